"""Certificates: obtaining, renewing and loading them; the room is empty until that lands."""
