"""Smoke run of the crypto benchmark: tiny sizes, checks only the output format (BENCH.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.process  # every test runs a benchmark as a process

ROOT = Path(__file__).resolve().parents[2]
KEYS = {"bench", "unit", "ours", "baseline", "ratio", "n", "params"}
FIGURES = {"crypto.seal", "crypto.open", "crypto.sign", "crypto.verify", "crypto.pow_verify"}


def test_crypto_bench_quick_prints_bench_md_json_lines() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.crypto", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) > 1, done.stdout
    assert "machine" in json.loads(lines[0])

    throughputs = set()
    for line in lines[1:]:
        figure = json.loads(line)
        assert set(figure) == KEYS, line
        assert isinstance(figure["ours"], int | float) and figure["ours"] > 0, line
        assert figure["baseline"], line
        assert all(value > 0 for value in figure["baseline"].values()), line
        assert figure["ratio"] > 0, line
        assert isinstance(figure["n"], int) and figure["n"] > 0, line
        assert isinstance(figure["params"], dict), line
        if figure["unit"] == "ops/s":
            throughputs.add(figure["bench"])
    assert throughputs == FIGURES


OVERLAY_FIGURES = {
    f"overlay.{op}{suffix}" for op in ("put", "get") for suffix in ("", ".p50", ".p99", ".cpu")
}
OVERLAY_BASELINES = {"opendht-signed", "opendht", "kademlia"}
OVERLAY_GOALS = {
    (f"overlay.{op}{suffix}", mode)
    for op in ("put", "get") for suffix in ("", ".p50", ".p99") for mode in ("seq", "c32")
}  # fmt: skip


def test_overlay_bench_quick_runs_ours_and_baselines_and_cleans_up() -> None:
    """12 nodes in 2 worker processes, OpenDHT (authenticated and unsigned) and kademlia
    beside them, 1 round (~25 s): every figure, the CPU lines and a goal line per goal."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.overlay", "--quick", "--ready-timeout", "60"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=200,
        check=False,
    )
    # Exit status 1 means some of our ops failed (params.failures): on 12 local nodes with
    # no loss, that is a defect to look at, not a run to accept.
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert "machine" in lines[0]
    assert "elapsed_s" in lines[-1]["detail"], lines[-1]  # ran to the end
    figures = [line for line in lines if "bench" in line]
    goals = [line["goal"] for line in lines if "goal" in line]
    others = [line for line in lines[1:] if "bench" not in line and "goal" not in line]
    assert all(set(line) == {"detail"} for line in others), others
    assert {(g["bench"], g["mode"]) for g in goals} == OVERLAY_GOALS
    assert all(g["baseline"] == "opendht-signed" for g in goals), goals
    assert all(g["status"] in ("PASS", "MISS") and g["ratio"] > 0 for g in goals), goals
    assert {f["bench"] for f in figures} == OVERLAY_FIGURES
    seen = set()
    for figure in figures:
        assert set(figure) == KEYS, figure
        assert figure["ours"] > 0, figure
        cpu = figure["bench"].endswith(".cpu")  # kademlia's CPU is not measured apart
        expected = OVERLAY_BASELINES - {"kademlia"} if cpu else OVERLAY_BASELINES
        assert set(figure["baseline"]) == expected, figure
        assert next(iter(figure["baseline"])) == "opendht-signed", figure  # the judge
        assert all(value > 0 for value in figure["baseline"].values()), figure
        assert figure["ratio"] > 0, figure
        params = figure["params"]
        assert set(params["failures"]) == {"ours", *OVERLAY_BASELINES}, figure
        assert params["failures"]["ours"] == 0, figure  # every op of ours went through
        seen.add((figure["bench"], params["mode"], params["replicas"]))
    assert len(seen) == len(OVERLAY_FIGURES) * 2 * 2  # seq/c32 x 8/20 replicas
    setup = next(line["detail"]["setup"] for line in others if "setup" in line["detail"])
    assert setup["node_tables_min"] > 0
    for pid in setup["worker_pids"]:  # the node workers were stopped and reaped
        assert not _is_overlay_worker(pid), pid


def _is_overlay_worker(pid: int) -> bool:
    """Whether ``pid`` is (still) a bench.overlay_nodes process."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"bench.overlay_nodes" in cmdline


def test_transport_bench_quick_compares_every_transport_and_stops_its_server() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.transport", "--quick", "--n", "100", "--rounds", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "Error" not in done.stderr, done.stderr  # the echo server stopped cleanly
    figures = {f["bench"]: f for f in map(json.loads, done.stdout.splitlines()[1:])}
    modes = ("seq", "c32")
    transports = {f"transport.{m}.{s}" for m in modes for s in (100, 4800)}
    guard = {
        f"transport.guard.{call}.{m}.{s}{cpu}"
        for call in ("unary", "stream") for m in modes for s in (100, 4800, 65536)
        for cpu in ("", ".cpu")
    }  # fmt: skip
    assert set(figures) == transports | guard
    for name, figure in figures.items():
        assert set(figure) == KEYS and figure["ours"] > 0, name
        if name in guard:
            expected = {"direct"}
        else:
            expected = {"grpc_stream", "tcp_framed"} | ({"udp"} if name.endswith(".100") else set())
        assert set(figure["baseline"]) == expected, name
        assert all(value > 0 for value in figure["baseline"].values()), name


def test_relay_tail_bench_quick_reports_each_size_relayed_beside_direct() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.relay_tail", "--quick"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    figures = {f["bench"]: f for f in map(json.loads, done.stdout.splitlines())}
    assert set(figures) == {
        f"relay_tail.{size}.{tail}"
        for size in (200, 8000, 40000)
        for tail in ("p99", "p999", "max")
    }
    for figure in figures.values():
        assert figure["n"] == 200 and figure["ours"] > 0 and figure["baseline"]["direct"] > 0
