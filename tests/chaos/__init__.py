"""Chaos and fuzz tooling: clients that vanish at every SMTP step, a recording sink, SMTP and PROXY v2 mutators, and the CI tests built on them."""
