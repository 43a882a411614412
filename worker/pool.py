"""Supervise a pool of worker processes: one `worker run` child per device, restarted if it dies.

`worker run --device all` (or a list such as `cuda:0,cuda:1` or `cpu,cpu`) becomes a WorkerPool of
children `python -m worker.cli run ... --device cuda:i`. The supervisor itself runs no engine and
never touches CUDA. What it does:

- starts every child in its own process group, so a Ctrl-C at the terminal reaches only the
  supervisor, which passes it on once (a child treats a second signal as "exit now");
- restarts a child that exits unexpectedly (non-zero status or killed by a signal), at most
  `max_restarts` times within `restart_window_s` per child, after `restart_delay_s`; past that the
  child is given up and logged (`child_restart_limit`). Exit status 0 means the child finished
  (--burst, or drained after a signal) and status 2 a setup error (bad engine, unreachable Redis at
  start): neither is restarted;
- on SIGTERM/SIGINT sends the same signal to every live child, waits up to `stop_timeout_s` for
  them to drain and exit, SIGKILLs whatever is left, and returns. A second signal is passed on too
  (the children then exit at once);
- children get PR_SET_PDEATHSIG=SIGTERM (Linux), so they drain and exit if the supervisor dies.

The exit status is 0 when every child's last exit was 0, else 1. Every wait is bounded.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

#: a worker's exit status for setup errors (bad engine, bad options, Redis unreachable at start)
SETUP_ERROR = 2


class Log(Protocol):
    def info(self, event: str, **kw: Any) -> Any: ...
    def warning(self, event: str, **kw: Any) -> Any: ...
    def error(self, event: str, **kw: Any) -> Any: ...


@dataclass(frozen=True)
class ChildSpec:
    """One pool member: a label ("gpu0", "cpu1"), its device, its full command line, and environment
    variables it gets on top of the pool's (secrets such as a Redis URL with a password, which any
    user of the host could read on a command line)."""

    label: str
    device: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PoolSettings:
    """Restart and stop bounds, in seconds and counts (per child)."""

    max_restarts: int = 5
    restart_window_s: float = 300.0
    restart_delay_s: float = 1.0
    stop_timeout_s: float = 300.0
    poll_interval_s: float = 0.2


@dataclass
class _Child:
    spec: ChildSpec
    process: subprocess.Popen | None = None
    restarts: deque[float] = field(default_factory=deque)
    last_status: int | None = None
    done: bool = False  # finished or given up: not restarted
    restart_at: float | None = None


def die_with_parent() -> None:  # pragma: no cover - runs in a forked child
    """Ask Linux to SIGTERM this process when the thread that forked it exits (PR_SET_PDEATHSIG)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class WorkerPool:
    """Start `children`, keep them running, pass signals on; `run()` returns the exit status."""

    def __init__(self, children: Sequence[ChildSpec], log: Log, settings: PoolSettings | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not children:
            raise ValueError("a pool needs at least one child")
        self.settings = settings or PoolSettings()
        self._log = log
        self._clock = clock
        self._children = [_Child(spec) for spec in children]
        self._signals: list[int] = []

    # -- signals ---------------------------------------------------------------------------------
    def _on_signal(self, signum: int, _frame: object) -> None:
        self._signals.append(signum)

    def _forward(self, signum: int) -> None:
        for child in self._children:
            if child.process is not None and child.process.poll() is None:
                try:
                    child.process.send_signal(signum)
                except ProcessLookupError:
                    pass

    # -- children --------------------------------------------------------------------------------
    def _start(self, child: _Child) -> None:
        preexec = die_with_parent if sys.platform.startswith("linux") else None
        env = {**os.environ, **child.spec.env} if child.spec.env else None
        child.process = subprocess.Popen(child.spec.argv, stdin=subprocess.DEVNULL, process_group=0,
                                         preexec_fn=preexec, env=env)
        child.restart_at = None
        self._log.info("child_started", child=child.spec.label, device=child.spec.device, pid=child.process.pid)

    def _on_exit(self, child: _Child, status: int) -> None:
        """A child exited while the pool runs: finished, setup error, or restart (rate-bounded)."""
        child.last_status = status
        pid = child.process.pid if child.process else None
        child.process = None
        if status == 0:
            child.done = True
            self._log.info("child_finished", child=child.spec.label, pid=pid)
            return
        if status == SETUP_ERROR:
            child.done = True
            self._log.error("child_setup_error", child=child.spec.label, pid=pid, status=status,
                            note="not restarted: fix the options or the engine (see the child's error above)")
            return
        now = self._clock()
        window = self.settings.restart_window_s
        while child.restarts and now - child.restarts[0] > window:
            child.restarts.popleft()
        if len(child.restarts) >= self.settings.max_restarts:
            child.done = True
            self._log.error("child_restart_limit", child=child.spec.label, pid=pid, status=status,
                            restarts=len(child.restarts), window_s=window)
            return
        child.restarts.append(now)
        child.restart_at = now + self.settings.restart_delay_s
        self._log.warning("child_died", child=child.spec.label, pid=pid, status=status,
                          restart_in_s=self.settings.restart_delay_s,
                          restart=len(child.restarts), max_restarts=self.settings.max_restarts, window_s=window)

    def _poll(self) -> None:
        for child in self._children:
            if child.process is not None:
                status = child.process.poll()
                if status is not None:
                    self._on_exit(child, status)
            if child.process is None and not child.done and child.restart_at is not None \
                    and self._clock() >= child.restart_at:
                self._log.info("child_restarting", child=child.spec.label)
                self._start(child)

    def _alive(self) -> list[_Child]:
        return [child for child, _ in self._running()]

    def _running(self) -> list[tuple[_Child, subprocess.Popen]]:
        """The children whose process is running, each with that process."""
        return [(c, c.process) for c in self._children if c.process is not None and c.process.poll() is None]

    def _stop(self, signum: int) -> None:
        """Pass `signum` on, wait (bounded) for every child, SIGKILL what is left."""
        self._log.info("pool_stopping", signal=signal.Signals(signum).name, children=len(self._alive()))
        self._forward(signum)
        forwarded = 1
        deadline = self._clock() + self.settings.stop_timeout_s
        while self._alive() and self._clock() < deadline:
            if len(self._signals) > forwarded:  # a second signal: the children exit at once
                forwarded = len(self._signals)
                self._forward(self._signals[-1])
            time.sleep(self.settings.poll_interval_s)
        for child, process in self._running():
            self._log.error("child_kill", child=child.spec.label, pid=process.pid,
                            note=f"still running {self.settings.stop_timeout_s:.0f} s after the signal")
            process.kill()
            process.wait(timeout=30)
        for child in self._children:
            if child.process is not None:
                child.last_status = child.process.wait(timeout=30)
                self._log.info("child_stopped", child=child.spec.label, pid=child.process.pid,
                               status=child.last_status)
                child.process = None

    def run(self) -> int:
        """Supervise until a signal arrives or every child is done; 0 if every child's last exit was 0."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self._log.info("pool_started", children=[c.spec.label for c in self._children])
            for child in self._children:
                self._start(child)
            while not self._signals:
                self._poll()
                if all(c.done for c in self._children):
                    break
                time.sleep(self.settings.poll_interval_s)
            if self._signals:
                self._stop(self._signals[0])
        except BaseException:
            for _, process in self._running():  # an error in the supervisor itself: leave no orphans
                process.kill()
                process.wait(timeout=30)
            raise
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        statuses = {c.spec.label: c.last_status for c in self._children}
        status = 0 if all(s == 0 for s in statuses.values()) else 1
        self._log.info("pool_stopped", statuses=statuses, status=status)
        return status

