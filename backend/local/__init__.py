"""Local delivery: Maildir for Dovecot."""
