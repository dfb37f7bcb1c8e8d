"""homemx backend: the home MTA (asyncio: aiosmtpd listeners, durable queue, delivery, Maildir)."""
