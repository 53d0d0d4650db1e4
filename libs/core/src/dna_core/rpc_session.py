"""The client side of a stream session, whatever the service (docs/protocol.md, "Stream
sessions"): the mailbox's (`dna_core.mailbox.session`) and the overlay records'
(`dna_core.overlay.aio.records_session`).

One long-lived bidirectional gRPC stream per node carries this client's requests, each
with an ID, at most the node's window of them unanswered (a request waits here for room
rather than get the session cut). The node's first frame is its hello, with the window.

A request answers as the unary call would: a refusal is the response's ``error`` status,
raised (``request``) as the same `RemoteError` the unary call's failure would be. A broken
session fails what was in flight with `UnavailableError` and the next request opens a new
one. A node that serves no sessions (older versions: UNIMPLEMENTED) is remembered for
``NO_SESSION_RETRY_S``, and the caller uses the unary calls meanwhile (`NoSession`).

A service's session subclasses `StreamSession` with how to open its stream and frame a
request (``_start_stream``, ``_frame``), and may hook what arrives besides answers.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, Generic, Protocol, TypeVar

import grpc

from dna_core.errors import ClosedError, RefusedError, RemoteError, UnavailableError
from dna_core.rpc_errors import UNAVAILABLE_CODES, remote_error
from dna_core.singleflight import SingleFlight
from dna_core.tasks import stop_tasks

NO_SESSION_RETRY_S = 300.0  # how long a node that serves no sessions is asked unary
OPEN_TIMEOUT_S = 5.0  # for the node's hello

T = TypeVar("T")
Channels = Callable[[str], grpc.aio.Channel]


class RequestStatusLike(Protocol):
    """A request's refusal on a session (each service's ``RequestStatus`` message)."""

    @property
    def code(self) -> int: ...
    @property
    def reason(self) -> str: ...
    @property
    def retry_after_ms(self) -> int: ...


class StreamGoneError(UnavailableError):
    """The session's stream had ended before the request could be sent: the node never
    saw it, so it may be sent again on a new session."""


class NoSession(Exception):  # noqa: N818 (a signal, not an error: use the unary call)
    """The node serves no sessions."""


class AnsweredUnavailableError(UnavailableError):
    """The node answered the request with a refusal it may lift later (its rate, its room,
    its load): unlike a session that failed, it saw the request, so the same request sent
    again (a unary call) is refused as a replay of its nonce, which hides why."""


def status_error(status: RequestStatusLike) -> RemoteError:
    """A request's refusal on a session, as the unary call's failure would be raised (one
    it may lift later: `AnsweredUnavailableError`)."""
    code = _CODES.get(status.code, grpc.StatusCode.UNKNOWN)
    if code in UNAVAILABLE_CODES:
        return AnsweredUnavailableError(code.name, status.reason, status.retry_after_ms)
    return RefusedError(code.name, status.reason)


_CODES = {code.value[0]: code for code in grpc.StatusCode}
# What a write on a stream that has ended raises: its status, or (the call finished before
# the reader saw it: a node killed mid-session) grpc's InvalidStateError.
STREAM_GONE = (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError)


class StreamSession:
    """One open session to one node (``open``, then requests from any task).

    Responses are the service's session response message: ``id``, a ``hello`` (the
    first frame), an ``error`` status or the operation's answer."""

    def __init__(
        self, channel: grpc.aio.Channel, timeout: float, open_timeout: float = OPEN_TIMEOUT_S
    ) -> None:
        self.channel = channel
        self.timeout, self.open_timeout = timeout, open_timeout
        self._call: Any = None
        self._room: asyncio.Semaphore | None = None
        self._window = 0
        self._writing = asyncio.Lock()
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._reader: asyncio.Task[None] | None = None
        self.closed: RemoteError | None = None

    # -- what a service's session says ---------------------------------------------------

    def _start_stream(self, channel: grpc.aio.Channel) -> Any:
        """The stream call (``Stub(channel).Session()``)."""
        raise NotImplementedError

    def _frame(self, request_id: int, op: dict[str, Any]) -> Any:
        """The request frame: ``id`` and the operation's field set to its message."""
        raise NotImplementedError

    def _before_answer(self, response: Any) -> None:
        """Called with each answer before its request is told (a subscription's page)."""

    def _ended(self) -> None:
        """Called once the stream is over and the requests in flight have failed."""

    # -- the session ---------------------------------------------------------------------

    async def open(self) -> None:
        """Start the stream and read the node's hello (its window); `NoSession` when the
        node serves no sessions, `RemoteError` when it cannot be reached."""
        self._call = self._start_stream(self.channel)
        try:
            async with asyncio.timeout(self.open_timeout):
                hello = await self._call.read()
        except TimeoutError:
            self._call.cancel()
            raise UnavailableError("DEADLINE_EXCEEDED", "session: no hello from the node") from None
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.UNIMPLEMENTED:
                raise NoSession from err
            raise remote_error(err) from err
        if hello is grpc.aio.EOF or not hello.HasField("hello") or hello.hello.window < 1:
            self._call.cancel()
            raise UnavailableError("UNKNOWN", "session: the node did not say hello")
        self._window = hello.hello.window
        self._room = asyncio.Semaphore(self._window)
        self._reader = asyncio.create_task(self._read())

    async def request(self, **op: Any) -> Any:
        """Send one request (its operation's field=message) and wait for its answer;
        a refusal is raised as `RemoteError` (``status_error``)."""
        response = await self.exchange(op)
        if response.HasField("error"):
            raise status_error(response.error)
        return response

    async def exchange(self, op: dict[str, Any], request_id: int | None = None) -> Any:
        """Send one request (``op``: its operation's field and message) and return the
        node's answer as it came, a refusal included."""
        if self.closed is not None:
            raise StreamGoneError(self.closed.grpc_code, self.closed.details)
        assert self._room is not None, "open the session first"
        await self._room.acquire()  # released when the answer arrives, not on a timeout
        if self.closed is not None:  # it ended while this request waited for room
            self._room.release()
            raise StreamGoneError(self.closed.grpc_code, self.closed.details)
        request_id = next(self._ids) if request_id is None else request_id
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            async with self._writing:  # grpc takes one write at a time on a stream
                await self._call.write(self._frame(request_id, op))
        except STREAM_GONE as err:
            self._end(err)
            assert self.closed is not None
            raise StreamGoneError(self.closed.grpc_code, self.closed.details) from None
        done, _ = await asyncio.wait({future}, timeout=self.timeout)
        if not done:
            raise UnavailableError("DEADLINE_EXCEEDED", "session: no answer in time")
        return future.result()

    async def _read(self) -> None:
        try:
            while True:
                response = await self._call.read()
                if response is grpc.aio.EOF:
                    self._end(None)
                    return
                self._deliver(response)
        except grpc.aio.AioRpcError as err:
            self._end(err)
        except asyncio.CancelledError:
            self._end(None)
            raise

    def _deliver(self, response: Any) -> None:
        future = self._pending.pop(response.id, None)
        if future is None:
            return  # an answer to a request this client no longer knows: ignore
        assert self._room is not None
        self._room.release()
        self._before_answer(response)
        if not future.done():
            future.set_result(response)

    def _end(self, err: BaseException | None) -> None:
        """The stream is over: fail what waits, then ``_ended``."""
        if self.closed is None:
            if isinstance(err, grpc.aio.AioRpcError):
                self.closed = remote_error(err)
            else:
                self.closed = UnavailableError("UNAVAILABLE", "session: the stream ended")
        for future in self._pending.values():
            if not future.done():
                future.set_exception(self.closed)
                future.exception()  # retrieved: a waiter that gave up must not log it
        self._pending.clear()
        if self._room is not None:  # wake every request waiting for room: they fail now
            for _ in range(self._window):
                self._room.release()
        self._ended()

    async def close(self) -> None:
        if self._call is not None:
            self._call.cancel()
        await stop_tasks([self._reader])


S = TypeVar("S", bound=StreamSession)


class SessionPool(Generic[S]):
    """A client's sessions, one per node (by gRPC target), opened on first use with
    ``make(channel, timeout)``. With ``max_sessions``, at most that many are kept: the
    least recently used is closed (a client that meets thousands of nodes, as the
    overlay's record client does, keeps no stream to each).

    Once ``close`` has begun the pool is closed for good: a `get` (so a `call`) raises
    `ClosedError` at once and opens no stream, and an open that was under way closes the
    session it made instead of keeping it."""

    def __init__(
        self,
        channels: Channels,
        timeout: float,
        discard: Callable[[str], None] | None = None,
        *,
        make: Callable[[grpc.aio.Channel, float], S],
        max_sessions: int | None = None,
    ) -> None:
        self._channels, self.timeout, self._make = channels, timeout, make
        self._discard = discard  # drops a target's channel: the next one connects afresh
        self.max_sessions = max_sessions
        self._sessions: OrderedDict[str, S] = OrderedDict()
        self._opening: SingleFlight[str, S] = SingleFlight()  # by target
        self._unsupported: dict[str, float] = {}  # target -> monotonic time to try again
        self._closing: set[asyncio.Task[None]] = set()
        self.closed = False

    def __len__(self) -> int:
        return len(self._sessions)

    async def get(self, target: str) -> S:
        """The open session to ``target``; `NoSession` when it serves none (recently),
        `ClosedError` once the pool is closed."""
        self._check_open()
        if time.monotonic() < self._unsupported.get(target, 0.0):
            raise NoSession
        session = self._sessions.get(target)
        if session is not None and session.closed is None:
            self._sessions.move_to_end(target)
            return session
        return await self._opening.run(target, lambda: self._open(target))

    async def call(self, target: str, work: Callable[[S], Awaitable[T]]) -> T:
        """``work`` on the session to ``target``, once more on a new session if the old
        one's stream turned out to be gone (the node restarted since: the request never
        left). `NoSession`: use the unary call."""
        for attempt in range(2):
            session = await self.get(target)
            try:
                return await work(session)
            except StreamGoneError:
                if attempt:
                    raise
        raise AssertionError("unreachable")

    async def _open(self, target: str) -> S:
        try:
            session = await self._start(target)
        except UnavailableError:
            # A channel whose node went away fails fast until its reconnect backoff ends,
            # even once the node is back: a stream's open, unlike a unary call on an idle
            # channel, meets that. Try once more on a fresh channel (a node still down
            # refuses it at once).
            if self._discard is None:
                raise
            self._discard(target)
            session = await self._start(target)
        if self.closed:  # closed while the hello was awaited: keep no stream open
            await session.close()
            self._check_open()
        old = self._sessions.pop(target, None)
        if old is not None:
            await old.close()
        self._sessions[target] = session
        self._trim()
        return session

    def _trim(self) -> None:
        """Close the least recently used sessions over ``max_sessions``, and forget the
        nodes found without sessions whose time to be asked again has come."""
        if self.max_sessions is None:
            return
        while len(self._sessions) > self.max_sessions:
            _, oldest = self._sessions.popitem(last=False)
            task = asyncio.get_running_loop().create_task(oldest.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        if len(self._unsupported) > self.max_sessions:
            now = time.monotonic()
            self._unsupported = {t: at for t, at in self._unsupported.items() if at > now}

    def _check_open(self) -> None:
        if self.closed:
            raise ClosedError("session pool: used after its close (no stream opened)")

    async def _start(self, target: str) -> S:
        self._check_open()  # a retry on a fresh channel after the close began
        session = self._make(self._channels(target), self.timeout)
        try:
            await session.open()
        except NoSession:
            self._unsupported[target] = time.monotonic() + NO_SESSION_RETRY_S
            raise
        return session

    async def close(self) -> None:
        # Closed first, so nothing starts a session from here on; an open still under way
        # closes the session it made (`_open`), and ends before this (bounded by the
        # open's timeouts).
        self.closed = True
        await self._opening.settled()
        sessions, self._sessions = list(self._sessions.values()), OrderedDict()
        for session in sessions:
            await session.close()
        await asyncio.gather(*self._closing)
