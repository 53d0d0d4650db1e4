"""Stopping asyncio tasks for sure."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

log = logging.getLogger(__name__)

RECANCEL_S = 1.0  # a task still running this long after its cancel is cancelled again


async def stop_tasks(
    tasks: Iterable[asyncio.Future[Any] | None],
    *,
    recancel_s: float = RECANCEL_S,
    failures_to: logging.Logger | logging.LoggerAdapter[logging.Logger] | None = None,
) -> list[BaseException]:
    """Cancel ``tasks`` (``None`` entries are skipped) and wait until every one has ended.

    One cancel is not always enough: code inside a task can turn a cancellation into an
    ordinary error and carry on, and a loop that retries errors then never ends. A storage
    node on SIGTERM waited 90 minutes for its GC loop while its Redis was away: the cancel
    ended up as a failed pass, the loop slept and ran again, and the node never stopped.
    So a task still running after ``recancel_s`` is cancelled again, until it ends.

    Returns what the tasks raised other than their cancellation, and never raises it: a
    stop path stops everything it owns. ``failures_to`` logs each (a long-lived loop that
    died is a bug, and retrieving its exception here silences asyncio's own report); a
    reader cut with its stream is expected, and its caller passes none. The caller's own
    cancellation is not swallowed."""
    owned = [task for task in tasks if task is not None]
    pending = {task for task in owned if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=recancel_s)
        for task in pending:
            log.warning("task %s went on after it was cancelled; cancelling it again", _name(task))
    failures = [task.exception() for task in owned if not task.cancelled()]
    failed = [failure for failure in failures if failure is not None]
    if failures_to is not None:
        for failure in failed:
            failures_to.error("a task had failed before it was stopped", exc_info=failure)
    return failed


def _name(task: asyncio.Future[Any]) -> str:
    return task.get_name() if isinstance(task, asyncio.Task) else repr(task)
