"""Reusable test topology: network namespaces, real DNS server, real peers."""
