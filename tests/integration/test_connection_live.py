"""broker.connection against a real redis-server, a closed port and the real CLI: one-line errors, no password."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from broker.server import RedisServer
from tests.conftest import free_port
from tests.unit.test_connection import BAD_PORT_URL, connect_error

ROOT = Path(__file__).parents[2]


def test_unreachable_redis_names_the_url_without_the_password() -> None:
    port = free_port()
    message = connect_error(f"redis://:secret@127.0.0.1:{port}/0")
    assert message.startswith(f"cannot reach Redis at redis://:***@127.0.0.1:{port}/0: ")
    assert "refused" in message.lower()


def test_redis_that_refuses_the_database_is_a_one_line_error(redis_server: RedisServer) -> None:
    message = connect_error(f"redis://:secret@127.0.0.1:{redis_server.port}/99")
    assert message == (
        f"Redis at redis://:***@127.0.0.1:{redis_server.port}/99 refused the connection: DB index is out of range"
    )


def test_cli_prints_one_error_line_for_a_malformed_url() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "producer", "status", "--redis-url", BAD_PORT_URL],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        "error: bad Redis URL redis://:***@127.0.0.1:notaport/0: Port could not be cast to integer value as 'notaport'"
    ]
    assert "Traceback" not in result.stdout + result.stderr
    assert "secret" not in result.stdout + result.stderr


def test_a_password_in_the_query_never_reaches_the_message() -> None:
    port = free_port()
    message = connect_error(f"redis://127.0.0.1:{port}/0?password=secret")
    assert message.startswith(f"cannot reach Redis at redis://127.0.0.1:{port}/0?password=***: ")
