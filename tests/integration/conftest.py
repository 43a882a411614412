"""Fixtures of the integration tier: a real redis-server started by the tests, and the small ONNX engine."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from broker.server import RedisServer
from tests.conftest import SMALL_SIZE, free_port, tiny_unet


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server (AOF on) for the whole session, on a free port, data in a temp dir."""
    server = RedisServer(data_dir=tmp_path_factory.mktemp("redis"), port=free_port()).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session server's URL."""
    return redis_server.url


@pytest.fixture
def queue_name() -> str:
    """A fresh queue name per test, so tests sharing the server never see each other's jobs."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    """A raw-bytes client on the session server."""
    connection = redis.Redis.from_url(redis_url)
    yield connection
    connection.close()


@pytest.fixture(scope="session")
def small_engine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A width-8 U-Net (fixed seed, untrained) exported to ONNX at 64x64, batch 1..8, metadata beside it."""
    from toolchain.export import export_onnx

    path = tmp_path_factory.mktemp("engine") / "unet_w8_64.onnx"
    export_onnx(tiny_unet(), path, height=SMALL_SIZE, width=SMALL_SIZE, max_batch=8)
    return path
