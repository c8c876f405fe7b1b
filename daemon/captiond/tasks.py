"""Named asyncio tasks that log their failure (the Service's own tasks have a done-callback of their own)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Coroutine

log = logging.getLogger(__name__)

_OVERSLEPT_S = 1.0  # a wait this much past its timeout was the process's absence, not the peer's silence


def log_failure(task: asyncio.Task) -> None:
    """Done-callback: log the exception a task ended with (a cancelled one ended fine)."""
    if not task.cancelled() and task.exception() is not None:
        log.error("task %s failed", task.get_name(), exc_info=task.exception())


def spawn(coro: Coroutine[Any, Any, Any], name: str, keep: set[asyncio.Task] | None = None) -> asyncio.Task:
    """Start `coro` as a task called `name` that logs its failure; `keep` holds it until it is done
    (the event loop keeps only a weak reference, so an unkept task can vanish mid-run)."""
    task = asyncio.get_running_loop().create_task(coro, name=name)
    task.add_done_callback(log_failure)
    if keep is not None:
        keep.add(task)
        task.add_done_callback(keep.discard)
    return task


async def within(aws: set[asyncio.Future], timeout: float) -> set[asyncio.Future]:
    """Those of `aws` done within `timeout` seconds of waiting (returning at the first), empty if none.

    A timeout the event loop itself overslept (the process stopped, a VM paused, the loop held up) is
    waited out again: a client that streamed all along had its data waiting in the socket, and was
    closed as idle before it could be read."""
    loop = asyncio.get_running_loop()
    while True:
        began = loop.time()
        done, _ = await asyncio.wait(aws, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if done or loop.time() - began < timeout + _OVERSLEPT_S:
            return done
