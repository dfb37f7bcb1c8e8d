"""The durable queue: the store (SQLite, group commit, spooled bodies) and the runner that schedules attempts."""
