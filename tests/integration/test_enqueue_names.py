"""`producer enqueue` (the real command, a real redis-server) on a folder holding a file whose name is not UTF-8:
that file is rejected with one line, the rest is enqueued. Finding and decoding images: tests/unit/test_images.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.unit.test_images import raw_named_png, touch_png


def test_enqueue_rejects_a_non_utf8_name_and_enqueues_the_rest(tmp_path: Path, redis_url: str, queue_name: str) -> None:
    touch_png(tmp_path / "good.png")
    raw_named_png(tmp_path, b"caf\xe9.png")
    result = subprocess.run(
        [sys.executable, "-m", "producer", "enqueue", str(tmp_path), "--size", "16",
         "--redis-url", redis_url, "--queue", queue_name],
        cwd=Path(__file__).parents[2], capture_output=True, text=True, timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output
    assert f"rejected: {tmp_path}/caf\\xe9.png: file name is not valid UTF-8; rename it" in output
    assert "enqueued 1 images in 1 jobs" in output and "rejected 1" in output
