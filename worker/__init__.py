"""The GPU/CPU worker: claims rq jobs, batches their images across jobs, runs an engine, writes masks."""
