"""`worker run`: load an engine once and serve a queue with a batching rq worker."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Annotated

import redis
import typer

from broker.connection import BrokerSettings, connect
from broker.errors import SegqueueError
from broker.store import QueueStore
from common.cli import Typer
from engines.base import EngineError
from engines.loader import load_engine, verify_sha256
from worker.devices import DeviceError, DevicePlan, child_labels, expand_devices, is_pool, pin_process, suffixed
from worker.loader import ImageLoader, LoaderDied, open_loader
from worker.logs import configure_logging
from worker.metrics import WorkerMetrics
from worker.metrics_server import MetricsServer
from worker.observability import engine_labels, instrument
from worker.pipeline import BatchPipeline
from worker.rq_source import RqJobSource
from worker.settings import WorkerSettings, default_decode_processes
from worker.signals import stop_on_signals

# Nothing imported above initialises CUDA (torch reads CUDA_VISIBLE_DEVICES only when CUDA first
# initialises, lazily): `run` pins the process to its GPU before any engine is loaded.
# tests/integration/test_devices_worker.py checks this.

app = Typer(help="Run segmentation workers: one process per GPU (or CPU), any number of hosts, one Redis.",
                  no_args_is_help=True, add_completion=False, rich_markup_mode="markdown")


@app.callback()
def main() -> None:
    """Segmentation worker."""


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


@app.command()
def run(
    ctx: typer.Context,
    engine: Annotated[Path, typer.Option(help=(
        "Engine file: .onnx (ONNX Runtime), .pt/.pth (torch checkpoint or torch2trt), .ptc (compiled torch, CUDA), "
        ".cudnn (cuDNN INT8, CUDA), .trt/.engine/.plan (TensorRT)."
    ))],
    engine_sha256: Annotated[str | None, typer.Option(envvar="SEGQUEUE_ENGINE_SHA256", show_envvar=True, help=(
        "Refuse to load the engine file unless its SHA-256 is this (64 hex digits, as `sha256sum FILE` prints). "
        "Loading an engine can run code from it: pin the file you trust."
    ))] = None,
    max_batch: Annotated[int, typer.Option(min=1, help="Most images per engine call (across jobs).")] = 8,
    max_wait_ms: Annotated[float, typer.Option(min=0, help=(
        "Longest wait for a batch to fill, from its oldest image."
    ))] = 20.0,
    device: Annotated[str, typer.Option(help=(
        "cpu, cuda or cuda:<index>: one worker; cuda:N sees only GPU N (CUDA_VISIBLE_DEVICES, mapped through one you "
        "set) and runs as cuda:0. 'all', or a list such as cuda:0,cuda:1 or cpu,cpu: a pool, one worker process per "
        "entry (all: per visible GPU), see below."
    ))] = "cpu",
    precision: Annotated[str | None, typer.Option(help=(
        "Torch checkpoints: fp32 (default), amp (autocast FP16, CUDA) or fp16 (half + channels_last, CUDA). Other "
        "engines carry their precision; a mismatch is refused."
    ))] = None,
    burst: Annotated[bool, typer.Option("--burst", help=(
        "Exit when the queue is empty instead of waiting for work."
    ))] = False,
    log_file: Annotated[Path | None, typer.Option(help="Also write JSON lines (one per batch) to this file.")] = None,
    log_json: Annotated[bool, typer.Option("--log-json", envvar="SEGQUEUE_LOG_JSON", show_envvar=True, help=(
        "Log JSON lines to stdout instead of readable lines to stderr (containers: what log collectors parse)."
    ))] = False,
    redis_url: Annotated[str | None, typer.Option(help=(
        "Redis URL; default $REDIS_URL, else the embedded server."
    ))] = None,
    queue: Annotated[str | None, typer.Option(help="Queue name (default: segment).")] = None,
    name: Annotated[str, typer.Option(help="Worker name shown by rq (default host.pid).")] = "",
    job_heartbeat_ttl: Annotated[int, typer.Option(min=5, help=(
        "Seconds before a silent worker's jobs are re-enqueued (its lease thread renews them every 2 s)."
    ))] = 8,
    maintenance_interval: Annotated[int, typer.Option(min=2, help=(
        "Seconds between rq registry maintenance runs (re-enqueues abandoned jobs)."
    ))] = 2,
    metrics_port: Annotated[int | None, typer.Option(min=0, max=65535, help=(
        "Serve Prometheus /metrics, /readyz (engine warm and Redis answering), /livez (loop not stuck) and /startupz "
        "(engine loaded and warm) on this port; a pool gives its children PORT, PORT+1, ..."
    ))] = None,
    liveness_timeout: Annotated[float, typer.Option(min=1, help=(
        "/livez fails once the worker loop has not passed for this many seconds."
    ))] = 60.0,
    engine_slots: Annotated[int | None, typer.Option(min=1, show_default=False, help=(
        "Batches in flight on a CUDA engine, each with its own buffers and CUDA graphs (default 2). More keep the GPU "
        "busy through the worker's own pauses (claiming jobs, handing masks to the writer) at the cost of GPU memory "
        "and a longer load; CPU and ONNX Runtime engines refuse it."
    ))] = None,
    decode_processes: Annotated[int | None, typer.Option(min=0, show_default=False, help=(
        "Processes that read and decode images from Redis (a GPU needs several busy ones, more than threads can "
        "share under the GIL; docs/performance.md gives the CPU per image); 0 decodes on the worker's fetch "
        "threads. Default: 12 for a CUDA device, 8 for the CPU, at most one per CPU (a pool divides the CPUs among "
        "its workers)."
    ))] = None,
) -> None:
    """Serve a queue: claim jobs, batch their images across jobs, run the engine, write masks back.

    SIGTERM or Ctrl-C finishes the work already claimed and exits 0; a second one exits at once
    (the claimed jobs are then re-enqueued by another worker after --job-heartbeat-ttl).

    One worker per GPU: `--device all` (every visible GPU) or a list (`cuda:0,cuda:2`, or `cpu,cpu`
    for CPU workers) starts a pool: one `worker run --device <entry>` child process per entry with
    the same other options, each logging to its own file (--log-file worker.log gives
    worker.gpu0.log, worker.gpu1.log, ...; the pool's own events go to worker.pool.log). A child
    that dies unexpectedly is restarted (at most 5 times in 5 minutes, logged); exit status 2
    (setup error) is not restarted. SIGTERM or Ctrl-C is passed on to every child, which drain;
    the pool exits when all have exited (status 0 if all exited 0).
    """
    if is_pool(device):
        options = dict(locals())  # this command's options by name (a statement: comprehensions differ on 3.11)
        sys.exit(_run_pool(ctx, options, device, log_file, name))
    try:
        plan = pin_process(device)  # before anything initialises CUDA
    except DeviceError as exc:
        _fail(str(exc))
    settings = WorkerSettings(
        broker=BrokerSettings.resolve(redis_url, queue),
        engine_path=engine,
        engine_sha256=engine_sha256,
        device=plan.engine_device,
        precision=precision,
        engine_slots=engine_slots,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        burst=burst,
        log_file=log_file,
        log_json=log_json,
        name=name,
        job_heartbeat_ttl_s=job_heartbeat_ttl,
        maintenance_interval_s=maintenance_interval,
        metrics_port=metrics_port,
        liveness_timeout_s=liveness_timeout,
        decode_processes=default_decode_processes(plan.engine_device) if decode_processes is None else decode_processes,
    )
    sys.exit(serve(settings, plan))


def _child_argv(ctx: typer.Context, options: dict[str, object], device: str, log_file: Path | None,
                name: str, metrics_port: int | None = None) -> list[str]:
    """`python -m worker.cli run` with this command's `options` (name -> value), but --device,
    --log-file, --name and --metrics-port as given, and no --redis-url (see _child_env)."""
    argv = [sys.executable, "-m", "worker.cli", "run"]
    for param in ctx.command.params:
        # typer's options are click Options, or its own vendored copy of them: ask the kind, not the class
        if param.param_type_name != "option" or param.name in ("device", "log_file", "name", "metrics_port",
                                                                "redis_url"):
            continue
        value = options.get(param.name)
        if value is None:
            continue
        flag = max(param.opts, key=len)
        if getattr(param, "is_flag", False):
            if value:
                argv.append(flag)
            continue
        argv += [flag, str(value)]
    argv += ["--device", device]
    if log_file is not None:
        argv += ["--log-file", str(log_file)]
    if name:
        argv += ["--name", name]
    if metrics_port is not None:
        argv += ["--metrics-port", str(metrics_port)]
    return argv


def _child_env(options: dict[str, object]) -> dict[str, str]:
    """A --redis-url reaches the pool's children as REDIS_URL: a password in it stays off their command lines."""
    url = options.get("redis_url")
    return {"REDIS_URL": str(url)} if url else {}


def _child_port(options: dict[str, object], index: int) -> int | None:
    """The index-th pool child's metrics port: --metrics-port + index (None without --metrics-port)."""
    base = options.get("metrics_port")
    return base + index if isinstance(base, int) else None


def _with_decode_processes(options: dict[str, object], device: str, workers: int) -> dict[str, object]:
    """A pool child's options: --decode-processes as given, else its share of this host's CPUs (of `workers`)."""
    if options.get("decode_processes") is not None:
        return options
    return {**options, "decode_processes": default_decode_processes(device, workers)}


def _run_pool(ctx: typer.Context, options: dict[str, object], device: str, log_file: Path | None, name: str) -> int:
    """`--device all` or a list: supervise one `worker run` child per device (worker/pool.py)."""
    from worker.pool import ChildSpec, WorkerPool

    try:
        devices = expand_devices(device)
    except DeviceError as exc:
        _fail(str(exc))
    labels = child_labels(devices)
    children = [
        ChildSpec(label, dev, _child_argv(ctx, _with_decode_processes(options, dev, len(devices)), dev,
                                          suffixed(log_file, label) if log_file else None,
                                          f"{name}.{label}" if name else "", _child_port(options, index)),
                  _child_env(options))
        for index, (label, dev) in enumerate(zip(labels, devices, strict=True))
    ]
    log = configure_logging(suffixed(log_file, "pool") if log_file else None, json_stdout=bool(options.get("log_json"))
                            ).bind(pool=os.getpid())
    return WorkerPool(children, log).run()


def _warm_up(loaded, max_batch: int) -> float:
    """Run one batch of zeros (the worker's batch size) through the engine; returns seconds."""
    import numpy as np

    spec = loaded.spec
    batch = max(spec.min_batch, min(max_batch, spec.max_batch))
    started = time.perf_counter()
    loaded.submit(np.zeros((batch, spec.height, spec.width), dtype=np.uint8)).result()
    return time.perf_counter() - started


def serve(settings: WorkerSettings, plan: DevicePlan | None = None) -> int:
    """Run a worker with `settings` until it stops; returns the process exit status.

    plan: how --device was mapped (pin_process); None means settings.device is used as given.
    Logs `worker_started` when the engine is loaded and `worker_ready` once a warm-up batch has run
    and the worker is registered with rq: from then on it serves at full speed. The decode processes
    (worker/loader.py) are forked first, before any thread starts and before the engine loads.
    """
    log = configure_logging(settings.log_file, json_stdout=settings.log_json)
    started = time.perf_counter()
    metrics = WorkerMetrics(liveness_timeout_s=settings.liveness_timeout_s)
    try:
        if settings.engine_sha256 is not None:  # before anything reads the file as an engine
            verify_sha256(settings.engine_path, settings.engine_sha256)
        client = connect(settings.broker)
        loader = open_loader(settings.broker, settings.decode_processes, QueueStore(client, settings.broker.queue))
    except (SegqueueError, EngineError) as exc:
        _fail(_with_device(str(exc), plan))
    # GPU gauges (and the warning when NVML is missing) only where /metrics is served: without --metrics-port
    # nothing reads them, and a worker on a missing GPU then gives its one clear error alone
    gpu = plan.physical if plan is not None and settings.metrics_port is not None else None
    probe = instrument(metrics, client, settings.broker.queue, gpu, log)
    try:
        server = _serve_metrics(metrics, settings.metrics_port)
        try:
            return _serve(settings, plan, log, started, metrics, client, loader)
        except LoaderDied as exc:
            log.error("worker_failed", reason=str(exc))
            return 1
        finally:
            if server is not None:
                server.close()
    finally:
        loader.close()
        probe.close()


def _with_device(message: str, plan: DevicePlan | None) -> str:
    """The message, with the --device mapping appended when a GPU was picked."""
    return f"{message} [--device {plan.describe()}]" if plan is not None and plan.physical is not None else message


def _serve_metrics(metrics: WorkerMetrics, port: int | None) -> MetricsServer | None:
    """Start the /metrics, /readyz, /livez server on `port` (None: no server); exit 2 if the port is taken."""
    if port is None:
        return None
    try:
        return MetricsServer(metrics, port)
    except OSError as exc:
        _fail(f"cannot serve metrics on port {port}: {exc.strerror or exc}")
    return None


def _serve(settings: WorkerSettings, plan: DevicePlan | None, log, started: float, metrics: WorkerMetrics,
           client: redis.Redis, loader: ImageLoader) -> int:
    engine_started = time.perf_counter()
    try:
        loaded = load_engine(settings.engine_path, device=settings.device, precision=settings.precision,
                             slots=settings.engine_slots)
    except (SegqueueError, EngineError) as exc:
        _fail(_with_device(str(exc), plan))
    load_s = time.perf_counter() - started
    engine_s = time.perf_counter() - engine_started
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
        gpu = ({} if plan is None or plan.physical is None
               else {"gpu": plan.physical, "requested_device": plan.requested})
        engine_timings = {k: round(v, 3) for k, v in getattr(loaded, "load_timings", {}).items()}
        log.info("worker_started", queue=settings.broker.queue, broker=settings.broker.describe(),
                 max_batch=settings.max_batch, max_wait_ms=settings.max_wait_ms, engine_slots=loaded.slots,
                 device=settings.device, burst=settings.burst, pid=os.getpid(), load_s=round(load_s, 3),
                 engine_s=round(engine_s, 3), engine_load=engine_timings, **gpu)
        graphs_error = getattr(loaded, "cuda_graphs_error", None)  # compiled engines only
        if graphs_error:
            log.warning("cuda_graphs_off", reason=graphs_error,
                        effect="kernels are launched one by one: slower feeding")
        try:
            warmup_s = _warm_up(loaded, settings.max_batch)
        except EngineError as exc:
            _fail(f"{settings.engine_path}: warm-up batch failed: {exc}")
        with stop_on_signals() as stop:  # before ready: a SIGTERM once ready is announced drains, never kills
            source.open()
            metrics.queue_depth = source.queued
            metrics.set_engine(engine_labels(loaded, settings.engine_path, settings.device))
            metrics.set_ready()
            log.info("worker_ready", pid=os.getpid(), device=settings.device, load_s=round(load_s, 3),
                     warmup_s=round(warmup_s, 3), ready_s=round(time.perf_counter() - started, 3), **gpu)
            try:
                images = BatchPipeline(settings, loaded, source, client, log, stop, metrics=metrics,
                                       loader=loader).run()
            finally:
                source.close()
        log.info("worker_stopped", images=images)
        return 0
    finally:
        loaded.close()


if __name__ == "__main__":  # pragma: no cover - `python -m worker.cli`
    app()
