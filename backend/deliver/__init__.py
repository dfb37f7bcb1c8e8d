"""Delivery to other hosts: MX resolution and the SMTP transaction, TLS policy and MTA-STS, outbound signing, DSNs."""
