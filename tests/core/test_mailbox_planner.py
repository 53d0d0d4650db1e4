"""The mailbox planner (sans-I/O, planner.py), driven by simulated storage nodes: a put
reaches its quorum iff W nodes stored it, hands off only for replicas that did not store,
escalates its proof of work only upward, respects "retry after"; a fetch merges pages
without losing or duplicating a blob, and moves each node's cursor."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
from dna_core.mailbox import StoredBlob
from dna_core.mailbox.planner import (
    Ask,
    FetchState,
    Finished,
    Put,
    QuorumError,
    ReadPlan,
    UnreachableError,
    Wait,
    WritePlan,
    storage_candidates,
)
from dna_core.overlay.contact import Contact, Endpoint
from dna_core.wire.gen.dna.v1 import common_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

MAX_BITS = 28
ATTEMPTS = 3
RETRY_CAP_S = 2.0


def contact(i: int, role: int = common_pb2.NODE_ROLE_STORAGE) -> Contact:
    node_id = hashlib.sha256(b"node" + bytes([i])).digest()
    return Contact(node_id, b"k" * 32, (Endpoint(f"127.0.0.{i + 1}", 7400),), role)


def contacts(n: int) -> list[Contact]:
    return [contact(i) for i in range(n)]


# -- replica choice -------------------------------------------------------------------


def test_candidates_are_the_closest_storage_nodes_in_lookup_order() -> None:
    found = [contact(0), contact(1, role=0), contact(2), contact(3), contact(4, role=0)]
    assert storage_candidates(found, 2) == [found[0], found[2]]
    assert storage_candidates(found, 9) == [found[0], found[2], found[3]]


# -- write ----------------------------------------------------------------------------

Answer = tuple[str, int]  # ("ok" | "fail" | "full" | "pow" | "retry", bits or milliseconds)
answers = st.one_of(
    st.just(("ok", 0)),
    st.just(("fail", 0)),
    st.just(("full", 0)),  # the mailbox is at its quota on that node
    st.tuples(st.just("pow"), st.integers(0, MAX_BITS + 4)),
    st.tuples(st.just("retry"), st.integers(0, 5000)),
)


@dataclass
class WriteRun:
    sends: list[tuple[bytes, int, float]] = field(default_factory=list)  # node, bits, time
    oks: list[bytes] = field(default_factory=list)  # nodes that answered "stored", in order
    not_before: dict[bytes, float] = field(default_factory=dict)  # last "retry after" due
    late_sends: list[bytes] = field(default_factory=list)  # sent before its retry-after
    asked_for: set[int] = field(default_factory=set)  # bits some node asked for
    fulls: list[int] = field(default_factory=list)  # sends made when each "full" came


def drive_write(
    plan: WritePlan, scripts: dict[bytes, list[Answer]], choose: st.DataObject
) -> WriteRun:
    """Run ``plan`` against nodes answering by their scripts (the last answer repeats), in
    an order and with delays hypothesis chooses."""
    run, now = WriteRun(), 0.0
    in_flight: list[bytes] = []
    seen: dict[bytes, int] = {}
    for _ in range(5000):
        step = plan.next(now)
        if isinstance(step, Finished):
            return run
        if isinstance(step, Put):
            node = step.contact.node_id
            if now < run.not_before.get(node, float("-inf")):
                run.late_sends.append(node)
            run.sends.append((node, step.pow_bits, now))
            in_flight.append(node)
            continue
        assert isinstance(step, Wait)
        if not in_flight:  # only a "retry after" can be pending
            assert step.until is not None and step.until > now
            now = step.until
            continue
        node = in_flight.pop(choose.draw(st.integers(0, len(in_flight) - 1)))
        now += choose.draw(st.sampled_from([0.0, 0.1, 0.7]))
        script = scripts[node]
        kind, value = script[min(seen.get(node, 0), len(script) - 1)]
        seen[node] = seen.get(node, 0) + 1
        if kind == "ok":
            assert plan.on_stored(node)
            run.oks.append(node)
        elif kind == "fail":
            assert plan.on_failure(node)
        elif kind == "full":
            assert plan.on_failure(node, "quota", no_room=True, mailbox_full=True)
            run.fulls.append(len(run.sends))
        elif kind == "pow":
            run.asked_for.add(value)
            assert plan.on_pow_required(node, value)
        else:
            run.not_before[node] = now + min(RETRY_CAP_S, value / 1000)
            assert plan.on_retry_after(node, value, now)
    raise AssertionError("the write did not finish")


@settings(max_examples=300, deadline=None)
@given(
    n=st.integers(0, 9),
    replicas=st.integers(1, 5),
    quorum=st.integers(1, 5),
    pow_bits=st.integers(0, 16),
    scripts=st.lists(st.lists(answers, min_size=1, max_size=4), min_size=9, max_size=9),
    choose=st.data(),
)
def test_a_write_reaches_quorum_iff_w_nodes_stored_it_and_hands_off_only_what_is_missing(
    n: int,
    replicas: int,
    quorum: int,
    pow_bits: int,
    scripts: list[list[Answer]],
    choose: st.DataObject,
) -> None:
    cands = contacts(n)
    plan = WritePlan(
        cands, replicas=replicas, write_quorum=quorum, pow_bits=pow_bits,
        max_pow_bits=MAX_BITS, attempts=ATTEMPTS, max_retry_after_s=RETRY_CAP_S,
    )  # fmt: skip
    run = drive_write(plan, {c.node_id: s for c, s in zip(cands, scripts, strict=False)}, choose)
    ids = [c.node_id for c in cands]

    # quorum: reached iff W nodes stored it; every "stored" counted once, and no more than R
    assert plan.stored == run.oks and len(set(plan.stored)) == len(plan.stored)
    assert plan.quorum_reached == (len(run.oks) >= quorum)
    assert len(plan.stored) <= replicas
    if len(run.oks) >= quorum:
        assert plan.result(b"id").stored_on == tuple(run.oks)
    else:
        with pytest.raises(QuorumError):
            plan.result(b"id")
    # a node that stored the blob is not sent it again
    for node in run.oks:
        stored_at = max(i for i, (n_, _, _) in enumerate(run.sends) if n_ == node)
        assert [s for s in run.sends[stored_at + 1 :] if s[0] == node] == []

    # hand-off: nodes are first asked in candidate order, the replicas first, and a
    # stand-in only while fewer than R stored; short of R, every candidate was asked
    first_asked = list(dict.fromkeys(node for node, _, _ in run.sends))
    assert first_asked == ids[: len(first_asked)]
    assert first_asked[: min(replicas, n)] == ids[: min(replicas, n)]
    for spare in first_asked[replicas:]:
        first = next(i for i, s in enumerate(run.sends) if s[0] == spare)
        stored_before = {node for node in run.oks if run.sends.index(
            next(s for s in run.sends if s[0] == node)) < first}  # fmt: skip
        assert len(stored_before) < replicas
        # none in place of a node where the mailbox is full, none once W is out of reach
        fulls_before = sum(sends <= first for sends in run.fulls)
        assert fulls_before <= max(0, replicas - quorum)
        assert len(stored_before) + fulls_before < replicas
    if len(plan.stored) < replicas and not run.fulls:
        assert first_asked == ids

    # proof of work: only upward, only to what a node asked for, never past the cap
    bits = [b for _, b, _ in run.sends]
    assert bits == sorted(bits)
    assert set(bits) <= {pow_bits} | {b for b in run.asked_for if b <= MAX_BITS}
    assert plan.pow_bits == (bits[-1] if bits else pow_bits)
    # retry after: never sent before it is due; a bounded number of sends per node a round
    assert run.late_sends == []
    rounds_of_pow = len(set(bits))
    for node in ids:
        assert sum(s[0] == node for s in run.sends) <= ATTEMPTS * rounds_of_pow


def test_a_write_where_every_replica_stores_asks_only_the_replicas_once() -> None:
    cands = contacts(9)
    plan = WritePlan(cands, replicas=5, write_quorum=3, pow_bits=12)
    sent = []
    while isinstance(step := plan.next(0.0), Put):
        sent.append(step.contact)
    assert sent == cands[:5] and plan.next(0.0) == Wait(None)
    for c in sent:
        assert plan.on_stored(c.node_id)
    assert isinstance(plan.next(0.0), Finished)
    assert plan.result(b"id").stored_on == tuple(c.node_id for c in cands[:5])
    assert not plan.on_stored(cands[0].node_id)  # not awaited any more: ignored


def test_a_harder_proof_is_asked_of_every_node_that_has_not_stored() -> None:
    cands = contacts(5)
    plan = WritePlan(cands, replicas=3, write_quorum=2, pow_bits=12)
    a, b, c = (plan.next(0.0) for _ in range(3))
    assert isinstance(a, Put) and isinstance(b, Put) and isinstance(c, Put)
    plan.on_stored(a.contact.node_id)
    plan.on_pow_required(b.contact.node_id, 20)
    plan.on_failure(c.contact.node_id)
    again = [plan.next(0.0), plan.next(0.0)]
    assert again == [Put(b.contact, 20), Put(c.contact, 20)]
    assert plan.failed == {c.contact.node_id}


def test_a_node_asking_past_the_cap_does_not_stop_the_escalation_another_asked_for() -> None:
    cands = contacts(3)
    plan = WritePlan(cands, replicas=3, write_quorum=2, pow_bits=12, max_pow_bits=28)
    steps = [plan.next(0.0) for _ in range(3)]
    assert all(isinstance(s, Put) for s in steps)
    plan.on_pow_required(cands[0].node_id, 40)  # a hostile or confused node
    plan.on_pow_required(cands[1].node_id, 16)
    plan.on_stored(cands[2].node_id)
    assert plan.next(0.0) == Put(cands[0], 16)


def test_retry_after_is_waited_for_up_to_the_cap() -> None:
    (only,) = contacts(1)
    plan = WritePlan([only], replicas=1, write_quorum=1, max_retry_after_s=2.0)
    assert plan.next(10.0) == Put(only, 12)
    plan.on_retry_after(only.node_id, 500, 10.0)
    assert plan.next(10.2) == Wait(10.5)
    assert plan.next(10.5) == Put(only, 12)
    plan.on_retry_after(only.node_id, 60_000, 11.0)  # a minute: capped
    assert plan.next(11.0) == Wait(13.0)
    assert plan.next(13.0) == Put(only, 12)
    plan.on_retry_after(only.node_id, 100, 13.0)  # third send: no more in this round
    assert isinstance(plan.next(13.0), Finished)
    with pytest.raises(QuorumError, match="rate limited"):
        plan.result(b"id")


def test_a_failed_write_says_what_the_nodes_said_each_reason_once_and_bounded() -> None:
    """A sender whose message the replicas refuse (the recipient's mailbox is full) must
    read why, not only a count; a node's text is cut and the list bounded."""
    cands = contacts(7)
    plan = WritePlan(cands, replicas=5, write_quorum=3)
    full = "mailbox quota: holds 10000 blobs, the limit is 10000"
    said = dict(zip(cands, [full, full, full, "", "x" * 10_000, "a", "b"], strict=True))
    while isinstance(step := plan.next(0.0), Put):  # "": silence
        plan.on_failure(step.contact.node_id, said[step.contact])
    assert isinstance(step, Finished)
    with pytest.raises(QuorumError) as raised:
        plan.result(b"id")
    message = str(raised.value)
    assert message.startswith("stored on 0 of 3 required replicas (")
    assert message.count(full) == 1 and "no answer" in message
    assert len(message) < 700


@pytest.mark.parametrize(
    ("replies", "spares_asked", "stored"),
    [
        ("FFFFF", 0, 0),  # full everywhere: refused as full, nothing handed off
        ("FFF..", 0, 0),  # W out of the replicas' reach: no stand-in for the silent two
        ("F.OOO", 1, 4),  # one full, one silent: a stand-in for the silent one only
        ("FF...", 3, 3),  # W still in reach: stand-ins for the three silent ones
    ],
)
def test_a_full_mailbox_is_not_handed_off(replies: str, spares_asked: int, stored: int) -> None:
    """A replica that says the mailbox is at its quota answered for the mailbox: a hand-off
    node would take the blob over the quota, where its owner does not read."""
    cands = contacts(9)
    plan = WritePlan(cands, replicas=5, write_quorum=3)
    answer = dict(zip((c.node_id for c in cands), replies + "OOOO", strict=True))
    asked = []
    while isinstance(step := plan.next(0.0), Put):
        node = step.contact.node_id
        asked.append(node)
        if answer[node] == "O":
            plan.on_stored(node)
        else:
            full = answer[node] == "F"
            plan.on_failure(node, "quota" if full else "", no_room=full, mailbox_full=full)
    assert len(asked) == 5 + spares_asked and len(plan.stored) == stored
    if stored < 3:
        with pytest.raises(QuorumError) as raised:
            plan.result(b"id")
        assert raised.value.full


@pytest.mark.parametrize(("no_room", "full"), [(5, True), (3, True), (2, False), (0, False)])
def test_a_write_refused_for_lack_of_room_says_so(no_room: int, full: bool) -> None:
    """Full when enough replicas had no room that W could not be met (the rest silent)."""
    plan = WritePlan(contacts(5), replicas=5, write_quorum=3)
    sent = 0
    while isinstance(step := plan.next(0.0), Put):
        plan.on_failure(step.contact.node_id, "quota", no_room=sent < no_room)
        sent += 1
    with pytest.raises(QuorumError) as raised:
        plan.result(b"id")
    assert raised.value.full is full


def test_no_candidates_is_a_finished_write_short_of_quorum() -> None:
    plan = WritePlan([], replicas=5, write_quorum=3)
    assert isinstance(plan.next(0.0), Finished)
    with pytest.raises(QuorumError):
        plan.result(b"id")


# -- fetch ----------------------------------------------------------------------------


def blob(n: int) -> bytes:
    return b"blob-%d" % n


def stored(n: int, stored_ms: int) -> StoredBlob:
    data = blob(n)
    return StoredBlob(b"m" * 32, hashlib.sha256(data).digest(), data, stored_ms, stored_ms + 9)


@dataclass
class Replica:
    """A node's log of one mailbox; a cursor is an index into it (8 bytes)."""

    log: list[StoredBlob]
    behaviour: str  # "ok", "down", "refuse", "session" (refuses once, in a session), "stuck"
    refused: bool = False

    def page(self, cursor: bytes, limit: int) -> tuple[list[StoredBlob], bytes, bool]:
        start = int.from_bytes(cursor, "big") if cursor else 0
        if self.behaviour == "stuck":  # says there is more, never moves on
            return self.log[start : start + limit], cursor or bytes(8), True
        end = min(start + limit, len(self.log))
        return self.log[start:end], end.to_bytes(8, "big"), end < len(self.log)


def drive_read(
    plan: ReadPlan,
    nodes: dict[bytes, Replica],
    limit: int,
    returned: dict[bytes, set[bytes]] | None = None,
) -> tuple[list[bytes], set[bytes], int]:
    """Run ``plan``; returns the nodes asked (in order), the blob IDs of every page
    reported, and how many answers were failures or refusals without a retry; fills
    ``returned`` with the nodes whose pages held each blob."""
    asked: list[bytes] = []
    reported: set[bytes] = set()
    stand_in_reasons = 0
    for _ in range(1000):
        step = plan.next()
        if isinstance(step, Finished):
            return asked, reported, stand_in_reasons
        assert isinstance(step, Ask)
        for c in step.contacts:
            node = nodes[c.node_id]
            asked.append(c.node_id)
            if node.behaviour == "down":
                stand_in_reasons += 1
                assert plan.on_failure(c.node_id)
            elif node.behaviour == "refuse":
                stand_in_reasons += 1
                assert plan.on_refused(c.node_id, ask_again=False)
            elif node.behaviour == "session" and not node.refused:
                node.refused = True
                assert plan.on_refused(c.node_id, ask_again=True)
            else:
                blobs, cursor, more = node.page(plan.state.cursors.get(c.node_id, b""), limit)
                reported |= {b.blob_id for b in blobs}
                if returned is not None:
                    for b in blobs:
                        returned.setdefault(b.blob_id, set()).add(c.node_id)
                assert plan.on_page(c.node_id, blobs, cursor, more)
    raise AssertionError("the fetch did not finish")


behaviours = st.sampled_from(["ok", "ok", "ok", "down", "refuse", "session", "stuck"])


@st.composite
def replica_sets(draw: st.DrawFn) -> list[Replica]:
    """Up to 9 nodes holding overlapping parts of 30 blobs, each stored at its own time."""
    count = draw(st.integers(0, 9))
    out = []
    for _ in range(count):
        held = draw(st.lists(st.integers(0, 29), unique=True, max_size=12))
        log = [stored(n, draw(st.integers(0, 5))) for n in held]
        out.append(Replica(log, draw(behaviours)))
    return out


@settings(max_examples=300, deadline=None)
@given(
    replicas=replica_sets(),
    r=st.integers(1, 5),
    limit=st.integers(1, 5),
    budget=st.sampled_from([1, 40, 10**9]),
)
def test_a_fetch_merges_pages_without_losing_or_duplicating_a_blob(
    replicas: list[Replica], r: int, limit: int, budget: int
) -> None:
    cands = contacts(len(replicas))
    nodes = {c.node_id: rep for c, rep in zip(cands, replicas, strict=True)}
    state = FetchState()
    plan = ReadPlan(cands, state, replicas=r, budget_bytes=budget)
    returned: dict[bytes, set[bytes]] = {}
    asked, reported, stand_in_reasons = drive_read(plan, nodes, limit, returned)

    answering = {n for n, rep in nodes.items() if rep.behaviour not in ("down", "refuse")}
    if not any(n in answering or nodes[n].behaviour == "refuse" for n in asked):
        with pytest.raises(UnreachableError):
            plan.result()
        return
    got = plan.result()
    ids = [b.blob_id for b in got]
    assert len(ids) == len(set(ids))  # each blob once
    assert set(ids) == reported  # nothing lost, nothing invented
    assert state.sources == returned  # which nodes returned each (one node's word: dna_peer)
    assert got == sorted(got, key=lambda b: (b.stored_ms, b.blob_id))
    # replicas first, then a stand-in per node that did not answer (or refused, signed)
    first_asked = list(dict.fromkeys(asked))
    assert first_asked[: min(r, len(cands))] == [c.node_id for c in cands[:r]]
    assert len(first_asked) <= min(r, len(cands)) + stand_in_reasons
    assert first_asked == [c.node_id for c in cands[: len(first_asked)]]
    # every node that answered has its cursor; one stuck on its cursor is asked once more
    for node in first_asked:
        refused_first = nodes[node].behaviour == "session"  # a page only when asked again
        if node in answering and (not refused_first or asked.count(node) > 1):
            assert node in state.cursors
        if nodes[node].behaviour == "stuck":
            assert asked.count(node) <= 2
    if state.more:
        assert sum(len(b.blob) for b in got) >= budget
    elif all(nodes[n].behaviour in ("ok", "session") for n in first_asked):
        # read to the end: every blob of every node asked
        assert reported == {b.blob_id for n in first_asked for b in nodes[n].log}


@settings(max_examples=150, deadline=None)
@given(
    logs=st.lists(st.lists(st.integers(0, 29), unique=True, max_size=12), min_size=1, max_size=5),
    limit=st.integers(1, 4),
    budget=st.sampled_from([1, 40, 10**9]),
    late=st.lists(st.integers(30, 39), unique=True, max_size=4),
)
def test_fetching_again_from_the_cursors_gets_every_blob_and_nothing_twice(
    logs: list[list[int]], limit: int, budget: int, late: Sequence[int]
) -> None:
    """Fetch until ``more`` is unset, add blobs, fetch again: every blob arrives, and a
    blob one node held is not fetched again from the same node."""
    cands = contacts(len(logs))
    nodes = {
        c.node_id: Replica([stored(n, 1) for n in log], "ok")
        for c, log in zip(cands, logs, strict=True)
    }
    state = FetchState()
    per_node: dict[bytes, list[bytes]] = {c.node_id: [] for c in cands}

    def fetch_all() -> list[bytes]:
        got: list[bytes] = []
        while True:
            before = dict(state.cursors)
            plan = ReadPlan(cands, state, replicas=5, budget_bytes=budget)
            drive_read(plan, nodes, limit)
            got += [b.blob_id for b in plan.result()]
            for node, rep in nodes.items():  # what each node's cursor moved over
                start = int.from_bytes(before.get(node, b""), "big")
                end = int.from_bytes(state.cursors.get(node, b""), "big")
                per_node[node] += [b.blob_id for b in rep.log[start:end]]
            if not state.more:
                return got

    first = fetch_all()
    for i, n in enumerate(late):
        nodes[cands[i % len(cands)].node_id].log.append(stored(n, 2))
    second = fetch_all()
    everything = {b.blob_id for rep in nodes.values() for b in rep.log}
    assert set(first) | set(second) == everything
    assert set(second) == {stored(n, 2).blob_id for n in late}  # the old ones not again
    for ids in per_node.values():
        assert len(ids) == len(set(ids))  # no node's blob passed its cursor twice


def test_an_altered_copy_answered_first_never_shadows_the_intact_one() -> None:
    """Blob IDs are content-addressed: a node answering first with an altered copy under a
    real blob's ID (or made-up bytes under any ID) is dropped in the merge, before its ID
    is deduplicated, and is not counted among the nodes that returned the blob (where a
    blob that does not open is deleted). Without the check the first copy won: the peer
    rejected it, and the real message was never shown (and, rejected, deleted)."""
    cands = contacts(3)
    real = stored(1, 1)
    altered = StoredBlob(real.mailbox_id, real.blob_id, b"altered" + real.blob, 1, 10)
    garbage = StoredBlob(real.mailbox_id, b"\x07" * 32, b"not what the ID says", 1, 10)
    plan = ReadPlan(cands, FetchState(), replicas=3)
    assert plan.next() == Ask(tuple(cands))
    hostile, honest, other = (c.node_id for c in cands)
    assert plan.on_page(hostile, [altered, garbage], b"h", more=False)
    assert plan.on_page(honest, [real], b"r", more=False)
    assert plan.on_page(other, [], b"", more=False)
    assert plan.next() == Finished()
    assert plan.result() == [real]
    assert plan.state.sources == {real.blob_id: {honest}}
