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
from urllib.parse import unquote, urlsplit, urlunsplit

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
    """`redis://user:secret@host:6379/0` -> `redis://user:***@host:6379/0`; URLs without a password unchanged.

    Never raises: a URL that urlsplit refuses (say, an unclosed IPv6 bracket) has everything between
    `://` and its last `@` hidden (`redis://***@[::1/0`). The port is never parsed here, so a bad
    one is shown as written (`redis://:***@host:notaport/0`).
    """
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
    except ValueError:
        return _redact_unparsed(url)
    userinfo, _, hostport = parts.netloc.rpartition("@")
    netloc = f"{userinfo.partition(':')[0]}:***@{hostport}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _redact_unparsed(url: str) -> str:
    """Hide everything between `://` and the last `@` of a URL that urlsplit refuses."""
    scheme, separator, rest = url.partition("://")
    if not separator or "@" not in rest:
        return url
    return f"{scheme}://***@{rest.rpartition('@')[2]}"


def _passwords(url: str) -> list[str]:
    """The URL's password as written and percent-decoded (as redis-py sends it), longest first; [] if none."""
    try:
        password = urlsplit(url).password
    except ValueError:
        userinfo = url.partition("://")[2].rpartition("@")[0]
        password = userinfo.partition(":")[2] or None
    if not password:
        return []
    return sorted({password, unquote(password)}, key=len, reverse=True)


def _detail(exc: Exception, url: str) -> str:
    """The error's text on one line, with the URL's password (if it appears) replaced by `***`."""
    message = str(exc)
    for password in _passwords(url):
        message = message.replace(password, "***")
    return " ".join(message.split())


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
    """An open, checked connection (raw bytes, as rq needs).

    Raises BrokerUnavailable, with a one-line message that names the URL with its password hidden,
    if the URL is malformed, Redis doesn't answer, or it refuses the connection.
    """
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
        raise BrokerUnavailable(f"cannot reach Redis at {settings.describe()}: {_detail(exc, url)}") from None
    except redis.RedisError as exc:  # answered, but refused (e.g. a database number out of range)
        raise BrokerUnavailable(f"Redis at {settings.describe()} refused the connection: {_detail(exc, url)}") from None
    except ValueError as exc:  # malformed URL
        raise BrokerUnavailable(f"bad Redis URL {redact(url)}: {_detail(exc, url)}") from None
    return client
