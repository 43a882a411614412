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


def request(port: int, path: str, method: str = "GET", accept: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one HTTP request to 127.0.0.1:port."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                 headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as reply:
            return reply.status, dict(reply.headers), reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_endpoints_serve_metrics_readiness_and_liveness() -> None:
    clock = FakeClock()
    metrics = WorkerMetrics(liveness_timeout_s=5, clock=clock)
    server = MetricsServer(metrics, port=0, host="127.0.0.1")
    try:
        assert get(server.port, "/readyz") == (503, "engine loading\n")
        assert get(server.port, "/startupz")[0] == 503
        clock.now += 6
        assert get(server.port, "/livez")[0] == 200  # loading: alive however long it takes
        metrics.set_ready()
        assert get(server.port, "/readyz") == (200, "ready\n")
        assert get(server.port, "/startupz") == (200, "started\n")
        assert get(server.port, "/livez")[0] == 200
        clock.now += 6
        status, body = get(server.port, "/livez")
        assert status == 503 and "stuck" in body
        status, body = get(server.port, "/metrics")
        assert status == 200 and "segqueue_ready 1.0" in body and "# TYPE segqueue_batch_size histogram" in body
        assert get(server.port, "/nope")[0] == 404
    finally:
        server.close()


def test_head_and_openmetrics_negotiation() -> None:
    metrics = WorkerMetrics()
    server = MetricsServer(metrics, port=0, host="127.0.0.1")
    try:
        status, headers, body = request(server.port, "/metrics")
        assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
        assert "# EOF" not in body.decode() and int(headers["Content-Length"]) == len(body)
        status, headers, head_body = request(server.port, "/metrics", method="HEAD")
        assert status == 200 and head_body == b"" and headers["Content-Type"].startswith("text/plain")
        assert int(headers["Content-Length"]) > 0
        status, headers, body = request(server.port, "/metrics", accept="application/openmetrics-text; version=1.0.0")
        assert status == 200 and headers["Content-Type"].startswith("application/openmetrics-text")
        assert body.decode().rstrip().endswith("# EOF")
        assert request(server.port, "/readyz", method="HEAD")[:1] == (503,)
        assert request(server.port, "/livez", method="HEAD")[0] == 200
        assert request(server.port, "/metrics", method="POST")[0] == 405
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


def test_a_real_worker_probes_through_a_slow_load_and_a_redis_outage(tmp_path, small_engine) -> None:
    """A real `worker run --metrics-port` on its own redis-server: the engine's metadata file is a FIFO the test
    writes only after watching the probes for twice --liveness-timeout (a slow engine load), then Redis is
    killed and restarted from its AOF."""
    import os
    import shutil
    import subprocess
    import sys
    import time
    from pathlib import Path

    from broker.server import RedisServer
    from tests.conftest import free_port
    from tests.helpers import wait_until

    root = Path(__file__).resolve().parents[2]
    engine = tmp_path / "engine" / small_engine.name
    engine.parent.mkdir()
    shutil.copy(small_engine, engine)
    meta = Path(str(engine) + ".json")
    os.mkfifo(meta)  # the worker's read of the metadata blocks until the test writes it
    server = RedisServer(data_dir=tmp_path / "redis", port=free_port()).start()
    port = free_port()
    worker = subprocess.Popen([sys.executable, "-m", "worker", "run", "--engine", str(engine), "--metrics-port",
                               str(port), "--liveness-timeout", "1", "--redis-url", server.url, "--queue", "probes",
                               "--decode-processes", "0"],
                              cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

    def status(path: str) -> int | None:
        try:
            return get(port, path)[0]
        except OSError:
            return None  # not listening yet

    try:
        wait_until(lambda: status("/startupz") == 503, 60, "the metrics server while the engine loads", worker)
        loading_since = time.monotonic()
        while time.monotonic() - loading_since < 2.5:  # 2.5 x --liveness-timeout, the load still blocked
            assert (status("/livez"), status("/readyz"), status("/startupz")) == (200, 503, 503)
            time.sleep(0.1)
        assert get(port, "/readyz")[1] == "engine loading\n"
        with open(meta, "w") as fifo:
            fifo.write(Path(str(small_engine) + ".json").read_text())
        wait_until(lambda: status("/readyz") == 200, 60, "/readyz 200 once the engine is loaded", worker)
        assert status("/startupz") == 200 and status("/livez") == 200
        code, headers, body = request(port, "/metrics", method="HEAD")
        assert code == 200 and body == b"" and int(headers["Content-Length"]) > 0
        text = get(port, "/metrics")[1]
        for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds",
                     "python_gc_collections_total", "segqueue_engine_compute_seconds_count",
                     "segqueue_fetch_seconds_count",
                     "segqueue_batches_in_flight", "segqueue_images_claimed", "segqueue_backlog_images"):
            assert f"\n{name}" in text, name
        assert 'segqueue_engine_info{' in text and f'name="onnxruntime:cpu fp32 {engine.name}"' in text
        assert "segqueue_gpu_" not in text  # a CPU worker has no GPU series

        server.kill()
        wait_until(lambda: status("/readyz") == 503, 30, "/readyz 503 with Redis down", worker)
        assert get(port, "/readyz")[1].startswith("redis unreachable")
        assert status("/startupz") == 200 and worker.poll() is None
        server.start()
        wait_until(lambda: status("/readyz") == 200, 60, "/readyz 200 again once Redis is back", worker)
        errors = lambda: sum(scrape_value(get(port, "/metrics")[1], f'segqueue_redis_errors_total{{where="{where}"}}')  # noqa: E731
                             for where in ("loop", "leases"))
        wait_until(lambda: errors() > 0, 30, "a Redis error counted")
    finally:
        worker.terminate()
        worker.wait(timeout=60)
        server.stop()
