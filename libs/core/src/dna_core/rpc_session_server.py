"""The server side of stream sessions (docs/protocol.md, "Stream sessions"): the loop that
the mailbox's sessions (``dna_storage.mailbox_stream``) and the overlay's record sessions
(``dna_core.overlay.aio.records_session``) share. The client side is `dna_core.rpc_session`.

A session says hello (its window) first, then reads requests and writes their responses
on one stream. What each request means is the subclass's (``_take``); the rules every
session keeps are here, and breaking one cuts the session with a status saying why,
counted by reason: more than ``window`` requests unanswered (RESOURCE_EXHAUSTED), an ID
still in use (INVALID_ARGUMENT), a frame that does not decode (the gRPC gate's
INVALID_ARGUMENT: nothing in it is applied), or a response left unread for ``stall_s``
(RESOURCE_EXHAUSTED). A client that closes its side gets every answer, then the end.
A frame over the message limit is grpc's own refusal (RESOURCE_EXHAUSTED): grpcio shows
the session only the end of the request stream, as for a client that closed its side or
went away, so it cannot be counted here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Collection
from typing import Any

import grpc
from prometheus_client import Counter, Gauge

from dna_core.errors import MalformedError
from dna_core.ratelimit import SITE_TIER, SiteTier, SourceCounts
from dna_core.tasks import stop_tasks

log = logging.getLogger("dna.session")
Ctx = grpc.aio.ServicerContext[Any, Any]
# A response to write, what to do once it is written, and the request it answers (None
# for what answers none: the hello, a push): that request stops counting against the
# window when the writer takes it, before the write, so a client that read it and sends
# the next request never finds the node counting it still.
Outgoing = tuple[Any, Callable[[], None], int | None]


def nothing() -> None:
    """What an answer needs once written, when it needs nothing."""


class SourceCaps:
    """How many of something (sessions, subscriptions) live at once per source address
    (``ratelimit.source_key``: IPv6 per prefix), per IPv6 site (``share`` times as many
    for all the /64s of a /48, `ratelimit.SiteTier`) and in all: ``take`` one or say why
    not. Without it, one address could open a session per stream of each of its
    connections (the connection guard's 64 per source, grpcio's 100 streams each), each
    holding its window and pages; without the site tier, one /48 could open that per /64."""

    def __init__(
        self, what: str, per_source: int, total: int, site: SiteTier | None = None
    ) -> None:
        self.what, self.per_source, self.total = what, per_source, total
        self.live = SourceCounts(per_source, site)
        self.count = 0

    def take(self, source: str) -> SessionCutError | None:
        """Count one more for ``source``, or the refusal (RESOURCE_EXHAUSTED) if over."""
        tier = self.live.over(source)
        if tier == SITE_TIER:
            return SessionCutError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.what}: {self.live.per_site} open from this address's IPv6 "
                f"/{self.live.site.prefix_len} (the limit)",
                "site_limit",
            )
        if tier is not None:
            return SessionCutError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.what}: {self.per_source} open from this address (the limit)",
                "source_limit",
            )
        if self.count >= self.total:
            return SessionCutError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.what}: {self.total} open on this node (the limit)",
                "node_limit",
            )
        self.live.add(source)
        self.count += 1
        return None

    def give(self, source: str) -> None:
        self.live.remove(source)
        self.count -= 1


class SharedSlots:
    """Slots every session of a node draws from, at most ``per_source`` held by the
    sessions of one address, ``share`` times that by those of one IPv6 site (`SourceCaps`)
    and ``total`` by all: what bounds the node's memory for sessions as a whole (each
    session also has its own few). ``acquire`` waits for a slot; ``release`` is plain
    (called once an answer is written)."""

    def __init__(self, per_source: int, total: int, site: SiteTier | None = None) -> None:
        self.per_source, self.total = per_source, total
        self.held = SourceCounts(per_source, site)
        self.count = 0
        self._waiters: list[asyncio.Future[None]] = []

    def _fits(self, source: str) -> bool:
        return self.count < self.total and self.held.over(source) is None

    async def acquire(self, source: str) -> None:
        await self.until_free(source)
        self.take(source)

    def take(self, source: str) -> bool:
        """Take a slot now if ``source`` may have one (no waiting); whether it did."""
        if not self._fits(source):
            return False
        self.held.add(source)
        self.count += 1
        return True

    async def until_free(self, source: str) -> None:
        """Until ``source`` could take a slot (without taking it: taking one only to give
        it back would wake every waiter each time, and they would do the same)."""
        while not self._fits(source):
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                self._waiters.remove(waiter)

    def release(self, source: str, count: int = 1) -> None:
        if count <= 0:
            return
        self.held.remove(source, count)
        self.count -= count
        for waiter in self._waiters:  # each checks again whether it fits now
            if not waiter.done():
                waiter.set_result(None)


class SessionCutError(Exception):
    """The session breaks a rule: end it with ``code`` and ``reason`` (counted by kind)."""

    def __init__(self, code: grpc.StatusCode, reason: str, kind: str) -> None:
        super().__init__(reason)
        self.code, self.reason, self.kind = code, reason, kind


class ServerSession:
    """One client's session: ``run`` it with the request stream."""

    def __init__(
        self,
        context: Ctx,
        *,
        window: int,
        stall_s: float,
        opened: Gauge,
        cuts: Counter,
        caps: SourceCaps | None = None,
        source: str = "",
    ) -> None:
        self.context, self.window, self.stall_s = context, window, stall_s
        self.caps, self.source = caps, source  # sessions per source address and in all
        self.opened, self.cuts = opened, cuts  # sessions open; cuts by ``reason``
        self.unanswered: set[int] = set()  # request IDs whose response is not being written
        self.out: asyncio.Queue[Outgoing] = asyncio.Queue()  # bounded by the window
        self.tasks: set[asyncio.Task[None]] = set()  # the subclass's work (``spawn``)
        self.writing: asyncio.Future[Any] | None = None  # the response being written
        self.closing: asyncio.Task[None] | None = None  # ``_close``'s work, once started

    # -- what a subclass gives ---------------------------------------------------------

    def _hello(self) -> Any:
        """The first response: the session's window."""
        raise NotImplementedError

    def _take(self, request: Any) -> None:
        """One request read: ``claim`` its ID, then answer it (``out``) or ``spawn``."""
        raise NotImplementedError

    async def _room(self) -> None:
        """Wait, before reading the next request, until the session may hold one more (a
        request not yet read is the client's memory, held back by HTTP/2 flow control)."""

    def _ending(self) -> None:
        """The session is ending (the client closed its side, or it is cut)."""

    def _ended(self) -> None:
        """The session is over (count what it carried)."""

    # -- the loop ----------------------------------------------------------------------

    async def run(self, requests: AsyncIterator[Any]) -> None:
        refusal = self.caps.take(self.source) if self.caps is not None else None
        if refusal is not None:  # refused before anything is read or held
            self.cuts.labels(reason=refusal.kind).inc()
            await self._abort(refusal)
            return
        await self._run(requests)  # its close gives the address's place back

    async def _run(self, requests: AsyncIterator[Any]) -> None:
        self.opened.inc()
        self.out.put_nowait((self._hello(), nothing, None))
        writer = asyncio.create_task(self._write_out())
        reader = asyncio.create_task(self._read(requests))
        try:
            await asyncio.wait((reader, writer), return_when=asyncio.FIRST_COMPLETED)
            if reader.done():
                reader.result()  # raises a cut
                await self._finish(writer)  # the client closed its side
            else:
                writer.result()  # raises a cut
        except SessionCutError as cut:
            self.cuts.labels(reason=cut.kind).inc()
            # Free the session first: grpc sends the status only after the response a
            # client that never reads left stuck in flow control, which may be never.
            await self._close(reader, writer)
            await self._abort(cut)
        finally:
            await self._close(reader, writer)

    def claim(self, request_id: int, in_use: Collection[int] = ()) -> None:
        """Count a request against the window; a cut if it is full or the ID in use."""
        if len(self.unanswered) >= self.window:
            raise SessionCutError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"session: more than {self.window} requests unanswered (the window)",
                "window",
            )
        if request_id in self.unanswered or request_id in in_use:
            raise SessionCutError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"session: request ID {request_id} is still in use",
                "duplicate_id",
            )
        self.unanswered.add(request_id)

    def spawn(self, work: Any) -> asyncio.Task[None]:
        task = asyncio.create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def _abort(self, cut: SessionCutError) -> None:
        # The status never leaves if it is sent while a response is still being written
        # (a cut right after the hello left about one client in 30 waiting for it until its
        # deadline): that write goes first, for at most the stall limit (a client that
        # never reads gets its status only once it reads, whatever we do).
        if self.writing is not None and not self.writing.done():
            await asyncio.wait((self.writing,), timeout=self.stall_s)
        try:
            await self.context.abort(cut.code, cut.reason)
        except grpc.aio.AbortError:
            raise
        except Exception:  # grpc could not send it: the call is gone, nobody to tell
            log.debug("session cut after its call ended", extra={"reason": cut.kind})

    async def _finish(self, writer: asyncio.Task[None]) -> None:
        """The client closed its side: answer what it asked, then end."""
        self._ending()
        while self.tasks:
            await asyncio.wait(set(self.tasks))
        written = asyncio.ensure_future(self.out.join())  # every answer out, then done
        try:
            await asyncio.wait((written, writer), return_when=asyncio.FIRST_COMPLETED)
        finally:  # cancelled too: ``_close`` empties the queue without a task_done, so the
            written.cancel()  # join would wait forever, holding the queue
        if writer.done():
            writer.result()  # a cut while answering
        writer.cancel()

    async def _close(self, *tasks: asyncio.Task[None]) -> None:
        """Stop the session's tasks, then give back what it holds (``opened``, ``_ended``):
        once, and to the end even if the call is cancelled meanwhile. grpc cancels the call
        when its client goes away, and that comes while the session is closing when the
        client had closed its side first (the end of its requests, then its cancel): the
        close was cut short after its first wait, the next call of it found it started,
        and the session stayed counted open and kept its page slots for the life of the
        node (a storage node under load counted one more mailbox session than it had)."""
        if self.closing is None:
            self.closing = asyncio.create_task(self._close_once(tasks))
            _CLOSING.add(self.closing)  # a task only the loop holds may be collected
            self.closing.add_done_callback(_CLOSING.discard)
        await asyncio.shield(self.closing)

    async def _close_once(self, tasks: tuple[asyncio.Task[None], ...]) -> None:
        try:
            self._ending()
            await stop_tasks((*tasks, *self.tasks))
            while not self.out.empty():  # responses never to be written
                self.out.get_nowait()
            self.opened.dec()
            self._ended()
        finally:
            # The address's place, in the same step as the gauge: given back by the
            # handler, after the close's task had ended, a client that saw the session
            # gone (the gauge) and opened another was refused as over its cap meanwhile;
            # and a handler cancelled twice ended before its close, freeing the place
            # while the session's work still ran.
            if self.caps is not None:
                self.caps.give(self.source)

    async def _read(self, requests: AsyncIterator[Any]) -> None:
        try:
            async for request in requests:
                self._take(request)
                await self._room()  # before reading the next frame: what it holds is bounded
                await asyncio.sleep(0)  # let the writer and other calls run between requests
        except MalformedError as exc:  # a frame that does not decode (the gRPC gate)
            raise SessionCutError(
                grpc.StatusCode.INVALID_ARGUMENT, exc.reason, "malformed"
            ) from None

    async def _write_out(self) -> None:
        while True:
            response, written, request_id = await self.out.get()
            if request_id is not None:
                self.unanswered.discard(request_id)
            write = asyncio.ensure_future(self.context.write(response))
            # A write this task stops waiting for (a stall cut, or the call ended under
            # it: grpc refused a frame over the message limit, the client went away) fails
            # later with nobody awaiting it; retrieved here, or asyncio logs an error with
            # its traceback for each such call, and any client could grow the logs at will.
            write.add_done_callback(_retrieve)
            self.writing = write
            await asyncio.wait((write,), timeout=self.stall_s)
            if not write.done():
                # Not cancelled: grpc fails a call whose write was cancelled under it, and
                # the status must still follow this response out.
                raise SessionCutError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"session: responses left unread for {self.stall_s:g} s",
                    "stalled",
                )
            write.result()
            written()
            self.out.task_done()


# The sessions' closes under way (``_close``): the loop holds a task only weakly.
_CLOSING: set[asyncio.Task[None]] = set()


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # a write that ended with its call: nothing to say
