"""Inbound verification (SPF, DKIM, DMARC, ARC, spam checks): receive calls it; the room is empty until that lands."""
