"""Shared fixtures: real redis-server processes started by the tests, small engines, synthetic images."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from broker.server import RedisServer


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


SMALL_SIZE = 64  # px: logic tests use small images and a width-8 U-Net


@pytest.fixture(scope="session")
def small_engine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A width-8 U-Net (fixed seed, untrained) exported to ONNX at 64x64, batch 1..8, metadata beside it."""
    import torch

    from toolchain.export import export_onnx
    from engines.unet import UNet, UNetConfig

    torch.manual_seed(0)
    model = UNet(UNetConfig(width=8)).eval()
    path = tmp_path_factory.mktemp("engine") / "unet_w8_64.onnx"
    export_onnx(model, path, height=SMALL_SIZE, width=SMALL_SIZE, max_batch=8)
    return path


def write_synthetic_images(folder: Path, count: int, size: int = SMALL_SIZE, seed: int = 0) -> list[Path]:
    """Write `count` synthetic microscopy PNGs (and their masks under folder/../truth) and return the image paths."""
    from PIL import Image

    from toolchain.synth import generate

    folder.mkdir(parents=True, exist_ok=True)
    truth = folder.parent / f"{folder.name}_truth"
    truth.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, (image, mask) in enumerate(generate(count, size=size, seed=seed)):
        path = folder / f"img_{index:03d}.png"
        Image.fromarray(image).save(path)
        Image.fromarray(mask * 255).save(truth / path.name)
        paths.append(path)
    return paths
