"""The HTTPS face (MTA-STS policy, autoconfig) and the HTTP send API; the room is empty until that lands."""
