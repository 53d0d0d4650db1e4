"""A history checker in the Jepsen "set-full" style, for messages instead of set elements.

The history: every send has an ID and an invoke time, and ends acknowledged (stored on a
write quorum), failed (indeterminate: it may still have been stored) or pending (the run
ended first); every read is what the recipient had received by its time, repeats kept (a
message delivered twice appears twice). From that, each acknowledged message is:

* present: in the last read;
* lost: absent from the last read although it completed after the ack, or present in one
  read and absent from a later one;
* never read: no read completed after its ack (nothing can be said).

A present message is stale when a read completed after its ack without it: its stale
window is from the ack to the first read that had it (delivery latency, at the reads'
resolution). A duplicate is a message seen twice in one read; a phantom is one read but
never sent. A failed or pending send that shows up is "recovered", which is allowed.

Pure: no I/O, no clock. `check` takes plain records and returns the figures; the runner
(compose) and deploy/chaos (kubectl) build the records from what their agents printed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

Outcome = Literal["ack", "fail", "pending"]


@dataclass(frozen=True)
class Send:
    id: str
    invoked: float  # seconds, any clock shared with the reads
    outcome: Outcome
    completed: float | None = None  # None while pending


@dataclass(frozen=True)
class Read:
    at: float  # when the read completed
    ids: tuple[str, ...]  # what it returned, repeats kept


@dataclass
class Verdict:
    acked: int = 0
    failed: int = 0
    pending: int = 0
    present: int = 0
    lost: list[str] = field(default_factory=list)
    never_read: list[str] = field(default_factory=list)
    stale: int = 0
    worst_stale_s: float = 0.0
    duplicates: dict[str, int] = field(default_factory=dict)  # id -> most copies in one read
    phantoms: list[str] = field(default_factory=list)
    recovered: int = 0

    @property
    def valid(self) -> bool:
        return not (self.lost or self.duplicates or self.phantoms)

    def figures(self) -> dict[str, object]:
        return {
            "acked": self.acked,
            "failed": self.failed,
            "pending": self.pending,
            "present": self.present,
            "lost": len(self.lost),
            "never_read": len(self.never_read),
            "stale": self.stale,
            "worst_stale_s": round(self.worst_stale_s, 1),
            "duplicates": len(self.duplicates),
            "phantoms": len(self.phantoms),
            "recovered": self.recovered,
            "valid": self.valid,
        }


def check(sends: Iterable[Send], reads: Iterable[Read]) -> Verdict:
    sends_by_id = _unique(sends)
    ordered = sorted(reads, key=lambda r: r.at)
    verdict = Verdict()
    seen = _seen_ids(ordered)
    for send in sends_by_id.values():
        if send.outcome == "ack":
            verdict.acked += 1
            _classify_acked(send, ordered, verdict)
        else:
            verdict.failed += send.outcome == "fail"
            verdict.pending += send.outcome == "pending"
            verdict.recovered += send.id in seen
    verdict.phantoms = sorted(seen - sends_by_id.keys())
    verdict.duplicates = _duplicates(ordered)
    return verdict


def _unique(sends: Iterable[Send]) -> dict[str, Send]:
    by_id: dict[str, Send] = {}
    for send in sends:
        if send.id in by_id:
            raise ValueError(f"send ID {send.id!r} occurs twice in the history")
        if send.outcome != "pending" and send.completed is None:
            raise ValueError(f"send {send.id!r} ended ({send.outcome}) without a completion time")
        by_id[send.id] = send
    return by_id


def _seen_ids(reads: Sequence[Read]) -> set[str]:
    return {i for read in reads for i in read.ids}


def _classify_acked(send: Send, reads: Sequence[Read], verdict: Verdict) -> None:
    assert send.completed is not None
    after = [read for read in reads if read.at >= send.completed]
    if not after:
        verdict.never_read.append(send.id)
        return
    holding = [send.id in read.ids for read in reads]
    first = holding.index(True) if True in holding else None
    dropped = first is not None and not all(holding[first:])
    if not holding[-1] or dropped:
        verdict.lost.append(send.id)
        return
    verdict.present += 1
    first_after = next(r for r in after if send.id in r.ids)
    if first_after is not after[0]:
        verdict.stale += 1
        verdict.worst_stale_s = max(verdict.worst_stale_s, first_after.at - send.completed)


def _duplicates(reads: Sequence[Read]) -> dict[str, int]:
    most: dict[str, int] = {}
    for read in reads:
        for ident, copies in Counter(read.ids).items():
            if copies > 1:
                most[ident] = max(most.get(ident, 0), copies)
    return most


def check_deleted(
    deleted: Iterable[str], holdings: Mapping[str, Sequence[str] | None]
) -> list[str]:
    """Deleted messages a storage node still serves (``holdings``: node -> the IDs it
    serves, None if it did not answer), as "ID@node": after the replicas converged, a
    delete must hold everywhere (nothing deleted comes back)."""
    gone = set(deleted)
    return sorted(f"{i}@{node}" for node, ids in holdings.items() for i in ids or () if i in gone)
