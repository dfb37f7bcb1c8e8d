"""homemx gateway: the trio SMTP edge proxy on the VPS."""
