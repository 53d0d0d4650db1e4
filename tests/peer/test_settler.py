"""`Peer.watch` settles pushed rounds in the background (`settle.Settler`): once the pushes
pause (or a steady stream has gone on long enough), one settling at a time, rounds handed
over meanwhile settled together with one receipt per sender, a failure logged without
stopping later ones, and a stopping watch settling what is due at once."""

from __future__ import annotations

import asyncio
import time

import pytest
from dna_core.crypto import Identity
from dna_peer.inbox import RECEIPT_BATCH_IDS, ReceiptDue, SyncReport
from dna_peer.settle import Settler, owe
from support import until_async


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

        settler = Settler(settle, quiet_s=0)
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

        settler = Settler(settle, quiet_s=0)
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

        settler = Settler(settle, quiet_s=0)
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

        settler = Settler(settle, quiet_s=0)
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

        settler = Settler(settle, quiet_s=0)
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
    owe(receipts, ReceiptDue(sender.public, me, [b"one more"]))
    assert [len(r.message_ids) for r in receipts] == [RECEIPT_BATCH_IDS, 1]


def test_rounds_closer_than_the_quiet_time_are_settled_together_once_pushes_pause() -> None:
    async def main() -> list[list[bytes]]:
        settled: list[list[bytes]] = []

        async def settle(report: SyncReport) -> None:
            settled.append(list(report.held))

        # rounds 10 ms apart and a quiet of 1 s (not 50 ms): a loaded machine that stalls
        # this process between two rounds must not pass for a pause in the pushes
        settler = Settler(settle, quiet_s=1.0, max_delay_s=30.0)
        for blob in (b"a", b"b", b"c"):
            settler.add(held(blob))
            await asyncio.sleep(0.01)
        assert settled == []  # still arriving: nothing settled yet
        await until_async(lambda: settled, "settled after the pause")
        assert settled == [[b"a", b"b", b"c"]]
        await settler.close()
        return settled

    assert asyncio.run(main()) == [[b"a", b"b", b"c"]]


def test_a_steady_stream_of_rounds_is_still_settled_every_max_delay() -> None:
    async def main() -> int:
        settled: list[list[bytes]] = []

        async def settle(report: SyncReport) -> None:
            settled.append(list(report.held))

        settler = Settler(settle, quiet_s=0.05, max_delay_s=0.1)
        for i in range(40):  # a round every 10 ms for 0.4 s: never a 50 ms pause
            settler.add(held(bytes([i])))
            await asyncio.sleep(0.01)
        during = len(settled)
        await settler.close()
        assert sorted(b for batch in settled for b in batch) == [bytes([i]) for i in range(40)]
        return during

    assert asyncio.run(main()) >= 2


def test_closing_settles_what_is_due_at_once() -> None:
    async def main() -> tuple[list[list[bytes]], float]:
        settled: list[list[bytes]] = []

        async def settle(report: SyncReport) -> None:
            settled.append(list(report.held))

        settler = Settler(settle, quiet_s=30.0, max_delay_s=60.0)
        settler.add(held(b"a"))
        await asyncio.sleep(0)
        t0 = time.monotonic()
        await settler.close()
        return settled, time.monotonic() - t0

    settled, took_s = asyncio.run(main())
    assert settled == [[b"a"]] and took_s < 10.0  # not the 30 s quiet (a loaded CI: not 1 s)
