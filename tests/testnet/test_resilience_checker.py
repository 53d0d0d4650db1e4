"""The resilience suite's history checker (dna_testnet.resilience.checker): every verdict it
can give, from small hand-made histories, including the ones that must fail a run."""

from __future__ import annotations

import pytest
from dna_testnet.resilience.checker import Read, Send, check, check_deleted


def acked(ident: str, at: float) -> Send:
    return Send(ident, at - 0.1, "ack", at)


def test_every_acked_message_in_the_last_read_is_present_and_the_run_valid() -> None:
    verdict = check([acked("a", 1), acked("b", 2)], [Read(3, ("a", "b"))])
    assert verdict.figures() == {
        "acked": 2, "failed": 0, "pending": 0, "present": 2, "lost": 0, "never_read": 0,
        "stale": 0, "worst_stale_s": 0.0, "duplicates": 0, "phantoms": 0, "recovered": 0,
        "valid": True,
    }  # fmt: skip


def test_an_acked_message_missing_from_the_last_read_is_lost() -> None:
    verdict = check([acked("a", 1), acked("b", 2)], [Read(3, ("a",)), Read(9, ("a",))])
    assert verdict.lost == ["b"] and verdict.present == 1 and not verdict.valid


def test_a_message_read_once_then_gone_is_lost_even_if_it_comes_back() -> None:
    reads = [Read(2, ("a",)), Read(3, ()), Read(4, ("a",))]
    verdict = check([acked("a", 1)], reads)
    assert verdict.lost == ["a"] and not verdict.valid


def test_an_ack_after_the_last_read_is_never_read_not_lost() -> None:
    verdict = check([acked("a", 1), acked("late", 5)], [Read(3, ("a",))])
    assert verdict.never_read == ["late"] and verdict.lost == [] and verdict.valid


def test_a_message_that_shows_up_reads_after_its_ack_is_stale_for_that_window() -> None:
    reads = [Read(2, ()), Read(4, ()), Read(6.5, ("a",)), Read(8, ("a",))]
    verdict = check([acked("a", 1.5)], reads)
    assert verdict.stale == 1 and verdict.worst_stale_s == 5.0 and verdict.present == 1
    assert verdict.valid  # late is not lost


def test_reads_before_the_ack_do_not_make_a_message_stale() -> None:
    verdict = check([acked("a", 5)], [Read(1, ()), Read(6, ("a",))])
    assert verdict.stale == 0 and verdict.present == 1


def test_a_message_delivered_twice_is_a_duplicate() -> None:
    verdict = check([acked("a", 1), acked("b", 1)], [Read(2, ("a", "b", "a")), Read(3, ("a",) * 3)])
    assert verdict.duplicates == {"a": 3} and not verdict.valid
    assert verdict.figures()["duplicates"] == 1


def test_a_message_nobody_sent_is_a_phantom() -> None:
    verdict = check([acked("a", 1)], [Read(2, ("a", "zzz"))])
    assert verdict.phantoms == ["zzz"] and not verdict.valid


def test_failed_and_pending_sends_are_never_lost_and_count_as_recovered_when_read() -> None:
    sends = [Send("f", 1, "fail", 2), Send("p", 1, "pending"), Send("g", 1, "fail", 2)]
    verdict = check(sends, [Read(3, ("f", "p"))])
    assert (verdict.failed, verdict.pending, verdict.recovered) == (2, 1, 2)
    assert verdict.acked == 0 and verdict.lost == [] and verdict.valid


def test_a_history_with_one_id_sent_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="'a' occurs twice"):
        check([acked("a", 1), acked("a", 2)], [])


def test_an_ended_send_without_a_completion_time_is_refused() -> None:
    with pytest.raises(ValueError, match="without a completion time"):
        check([Send("a", 1, "ack")], [])


def test_deleted_messages_still_served_are_named_with_their_node() -> None:
    holdings = {"10.0.0.1": ["a", "keep"], "10.0.0.2": None, "10.0.0.3": ["b"]}
    assert check_deleted(["a", "b", "c"], holdings) == ["a@10.0.0.1", "b@10.0.0.3"]
    assert check_deleted(["c"], holdings) == []
