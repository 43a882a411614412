"""The worker pool: `worker run --device cpu,cpu` supervises two real workers against a real Redis.

A child SIGKILLed is restarted; SIGTERM drains every child and the pool exits 0 with all work done.
The supervisor's restart bound is tested on its own with children that always crash.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from broker.store import QueueStore
from tests.conftest import SMALL_SIZE, write_synthetic_images
from tests.helpers import log_events as events
from tests.helpers import wait_until
from worker.pool import ChildSpec, PoolSettings, WorkerPool

ROOT = Path(__file__).resolve().parents[2]


def test_pool_restarts_a_killed_child_and_drains_on_sigterm(tmp_path, redis_url, queue_name, small_engine, client):
    log = tmp_path / "logs" / "worker.log"
    common = ["--redis-url", redis_url, "--queue", queue_name]
    pool = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "run", "--engine", str(small_engine), "--device", "cpu,cpu",
         "--log-file", str(log), "--job-heartbeat-ttl", "5", "--maintenance-interval", "2", *common],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    logs = {label: log.with_name(f"worker.{label}.log") for label in ("cpu0", "cpu1")}
    pool_log = log.with_name("worker.pool.log")
    try:
        wait_until(lambda: all(events(f, "worker_ready") for f in logs.values()), 120, "both workers ready", pool)
        first = events(logs["cpu0"], "worker_ready")[0]["pid"]
        started = {e["child"]: e["pid"] for e in events(pool_log, "child_started")}
        assert started["cpu0"] == first and started["cpu1"] != first
        for pid in started.values():  # the URL (and any password in it) reaches them as REDIS_URL, not argv
            command_line = Path(f"/proc/{pid}/cmdline").read_bytes().decode()
            assert "--redis-url" not in command_line and redis_url not in command_line, command_line
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: len(events(logs["cpu0"], "worker_ready")) == 2, 120, "cpu0 restarted and ready", pool)
        assert events(pool_log, "child_died")[0]["child"] == "cpu0"
        assert events(logs["cpu0"], "worker_ready")[1]["pid"] != first

        images = tmp_path / "images"
        write_synthetic_images(images, 24)
        enq = subprocess.run([sys.executable, "-m", "producer", "enqueue", str(images), "--job-size", "2",
                              "--size", str(SMALL_SIZE), *common], cwd=ROOT, capture_output=True, text=True,
                             timeout=120)
        assert enq.returncode == 0, enq.stderr
        store = QueueStore(client, queue_name)
        wait_until(lambda: store.counts().done == 24, 120, "all 24 masks", pool)

        pool.send_signal(signal.SIGTERM)
        output, _ = pool.communicate(timeout=120)
    finally:
        if pool.poll() is None:
            pool.kill()
            pool.wait(timeout=30)
            for record in events(pool_log, "child_started"):
                try:
                    os.kill(record["pid"], signal.SIGKILL)
                except ProcessLookupError:
                    pass
    assert pool.returncode == 0, output
    assert "Traceback" not in output
    stopped = events(pool_log, "pool_stopped")
    assert stopped and stopped[0]["statuses"] == {"cpu0": 0, "cpu1": 0}
    assert all(events(f, "worker_stopped") for f in logs.values())
    done = sum(e["images"] for f in logs.values() for e in events(f, "worker_stopped"))
    assert done >= 24  # each image once (or more, after a retry); none lost
    assert store.counts().failed == 0


class _ListLog:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict]] = []

    def info(self, event: str, **kw) -> None:
        self.events.append((event, kw))

    warning = error = info


def test_restarts_are_bounded_and_a_setup_error_is_not_restarted():
    crash = [sys.executable, "-c", "import sys; sys.exit(3)"]
    setup_error = [sys.executable, "-c", "import sys; sys.exit(2)"]
    log = _ListLog()
    pool = WorkerPool([ChildSpec("a", "cpu", crash), ChildSpec("b", "cpu", setup_error)], log,
                      PoolSettings(max_restarts=2, restart_window_s=60, restart_delay_s=0.05, poll_interval_s=0.02))
    started = time.monotonic()
    assert pool.run() == 1
    assert time.monotonic() - started < 30
    names = [e for e, _ in log.events]
    assert names.count("child_died") == 2 and names.count("child_restart_limit") == 1
    assert [kw["child"] for e, kw in log.events if e == "child_started"].count("a") == 3
    assert [kw["child"] for e, kw in log.events if e == "child_setup_error"] == ["b"]
    assert log.events[-1][1]["statuses"] == {"a": 3, "b": 2}


def test_children_that_finish_end_the_pool_with_status_0():
    log = _ListLog()
    ok = [sys.executable, "-c", "pass"]
    assert WorkerPool([ChildSpec("a", "cpu", ok), ChildSpec("b", "cpu", ok)], log,
                      PoolSettings(poll_interval_s=0.02)).run() == 0
    assert [e for e, _ in log.events].count("child_finished") == 2
