"""bench.e2e_trace joins the processes' trace files into one way per message: segments
that add up to the total, measured from the replica that pushed first."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest


def _load() -> ModuleType:
    """``bench/e2e_trace.py`` by path: on the tests' path, ``bench`` is this directory."""
    path = Path(__file__).resolve().parents[2] / "bench" / "e2e_trace.py"
    spec = importlib.util.spec_from_file_location("bench_e2e_trace", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_e2e_trace"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


e2e_trace = _load()

MS = 1_000_000
BLOB = "ab" * 8
SENDER = [("send.start", 0), ("send.sealed", 1), ("send.pow_start", 2), ("send.pow_done", 5)]
RECIPIENT = [("peer.arrived", 12), ("peer.taken", 13), ("peer.opened", 14), ("peer.told", 15),
             ("peer.committed", 18), ("peer.progress", 19)]  # fmt: skip


def node(first_push_ms: int) -> list[tuple[str, int]]:
    return [("node.recv", 6), ("node.admitted", 7), ("node.write", 7), ("node.stored", 9),
            ("node.push_read", 10), ("node.push_written", first_push_ms)]  # fmt: skip


def write(directory: Path, pid: int, events: list[tuple[str, int]], extra: str = "") -> None:
    lines = [f"{event} {BLOB} {ms * MS}" for event, ms in events]
    (directory / f"{pid}.trace").write_text("\n".join(lines) + "\n" + extra)


@pytest.fixture
def traced(tmp_path: Path) -> Path:
    phase = b"seq".hex()
    write(tmp_path, 1, SENDER, f"phase {phase} {-1 * MS}\n")
    write(tmp_path, 2, node(11), f"sqlite.commit 3:{int(7.5 * MS)} {int(8.5 * MS)}\n")
    write(tmp_path, 3, [*node(12), ("node.recv", 100)])  # pushed later: not the way taken
    write(tmp_path, 4, RECIPIENT, f"gc.2 {2 * MS} {16 * MS}\nnode.recv cut-off")
    return tmp_path


def test_a_message_s_segments_add_up_to_its_total_from_the_first_pusher(traced: Path) -> None:
    (way,) = e2e_trace.ways(e2e_trace.read(traced))
    assert way.phase == "seq" and way.total_ms == 19.0 and way.told_ms == 15.0
    assert sum(way.segments.values()) == pytest.approx(way.total_ms)
    assert way.segments["pow"] == 3.0 and way.segments["push_out"] == 1.0  # node 2's: 10 -> 11
    assert way.segments["to_peer"] == 1.0 and way.segments["commit"] == 3.0
    assert (way.fsync_ms, way.group, way.gc_ms) == (1.0, 3, 2.0)


def test_a_message_missing_a_step_is_left_out(traced: Path) -> None:
    write(traced, 4, RECIPIENT[:-1])  # never reached the progress callback
    assert e2e_trace.ways(e2e_trace.read(traced)) == []


def test_the_report_gives_each_phase_its_histogram_and_segments(traced: Path) -> None:
    out = e2e_trace.report(traced)
    assert list(out) == ["seq"]
    assert out["seq"]["messages"] == 1 and out["seq"]["histogram_ms"]["15-20"] == 1
    assert out["seq"]["segments_ms"]["open"]["p50"] == 1.0
    assert "== seq: 1 messages" in e2e_trace.render(out)
