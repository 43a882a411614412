"""The unit tier's rule, enforced: no redis-server, no child process, no network, no engine.

While the tests of tests/unit run, starting a `RedisServer`, any child process (subprocess, multiprocessing,
os.fork/system/posix_spawn), a TCP connection, an ONNX Runtime session, an ONNX or torch.export export, or
torch.compile raises `UnitTierViolation`; a test during which one was attempted fails even if it caught the
error. Such a test belongs in tests/integration (tests/README.md).
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest


class UnitTierViolation(RuntimeError):
    """A unit test tried to start a process, open a connection or build/load an engine."""


def _blocker(what: str, attempts: list[str]) -> Callable[..., Any]:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        attempts.append(what)
        raise UnitTierViolation(f"{what} in a unit test: move the test to tests/integration (tests/README.md)")

    return refuse


def _tcp_only(what: str, real: Callable[..., Any], attempts: list[str]) -> Callable[..., Any]:
    """`socket.connect`/`connect_ex` refused for TCP (IPv4/IPv6); local Unix sockets stay allowed."""
    refuse = _blocker(what, attempts)

    def connect(sock: socket.socket, address: Any) -> Any:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            return refuse()
        return real(sock, address)

    return connect


@pytest.fixture(scope="package", autouse=True)
def unit_tier_attempts() -> Iterator[list[str]]:
    """For the whole unit package: what each forbidden call would have done is refused and recorded here."""
    import _posixsubprocess

    import onnxruntime
    import torch
    import torch.export
    import torch.onnx

    from broker.server import RedisServer

    attempts: list[str] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(RedisServer, "start", _blocker("starting a redis-server", attempts))
        patch.setattr(subprocess.Popen, "_execute_child", _blocker("starting a subprocess", attempts))
        patch.setattr(_posixsubprocess, "fork_exec", _blocker("starting a child process", attempts))
        for name in ("fork", "system", "posix_spawn", "posix_spawnp"):
            if hasattr(os, name):
                patch.setattr(os, name, _blocker(f"os.{name}", attempts))
        patch.setattr(socket.socket, "connect", _tcp_only("a TCP connection", socket.socket.connect, attempts))
        patch.setattr(socket.socket, "connect_ex", _tcp_only("a TCP connection", socket.socket.connect_ex, attempts))
        patch.setattr(onnxruntime.InferenceSession, "__init__", _blocker("an ONNX Runtime session", attempts))
        patch.setattr(torch.onnx, "export", _blocker("torch.onnx.export", attempts))
        patch.setattr(torch.export, "export", _blocker("torch.export.export", attempts))
        patch.setattr(torch, "compile", _blocker("torch.compile", attempts))
        yield attempts


@pytest.fixture(autouse=True)
def no_forbidden_call(unit_tier_attempts: list[str]) -> Iterator[None]:
    """Fail the test if it attempted a forbidden call, even one whose UnitTierViolation it caught."""
    before = len(unit_tier_attempts)
    yield
    attempted = unit_tier_attempts[before:]
    assert not attempted, f"unit test attempted: {', '.join(dict.fromkeys(attempted))} (tests/README.md)"
