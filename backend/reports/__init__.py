"""Reports read and written for the operator: DMARC aggregate reports received (RFC 7489 7.2,
``dmarc``) and TLS-RPT reports sent (RFC 8460, ``tlsrpt``), both kept in ``reports.sqlite3`` in the
data directory (``db``)."""
