"""The autoscaling signal (broker/backlog.py): a real `producer enqueue --max-pending 80` with 400 files and
no worker, read as a worker exports it and turned into KEDA's replica count with deploy/k8s/keda.yaml's
numbers; and the same producer by reference (`--by-reference`)."""

from __future__ import annotations

import math
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import structlog
import yaml

from broker.backlog import read_backlog
from tests.conftest import SMALL_SIZE, write_synthetic_images
from tests.helpers import wait_until
from worker.metrics import WorkerMetrics
from worker.observability import instrument

ROOT = Path(__file__).resolve().parents[2]


def keda_replicas(metric: float, trigger: dict, scaled: dict) -> int:
    """The replica count KEDA's HPA asks for on one AverageValue trigger: ceil(metric / target), clamped."""
    target = float(trigger["metadata"].get("threshold") or trigger["metadata"]["listLength"])
    return min(max(math.ceil(metric / target), scaled["minReplicaCount"]), scaled["maxReplicaCount"])


@contextmanager
def held_back_producer(folder: Path, redis_url: str, queue_name: str, *options: str) -> Iterator[subprocess.Popen]:
    """`producer enqueue folder --max-pending 80` (jobs of 8) with no worker; killed on the way out if still running."""
    producer = subprocess.Popen([sys.executable, "-m", "producer", "enqueue", str(folder), *options, "--size",
                                 str(SMALL_SIZE), "--job-size", "8", "--max-pending", "80", "--timeout", "300",
                                 "--redis-url", redis_url, "--queue", queue_name],
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        yield producer
    finally:
        if producer.poll() is None:
            producer.kill()
            producer.wait()


def interrupt_and_check_queue_kept(producer: subprocess.Popen, client, queue_name: str) -> None:
    """Ctrl-C the producer: it exits 130, its record goes, the 80 images it stored stay queued."""
    producer.send_signal(signal.SIGINT)
    assert producer.wait(timeout=60) == 130, producer.stderr.read() if producer.stderr else ""
    backlog = read_backlog(client, queue_name)
    assert backlog == type(backlog)(to_send=0, queued=80, claimed=0, producers=0)


def test_backlog_counts_files_a_held_back_producer_still_has(tmp_path, client, redis_url, queue_name) -> None:
    write_synthetic_images(tmp_path / "in", 400)
    with held_back_producer(tmp_path / "in", redis_url, queue_name, "--workers", "1") as producer:
        llen = lambda: client.llen(f"rq:queue:{queue_name}")  # noqa: E731 (what the redis list trigger reads)
        wait_until(lambda: llen() == 10 and read_backlog(client, queue_name).total == 400, 120,
                   lambda: f"backlog 400 with 10 jobs listed (now {read_backlog(client, queue_name)}, {llen()} jobs)",
                   producer)
        backlog = read_backlog(client, queue_name)
        assert (backlog.to_send, backlog.queued, backlog.claimed, backlog.producers) == (320, 80, 0, 1)

        metrics = WorkerMetrics()  # what a worker exports, read through the same collector
        probe = instrument(metrics, client, queue_name, None, structlog.get_logger("test"))
        assert metrics.registry.get_sample_value("segqueue_backlog_images") == 400
        assert metrics.registry.get_sample_value("segqueue_backlog_to_send_images") == 320
        probe.close()

        scaled = next(doc for doc in yaml.safe_load_all((ROOT / "deploy/k8s/keda.yaml").read_text())
                      if doc["kind"] == "ScaledObject")["spec"]
        by_type = {trigger["type"]: trigger for trigger in scaled["triggers"]}
        assert "segqueue_backlog_images" in by_type["prometheus"]["metadata"]["query"]
        assert keda_replicas(400, by_type["prometheus"], scaled) == 1
        # compose's producer (--max-pending 2000, jobs of 8) with 100,000 files: the list holds 250 jobs
        assert keda_replicas(100_000, by_type["prometheus"], scaled) == 5
        assert keda_replicas(2000 / 8, by_type["redis"], scaled) == 1

        interrupt_and_check_queue_kept(producer, client, queue_name)


def test_backlog_counts_files_a_producer_by_reference_still_has(tmp_path, client, redis_url, queue_name) -> None:
    write_synthetic_images(tmp_path / "in", 400)
    with held_back_producer(tmp_path / "in", redis_url, queue_name, "--by-reference",
                            "--out", str(tmp_path / "masks")) as producer:
        wait_until(lambda: read_backlog(client, queue_name).total == 400, 120,
                   lambda: f"backlog 400 (now {read_backlog(client, queue_name)})", producer)
        backlog = read_backlog(client, queue_name)
        assert (backlog.to_send, backlog.queued, backlog.claimed, backlog.producers) == (320, 80, 0, 1)
        interrupt_and_check_queue_kept(producer, client, queue_name)
