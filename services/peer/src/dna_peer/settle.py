"""Settling what received messages owe, in the background of `Peer.watch`.

A handled blob owes a delivery receipt to its sender (a sealed put with its proof of
work), an acknowledgement to the identity's other devices (a put to the own mailbox) and
a signed delete from the replicas: 10-50 ms of puts and signed calls. A watch hands each
pushed round to a `Settler` and goes on handling the next, so a message is shown as soon
as it arrives instead of waiting behind its predecessors' receipts and deletes.

The settler waits until the pushes pause (``quiet_s``), or at most ``max_delay_s`` after
the oldest round it holds, and then settles everything handed over so far together: one
receipt per sender, one clean-up, whatever the number of rounds. A conversation's burst
thus costs a few receipts and deletes instead of one per message, and their CPU-bound
parts (sealing, proof of work, signing) stay out of the way of the messages arriving.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from dna_core.tasks import stop_tasks

from dna_peer.inbox import RECEIPT_BATCH_IDS, ReceiptDue, SyncReport

log = logging.getLogger("dna.peer")
SETTLE_QUIET_S = 0.05  # the pushes have paused: settle now
SETTLE_MAX_DELAY_S = 1.0  # a steady stream of pushes still settles this often
SETTLE_GRACE_S = 5.0  # a watch that stops first finishes settling what it received


class Settler:
    """Settles handed-over rounds in the background, one settling at a time, each covering
    every round handed over before it began. A failure is logged: receipts are best
    effort, and what was not deleted is deleted by a later clean-up (a device notes its
    own acknowledgements when it handles the blobs)."""

    def __init__(
        self,
        settle: Callable[[SyncReport], Awaitable[None]],
        *,
        quiet_s: float = SETTLE_QUIET_S,
        max_delay_s: float = SETTLE_MAX_DELAY_S,
    ) -> None:
        self._settle, self.quiet_s, self.max_delay_s = settle, quiet_s, max_delay_s
        self._due: SyncReport | None = None
        self._due_since = 0.0  # monotonic: when the oldest round now due was handed over
        self._added = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    def add(self, report: SyncReport) -> None:
        if not (report.held or report.receipts_due or report.history_wanted):
            return
        if self._due is None:
            self._due, self._due_since = SyncReport(), time.monotonic()
        self._due.held += report.held
        for receipt in report.receipts_due:
            owe(self._due.receipts_due, receipt)
        self._due.history_wanted |= report.history_wanted
        self._added.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while (due := await self._next_due()) is not None:
            try:
                await self._settle(due)
            except Exception as exc:  # any failure: the next round goes on regardless
                log.warning("settling received messages failed: %s", exc)

    async def _next_due(self) -> SyncReport | None:
        """Everything due, once no round was handed over for ``quiet_s``, or
        ``max_delay_s`` after the oldest one due, or at once when closing."""
        if self._due is None:
            return None
        deadline = self._due_since + self.max_delay_s
        while not self._closing and (wait_s := min(self.quiet_s, deadline - time.monotonic())) > 0:
            self._added.clear()
            try:
                async with asyncio.timeout(wait_s):
                    await self._added.wait()
            except TimeoutError:
                break  # the pushes paused
        due, self._due = self._due, None
        return due

    async def close(self) -> None:
        """Settle what is due at once and wait for it, up to ``SETTLE_GRACE_S``, then stop:
        deletes left undone are made by a later clean-up, receipts are best effort."""
        if self._task is None:
            return
        self._closing = True
        self._added.set()
        await asyncio.wait({self._task}, timeout=SETTLE_GRACE_S)
        await stop_tasks([self._task])


def owe(receipts: list[ReceiptDue], more: ReceiptDue) -> None:
    """Add ``more``'s message IDs to the receipt due to the same keys from the same
    identity, while it stays within ``RECEIPT_BATCH_IDS``; else owe a receipt of its own."""
    same = (r for r in receipts if r.to.fingerprint == more.to.fingerprint
            and r.signer is more.signer)  # fmt: skip
    into = next(same, None)
    if into is not None and len(into.message_ids) + len(more.message_ids) <= RECEIPT_BATCH_IDS:
        into.message_ids += more.message_ids
    else:
        receipts.append(ReceiptDue(more.to, more.signer, list(more.message_ids)))
