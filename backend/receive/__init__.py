"""Reception: the aiosmtpd protocol glue for every listener, reception policy, the AUTH limiter, the directory of local addresses and the users database."""
