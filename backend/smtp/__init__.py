"""Pure SMTP pieces with no I/O: paths (addresses), replies (codes and texts), message bytes."""
