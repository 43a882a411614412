"""The forked store pool shared by producer and worker (broker/process_store.py), on a real Redis.

Each child must hold its own Redis connection (not the parent's, not a sibling's), ignore Ctrl-C,
keep SIGTERM's default, and have run the caller's hook before connecting; children that cannot
connect must break the pool at start rather than at the first task.
"""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures.process import BrokenProcessPool
from functools import partial

import pytest

from broker.connection import BrokerSettings
from broker.process_store import fork_store_pool, process_store
from tests.conftest import free_port

CHILDREN = 3


def _describe_child(counter_key: str, children: int) -> tuple[int, int, bool, bool, int]:
    """(pid, Redis client id, SIGINT ignored, SIGTERM default, niceness), once `children` tasks run at the same time.

    A child runs one task at a time, so `children` tasks waiting here together are on `children` processes.
    """
    client = process_store().client
    client.incr(counter_key)
    deadline = time.monotonic() + 60
    while int(client.get(counter_key) or 0) < children:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {client.get(counter_key)!r} of {children} tasks started together")
        time.sleep(0.01)
    return (os.getpid(), client.client_id(), signal.getsignal(signal.SIGINT) == signal.SIG_IGN,
            signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, os.nice(0))


def test_each_child_has_its_own_connection_signals_and_hook(client, redis_url, queue_name):
    settings = BrokerSettings(redis_url=redis_url, queue=queue_name)
    counter_key = f"test:{queue_name}:started"
    executor = fork_store_pool(settings, CHILDREN, partial(os.nice, 1), wait=True)
    try:
        futures = [executor.submit(_describe_child, counter_key, CHILDREN) for _ in range(CHILDREN)]
        described = [future.result(timeout=120) for future in futures]
    finally:
        executor.shutdown(wait=True)
    pids = {pid for pid, *_ in described}
    client_ids = {client_id for _, client_id, *_ in described}
    assert len(pids) == CHILDREN and os.getpid() not in pids
    assert len(client_ids) == CHILDREN and client.client_id() not in client_ids
    assert all(sigint_ignored and sigterm_default for _, _, sigint_ignored, sigterm_default, _ in described)
    assert {niceness for *_, niceness in described} == {min(os.nice(0) + 1, 19)}


def test_children_that_cannot_connect_break_the_pool_at_start():
    nobody = BrokerSettings(redis_url=f"redis://127.0.0.1:{free_port()}/0", queue="unused")
    with pytest.raises(BrokenProcessPool):
        fork_store_pool(nobody, 2, wait=True)


def test_the_parent_has_no_process_store():
    with pytest.raises(RuntimeError, match="without its Redis store"):
        process_store()
