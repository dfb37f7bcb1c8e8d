"""DKIM: keys, signing (and the verification helpers inbound checks build on)."""
