"""Engine pinning's hash check: `file_sha256` and `verify_sha256` on the committed demo engine and small files.

The worker's `--engine-sha256` / SEGQUEUE_ENGINE_SHA256 run for real in tests/integration/test_engine_pinning.py."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from engines import DEMO_ONNX
from engines.base import EngineError
from engines.loader import file_sha256, verify_sha256

DEMO_SHA256 = hashlib.sha256(DEMO_ONNX.read_bytes()).hexdigest()


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
