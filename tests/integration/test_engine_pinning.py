"""Engine pinning: `worker run --engine-sha256` / SEGQUEUE_ENGINE_SHA256 with the committed demo engine, through
the real `python -m worker run --burst` command and a real redis-server (the hash check alone:
tests/unit/test_engine_sha256.py)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from broker.store import QueueStore
from engines import DEMO_ONNX
from tests.conftest import write_synthetic_images

ROOT = Path(__file__).parents[2]
DEMO_SHA256 = hashlib.sha256(DEMO_ONNX.read_bytes()).hexdigest()
WRONG = "0" * 64


def worker(redis_url: str, queue: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m worker run --engine <demo> --burst ...` on `queue`, to completion."""
    return subprocess.run(
        [sys.executable, "-m", "worker", "run", "--engine", str(DEMO_ONNX), "--burst", "--max-batch", "2",
         "--redis-url", redis_url, "--queue", queue, *args],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})},
    )


@pytest.fixture
def two_images(tmp_path, redis_url, queue_name, client) -> QueueStore:
    """Two 512x512 images enqueued on the queue through `producer enqueue`; returns its store."""
    write_synthetic_images(tmp_path / "in", 2, size=512)
    enq = subprocess.run([sys.executable, "-m", "producer", "enqueue", str(tmp_path / "in"), "--workers", "1",
                          "--redis-url", redis_url, "--queue", queue_name],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert enq.returncode == 0, enq.stderr
    return QueueStore(client, queue_name)


@pytest.mark.slow  # full size: the 512 px demo engine
def test_worker_with_the_right_hash_runs(redis_url, queue_name, two_images):
    result = worker(redis_url, queue_name, "--engine-sha256", DEMO_SHA256)
    assert result.returncode == 0, result.stdout + result.stderr
    assert two_images.counts().done == 2


@pytest.mark.slow  # full size: the 512 px demo engine
def test_worker_with_the_right_hash_from_the_environment_runs(redis_url, queue_name, two_images):
    result = worker(redis_url, queue_name, env={"SEGQUEUE_ENGINE_SHA256": DEMO_SHA256.upper()})
    assert result.returncode == 0, result.stdout + result.stderr
    assert two_images.counts().done == 2


@pytest.mark.slow  # full size: the 512 px demo engine
@pytest.mark.parametrize("where", ["option", "environment"])
def test_worker_with_a_wrong_hash_exits_2_with_one_line_and_touches_nothing(redis_url, queue_name, two_images,
                                                                              where):
    args, env = (["--engine-sha256", WRONG], None) if where == "option" else ([], {"SEGQUEUE_ENGINE_SHA256": WRONG})
    result = worker(redis_url, queue_name, *args, env=env)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"error: {DEMO_ONNX}: SHA-256 is {DEMO_SHA256}, expected {WRONG}; "
        "refusing to load an engine file that is not the pinned one"
    ]
    assert "Traceback" not in result.stdout + result.stderr
    assert "worker_started" not in result.stdout + result.stderr  # the engine was never loaded
    assert two_images.counts().done == 0


@pytest.mark.slow  # full size: the 512 px demo engine
def test_worker_pool_children_get_the_pin(redis_url, queue_name, two_images, tmp_path):
    """A pool (`--device cpu,cpu`) passes --engine-sha256 on: a wrong pin is a setup error in each child."""
    result = worker(redis_url, queue_name, "--engine-sha256", WRONG, "--device", "cpu,cpu",
                    "--log-file", str(tmp_path / "w.log"))
    assert result.returncode != 0
    pool_log = (tmp_path / "w.pool.log").read_text()
    assert pool_log.count('"child_setup_error"') == 2, pool_log
    assert two_images.counts().done == 0
