"""The durable queue: its records (model), the SQLite store (store, with schema, reads, the group-commit writer and spooled bodies) and the runner that schedules attempts."""
