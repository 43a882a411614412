"""The readiness probe's view of Redis: a PING on a client of its own, with short timeouts, cached briefly.

Its own connection pool: a probe never waits behind the worker's long Redis calls (blocking claims, big
pipelines) and never uses up a connection they need. Answers are cached for `cache_s` so that frequent
probes and scrapes cost at most one PING per period.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import redis


def probe_client(client: redis.Redis, timeout_s: float) -> redis.Redis:
    """A client to the same Redis as `client` (same URL, password, TLS), with `timeout_s` socket timeouts."""
    pool = client.connection_pool
    kwargs = {**pool.connection_kwargs, "socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
    kwargs.pop("health_check_interval", None)
    return redis.Redis(connection_pool=redis.ConnectionPool(connection_class=pool.connection_class, max_connections=2,
                                                            **kwargs))


class RedisProbe:
    """`problem()`: None while Redis answers PING within timeout_s, else a one-line reason (no password in it)."""

    def __init__(self, client: redis.Redis, timeout_s: float = 1.0, cache_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.client = probe_client(client, timeout_s)
        self.cache_s = cache_s
        self.clock = clock
        self._lock = threading.Lock()
        self._checked_at = float("-inf")
        self._problem: str | None = None

    def problem(self) -> str | None:
        """Why Redis is unusable now, or None."""
        with self._lock:
            if self.clock() - self._checked_at >= self.cache_s:
                self._problem = self._ping()
                self._checked_at = self.clock()
            return self._problem

    def _ping(self) -> str | None:
        try:
            self.client.ping()
        except redis.RedisError as exc:
            return type(exc).__name__  # redis-py's messages can name the host; the type says enough for a probe
        return None

    def close(self) -> None:
        """Release the probe's connections."""
        self.client.close()
