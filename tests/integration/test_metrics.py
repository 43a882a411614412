"""worker/metrics.py: the HTTP endpoints for real, and a real worker scraped during a run (the counters alone:
tests/unit/test_metrics_counts.py)."""

from __future__ import annotations

import urllib.error
import urllib.request

from tests.helpers import FakeClock
from worker.metrics import WorkerMetrics
from worker.metrics_server import MetricsServer


def sample(metrics: WorkerMetrics, name: str, labels: dict[str, str] | None = None) -> float:
    value = metrics.registry.get_sample_value(name, labels or {})
    assert value is not None, f"no sample {name} {labels}"
    return value


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_endpoints_serve_metrics_readiness_and_liveness() -> None:
    clock = FakeClock()
    metrics = WorkerMetrics(liveness_timeout_s=5, clock=clock)
    server = MetricsServer(metrics, port=0, host="127.0.0.1")
    try:
        assert get(server.port, "/readyz")[0] == 503
        metrics.set_ready()
        assert get(server.port, "/readyz") == (200, "ready\n")
        assert get(server.port, "/livez")[0] == 200
        clock.now += 6
        status, body = get(server.port, "/livez")
        assert status == 503 and "stuck" in body
        status, body = get(server.port, "/metrics")
        assert status == 200 and "segqueue_ready 1.0" in body and "# TYPE segqueue_batch_size histogram" in body
        assert get(server.port, "/nope")[0] == 404
    finally:
        server.close()


def scrape_value(text: str, name: str) -> float:
    """A sample's value from Prometheus text ('name value' lines; labels included in name)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in the scrape")


def test_a_real_worker_is_scraped_during_a_real_run(tmp_path, redis_url, queue_name, small_engine) -> None:
    import subprocess
    import sys
    import time
    from pathlib import Path

    from tests.conftest import SMALL_SIZE, free_port, write_synthetic_images

    root = Path(__file__).resolve().parents[2]
    port = free_port()
    common = ["--redis-url", redis_url, "--queue", queue_name]
    worker = subprocess.Popen([sys.executable, "-m", "worker", "run", "--engine", str(small_engine), "--metrics-port",
                               str(port), *common], cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if get(port, "/readyz")[0] == 200:
                    break
            except OSError:
                pass  # not listening yet
            assert worker.poll() is None and time.monotonic() < deadline, "worker never became ready"
            time.sleep(0.1)
        write_synthetic_images(tmp_path / "in", 40)
        enq = subprocess.run([sys.executable, "-m", "producer", "enqueue", str(tmp_path / "in"), "--size",
                              str(SMALL_SIZE), "--job-size", "4", "--workers", "1", *common],
                             cwd=root, capture_output=True, text=True, timeout=120)
        assert enq.returncode == 0, enq.stderr
        seen = []
        while True:
            status, text = get(port, "/metrics")
            assert status == 200 and get(port, "/livez")[0] == 200
            seen.append(scrape_value(text, 'segqueue_images_total{outcome="ok"}'))
            if seen[-1] >= 40 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert seen[-1] == 40 and seen == sorted(seen)
        assert scrape_value(text, "segqueue_jobs_total{outcome=\"finished\"}") == 10
        assert scrape_value(text, "segqueue_batch_size_sum") == 40
        assert scrape_value(text, "segqueue_end_to_end_seconds_count") == 40
        assert scrape_value(text, "segqueue_engine_busy_seconds_total") > 0
        assert 0 < scrape_value(text, "segqueue_engine_busy_share") <= 1
        assert scrape_value(text, "segqueue_queue_depth") == 0
    finally:
        worker.terminate()
        worker.wait(timeout=60)
