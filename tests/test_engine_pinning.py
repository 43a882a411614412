"""Engine pinning: `verify_sha256` and `worker run --engine-sha256` / SEGQUEUE_ENGINE_SHA256 with the
committed demo engine, through the real `python -m worker run --burst` command and a real redis-server."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from broker.store import QueueStore
from engines import DEMO_ONNX
from engines.base import EngineError
from engines.loader import file_sha256, verify_sha256
from tests.conftest import write_synthetic_images

ROOT = Path(__file__).parents[1]
DEMO_SHA256 = hashlib.sha256(DEMO_ONNX.read_bytes()).hexdigest()
WRONG = "0" * 64


def test_file_sha256_is_sha256sum(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"segqueue" * 100_000)
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert file_sha256(DEMO_ONNX) == DEMO_SHA256


def test_verify_sha256_accepts_the_right_hash_in_any_case():
    assert verify_sha256(DEMO_ONNX, DEMO_SHA256) == DEMO_SHA256
    assert verify_sha256(DEMO_ONNX, f" {DEMO_SHA256.upper()}\n") == DEMO_SHA256


def test_verify_sha256_refuses_another_file_naming_it_and_both_hashes(tmp_path):
    tampered = tmp_path / "unet_w16.onnx"
    shutil.copy(DEMO_ONNX, tampered)
    shutil.copy(DEMO_ONNX.with_name(DEMO_ONNX.name + ".json"), tmp_path)
    with tampered.open("ab") as file:
        file.write(b"\0")
    with pytest.raises(EngineError) as excinfo:
        verify_sha256(tampered, DEMO_SHA256)
    assert str(excinfo.value) == (f"{tampered}: SHA-256 is {file_sha256(tampered)}, expected {DEMO_SHA256}; "
                                  "refusing to load an engine file that is not the pinned one")


def test_verify_sha256_hashes_the_engine_file_alone(tmp_path):
    """The metadata JSON beside an .onnx file is data, not code: changing it does not change the pin."""
    engine = tmp_path / "unet_w16.onnx"
    shutil.copy(DEMO_ONNX, engine)
    meta = json.loads(DEMO_ONNX.with_name(DEMO_ONNX.name + ".json").read_text())
    (tmp_path / "unet_w16.onnx.json").write_text(json.dumps({**meta, "note": "edited"}))
    assert verify_sha256(engine, DEMO_SHA256) == DEMO_SHA256


@pytest.mark.parametrize("expected", ["", "abc", "g" * 64, DEMO_SHA256 + "0", f"sha256:{DEMO_SHA256}"])
def test_verify_sha256_refuses_a_malformed_expected_hash(expected):
    with pytest.raises(EngineError, match="is not 64 hex digits"):
        verify_sha256(DEMO_ONNX, expected)


def test_verify_sha256_of_a_missing_file_is_one_line(tmp_path):
    with pytest.raises(EngineError) as excinfo:
        verify_sha256(tmp_path / "gone.onnx", DEMO_SHA256)
    assert str(excinfo.value) == (f"{tmp_path / 'gone.onnx'}: cannot read the engine file to check its SHA-256: "
                                  "No such file or directory")


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


def test_worker_with_the_right_hash_runs(redis_url, queue_name, two_images):
    result = worker(redis_url, queue_name, "--engine-sha256", DEMO_SHA256)
    assert result.returncode == 0, result.stdout + result.stderr
    assert two_images.counts().done == 2


def test_worker_with_the_right_hash_from_the_environment_runs(redis_url, queue_name, two_images):
    result = worker(redis_url, queue_name, env={"SEGQUEUE_ENGINE_SHA256": DEMO_SHA256.upper()})
    assert result.returncode == 0, result.stdout + result.stderr
    assert two_images.counts().done == 2


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


def test_worker_pool_children_get_the_pin(redis_url, queue_name, two_images, tmp_path):
    """A pool (`--device cpu,cpu`) passes --engine-sha256 on: a wrong pin is a setup error in each child."""
    result = worker(redis_url, queue_name, "--engine-sha256", WRONG, "--device", "cpu,cpu",
                    "--log-file", str(tmp_path / "w.log"))
    assert result.returncode != 0
    pool_log = (tmp_path / "w.pool.log").read_text()
    assert pool_log.count('"child_setup_error"') == 2, pool_log
    assert two_images.counts().done == 0
