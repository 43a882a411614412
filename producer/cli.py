"""`producer enqueue | collect | status`: the user's side of the queue."""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import redis
import typer
from tqdm import tqdm

from broker.backlog import read_backlog
from broker.connection import BrokerSettings, connect, default_state_dir, stop_embedded_server
from broker.errors import SegqueueError
from broker.jobs import RESULT_TTL_S, segmentation_queue
from broker.store import QueueStore
from common.cli import Typer
from common.images import ImageError
from producer.backlog import BacklogReporter
from producer.collect import CollectReport, absorb, collect_units, mask_destinations
from producer.enqueue import Enqueuer, EnqueueReport, enqueue_paths
from producer.pool import ProducerPool
from producer.status import queue_status
from producer.stream import COLLECT_CHUNK, STALL_WARNING_S, PendingImages
from producer.tiling import DEFAULT_OVERLAP, Fitting


class FitMode(enum.StrEnum):
    """How an image that is not --size x --size becomes engine inputs (producer/tiling.py)."""

    tile = "tile"
    resize = "resize"

app = Typer(help="Push images into the segmentation queue, get masks back, see where things stand.",
                  no_args_is_help=True, add_completion=False, rich_markup_mode="markdown")

redis_app = Typer(help="The embedded Redis: the one every command uses when neither --redis-url nor $REDIS_URL is set.",
                  no_args_is_help=True, add_completion=False, rich_markup_mode="markdown")
app.add_typer(redis_app, name="redis")

RedisUrl = Annotated[str | None, typer.Option(help="Redis URL; default $REDIS_URL, else the embedded server.")]
QueueName = Annotated[str | None, typer.Option(help="Queue name (default: segment).")]


def _connect(redis_url: str | None, queue: str | None) -> tuple[BrokerSettings, redis.Redis]:
    settings = BrokerSettings.resolve(redis_url, queue)
    try:
        return settings, connect(settings)
    except SegqueueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def _default_workers() -> int:
    return max(1, os.cpu_count() or 1)


DEFAULT_WORKERS = _default_workers()  # one per CPU core, read once at import (typer shows it in --help)


Workers = Annotated[int, typer.Option(min=1, help=(
    "Processes that decode files and write masks (default: one per CPU core)."
))]


@app.command()
def enqueue(
    paths: Annotated[list[str], typer.Argument(help=(
        "Image files or folders (PNG, JPEG, TIFF, BMP; searched recursively). With --by-reference: one folder every "
        "worker sees at the same path, or a URL such as s3://bucket/prefix."
    ))],
    job_size: Annotated[int, typer.Option(min=1, help="Images per rq job.")] = 8,
    size: Annotated[int, typer.Option(min=16, help=(
        "The engine's input size: images are cut into (or padded to) size x size tiles, or resized to it (--fit)."
    ))] = 512,
    fit: Annotated[FitMode | None, typer.Option(show_default=False, help=(
        "tile (the default): cut an image of any other size into --size tiles (smaller ones padded by reflection) "
        "and stitch the masks at full resolution; resize: stretch every image to --size x --size (the study's "
        "behaviour). With --by-reference images are always resized (tile is refused)."
    ))] = None,
    tile_overlap: Annotated[int | None, typer.Option(min=0, help=(
        f"Pixels shared by neighbouring tiles (--fit tile); each mask pixel comes from the tile it is furthest inside. "
        f"Default {DEFAULT_OVERLAP}, or a quarter of --size below 256."
    ))] = None,
    workers: Workers = DEFAULT_WORKERS,
    max_pending: Annotated[int | None, typer.Option(min=1, help=(
        "Wait while this many of this run's records (engine inputs: images and tiles) are held in Redis, not yet "
        "collected (bounds Redis memory)."
    ))] = None,
    out: Annotated[str | None, typer.Option(help=(
        "Write each mask here as it finishes (as collect does), free it from Redis, and return when all are done. "
        "With --by-reference the workers write the masks here (a shared folder or a URL)."
    ))] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Older spelling of --out DIR; needs --out.")] = False,
    timeout: Annotated[float, typer.Option(help=(
        "Seconds to wait, with --out, for the last masks once everything is enqueued, and with --max-pending, for room "
        "each time Redis is full."
    ))] = 3600.0,
    stall_warning: Annotated[float, typer.Option(min=0.1, help=(
        "While waiting (--out, --max-pending), say so after this many seconds in which no image has finished (no "
        "worker?)."
    ))] = STALL_WARNING_S,
    by_reference: Annotated[bool, typer.Option("--by-reference", help=(
        "Put only each image's location into Redis: workers read and decode the images from shared storage and "
        "write the masks to --out themselves (needs --out). No image or mask bytes go through Redis."
    ))] = False,
    redis_url: RedisUrl = None,
    queue: QueueName = None,
) -> None:
    """Validate, decode and store images, and enqueue jobs of --job-size images.

    Each image becomes uint8 grayscale engine inputs of --size x --size: itself when it has that size,
    else its tiles (--fit tile, the default) or itself resized (--fit resize); its mask comes back at
    its original size. A multi-page TIFF (a stack of 2-D pages of one size, at most 1000) is enqueued
    page by page, and its masks come back as one multi-page TIFF. Files are decoded by --workers processes;
    a PNG that already is 8-bit gray at --size x --size is checked (every chunk's CRC) and stored as it
    is, for the worker to decode. A bad file is reported with its problem and skipped; the exit status is 1 if any file
    was rejected or any image failed.

    For a huge folder, `producer enqueue DIR --out MASKS --max-pending 2000` streams it through Redis.
    On shared storage, `producer enqueue s3://bucket/images --by-reference --out s3://bucket/masks` moves
    no pixels through Redis (docs/usage.md); by reference, every image is resized to --size x --size
    (no tiling) and a multi-page TIFF fails with its reason.
    """
    if by_reference:
        from producer.reference_cli import enqueue_by_reference

        if fit is FitMode.tile or tile_overlap is not None:
            typer.echo("error: --by-reference resizes every image to --size x --size (the producer does not read the "
                       "images, so it cannot cut them into tiles): drop --fit tile and --tile-overlap, or enqueue "
                       "without --by-reference to tile large images and stacks", err=True)
            raise typer.Exit(2)
        raise typer.Exit(enqueue_by_reference(paths, out, job_size, size, max_pending, timeout, stall_warning,
                                              redis_url, queue))
    if wait and out is None:
        typer.echo("error: --wait needs --out DIR", err=True)
        raise typer.Exit(2)
    try:
        fitting = Fitting((fit or FitMode.tile).value, tile_overlap).for_engine(size, size)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    settings, client = _connect(redis_url, queue)
    enqueuer = Enqueuer(client, segmentation_queue(client, settings.queue), job_size)
    tqdm.monitor_interval = 0  # no monitor thread: the pool forks
    stop = threading.Event()
    try:
        with _first_sigint_sets(stop):
            exit_code = _enqueue_and_stream(enqueuer, settings, [Path(p) for p in paths], size, workers, max_pending,
                                            None if out is None else Path(out), timeout, stall_warning, stop, fitting)
    except KeyboardInterrupt:  # a second Ctrl-C: stopped at once; the counts are what was queued by then
        stop.set()
    if stop.is_set():
        _say_interrupted(enqueuer.report, settings.queue)
        raise typer.Exit(130)
    raise typer.Exit(exit_code)


@contextlib.contextmanager
def _first_sigint_sets(stop: threading.Event) -> Iterator[None]:
    """Inside: the first Ctrl-C sets `stop` (the run finishes the chunks in flight, enqueues their jobs and
    returns); a second raises KeyboardInterrupt. The pool processes ignore Ctrl-C (producer/pool.py)."""

    def handler(signum: int, frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _say_interrupted(report: EnqueueReport, queue: str) -> None:
    """One line on stderr: what an interrupted enqueue left stored and queued."""
    typer.echo(f"interrupted: {len(report.image_ids)} images stored, {len(report.job_ids)} jobs queued on queue "
               f"'{queue}' (they stay queued; a worker will process them; `producer status` shows them); "
               "files not yet read were not enqueued", err=True)


def _enqueue_and_stream(enqueuer: Enqueuer, settings: BrokerSettings, paths: list[Path], size: int, workers: int,
                        max_pending: int | None, out: Path | None, timeout: float, stall_warning: float,
                        stop: threading.Event, fitting: Fitting) -> int:
    """`producer enqueue`'s work, with its bars and messages; returns the exit status (130 once `stop` is set)."""
    with ProducerPool(settings, enqueuer.store, workers) as pool, \
            BacklogReporter(enqueuer.client, settings.queue) as backlog:  # the autoscaling signal: broker/backlog.py
        masks_bar = tqdm(desc="masks", unit="img", position=1, disable=out is None)
        with tqdm(desc="enqueue", unit="img") as bar:
            pending = PendingImages(enqueuer.store, pool, out, on_collected=masks_bar.update,
                                    stall_warning_s=stall_warning, on_stall=bar.write, stop=stop)

            def progress(files: int, error: ImageError | None) -> None:
                if error is not None:
                    bar.write(f"rejected: {error}")
                bar.update(files)
                backlog.handled(files)

            def found(files: int) -> None:  # the files are found before any is decoded: the bar gets a total, an ETA
                bar.total = files
                masks_bar.total = files
                bar.refresh()
                backlog.found(files)

            try:
                report = enqueue_paths(enqueuer, paths, size, size, progress, pool=pool, pending=pending,
                                       max_pending=max_pending, pending_timeout_s=timeout, on_found=found, stop=stop,
                                       fitting=fitting)
            except (SegqueueError, redis.RedisError, OSError) as exc:  # every image stored so far has its job
                typer.echo(f"error: {exc}", err=True)
                raise typer.Exit(1) from None
        if report.interrupted:
            return 130
        tiled = [unit for unit in report.units if unit.tiled]
        tiles = f" ({len(tiled)} of them as {sum(unit.records for unit in tiled)} tiles)" if tiled else ""
        typer.echo(f"enqueued {len(report.units)} images in {len(report.job_ids)} jobs{tiles} on queue "
                   f"'{settings.queue}' ({settings.describe()}); rejected {len(report.rejected)}")
        exit_code = 1 if report.rejected else 0
        if out is not None:
            try:
                drained = pending.drain(time.monotonic() + timeout)
            except (redis.RedisError, OSError) as exc:  # masks written so far stay written
                typer.echo(f"error: writing masks stopped: {exc}", err=True)
                raise typer.Exit(1) from None
            if not drained and stop.is_set():
                return 130
            if not drained:
                typer.echo(f"error: timed out after {timeout:.0f} s; {len(pending)} images have no mask yet", err=True)
                exit_code = 1
            masks_bar.close()
            exit_code = max(exit_code, _print_collect(pending.report))
    return exit_code


def _print_collect(report: CollectReport, out: Path | None = None) -> int:
    for name, reason in sorted(report.failed.items()):
        typer.echo(f"failed: {name}: {reason}", err=True)
    in_place = ""
    if report.in_place:
        copied = f", not copied to {out}" if out is not None else ""
        in_place = (f"; {len(report.in_place)} enqueued by reference already at their mask locations{copied} "
                    f"({', '.join(mask_destinations(report))})")
    typer.echo(f"wrote {len(report.written)} masks{in_place}; {len(report.failed)} failed; "
               f"{len(report.pending)} not done yet")
    return 1 if report.failed else 0


@app.command()
def collect(
    out: Annotated[Path, typer.Option(help=(
        "Folder for the masks (same relative names, .png). Images enqueued with --by-reference are not copied here: "
        "their masks already are at the --out DEST they were enqueued with, and collect names that location."
    ))],
    delete: Annotated[bool, typer.Option("--delete", help=(
        "After writing each mask file, delete that image and its mask from Redis. By-reference images are freed "
        "once their outcome is reported: done (mask in place) or failed (reason listed)."
    ))] = False,
    workers: Workers = DEFAULT_WORKERS,
    redis_url: RedisUrl = None,
    queue: QueueName = None,
) -> None:
    """Write every finished mask as a PNG at its image's original size (0 background, 255 foreground).

    Exit status 1 if some image failed (each is listed with its reason). Without --delete, images
    and masks stay in Redis (collect can run again); with it, what was written is removed.

    Images enqueued with `--by-reference` (say, by a producer that was interrupted before they
    finished) count as done once the worker wrote their mask to its location (checked for local
    paths); collect reports that location and writes nothing for them.
    """
    settings, client = _connect(redis_url, queue)
    store = QueueStore(client, settings.queue)
    image_ids = collect_units(list(store.manifest()))  # a tiled image once, not once per tile
    report = CollectReport()
    tqdm.monitor_interval = 0
    with ProducerPool(settings, store, workers) as pool, tqdm(total=len(image_ids), desc="collect", unit="img") as bar:
        tasks = [(len(chunk), pool.submit_collect(chunk, out, delete))
                 for chunk in (image_ids[i:i + COLLECT_CHUNK] for i in range(0, len(image_ids), COLLECT_CHUNK))]
        for count, task in tasks:
            try:
                absorb(report, task.result())
            except (OSError, redis.RedisError) as exc:  # disk full, Redis gone: what was written stays written
                typer.echo(f"error: collect stopped: {exc}", err=True)
                raise typer.Exit(1) from None
            bar.update(count)
    raise typer.Exit(_print_collect(report, out))


@app.command()
def status(
    redis_url: RedisUrl = None,
    queue: QueueName = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Queued / started / finished / failed, in jobs and in images, and the number of live workers.

    Images finished counts masks still in Redis and masks already collected into files.
    """
    settings, client = _connect(redis_url, queue)
    snapshot = queue_status(client, segmentation_queue(client, settings.queue))
    backlog = read_backlog(client, settings.queue)
    if as_json:
        backlog_dict = {**dataclasses.asdict(backlog), "total": backlog.total}
        typer.echo(json.dumps({**snapshot.as_dict(), "backlog": backlog_dict}))
        return
    typer.echo(f"queue '{snapshot.queue}' on {settings.describe()}: {snapshot.workers} workers")
    typer.echo(f"{'':8}{'queued':>10}{'started':>10}{'finished':>10}{'failed':>10}")
    for label, counts in (("jobs", snapshot.jobs), ("images", snapshot.images)):
        typer.echo(f"{label:8}{counts.queued:>10}{counts.started:>10}{counts.finished:>10}{counts.failed:>10}")
    typer.echo(f"images finished: {snapshot.masks_in_redis} with a mask kept in Redis (`producer collect` writes it; "
               f"with --delete it also frees it), {snapshot.collected} collected (mask file written, freed from Redis)")
    if snapshot.tiled_images:
        typer.echo(f"images are engine inputs: {snapshot.tiles} of them are tiles of {snapshot.tiled_images} tiled "
                   "images or stacks held in Redis (each written once all its tiles are finished)")
    typer.echo(f"backlog (the autoscaling signal): {backlog.total} images = {backlog.to_send} still to send by "
               f"{backlog.producers} producers + {backlog.queued} queued + {backlog.claimed} claimed")
    typer.echo(f"jobs finished: rq's finished registry (a job stays listed {RESULT_TTL_S // 86400} days after it ends)")


@app.command()
def report(
    logs: Annotated[list[Path], typer.Argument(help="Worker JSON-line logs (worker run --log-file), one or more.")],
    out: Annotated[Path, typer.Option(help="Folder for report.md and the PNG plots.")],
    masks: Annotated[Path | None, typer.Option(help="Masks to score (producer collect output).")] = None,
    truth: Annotated[Path | None, typer.Option(help="Ground-truth masks with the same relative names.")] = None,
    reference: Annotated[Path | None, typer.Option(help=(
        "A reference run's masks (e.g. FP32) for the Deviation column."
    ))] = None,
) -> None:
    """Offline analysis: FPS, latency split, batch sizes, latency percentiles, and Dice against ground truth.

    Several workers' logs merge: total FPS is images over the union of their busy time. Malformed
    or truncated lines are counted, reported and skipped.
    """
    from report.analysis import NoBatchLines, dice_against, read_logs
    from report.writer import write_report

    for path in [*logs, *(p for p in (masks, truth, reference) if p is not None)]:
        if not path.exists():
            typer.echo(f"error: {path}: not found", err=True)
            raise typer.Exit(2)
    if (masks is None) != (truth is None):
        typer.echo("error: --masks and --truth go together", err=True)
        raise typer.Exit(2)
    try:
        data = read_logs(logs)
    except (NoBatchLines, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    scores = dice_against(masks, truth, reference) if masks is not None and truth is not None else None
    path = write_report(out, data, scores)
    typer.echo(f"wrote {path} ({len(data.batches)} batches, {data.malformed_total} malformed lines skipped)")


@redis_app.command("stop")
def redis_stop() -> None:
    """Stop the embedded Redis (its data stays, in $SEGQUEUE_STATE_DIR or ~/.local/state/segqueue).

    The next command that needs it starts it again, with the same data. A Redis named by
    --redis-url or $REDIS_URL is not touched.
    """
    state_dir = default_state_dir()
    try:
        stopped = stop_embedded_server(state_dir)
    except SegqueueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"stopped the embedded Redis in {state_dir}" if stopped
               else f"the embedded Redis in {state_dir} is not running")
