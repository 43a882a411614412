"""structlog set up once per worker process: readable lines on the terminal (or JSON lines on stdout,
`--log-json`), JSON lines in a log file.

Every batch produces one `batch` event (what `producer report` reads); `worker_started` and
`worker_stopped` bracket a run.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import structlog

_SHARED: list[structlog.typing.Processor] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True, key="time"),
]


def configure_logging(log_file: Path | None, level: int = logging.INFO,
                      json_stdout: bool = False) -> structlog.stdlib.BoundLogger:
    """Route structlog through stdlib logging to stderr (console format), or to stdout as JSON lines with
    json_stdout (containers), and to `log_file` (JSON lines)."""
    structlog.configure(
        processors=[*_SHARED, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    root = logging.getLogger("segqueue")
    root.handlers.clear()
    root.setLevel(level)
    root.propagate = False
    console = logging.StreamHandler(sys.stdout if json_stdout else sys.stderr)
    renderer = (structlog.processors.JSONRenderer() if json_stdout
                else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
    console.setFormatter(structlog.stdlib.ProcessorFormatter(processor=renderer, foreign_pre_chain=_SHARED))
    root.addHandler(console)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        to_file = logging.FileHandler(log_file, encoding="utf-8")
        to_file.setFormatter(
            structlog.stdlib.ProcessorFormatter(processor=structlog.processors.JSONRenderer(),
                                                foreign_pre_chain=_SHARED)
        )
        root.addHandler(to_file)
    return structlog.get_logger("segqueue.worker")
