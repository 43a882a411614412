"""`worker run`: load an engine once and serve a queue with a batching rq worker."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from broker.connection import BrokerSettings, connect
from broker.errors import SegqueueError
from engines.base import EngineError
from engines.loader import load_engine
from worker.logs import configure_logging
from worker.pipeline import BatchPipeline
from worker.rq_source import RqJobSource
from worker.settings import WorkerSettings
from worker.signals import stop_on_signals

app = typer.Typer(help="Run segmentation workers: one process per GPU (or CPU), any number of hosts, one Redis.",
                  no_args_is_help=True, add_completion=False)


@app.callback()
def main() -> None:
    """Segmentation worker."""


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


@app.command()
def run(
    engine: Annotated[Path, typer.Option(help="Engine file: .onnx (ONNX Runtime), .pt/.pth (torch checkpoint or torch2trt), .ptc (compiled torch, CUDA), .trt/.engine/.plan (TensorRT).")],
    max_batch: Annotated[int, typer.Option(min=1, help="Most images per engine call (across jobs).")] = 8,
    max_wait_ms: Annotated[float, typer.Option(min=0, help="Longest wait for a batch to fill, from its oldest image.")] = 20.0,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:<index>.")] = "cpu",
    precision: Annotated[Optional[str], typer.Option(help="Torch checkpoints: fp32 (default), amp (autocast FP16, CUDA) or fp16 (half + channels_last, CUDA). Other engines carry their precision; a mismatch is refused.")] = None,
    burst: Annotated[bool, typer.Option("--burst", help="Exit when the queue is empty instead of waiting for work.")] = False,
    log_file: Annotated[Optional[Path], typer.Option(help="Also write JSON lines (one per batch) to this file.")] = None,
    redis_url: Annotated[Optional[str], typer.Option(help="Redis URL; default $REDIS_URL, else the embedded server.")] = None,
    queue: Annotated[Optional[str], typer.Option(help="Queue name (default: segment).")] = None,
    name: Annotated[str, typer.Option(help="Worker name shown by rq (default host.pid).")] = "",
    job_heartbeat_ttl: Annotated[int, typer.Option(min=5, help="Seconds before a silent worker's jobs are re-enqueued.")] = 40,
    maintenance_interval: Annotated[int, typer.Option(min=2, help="Seconds between rq registry maintenance runs (re-enqueues abandoned jobs).")] = 15,
) -> None:
    """Serve a queue: claim jobs, batch their images across jobs, run the engine, write masks back.

    SIGTERM or Ctrl-C finishes the work already claimed and exits 0; a second one exits at once
    (the claimed jobs are then re-enqueued by another worker after --job-heartbeat-ttl).
    """
    settings = WorkerSettings(
        broker=BrokerSettings.resolve(redis_url, queue),
        engine_path=engine,
        device=device,
        precision=precision,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        burst=burst,
        log_file=log_file,
        name=name,
        job_heartbeat_ttl_s=job_heartbeat_ttl,
        maintenance_interval_s=maintenance_interval,
    )
    sys.exit(serve(settings))


def serve(settings: WorkerSettings) -> int:
    """Run a worker with `settings` until it stops; returns the process exit status."""
    log = configure_logging(settings.log_file)
    try:
        client = connect(settings.broker)
        loaded = load_engine(settings.engine_path, device=settings.device, precision=settings.precision)
    except (SegqueueError, EngineError) as exc:
        _fail(str(exc))
    try:
        if settings.max_batch > loaded.spec.max_batch:
            _fail(f"--max-batch {settings.max_batch} exceeds what {settings.engine_path} accepts "
                  f"({loaded.spec.max_batch}); lower it or rebuild the engine")
        source = RqJobSource(
            client,
            settings.broker.queue,
            name=settings.worker_name(),
            job_heartbeat_ttl_s=settings.job_heartbeat_ttl_s,
            maintenance_interval_s=settings.maintenance_interval_s,
        )
        log = log.bind(worker=source.name, engine=loaded.name)
        log.info("worker_started", queue=settings.broker.queue, broker=settings.broker.describe(),
                 max_batch=settings.max_batch, max_wait_ms=settings.max_wait_ms, device=settings.device,
                 burst=settings.burst)
        source.open()
        try:
            with stop_on_signals() as stop:
                images = BatchPipeline(settings, loaded, source, client, log, stop).run()
        finally:
            source.close()
        log.info("worker_stopped", images=images)
        return 0
    finally:
        loaded.close()
