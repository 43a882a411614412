"""Connecting to Redis: a URL given by the user, or the embedded server shared by every process on the machine.

No `--redis-url` and no `REDIS_URL` means the embedded broker: a redis-server (AOF on) with its data
and unix socket under the state directory (`SEGQUEUE_STATE_DIR`, default `~/.local/state/segqueue`).
The first process that needs it starts it, detached, under a file lock; later processes reuse it.

A production Redis is reached with a URL that may carry an ACL user and its password
(`redis://segqueue:PASSWORD@host:6379/0`; the user's rules are `LEAST_PRIVILEGE_ACL`) and TLS
(`rediss://...?ssl_ca_certs=/path/ca.pem`, redis-py's own URL argument; `ssl_certfile` and
`ssl_keyfile` add a client certificate). Every message names the URL through `redact`, so the
password (in the URL's user part, or as a `password` / `ssl_password` query argument) never
reaches a log or an error.
"""

from __future__ import annotations

import fcntl
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

import redis

from broker.errors import BrokerUnavailable
from broker.server import RedisServer, ping

DEFAULT_QUEUE = "segment"
SOCKET_TIMEOUT_S = 30.0  # every Redis call returns or fails within this (blocking pops use less)

# The least-privilege ACL user for every segqueue process (producer enqueue/status/collect, worker),
# as a line of a Redis ACL file (`aclfile`); `ACL SETUSER` takes the same rules after `user`.
# Replace CHANGE-ME with the password (or the password's SHA-256 as `#<hex>`).
# Keys: segqueue's own `segq:*` and rq's `rq:*`. Pub/sub: only the channels rq's workers listen on
# (`rq:pubsub:<worker>`; Redis 6.2 allows every channel unless told `resetchannels`). Commands: those
# seen with MONITOR while `producer enqueue` (also with --out and --max-pending), `worker run`
# (--burst, a SIGTERM drain, a SIGKILLed worker's jobs recovered by another's maintenance, per-image
# and whole-job failures, an rq retry, garbled and vanished jobs), `producer status` and
# `producer collect --delete` ran, and nothing else (GET and TTL: the worker's maintenance, see
# worker/rq_source.py). INFO is allowed for its `server` section only
# (rq reads the version there; Redis 7 logs that first-argument rule as deprecated). AUTH and HELLO
# need no rule. Left out on purpose:
# - CLIENT SETINFO and CLIENT MAINT_NOTIFICATIONS, which redis-py tries on every new connection and
#   does without when refused (Redis 7.0 rejects rules naming them; newer servers log the refusal
#   in ACL LOG, one entry counting the connections);
# - SELECT: add `+select` if the URL names a database other than 0;
# - SCAN (QueueStore.record_counts, for checks and tests) and MEMORY USAGE (tests' own measurements);
# - whatever `rq info` or a dashboard needs: give those their own user.
# tests/integration/test_redis_security.py runs the commands as this user on every redis-server it finds.
LEAST_PRIVILEGE_ACL = (
    "user segqueue on >CHANGE-ME resetkeys ~segq:* ~rq:* resetchannels &rq:pubsub:* -@all"
    " +ping +info|server +client|setname +client|info"
    " +multi +exec +watch +unwatch +subscribe +unsubscribe"
    " +time +exists +del +expire +persist +set +get +ttl"
    " +hset +hget +hgetall +hmget +hdel +hexists +hlen +hincrby +hincrbyfloat"
    " +sadd +srem +scard +sismember +smismember +smembers"
    " +rpush +llen +lrange +lrem +lmove +blmove"
    " +zadd +zrem +zcard +zrange +zrangebyscore +zremrangebyscore +xadd"
)

_SECRET_QUERY_ARGUMENTS = ("password", "ssl_password")  # redis-py reads both from a URL's query
_TLS_FILE_ARGUMENTS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")


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
    def resolve(cls, redis_url: str | None, queue: str | None, state_dir: Path | None = None) -> BrokerSettings:
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
        password = parts.password
    except ValueError:
        return _redact_unparsed(url)
    query = _redact_query(parts.query)
    if password is None and query == parts.query:
        return url
    netloc = parts.netloc
    if password is not None:
        userinfo, _, hostport = parts.netloc.rpartition("@")
        netloc = f"{userinfo.partition(':')[0]}:***@{hostport}"
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _redact_query(query: str) -> str:
    """A URL query with the values of `password` and `ssl_password` replaced by `***`."""
    names = "|".join(_SECRET_QUERY_ARGUMENTS)
    return re.sub(rf"(^|&)((?:{names})=)[^&]*", r"\1\2***", query)


def _redact_unparsed(url: str) -> str:
    """Hide everything between `://` and the last `@` of a URL that urlsplit refuses."""
    scheme, separator, rest = url.partition("://")
    if not separator or "@" not in rest:
        return url
    return f"{scheme}://***@{rest.rpartition('@')[2]}"


def _passwords(url: str) -> list[str]:
    """The URL's secrets (its password, and `password` / `ssl_password` query values) as written and
    percent-decoded (as redis-py sends them), longest first; [] if none."""
    try:
        parts = urlsplit(url)
        secrets = [parts.password or ""]
        query = parts.query
    except ValueError:
        userinfo = url.partition("://")[2].rpartition("@")[0]
        secrets = [userinfo.partition(":")[2]]
        query = url.partition("?")[2]
    secrets += [value for name, value in _query_arguments(query) if name in _SECRET_QUERY_ARGUMENTS]
    found = {form for secret in secrets if secret for form in (secret, unquote(secret))}
    return sorted(found, key=len, reverse=True)


def _query_arguments(query: str) -> list[tuple[str, str]]:
    """(name, raw value) of each argument of a URL query, values not percent-decoded."""
    return [(name, value) for name, _, value in (part.partition("=") for part in query.split("&") if part)]


def check_url_options(url: str) -> None:
    """Refuse, with a ValueError saying what to fix, TLS arguments that cannot work: `ssl_*` query
    arguments on a URL that is not `rediss://`, and `ssl_ca_certs` / `ssl_certfile` / `ssl_keyfile`
    files that do not exist (redis-py would report those as a failed connection)."""
    parts = urlsplit(url)
    arguments = dict(parse_qsl(parts.query))
    tls_arguments = sorted(name for name in arguments if name.startswith("ssl_"))
    if tls_arguments and parts.scheme != "rediss":
        raise ValueError(f"TLS arguments ({', '.join(tls_arguments)}) need a rediss:// URL, not {parts.scheme}://")
    for name in _TLS_FILE_ARGUMENTS:
        if name in arguments and not Path(arguments[name]).is_file():
            raise ValueError(f"{name} file {arguments[name]} not found")


def _detail(exc: Exception, url: str) -> str:
    """The error's text on one line, with the URL's password (if it appears) replaced by `***`."""
    message = str(exc)
    for password in _passwords(url):
        message = message.replace(password, "***")
    return " ".join(message.split())


#: the command that stops the embedded broker (producer/cli.py)
STOP_COMMAND = "producer redis stop"


def _announce_on_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _embedded(state_dir: Path) -> RedisServer:
    """The embedded broker's server object for `state_dir` (unix socket, detached); nothing is started."""
    return RedisServer(data_dir=state_dir, unix_socket=state_dir / "redis.sock", detach=True)


def embedded_server(state_dir: Path, announce: Callable[[str], None] = _announce_on_stderr) -> RedisServer:
    """The embedded broker for `state_dir`, started (detached) if it is not running yet.

    The process that starts it says so through `announce` (one line on stderr by default), at once,
    so the line is there even if the command then fails: the server outlives the command.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    server = _embedded(state_dir)
    with open(state_dir / "redis.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not ping(server.url):
            (state_dir / "redis.sock").unlink(missing_ok=True)  # a stale socket of a server that died
            server.start()
            announce(f"started the embedded Redis (unix socket {server.unix_socket}, data in {state_dir}); "
                     f"it keeps running for the next commands; stop it with `{STOP_COMMAND}`")
    return server


def stop_embedded_server(state_dir: Path, timeout_s: float = 30.0) -> bool:
    """Stop the embedded broker of `state_dir` (SHUTDOWN: the AOF is flushed first); False if it was not running.

    BrokerUnavailable if it is still answering after timeout_s seconds.
    """
    if not state_dir.is_dir():
        return False
    server = _embedded(state_dir)
    with open(state_dir / "redis.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # no other command starts it meanwhile
        if not ping(server.url):
            return False
        client = redis.Redis.from_url(server.url, socket_timeout=timeout_s)
        try:
            client.shutdown()
        except redis.ConnectionError:  # it went away before answering: what SHUTDOWN does
            pass
        finally:
            client.close()
        deadline = time.monotonic() + timeout_s
        while ping(server.url, timeout_s=0.5):
            if time.monotonic() > deadline:
                raise BrokerUnavailable(f"the embedded Redis in {state_dir} did not stop within {timeout_s:.0f} s")
            time.sleep(0.05)
    return True


def connect(settings: BrokerSettings) -> redis.Redis:
    """An open, checked connection (raw bytes, as rq needs).

    Raises BrokerUnavailable, with a one-line message that names the URL with its password hidden,
    if the URL is malformed, Redis doesn't answer, or it refuses the connection.
    """
    url = settings.redis_url or embedded_server(settings.state_dir).url
    try:
        check_url_options(url)
        client = redis.Redis.from_url(
            url,
            socket_timeout=SOCKET_TIMEOUT_S,
            socket_connect_timeout=10,
            health_check_interval=30,
        )
        client.ping()
    except redis.AuthenticationError as exc:  # wrong user or password (a ConnectionError to redis-py)
        raise BrokerUnavailable(f"Redis at {settings.describe()} refused the login: {_detail(exc, url)}") from None
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        raise BrokerUnavailable(
            f"cannot reach Redis at {settings.describe()}: {_tls_hint(_detail(exc, url))}"
        ) from None
    except redis.RedisError as exc:  # answered, but refused (e.g. a database number out of range)
        raise BrokerUnavailable(f"Redis at {settings.describe()} refused the connection: {_detail(exc, url)}") from None
    except ValueError as exc:  # malformed URL
        raise BrokerUnavailable(f"bad Redis URL {redact(url)}: {_detail(exc, url)}") from None
    except TypeError as exc:  # a query argument that redis-py's connection does not take
        unknown = re.search(r"unexpected keyword argument '([^']+)'", str(exc))
        detail = f"unknown argument {unknown.group(1)!r}" if unknown else _detail(exc, url)
        raise BrokerUnavailable(f"bad Redis URL {redact(url)}: {detail}") from None
    return client


def _tls_hint(detail: str) -> str:
    """A failed certificate check's message, with what to do about it appended."""
    if "CERTIFICATE_VERIFY_FAILED" not in detail:
        return detail
    return (f"{detail} The server's TLS certificate was not accepted: ssl_ca_certs=FILE in the URL must name "
            "the CA certificate (PEM) that signed it, and the certificate must name the URL's host.")
