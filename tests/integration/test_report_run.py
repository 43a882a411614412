"""`producer report` from a real worker run on CPU, checked against the log and against independently computed Dice;
the real `producer report` command on malformed and console-output logs."""

from __future__ import annotations

import json
import re
from datetime import datetime

import numpy as np
import pytest
from PIL import Image

from broker.store import QueueStore
from producer.collect import collect_masks
from report.analysis import read_logs
from tests.conftest import write_synthetic_images
from tests.integration.test_e2e import cli
from tests.integration.test_worker import enqueue_folder, run_worker
from tests.unit.test_report import _event, table_row


def test_report_numbers_match_the_log_and_independent_dice(tmp_path, client, redis_url, queue_name, small_engine):
    write_synthetic_images(tmp_path / "images", 13, seed=5)
    enqueue_folder(client, queue_name, tmp_path / "images", job_size=3)
    log = tmp_path / "worker.log"
    run_worker(redis_url, queue_name, small_engine, log)
    collect_masks(QueueStore(client, queue_name), tmp_path / "masks")
    with open(log, "a") as handle:  # damage: a non-JSON line and a truncated batch line
        handle.write("this is not json\n")
        handle.write('{"event": "batch", "batch_size": 8, "time": "2026-\n')

    result = cli("producer", "report", str(log), "--masks", str(tmp_path / "masks"),
                 "--truth", str(tmp_path / "images_truth"), "--reference", str(tmp_path / "masks"),
                 "--out", str(tmp_path / "report"))
    assert result.returncode == 0, result.stderr
    markdown = (tmp_path / "report" / "report.md").read_text()

    events = [json.loads(line) for line in log.read_text().splitlines()[:-2]]
    batches = [e for e in events if e["event"] == "batch"]
    ends = [datetime.fromisoformat(e["time"].replace("Z", "+00:00")).timestamp() for e in batches]
    starts = [end - e["total_ms"] / 1000 for end, e in zip(ends, batches, strict=True)]
    expected_fps = sum(e["images_ok"] for e in batches) / (max(ends) - min(starts))

    workers, n_batches, images, wall, fps, _ = table_row(markdown, "workers")
    assert (int(workers), int(n_batches), int(images)) == (1, len(batches), 13)
    assert float(fps.replace(",", "")) == round(expected_fps, 2)
    assert re.search(r"\| `.*worker.log` \| \d+ \| 2 \|", markdown)  # both damaged lines counted

    truth_dir, mask_dir = tmp_path / "images_truth", tmp_path / "masks"
    independent = []
    for truth_file in sorted(truth_dir.glob("*.png")):
        t = np.asarray(Image.open(truth_file)) >= 128
        m = np.asarray(Image.open(mask_dir / truth_file.name)) >= 128
        independent.append(2 * (t & m).sum() / max(1, t.sum() + m.sum()) if (t.sum() + m.sum()) else 1.0)
    scored, mean, median, deviation, agreement = table_row(markdown, "images scored")
    assert int(scored) == 13
    assert float(mean) == round(float(np.mean(independent)), 4)
    assert float(median) == round(float(np.median(independent)), 4)
    assert float(deviation) == 0.0 and float(agreement) == 1.0  # reference = the same masks
    for plot in ("throughput", "latency_split", "batch_sizes", "latency_percentiles", "dice"):
        assert Image.open(tmp_path / "report" / f"{plot}.png").size[0] > 100


def test_malformed_lines_never_crash_the_report(tmp_path):
    log = tmp_path / "bad.log"
    good = json.dumps(_event("w", 1_000_000, 500))
    log.write_bytes(b"\xff\xfe garbage\n" + b"[1, 2]\n" + b'{"event": "batch", "worker": "w"}\n'
                    + b'{"event": "batch", "worker": "w", "batch_size": "eight", "images_ok": 1, "fetch_ms": 0,'
                    + b' "compute_ms": 0, "write_ms": 0, "total_ms": 1, "time": "2026-01-01T00:00:00Z"}\n'
                    + good.encode() + b"\n" + good[: len(good) // 2].encode())
    data = read_logs([log])
    assert len(data.batches) == 1
    assert data.malformed_total == 5
    result = cli("producer", "report", str(log), "--out", str(tmp_path / "r"))
    assert result.returncode == 0, result.stderr
    assert "5 malformed lines skipped" in result.stdout


def test_report_refuses_the_workers_console_output_and_splits_total_latency_in_full(tmp_path, client, redis_url,
                                                                                    queue_name, small_engine):
    """A real `worker run --burst`: its console output (stderr) is refused by name, its --log-file is reported,
    and the latency table's parts (fetch, compute, write, waiting between stages) add up to its total."""
    write_synthetic_images(tmp_path / "images", 13, seed=5)
    enqueue_folder(client, queue_name, tmp_path / "images", job_size=3)
    log, console = tmp_path / "worker.log", tmp_path / "worker_console.txt"
    worker = cli("worker", "run", "--burst", "--engine", str(small_engine), "--redis-url", redis_url,
                 "--queue", queue_name, "--log-file", str(log))
    assert worker.returncode == 0, worker.stderr
    console.write_text(worker.stdout + worker.stderr)
    assert len(console.read_text().splitlines()) >= 2

    refused = cli("producer", "report", str(console), "--out", str(tmp_path / "refused"))
    lines = len([line for line in console.read_text().splitlines() if line.strip()])
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "Traceback" not in refused.stderr
    assert (f"error: {console}: no batch lines ({lines} lines are not JSON batch records); pass the worker's "
            "--log-file JSON log, not its console output") in refused.stderr
    assert not (tmp_path / "refused" / "report.md").exists()
    # one console output among real logs is refused just the same
    mixed = cli("producer", "report", str(log), str(console), "--out", str(tmp_path / "mixed"))
    assert mixed.returncode == 2 and f"{console}: no batch lines" in mixed.stderr

    result = cli("producer", "report", str(log), "--out", str(tmp_path / "report"))
    assert result.returncode == 0, result.stderr
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "| per batch, mean ms | fetch | compute | write | waiting between stages | total |" in markdown
    fetch, compute, write, waiting, total = (float(cell.replace(",", ""))
                                             for cell in table_row(markdown, "per batch")[1:])
    batches = [e for e in map(json.loads, log.read_text().splitlines()) if e["event"] == "batch"]
    mean = lambda key: sum(e[key] for e in batches) / len(batches)  # noqa: E731
    expected_waiting = sum(max(0.0, e["total_ms"] - e["fetch_ms"] - e["compute_ms"] - e["write_ms"])
                           for e in batches) / len(batches)
    assert waiting == pytest.approx(expected_waiting, abs=0.006)
    assert total == pytest.approx(mean("total_ms"), abs=0.006)
    assert fetch + compute + write + waiting == pytest.approx(total, abs=0.03)  # the row adds up (2-digit rounding)
    assert "waiting between stages (total minus those three" in markdown
