"""`producer enqueue SOURCE --by-reference --out DEST`'s work, with its progress bars and messages (producer/cli.py
calls it; the enqueueing itself is producer/references.py)."""

from __future__ import annotations

import threading
import time

import redis
import typer
from tqdm import tqdm

from broker.errors import SegqueueError
from broker.jobs import segmentation_queue
from common.images import ImageError
from common.storage import StorageError
from producer.backlog import BacklogReporter
from producer.cli import _connect, _first_sigint_sets, _print_collect, _say_interrupted
from producer.enqueue import Enqueuer
from producer.references import FinishedImages, enqueue_references


def enqueue_by_reference(paths: list[str], out: str | None, job_size: int, size: int, max_pending: int | None,
                         timeout: float, stall_warning: float, redis_url: str | None, queue: str | None) -> int:
    """Enqueue the images of one SOURCE by reference, masks to `out`; wait until every image has an outcome.

    Returns the exit status: 0, 1 if any file was rejected or any image failed, 2 for a usage error,
    130 if interrupted (Ctrl-C).
    """
    if out is None or len(paths) != 1:
        typer.echo("error: --by-reference takes one SOURCE (a folder every worker sees, or a URL) and --out DEST",
                   err=True)
        return 2
    settings, client = _connect(redis_url, queue)
    enqueuer = Enqueuer(client, segmentation_queue(client, settings.queue), job_size)
    tqdm.monitor_interval = 0
    stop = threading.Event()
    with _first_sigint_sets(stop), tqdm(desc="masks", unit="img", position=1) as masks_bar, \
            BacklogReporter(client, settings.queue) as backlog:  # the autoscaling signal, as for stored images
        with tqdm(desc="enqueue", unit="img") as bar:
            pending = FinishedImages(enqueuer.store, on_collected=masks_bar.update, stall_warning_s=stall_warning,
                                     on_stall=bar.write, stop=stop)

            def progress(images: int, problem: ImageError | None) -> None:
                if problem is not None:
                    bar.write(f"rejected: {problem}")
                bar.update(images)
                backlog.handled(images)

            def found(images: int) -> None:
                bar.total = masks_bar.total = images
                bar.refresh()
                backlog.found(images)

            try:
                report = enqueue_references(enqueuer, paths[0], out, size, size, pending, max_pending, timeout,
                                            progress, found, stop)
            except (SegqueueError, StorageError, redis.RedisError, OSError) as exc:
                typer.echo(f"error: {exc}", err=True)
                return 1
        if report.interrupted:
            _say_interrupted(report, settings.queue)
            return 130
        typer.echo(f"enqueued {len(report.image_ids)} images by reference in {len(report.job_ids)} jobs on queue "
                   f"'{settings.queue}' ({settings.describe()}); rejected {len(report.rejected)}; masks go to {out}")
        try:
            drained = pending.drain(time.monotonic() + timeout)
        except redis.RedisError as exc:
            typer.echo(f"error: waiting for the masks stopped: {exc}", err=True)
            return 1
    if not drained and stop.is_set():
        _say_interrupted(report, settings.queue)
        return 130
    exit_code = 1 if report.rejected else 0
    if not drained:
        typer.echo(f"error: timed out after {timeout:.0f} s; {len(pending)} images have no mask yet", err=True)
        exit_code = 1
    return max(exit_code, _print_collect(pending.report))
