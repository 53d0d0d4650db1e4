"""`Peer.watch` settles pushed rounds in the background (`peer._Settler`): one settling at a
time, rounds handed over meanwhile settled together, a failure logged without stopping
later ones, and a stopping watch finishing the settling under way."""

from __future__ import annotations

import asyncio

import pytest
from dna_core.crypto import Identity
from dna_peer.inbox import RECEIPT_BATCH_IDS, ReceiptDue, SyncReport
from dna_peer.peer import _owe, _Settler


def held(*blob_ids: bytes) -> SyncReport:
    return SyncReport(held=list(blob_ids))


def test_rounds_handed_over_during_a_settling_are_settled_together_after_it() -> None:
    async def main() -> list[list[bytes]]:
        settled: list[list[bytes]] = []
        release = asyncio.Event()

        async def settle(report: SyncReport) -> None:
            settled.append(list(report.held))
            if len(settled) == 1:
                await release.wait()  # the first settling is slow

        settler = _Settler(settle)
        settler.add(held(b"a"))
        await asyncio.sleep(0)  # the first settling starts, and waits
        settler.add(held(b"b"))
        settler.add(held(b"c"))
        assert settled == [[b"a"]]  # not a second settling beside the first
        release.set()
        await settler.close()
        return settled

    assert asyncio.run(main()) == [[b"a"], [b"b", b"c"]]


def test_a_round_that_owes_nothing_starts_no_settling() -> None:
    async def main() -> int:
        calls = 0

        async def settle(_report: SyncReport) -> None:
            nonlocal calls
            calls += 1

        settler = _Settler(settle)
        settler.add(SyncReport())
        await asyncio.sleep(0)
        await settler.close()
        return calls

    assert asyncio.run(main()) == 0


def test_a_failed_settling_is_logged_and_the_next_one_still_runs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> list[list[bytes]]:
        settled: list[list[bytes]] = []

        async def settle(report: SyncReport) -> None:
            settled.append(list(report.held))
            if len(settled) == 1:
                raise ConnectionError("storage nodes unreachable")

        settler = _Settler(settle)
        settler.add(held(b"a"))
        await asyncio.sleep(0)
        await asyncio.sleep(0)  # the first settling has failed
        settler.add(held(b"b"))
        await settler.close()
        return settled

    assert asyncio.run(main()) == [[b"a"], [b"b"]]
    assert "settling received messages failed: storage nodes unreachable" in caplog.text


def test_closing_waits_for_the_settling_under_way() -> None:
    async def main() -> bool:
        done = False

        async def settle(_report: SyncReport) -> None:
            nonlocal done
            await asyncio.sleep(0.05)
            done = True

        settler = _Settler(settle)
        settler.add(held(b"a"))
        await settler.close()
        return done

    assert asyncio.run(main())


def test_receipts_of_rounds_settled_together_are_one_receipt_per_sender() -> None:
    alice, bob, me = Identity.generate(), Identity.generate(), Identity.generate()

    def round_owing(*dues: tuple[Identity, bytes]) -> SyncReport:
        return SyncReport(receipts_due=[ReceiptDue(s.public, me, [m]) for s, m in dues])

    async def main() -> list[tuple[bytes, list[bytes]]]:
        receipts: list[tuple[bytes, list[bytes]]] = []
        release = asyncio.Event()

        async def settle(report: SyncReport) -> None:
            receipts.extend((r.to.fingerprint, r.message_ids) for r in report.receipts_due)
            await release.wait()

        settler = _Settler(settle)
        settler.add(round_owing((alice, b"m1")))
        await asyncio.sleep(0)  # settling the first round
        settler.add(round_owing((alice, b"m2"), (bob, b"m3")))
        settler.add(round_owing((alice, b"m4")))
        release.set()
        await settler.close()
        return receipts

    assert asyncio.run(main()) == [
        (alice.fingerprint, [b"m1"]),
        (alice.fingerprint, [b"m2", b"m4"]),
        (bob.fingerprint, [b"m3"]),
    ]


def test_a_merged_receipt_stays_within_its_batch_size() -> None:
    sender, me = Identity.generate(), Identity.generate()
    full = [bytes([i % 256, i // 256]) for i in range(RECEIPT_BATCH_IDS)]
    receipts = [ReceiptDue(sender.public, me, list(full))]
    _owe(receipts, ReceiptDue(sender.public, me, [b"one more"]))
    assert [len(r.message_ids) for r in receipts] == [RECEIPT_BATCH_IDS, 1]
