"""DNS: the records to publish, the live installation check and the parsers it shares."""
