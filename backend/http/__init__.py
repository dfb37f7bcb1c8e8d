"""The home's web face (issue 14), behind the gateway's 80/443 passthrough: ``server.py`` (listeners,
PROXY v2, TLS at home, limits), ``routes.py`` (what is answered: MTA-STS policy, autoconfig,
autodiscover, ACME HTTP-01, the redirect to https), ``clientconfig.py`` (the mail-client documents)."""
