"""The client side of store-and-forward: replicated put, merged fetch, delete.

This module is the asyncio adapter of the mailbox client: it looks the storage nodes up,
solves proofs of work, signs, keeps fetch sessions and makes the gRPC calls. What to do
next (replica choice, write quorum, hand-off, proof-of-work escalation, "retry after",
merging pages by blob ID and moving cursors) is decided by the sans-I/O planner
(planner.py), from what this adapter reports to it; the messages are the codec's
(codec.py).

A mailbox lives on the R = 5 storage nodes closest to its ID, at most 2 of one /24
(/48) while other subnets are left (`planner.replica_set`). A put goes to all
of them in parallel with one proof of work (it is bound to mailbox and blob,
not to a node) and succeeds once W = 3 stored it durably. When replicas are
down or refuse, the next-closest storage nodes take the write instead (hinted
hand-off: anti-entropy moves it to the rightful replicas later), chosen with the
same spread. A fetch asks
the replicas, each from its own cursor, with one signed request naming them
all, and asks a hand-off candidate only in place of a replica that did not
answer; results merge by blob ID.

The candidates of a mailbox (replicas, then hand-off candidates) are cached for
``replica_set_ttl_s`` (30 s), so repeated puts and fetches to one mailbox skip
the overlay lookup; any candidate failing drops the entry.

Puts to one node travel in ``PutMany`` calls: the first goes out at once, and the
puts that arrive while a call to that node is in flight leave together in the
next one (`NodeBatcher`). One put at a time costs one call, as a plain ``Put``
would; many in flight cost a few calls per node instead of one each, which is
where a client's CPU went (~0.26 ms of gRPC per call, 5 calls per put).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import grpc

from dna_core import trace
from dna_core.crypto import Identity
from dna_core.crypto import pow as pow_
from dna_core.errors import (
    ClosedError,
    ProtocolError,
    RemoteError,
    UnavailableError,
)
from dna_core.mailbox.auth import (
    MAX_DELETE_IDS,
    FetchSession,
    fetch_body,
    open_session,
    session_fetch,
    sign_delete,
    sign_fetch,
)
from dna_core.mailbox.codec import StoredBlob, put_request
from dna_core.mailbox.ids import blob_id, mailbox_id, put_pow_hash
from dna_core.mailbox.planner import (
    FETCH_BUDGET_BYTES,
    HANDOFF_CANDIDATES,
    MAILBOX_FULL,
    MAX_POW_BITS,
    MAX_RETRY_AFTER_S,
    REPLICA_SET_CACHE_SIZE,
    REPLICA_SET_TTL_S,
    REPLICAS,
    SHORT_REPLICA_SET_TTL_S,
    WRITE_QUORUM,
    Ask,
    FetchState,
    Finished,
    Put,
    PutResult,
    QuorumError,
    ReadPlan,
    ReplicaSetCache,
    TooFewNodesError,
    UnreachableError,
    WritePlan,
    mailbox_candidates,
    storage_candidates,
)
from dna_core.mailbox.session import (
    NodeSession,
    NoSession,
    SessionPool,
    Subscription,
    subscribe_nodes,
)
from dna_core.overlay.aio.node import OverlayNode, find_enough
from dna_core.overlay.contact import Contact
from dna_core.rpc_errors import call
from dna_core.rpc_session import AnsweredUnavailableError
from dna_core.singleflight import SingleFlight
from dna_core.wire.gen.dna.v1 import mailbox_pb2, mailbox_pb2_grpc

__all__ = [
    "DELETE_BATCH_IDS", "FETCH_BUDGET_BYTES", "HANDOFF_CANDIDATES", "MAX_POW_BITS",
    "REPLICAS", "REPLICA_SET_CACHE_SIZE", "WRITE_QUORUM", "DeleteResult", "FetchState",
    "MailboxClient", "NodeBatcher", "PutResult", "QuorumError", "ReplicaSetCache",
    "UnreachableError",
]  # fmt: skip

T = TypeVar("T")
SESSION_MARGIN_MS = 60_000  # a session this close to expiry is not used: sign instead
MAX_SESSIONS = 4096  # (mailbox, node) sessions a client keeps; the oldest go first
MAX_PUT_BATCH = 64  # puts per PutMany call (the node's limit)
MAX_PUT_BATCH_BYTES = 2 * 1024 * 1024  # half the node's 4 MiB message limit
POW_YIELD_EVERY = 512  # proof-of-work attempts between two yields to the loop (~0.2 ms)


# Blob IDs per signed delete (nodes accept MAX_DELETE_IDS). The request is 6.6 KB of key set
# and signature plus 34 bytes per ID, 13.4 KB for 200; a replica stores it once for the
# batch, but repair moves it with every tombstone: small batches keep that small.
DELETE_BATCH_IDS = 200
DELETE_REQUEST_BYTES = 16 * 1024  # what a full batch's request stays under (tested)
assert DELETE_BATCH_IDS <= MAX_DELETE_IDS
_UNREACHABLE = "unreachable"
# Rounds a delete batch is sent to the nodes that answered "retry after" (a node rates the
# IDs it does not hold per source): each round re-signed, as the node has spent the nonce.
DELETE_ATTEMPTS = 3


@dataclass
class DeleteResult:
    deleted: list[bytes] = field(default_factory=list)  # tombstoned on at least W nodes
    refusals: list[str] = field(default_factory=list)  # why nodes refused a batch, if they did


async def solve_yielding(
    payload_hash: bytes, difficulty: int, *, now_ms: int, chunk: int = POW_YIELD_EVERY
) -> tuple[pow_.Proof, int]:
    """`pow.solve` for a put (in `pow.PUT_PARTS` parts: the same work, a short tail),
    handing the event loop back every ``chunk`` attempts (~0.2 ms), so a device solving
    a put's proof still handles what arrives meanwhile (a pushed message)."""
    search = pow_.Search(payload_hash, difficulty, now_ms, parts=pow_.parts_for(difficulty))
    while (found := search.step(chunk)) is None:
        await asyncio.sleep(0)
    return found


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


Outcome = mailbox_pb2.PutOutcome | None  # None: the call itself failed


class NodeBatcher:
    """Coalesces the puts in flight to one node into ``PutMany`` calls, no timer: a put
    that finds no call in flight is sent at once; the ones that arrive meanwhile are
    sent together when it returns (up to ``MAX_PUT_BATCH`` puts and
    ``MAX_PUT_BATCH_BYTES``)."""

    def __init__(
        self, send: Callable[[mailbox_pb2.PutManyRequest], Awaitable[mailbox_pb2.PutManyResponse]]
    ) -> None:
        self._send = send  # a PutMany on the node's session, or the unary call
        self._waiting: list[tuple[mailbox_pb2.PutRequest, asyncio.Future[Outcome]]] = []
        self._sender: asyncio.Task[None] | None = None

    async def put(self, request: mailbox_pb2.PutRequest) -> Outcome:
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._waiting.append((request, future))
        if self._sender is None:
            self._sender = asyncio.create_task(self._send_all())
        return await future

    async def _send_all(self) -> None:
        batch: list[tuple[mailbox_pb2.PutRequest, asyncio.Future[Outcome]]] = []
        try:
            while self._waiting:
                batch = self._take()
                outcomes = await self._call([request for request, _ in batch])
                for (_, future), outcome in zip(batch, outcomes, strict=True):
                    if not future.done():  # its put may have been cancelled
                        future.set_result(outcome)
                batch = []
        finally:
            self._sender = None
            for _, future in batch + self._waiting:  # only after a bug or cancellation
                if not future.done():
                    future.set_result(None)
            self._waiting.clear()

    def _take(self) -> list[tuple[mailbox_pb2.PutRequest, asyncio.Future[Outcome]]]:
        size, count = 0, 0
        for request, _ in self._waiting[:MAX_PUT_BATCH]:
            size += request.ByteSize()  # the whole put (proof, IDs), not only its blob
            if count and size > MAX_PUT_BATCH_BYTES:
                break
            count += 1
        batch, self._waiting = self._waiting[:count], self._waiting[count:]
        return batch

    async def _call(self, requests: list[mailbox_pb2.PutRequest]) -> list[Outcome]:
        try:
            response = await self._send(mailbox_pb2.PutManyRequest(puts=requests))
        except (RemoteError, ClosedError):  # ClosedError: its client closed meanwhile
            return [None] * len(requests)
        if len(response.outcomes) != len(requests):  # a broken node: trust none of it
            return [None] * len(requests)
        return list(response.outcomes)


def _page_blobs(box: bytes, blobs: Iterable[mailbox_pb2.StoredBlob]) -> list[StoredBlob]:
    """A page's blobs as the node sent them: the plan's merge checks that each hashes to
    its ID (``ReadPlan.on_page``), before it counts its node as one that returned it."""
    return [StoredBlob(box, b.blob_id, b.blob, b.stored_ms, b.expires_ms) for b in blobs]


class MailboxClient:
    def __init__(
        self,
        node: OverlayNode,
        *,
        replicas: int = REPLICAS,
        write_quorum: int = WRITE_QUORUM,
        pow_bits: int = 12,
        timeout: float = 5.0,
        replica_set_ttl_s: float = REPLICA_SET_TTL_S,
        sessions: bool = True,
    ) -> None:
        self.node, self.replicas, self.write_quorum = node, replicas, write_quorum
        self.pow_bits, self.timeout = pow_bits, timeout
        self.replica_sets = ReplicaSetCache(replica_set_ttl_s)
        self._batchers: dict[str, NodeBatcher] = {}  # by gRPC target
        self._sessions: dict[tuple[bytes, bytes], FetchSession] = {}  # (mailbox, node ID)
        self._writes: set[asyncio.Task[PutResult]] = set()  # puts still reaching replicas
        self._lookups: SingleFlight[bytes, list[Contact]] = SingleFlight()  # by mailbox
        # One stream per node for puts, fetches, deletes and subscriptions (session.py);
        # None (or a node serving none): the unary calls.
        self.session_pool = (
            SessionPool(node.channels.get, timeout, node.channels.discard) if sessions else None
        )
        self.closed = False  # after `close`, every operation raises ClosedError at once

    async def storage_nodes(self, box: bytes, count: int) -> list[Contact]:
        """The first ``count`` candidates of a mailbox from a fresh lookup: its replicas
        (`planner.replica_set`), then hand-off candidates."""
        found = await self.node.find_node(box)
        return self._candidates(found, count)[:count]

    def _candidates(self, found: list[Contact], want: int) -> list[Contact]:
        """A lookup's answer (closest first) as the mailbox's replicas, then up to ``want``
        in all. Of two merged answers, the k closest: the spread may reach the k-th when
        subnets are few, and the nodes choose from a lookup's k (replication.lookup_view)."""
        handoffs = max(0, want - self.replicas)
        exempt, k = self.node.config.allow_loopback, self.node.config.k
        return mailbox_candidates(found[:k], self.replicas, handoffs, loopback_exempt=exempt)

    async def candidates(self, box: bytes) -> list[Contact]:
        """The replicas, then the hand-off candidates, of a mailbox (cached lookup).
        Callers that miss the cache at once share one lookup: 32 sends to a mailbox must
        not start 32 lookups, which load the nodes until lookups come back short."""
        cached = self.replica_sets.get(box)
        if cached is not None:
            return cached
        return await self._lookups.run(box, lambda: self._look_up(box))

    async def _look_up(self, box: bytes) -> list[Contact]:
        """The mailbox's storage nodes, cached. A lookup that found fewer than it wants
        while nodes it asked never answered (under load they answer past its deadline) is
        made once more and the two merged; still short of the replicas, it is cached only
        briefly."""
        want = self.replicas + HANDOFF_CANDIDATES
        found = await find_enough(
            self.node, box, lambda contacts: len(storage_candidates(contacts, want)) >= want
        )
        nodes = self._candidates(found.contacts, want)
        if nodes:
            short = found.missed > 0 and len(nodes) < self.replicas
            self.replica_sets.put(box, nodes, SHORT_REPLICA_SET_TTL_S if short else None)
        return nodes

    def _stub(self, contact: Contact) -> mailbox_pb2_grpc.MailboxAsyncStub:
        return mailbox_pb2_grpc.MailboxStub(self.node.channels.get(contact.endpoint.grpc_target))

    # -- put ---------------------------------------------------------------------

    async def put(
        self, recipient_fp: bytes, blob: bytes, *, ttl_s: int = 0, return_at_quorum: bool = False
    ) -> PutResult:
        """Store ``blob`` on the mailbox's replicas; done once W stored it durably.

        By default the call returns when every replica (or its hand-off stand-in) has
        answered; with ``return_at_quorum`` it returns as soon as W have, and the rest of
        the write goes on in the background (`drain` waits for it)."""
        self._check_open()
        box = mailbox_id(recipient_fp)
        candidates = await self.candidates(box)
        if len(candidates) < self.write_quorum:
            self.replica_sets.forget(box)
            raise TooFewNodesError(len(candidates))
        quorum: asyncio.Future[PutResult] = asyncio.get_running_loop().create_future()
        write = asyncio.create_task(self._replicate(box, blob, ttl_s, candidates, quorum))
        self._writes.add(write)
        write.add_done_callback(self._writes.discard)
        if not return_at_quorum:
            return await write
        await asyncio.wait((quorum, write), return_when=asyncio.FIRST_COMPLETED)
        return quorum.result() if quorum.done() else write.result()

    async def drain(self, timeout: float = 10.0) -> None:
        """Wait (bounded) for writes still reaching their last replicas."""
        if self._writes:
            await asyncio.wait(set(self._writes), timeout=timeout)

    async def _replicate(
        self,
        box: bytes,
        blob: bytes,
        ttl_s: int,
        candidates: list[Contact],
        quorum: asyncio.Future[PutResult],
    ) -> PutResult:
        """Drive the write's plan (planner.WritePlan): send what it says, report what
        each node answered, until it is finished."""
        plan = WritePlan(
            candidates, replicas=self.replicas, write_quorum=self.write_quorum,
            pow_bits=self.pow_bits, max_pow_bits=MAX_POW_BITS,
        )  # fmt: skip
        requests: dict[int, mailbox_pb2.PutRequest] = {}  # by proof-of-work bits
        in_flight: dict[asyncio.Future[Outcome], bytes] = {}
        loop = asyncio.get_running_loop()
        try:
            while not isinstance(step := plan.next(loop.time()), Finished):
                if isinstance(step, Put):
                    if step.pow_bits not in requests:
                        requests[step.pow_bits] = await self._put_request(
                            box, blob, ttl_s, step.pow_bits
                        )
                    sending = self._batcher(step.contact).put(requests[step.pow_bits])
                    in_flight[asyncio.ensure_future(sending)] = step.contact.node_id
                    continue
                timeout = None if step.until is None else max(0.0, step.until - loop.time())
                if not in_flight:
                    await asyncio.sleep(timeout or 0.0)  # only a "retry after" is due
                    continue
                done, _ = await asyncio.wait(
                    in_flight, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                if self.closed:  # its batchers answer None: not the nodes failing
                    if quorum.done():  # its caller has its answer: end quietly
                        break
                    raise ClosedError("mailbox client: closed during the write")
                for sent in done:
                    self._report(plan, box, in_flight.pop(sent), sent.result(), loop.time())
                if plan.quorum_reached and not quorum.done():
                    quorum.set_result(plan.result(blob_id(blob)))
                    trace.mark("send.quorum", blob_id(blob))
        finally:
            for sent in in_flight:  # only when cancelled
                sent.cancel()
        return plan.result(blob_id(blob))

    def _report(
        self, plan: WritePlan, box: bytes, node_id: bytes, outcome: Outcome, now: float
    ) -> None:
        """One node's answer to a put, told to the plan."""
        if outcome is None:
            plan.on_failure(node_id)
        elif outcome.code == grpc.StatusCode.OK.value[0] or outcome.deleted:
            # Deleted: the owner read it and deleted it before this copy came (a device
            # subscribed to the mailbox is that fast), so it was delivered.
            plan.on_stored(node_id)
        elif outcome.pow_required:
            plan.on_pow_required(node_id, outcome.pow_required)
        elif outcome.retry_after_ms:
            plan.on_retry_after(node_id, outcome.retry_after_ms, now)
        else:
            no_room = outcome.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
            plan.on_failure(node_id, outcome.reason, no_room=no_room,
                            mailbox_full=outcome.kind == MAILBOX_FULL)  # fmt: skip
        if node_id in plan.failed:
            self.replica_sets.forget(box)  # a candidate is down or refusing: look again

    async def _put_request(
        self, box: bytes, blob: bytes, ttl_s: int, bits: int
    ) -> mailbox_pb2.PutRequest:
        started_ns = time.monotonic_ns()
        proof, _ = await solve_yielding(put_pow_hash(box, blob), bits, now_ms=_wall_ms())
        if trace.enabled():
            trace.mark("send.pow_start", blob_id(blob), started_ns)
            trace.mark("send.pow_done", blob_id(blob))
        return put_request(box, blob, proof, ttl_s)

    async def _on_session(self, contact: Contact, work: Callable[[NodeSession], Awaitable[T]]) -> T:
        """``work`` on the session to a node; `NoSession` when sessions are off or the
        node serves none (use the unary calls), `RemoteError` when it failed. Callers
        fall back to the unary call on `UnavailableError` too: a session that cannot be
        opened or died must never make a node less reachable than its unary calls do.
        `ClosedError` (not a fallback) once the client is closed."""
        self._check_open()
        if self.session_pool is None:
            raise NoSession
        return await self.session_pool.call(contact.endpoint.grpc_target, work)

    def _batcher(self, contact: Contact) -> NodeBatcher:
        target = contact.endpoint.grpc_target
        batcher = self._batchers.get(target)
        if batcher is None:

            async def send(request: mailbox_pb2.PutManyRequest) -> mailbox_pb2.PutManyResponse:
                try:
                    answer = await self._on_session(contact, lambda s: s.request(put_many=request))
                    return answer.put_many
                except (NoSession, UnavailableError):  # no session: the unary call
                    return await call(self._stub(contact).PutMany(request, timeout=self.timeout))

            batcher = NodeBatcher(send)
            self._batchers[target] = batcher
        return batcher

    # -- fetch and delete ---------------------------------------------------------

    async def fetch(
        self,
        owner: Identity,
        state: FetchState | None = None,
        *,
        limit: int = 200,
        max_bytes: int | None = None,
    ) -> tuple[list[StoredBlob], FetchState]:
        """New blobs since each node's cursor, merged by blob ID, up to about
        ``max_bytes`` (default ``FETCH_BUDGET_BYTES``) of them; past it ``state.more`` is
        set: the caller handles these, keeps the cursors and fetches again (so a node
        paging without end cannot make one fetch hold more than that).

        The replicas are asked first; a hand-off candidate only in place of one that did
        not answer (down, or refusing: also a nonce another node spent first). Each round
        (the first, then nodes with more pages) costs at most one signature: nodes that
        granted this client a fetch session get a MAC instead, the others one signed
        request naming them all, which asks each of them for a session. A node refusing
        its session (restarted, or the session expired there) is asked again, signed.
        No node found, or none answering, is `UnreachableError`, not an empty mailbox.
        """
        self._check_open()
        state = state or FetchState()
        box = mailbox_id(owner.fingerprint)
        candidates = await self.candidates(box)
        if not candidates:
            raise UnreachableError("no storage node found for the mailbox (network down?)")
        budget = FETCH_BUDGET_BYTES if max_bytes is None else max_bytes
        plan = ReadPlan(candidates, state, replicas=self.replicas, budget_bytes=budget)
        while isinstance(step := plan.next(), Ask):
            requests = self._fetch_requests(owner, box, step.contacts, state, limit)
            answers = await asyncio.gather(
                *(self._fetch_page(c, requests[c.node_id]) for c in step.contacts)
            )
            for contact, answer in zip(step.contacts, answers, strict=True):  # in asked order
                self._report_page(plan, owner, box, contact, requests[contact.node_id], answer)
        if plan.failed:
            self.replica_sets.forget(box)
        return plan.result(), state

    def _report_page(
        self,
        plan: ReadPlan,
        owner: Identity,
        box: bytes,
        contact: Contact,
        request: mailbox_pb2.FetchRequest,
        answer: mailbox_pb2.FetchResponse | RemoteError,
    ) -> None:
        """One node's answer to a fetch, told to the plan; its session kept or dropped.
        A node refusing a request made in a session (restarted, or the session expired
        there) is asked again, signed; one that did not answer is replaced."""
        node_id, key = contact.node_id, (box, contact.node_id)
        if isinstance(answer, RemoteError):
            self._sessions.pop(key, None)  # down or restarted: its sessions may be gone
            if answer.grpc_code == grpc.StatusCode.PERMISSION_DENIED.name:
                plan.on_refused(node_id, ask_again=bool(request.session_id))
            else:
                plan.on_failure(node_id)
            return
        plan.on_page(node_id, _page_blobs(box, answer.blobs), answer.next_cursor, answer.more)
        if answer.HasField("session"):
            with contextlib.suppress(ProtocolError):  # a bad grant: sign next time
                self._sessions[key] = open_session(owner, answer.session)
            while len(self._sessions) > MAX_SESSIONS:
                del self._sessions[next(iter(self._sessions))]

    def _fetch_requests(
        self, owner: Identity, box: bytes, nodes: Sequence[Contact], state: FetchState, limit: int
    ) -> dict[bytes, mailbox_pb2.FetchRequest]:
        """Per node ID: a request within its session, or the round's one signed request."""
        now = _wall_ms()
        cursors = {c.node_id: state.cursors.get(c.node_id, b"") for c in nodes}
        sessions = {n: s for n in cursors if (s := self._session(box, n, now)) is not None}
        requests: dict[bytes, mailbox_pb2.FetchRequest] = {}
        if sessions:
            named = {n: cursors[n] for n in sessions}
            body = fetch_body(box, limit=limit, now_ms=now, node_cursors=named)
            requests = {n: session_fetch(s, body) for n, s in sessions.items()}
        unsigned = {n: c for n, c in cursors.items() if n not in sessions}
        if unsigned:
            signed = sign_fetch(
                owner, limit=limit, now_ms=now, node_cursors=unsigned, open_session=True
            )
            requests |= dict.fromkeys(unsigned, mailbox_pb2.FetchRequest.FromString(signed))
        return requests

    def _session(self, box: bytes, node_id: bytes, now_ms: int) -> FetchSession | None:
        session = self._sessions.get((box, node_id))
        if session is not None and session.expires_ms - SESSION_MARGIN_MS <= now_ms:
            del self._sessions[(box, node_id)]
            return None
        return session

    async def _fetch_page(
        self, contact: Contact, request: mailbox_pb2.FetchRequest
    ) -> mailbox_pb2.FetchResponse | RemoteError:
        """The node's page, or why the call failed."""
        try:
            try:
                answer = await self._on_session(contact, lambda s: s.request(fetch=request))
                response = answer.fetch
            except (NoSession, UnavailableError):  # no session: the unary call
                response = await call(self._stub(contact).Fetch(request, timeout=self.timeout))
        except RemoteError as err:
            return err
        return response

    async def delete(
        self, owner: Identity, blob_ids: Sequence[bytes], *, at: Collection[bytes] | None = None
    ) -> DeleteResult:
        """Tombstone blobs on the replicas and the hand-off candidates (a hand-off copy
        must not outlive the delete), ``DELETE_BATCH_IDS`` per signed request. One
        request serves every node: it names none, and every replica receives it anyway as
        the tombstones' authorization. A batch counts as deleted once W nodes accepted it.

        With ``at`` (node IDs: the nodes that returned blobs which did not verify), only
        those of the candidates are sent the deletes, and a batch counts as deleted once
        one of them accepted it, or all of them answered (a refusal is not asked again:
        a hostile node refusing the deletes of the blobs it makes up must not make the
        owner send them at every clean-up); none of them a candidate now: nothing is
        sent, and the blobs count as deleted (they expire there). Such a blob is only its
        nodes' word: a tombstone elsewhere would be one for an ID that node never held,
        charged to the owner's delete rate and to the mailbox's tombstones
        (docs/storage.md "Deletes").

        A node that refuses a batch (its tombstone bound, a wrong clock) is not sent the
        rest of the run, which goes on at the others while enough are left to count a batch
        deleted; the refusals of the batches not deleted are said in the result. Before, a
        batch one node refused while others were down stopped the whole run, so one
        replica refusing stopped every delete of the owner's."""
        self._check_open()
        box = mailbox_id(owner.fingerprint)
        candidates = await self.candidates(box)
        needed = self.write_quorum
        if at is not None:
            candidates, needed = [c for c in candidates if c.node_id in at], 1
            if not candidates:  # none of them a node of the mailbox now: the blobs expire there
                return DeleteResult(deleted=list(blob_ids))
        result = DeleteResult()
        refusals: dict[str, None] = {}
        for start in range(0, len(blob_ids), DELETE_BATCH_IDS):
            if len(candidates) < needed:
                break  # too few nodes left that accept: the rest would not count either
            batch = list(blob_ids[start : start + DELETE_BATCH_IDS])
            errors = await self._delete_batch(owner, batch, candidates)
            if any(errors):
                self.replica_sets.forget(box)
            refused = {i for i, e in enumerate(errors) if e and not e.startswith(_UNREACHABLE)}
            answered = errors.count(None) + len(refused) == len(errors)
            if errors.count(None) >= needed or (at is not None and answered):
                result.deleted.extend(batch)  # (at: each node has had its say: not again)
            else:  # said only for what stays: a batch others deleted is done
                refusals |= dict.fromkeys(sorted({errors[i] or "" for i in refused}))
            candidates = [c for i, c in enumerate(candidates) if i not in refused]
        result.refusals = list(refusals)
        return result

    async def _delete_batch(
        self, owner: Identity, batch: list[bytes], candidates: Sequence[Contact]
    ) -> list[str | None]:
        """Each candidate's answer to one signed delete of ``batch`` (``_delete_one``); the
        nodes that refused with a retry-after get it again, re-signed, once it has passed
        (up to ``MAX_RETRY_AFTER_S`` waited, ``DELETE_ATTEMPTS`` rounds), as puts do. Once
        W took it, a hand-off candidate's refusal is not waited out: it holds none of the
        mailbox's blobs (a hand-off copy goes once the replicas report their tombstones),
        so every ID costs it a token, and waiting made every batch past its burst (1,000
        IDs) wait 2 x 2 s, in any network of 9 storage nodes or more."""
        errors: list[str | None] = [None] * len(candidates)
        pending = list(range(len(candidates)))
        for attempt in range(DELETE_ATTEMPTS):
            request = mailbox_pb2.DeleteRequest.FromString(
                sign_delete(owner, batch, now_ms=_wall_ms())
            )
            answers = await asyncio.gather(
                *(self._delete_one(candidates[i], request) for i in pending)
            )
            waits = []
            for i, (error, retry_after_ms) in zip(pending, answers, strict=True):
                errors[i] = error
                if retry_after_ms:
                    waits.append((i, retry_after_ms))
            if errors.count(None) >= self.write_quorum:
                waits = [(i, ms) for i, ms in waits if i < self.replicas]
            if not waits or attempt == DELETE_ATTEMPTS - 1:
                break
            await asyncio.sleep(min(MAX_RETRY_AFTER_S, max(ms for _, ms in waits) / 1000))
            pending = [i for i, _ in waits]
        return errors

    async def _delete_one(
        self, contact: Contact, request: mailbox_pb2.DeleteRequest
    ) -> tuple[str | None, int]:
        """None when the node accepted; else why not (``_UNREACHABLE`` first when it did
        not answer or could not do it now; a refusal for its bounds, RESOURCE_EXHAUSTED with
        no retry-after, is a refusal: asked again, it refuses again); and the node's
        retry-after in ms (0: none). A refusal the node answered on the session is not sent
        again as a unary call: the node spent its nonce, and the replay it refused hid why."""
        try:
            try:
                await self._on_session(contact, lambda s: s.request(delete=request))
            except (NoSession, UnavailableError) as err:  # no session: the unary call
                if isinstance(err, AnsweredUnavailableError):
                    raise  # the node answered (its bound, "retry after"): not a missing session
                await call(self._stub(contact).Delete(request, timeout=self.timeout))
        except UnavailableError as err:
            if err.grpc_code == "RESOURCE_EXHAUSTED" and not err.retry_after_ms:
                return str(err), 0  # its bounds (tombstones, disk), not a passing load
            return f"{_UNREACHABLE}: {err.grpc_code}", err.retry_after_ms
        except RemoteError as err:
            return str(err), 0  # "CODE: details"
        return None, 0

    # -- push ----------------------------------------------------------------------

    async def subscribe(self, owner: Identity, state: FetchState | None = None) -> Subscription:
        """Subscribe to the owner's mailbox on its replicas, each from its cursor in
        ``state``: what they hold past it, then what they store later, arrives in the
        returned `Subscription` (``wait``, ``take``; ``resubscribe`` the nodes it
        ``dropped``). `UnreachableError` when no replica took the subscription (sessions
        off, or no node serving them: poll with `fetch` instead)."""
        self._check_open()
        if self.session_pool is None:
            raise UnreachableError("sessions are off: no subscriptions")
        box = mailbox_id(owner.fingerprint)
        replicas = (await self.candidates(box))[: self.replicas]
        subscription = Subscription(box, cursors=dict(state.cursors) if state else {})
        nodes = [(c.node_id, c.endpoint.grpc_target) for c in replicas]
        failed = await self._subscribe_nodes(owner, subscription, nodes)
        if len(failed) == len(nodes):
            raise UnreachableError(f"no replica took the subscription ({len(nodes)} asked)")
        return subscription

    async def resubscribe(self, owner: Identity, subscription: Subscription) -> list[bytes]:
        """Subscribe again, from their cursors, on the nodes whose subscription dropped
        (a restart, an outage); returns the IDs of those still not subscribed."""
        nodes = [(n, subscription.feeds[n].target) for n in subscription.dropped()]
        return await self._subscribe_nodes(owner, subscription, nodes) if nodes else []

    async def _subscribe_nodes(
        self, owner: Identity, subscription: Subscription, nodes: list[tuple[bytes, str]]
    ) -> list[bytes]:
        self._check_open()
        assert self.session_pool is not None

        def request(node_ids: Sequence[bytes]) -> mailbox_pb2.FetchRequest:
            cursors = {n: subscription.cursors.get(n, b"") for n in node_ids}
            signed = sign_fetch(owner, limit=200, now_ms=_wall_ms(), node_cursors=cursors)
            return mailbox_pb2.FetchRequest.FromString(signed)

        return await subscribe_nodes(subscription, self.session_pool, nodes, request)

    def _check_open(self) -> None:
        if self.closed:
            raise ClosedError("mailbox client: used after its close")

    async def close(self) -> None:
        """End the sessions (the overlay node's channels stay its own). The client is
        closed for good: what starts later raises `ClosedError`, opening no session and
        making no unary call; a call under way when the close came fails or returns as
        its node's would."""
        self.closed = True
        if self.session_pool is not None:
            await self.session_pool.close()
