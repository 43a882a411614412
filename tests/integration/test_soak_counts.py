"""benchmarks/soak.py's count of images run again, from rq's job records of a real run (a real redis-server,
rq's own retry of abandoned jobs, a real `worker run --burst` on the small ONNX engine)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from rq.job import Job
from rq.serializers import JSONSerializer

from broker.jobs import JOB_RETRIES, segmentation_queue
from tests.conftest import write_synthetic_images
from tests.integration.test_e2e import cli
from tests.integration.test_worker import enqueue_folder

SOAK = Path(__file__).resolve().parents[2] / "benchmarks" / "soak.py"


def load_soak():
    spec = importlib.util.spec_from_file_location("soak", SOAK)
    module = importlib.util.module_from_spec(spec)
    sys.modules["soak"] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def test_rerun_counts_come_from_rqs_retries_and_are_never_negative(tmp_path, client, redis_url, queue_name,
                                                                   small_engine):
    soak = load_soak()
    write_synthetic_images(tmp_path / "in", 21)
    report = enqueue_folder(client, queue_name, tmp_path / "in", job_size=4)  # 5 jobs of 4, one of 1
    queue = segmentation_queue(client, queue_name)
    assert soak.rerun_counts(client, queue_name) == soak.Reruns(0, 0)  # nothing finished yet

    # what rq's StartedJobRegistry.cleanup does to the job of a SIGKILLed worker: off the queue, then retried
    twice, once = report.job_ids[0], report.job_ids[1]
    for job_id in (twice, twice, once):
        job = Job.fetch(job_id, connection=client, serializer=JSONSerializer)
        queue.remove(job_id)
        with client.pipeline() as pipe:
            job.retry(queue, pipe)
            pipe.execute()
    assert Job.fetch(twice, connection=client, serializer=JSONSerializer).retries_left == JOB_RETRIES - 2

    worker = cli("worker", "run", "--burst", "--engine", str(small_engine), "--redis-url", redis_url,
                 "--queue", queue_name)
    assert worker.returncode == 0, worker.stderr
    assert queue.finished_job_registry.count == 6
    assert soak.rerun_counts(client, queue_name) == soak.Reruns(jobs=2, images=4 * 2 + 4)
