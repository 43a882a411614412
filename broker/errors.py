"""The project's error hierarchy for everything outside the engines (those raise engines.EngineError).

Errors are translated at the edges (Redis, files, CUDA) into these, and the CLIs print their message
as one line, without a traceback.
"""


class SegqueueError(Exception):
    """Base of every error this project raises on purpose; its message is meant for the user."""


class BrokerUnavailable(SegqueueError):
    """Redis cannot be reached (the message names the URL with its password hidden)."""


class BadJob(SegqueueError):
    """A job's arguments are not what `producer enqueue` writes: the job fails with this reason."""
