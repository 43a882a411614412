"""Connecting to Redis: a URL given by the user, or the embedded server shared by every process on the machine.

No `--redis-url` and no `REDIS_URL` means the embedded broker: a redis-server (AOF on) with its data
and unix socket under the state directory (`SEGQUEUE_STATE_DIR`, default `~/.local/state/segqueue`).
The first process that needs it starts it, detached, under a file lock; later processes reuse it.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import redis

from broker.errors import BrokerUnavailable
from broker.server import RedisServer, ping

DEFAULT_QUEUE = "segment"
SOCKET_TIMEOUT_S = 30.0  # every Redis call returns or fails within this (blocking pops use less)


def default_state_dir() -> Path:
    """Where the embedded broker keeps its data: $SEGQUEUE_STATE_DIR or ~/.local/state/segqueue."""
    env = os.environ.get("SEGQUEUE_STATE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "segqueue"


@dataclass(frozen=True)
class BrokerSettings:
    """Which Redis to use and which queue on it. `redis_url=None` selects the embedded server."""

    redis_url: str | None = None
    queue: str = DEFAULT_QUEUE
    state_dir: Path = Path()

    @classmethod
    def resolve(cls, redis_url: str | None, queue: str | None, state_dir: Path | None = None) -> "BrokerSettings":
        """Fill gaps from the environment: REDIS_URL, then the embedded default."""
        url = redis_url or os.environ.get("REDIS_URL") or None
        return cls(redis_url=url, queue=queue or DEFAULT_QUEUE, state_dir=state_dir or default_state_dir())

    def describe(self) -> str:
        """Where the broker is, safe for logs (passwords hidden)."""
        return redact(self.redis_url) if self.redis_url else f"embedded redis in {self.state_dir}"


def redact(url: str) -> str:
    """`redis://user:secret@host:6379/0` -> `redis://user:***@host:6379/0`; other URLs unchanged."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def embedded_server(state_dir: Path) -> RedisServer:
    """The embedded broker for `state_dir`, started (detached) if it is not running yet."""
    state_dir.mkdir(parents=True, exist_ok=True)
    server = RedisServer(data_dir=state_dir, unix_socket=state_dir / "redis.sock", detach=True)
    with open(state_dir / "redis.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not ping(server.url):
            server.unix_socket.unlink(missing_ok=True)
            server.start()
    return server


def connect(settings: BrokerSettings) -> redis.Redis:
    """An open, checked connection (raw bytes, as rq needs); BrokerUnavailable if Redis doesn't answer."""
    url = settings.redis_url or embedded_server(settings.state_dir).url
    try:
        client = redis.Redis.from_url(
            url,
            socket_timeout=SOCKET_TIMEOUT_S,
            socket_connect_timeout=10,
            health_check_interval=30,
        )
        client.ping()
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        raise BrokerUnavailable(f"cannot reach Redis at {settings.describe()}: {exc}") from None
    except ValueError as exc:  # malformed URL
        raise BrokerUnavailable(f"bad Redis URL {redact(url)}: {exc}") from None
    return client
