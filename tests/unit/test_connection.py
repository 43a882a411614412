"""broker.connection without a server: passwords hidden in every message, malformed URLs as one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.connection import BrokerSettings, connect, redact
from broker.errors import BrokerUnavailable
from tests.conftest import free_port

BAD_PORT_URL = "redis://:secret@127.0.0.1:notaport/0"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://user:secret@host:6379/0", "redis://user:***@host:6379/0"),
        ("rediss://:secret@host:6380/2", "rediss://:***@host:6380/2"),
        ("redis://:secret@[::1]:6379/0", "redis://:***@[::1]:6379/0"),
        ("redis://:se%40cret@host/0", "redis://:***@host/0"),
        ("redis://:a:secret@host/0", "redis://:***@host/0"),
        ("redis://host:6379/0", "redis://host:6379/0"),
        ("unix:///tmp/redis.sock", "unix:///tmp/redis.sock"),
        (BAD_PORT_URL, "redis://:***@127.0.0.1:notaport/0"),
        ("redis://user:secret@host:99999/0", "redis://user:***@host:99999/0"),
        ("redis://user:secret@[::1/0", "redis://***@[::1/0"),  # urlsplit refuses it: all userinfo hidden
        ("redis://user:sec@ret@[::1/0", "redis://***@[::1/0"),
        ("not a url", "not a url"),
        ("", ""),
        ("redis://host/0?password=secret", "redis://host/0?password=***"),  # redis-py reads it from the query too
        ("rediss://u:secret@host/0?ssl_ca_certs=/ca.pem&ssl_password=secret",
         "rediss://u:***@host/0?ssl_ca_certs=/ca.pem&ssl_password=***"),
        ("rediss://host/0?ssl_ca_certs=/ca.pem", "rediss://host/0?ssl_ca_certs=/ca.pem"),
    ],
)
def test_redact_hides_the_password_and_never_raises(url: str, shown: str) -> None:
    assert redact(url) == shown
    assert "sec" not in redact(url)


def connect_error(url: str) -> str:
    """The message of the BrokerUnavailable that connecting to `url` raises."""
    with pytest.raises(BrokerUnavailable) as excinfo:
        connect(BrokerSettings(redis_url=url))
    message = str(excinfo.value)
    assert "secret" not in message and "\n" not in message, message
    return message


def test_malformed_port_is_a_one_line_error_without_the_password() -> None:
    assert connect_error(BAD_PORT_URL) == (
        "bad Redis URL redis://:***@127.0.0.1:notaport/0: Port could not be cast to integer value as 'notaport'"
    )


def test_unparsable_url_is_a_one_line_error_without_the_password() -> None:
    assert connect_error("redis://user:secret@[::1/0") == "bad Redis URL redis://***@[::1/0: Invalid IPv6 URL"


def test_wrong_scheme_is_a_one_line_error_without_the_password() -> None:
    assert connect_error("http://:secret@127.0.0.1:6379/0").startswith(
        "bad Redis URL http://:***@127.0.0.1:6379/0: Redis URL must specify one of the following schemes"
    )


def test_tls_arguments_on_a_plain_url_are_a_one_line_error() -> None:
    assert connect_error("redis://:secret@127.0.0.1:6379/0?ssl_ca_certs=/ca.pem") == (
        "bad Redis URL redis://:***@127.0.0.1:6379/0?ssl_ca_certs=/ca.pem: "
        "TLS arguments (ssl_ca_certs) need a rediss:// URL, not redis://"
    )


def test_a_missing_ca_file_is_named_before_connecting(tmp_path: Path) -> None:
    missing = tmp_path / "ca.pem"
    assert connect_error(f"rediss://:secret@127.0.0.1:{free_port()}/0?ssl_ca_certs={missing}").endswith(
        f": ssl_ca_certs file {missing} not found"
    )


def test_an_unknown_url_argument_is_a_one_line_error() -> None:
    port = free_port()
    assert connect_error(f"rediss://:secret@127.0.0.1:{port}/0?ssl_ca_cert=/ca.pem") == (
        f"bad Redis URL rediss://:***@127.0.0.1:{port}/0?ssl_ca_cert=/ca.pem: unknown argument 'ssl_ca_cert'"
    )
