"""Named asyncio tasks that log their failure (the Service's own tasks have a done-callback of their own)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Coroutine

log = logging.getLogger(__name__)


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
