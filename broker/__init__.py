"""The Redis side shared by producer and worker: connection (or an embedded server), key layout, job schema."""
