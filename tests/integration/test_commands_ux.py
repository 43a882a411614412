"""What a user sees from the commands (issue 17): Ctrl-C during enqueue, silent waits, the embedded Redis
announced and stopped, `engines synth` keeping its exact masks apart from predictions, and clean --help.
Real commands as subprocesses, a real redis-server, real images."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from broker.jobs import segmentation_queue
from broker.server import ping
from broker.store import QueueStore
from producer.status import queue_status
from tests.conftest import SMALL_SIZE, write_synthetic_images
from tests.helpers import wait_until

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=env)


@pytest.mark.slow  # full size: the 512 px demo engine
def test_ctrl_c_during_enqueue_says_in_one_line_what_stays_queued(tmp_path, redis_url, client, queue_name):
    originals = write_synthetic_images(tmp_path / "orig", 8, size=512)
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(800):  # full-size files to decode: the run is still going when the signal comes
        (folder / f"img_{i:04d}.png").write_bytes(originals[i % 8].read_bytes())
    store = QueueStore(client, queue_name)
    run = subprocess.Popen([sys.executable, "-m", "producer", "enqueue", str(folder), "--workers", "2",
                            "--size", "384", "--redis-url", redis_url, "--queue", queue_name],
                           cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: store.counts().total >= 32 or run.poll() is not None, 120, "some images stored")
        assert run.poll() is None, "enqueue finished before it could be interrupted"
        run.send_signal(signal.SIGINT)
        stdout, stderr = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
    output = stdout + stderr
    assert run.returncode == 130, output
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output
    lines = [line for line in output.replace("\r", "\n").splitlines() if line.startswith("interrupted:")]
    assert len(lines) == 1, output
    found = re.search(r"interrupted: (\d+) images stored, (\d+) jobs queued", lines[0])
    assert found, lines[0]
    images, jobs = int(found.group(1)), int(found.group(2))
    assert 0 < images < 800 and jobs == -(-images // 8)
    status = queue_status(client, segmentation_queue(client, queue_name))
    assert (status.images.queued, status.jobs.queued) == (images, jobs)
    assert store.counts().total == images  # every stored image is in a job: nothing orphaned


def test_a_wait_with_no_worker_says_so_and_how_to_check(tmp_path, redis_url, queue_name):
    write_synthetic_images(tmp_path / "in", 6)
    result = cli("producer", "enqueue", str(tmp_path / "in"), "--out", str(tmp_path / "masks"), "--max-pending", "4",
                 "--stall-warning", "0.5", "--timeout", "3", "--workers", "1", "--size", str(SMALL_SIZE),
                 "--redis-url", redis_url, "--queue", queue_name)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "no worker seems to have taken a job" in output, output
    assert "producer status" in output and "worker run --engine" in output
    assert "Traceback" not in output


def test_the_enqueue_bar_has_a_total(tmp_path, redis_url, queue_name):
    write_synthetic_images(tmp_path / "in", 5)
    result = cli("producer", "enqueue", str(tmp_path / "in"), "--workers", "1", "--size", str(SMALL_SIZE),
                 "--redis-url", redis_url, "--queue", queue_name)
    assert result.returncode == 0, result.stderr
    assert "5/5" in result.stderr.replace("\r", "\n"), result.stderr


def test_embedded_redis_is_announced_even_when_the_command_fails_and_can_be_stopped(tmp_path):
    state = tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env.update(SEGQUEUE_STATE_DIR=str(state), HOME=str(tmp_path / "home"))
    socket_url = f"unix://{state / 'redis.sock'}"
    try:
        failed = cli("worker", "run", "--engine", str(tmp_path / "nope.onnx"), env=env)
        assert failed.returncode == 2 and "nope.onnx" in failed.stderr, failed.stderr
        announced = [line for line in failed.stderr.splitlines() if line.startswith("started the embedded Redis")]
        assert len(announced) == 1 and "producer redis stop" in announced[0] and str(state) in announced[0]
        assert ping(socket_url)
        again = cli("producer", "status", env=env)  # already running: not announced again
        assert again.returncode == 0 and "started the embedded Redis" not in again.stderr, again.stderr
        stopped = cli("producer", "redis", "stop", env=env)
        assert stopped.returncode == 0 and f"stopped the embedded Redis in {state}" in stopped.stdout, stopped.stderr
        assert not ping(socket_url)
        twice = cli("producer", "redis", "stop", env=env)
        assert twice.returncode == 0 and "is not running" in twice.stdout
    finally:
        pid_file = state / "redis.pid"
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text()), signal.SIGTERM)
            except ProcessLookupError:
                pass


def test_synth_keeps_the_exact_masks_out_of_the_readme_collect_folder(tmp_path):
    made = cli("toolchain.cli", "synth", str(tmp_path / "demo"), "--n", "2", "--size", "64")
    assert made.returncode == 0, made.stderr
    readme = (ROOT / "README.md").read_text()
    first = next(line for line in readme.splitlines() if "engines synth demo" in line)
    collect_out = re.search(r"producer collect --out demo/(\S+)", first).group(1)
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == ["images", "truth"]
    assert collect_out not in ("images", "truth")  # collect writes predictions apart from the truth
    assert len(list((tmp_path / "demo" / "truth").glob("*.png"))) == 2


def _help(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", *args, "--help"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "COLUMNS": "200", "TERM": "dumb"})
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_help_reads_cleanly():
    worker = _help("worker", "run")
    assert "cuda:<index>" in worker and "cuda::" not in worker
    enqueue = _help("producer", "enqueue")
    assert "Usage: producer enqueue [OPTIONS] PATHS..." in " ".join(enqueue.split())
    for text in (worker, enqueue, _help("producer"), _help("producer", "redis", "stop"),
                 _help("toolchain.cli", "synth")):
        assert "<bool>" not in text and "{" not in text and "<int" not in text and "<list" not in text, text
    assert re.search(r"--burst\s+Exit when the queue is empty", worker), worker
    assert re.search(r"--max-batch\s+INTEGER", worker), worker
    assert "engines evaluate" in (ROOT / "README.md").read_text()
