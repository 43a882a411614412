"""The producer: validate and decode images, store them in Redis, enqueue jobs; collect masks; report status."""
