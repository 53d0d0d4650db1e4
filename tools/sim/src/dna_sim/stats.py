"""Per-lookup records and their summary figures (deterministic: no float-order surprises)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class LookupRecord:
    exact: bool  # the result is exactly the k closest alive nodes
    closest_found: bool  # the result holds the closest alive honest node
    same_side: bool  # exact against only the nodes the origin can reach (partitions)
    cross_side: bool  # the result holds a node the origin cannot reach (partitions)
    recall: float  # share of the true k closest in the result
    complete: bool  # the result holds k contacts
    hops: int
    queries: int
    messages: int
    timeouts: int
    latency: float  # virtual seconds


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (an observed value, never an interpolation)."""
    ordered = sorted(values)
    if not ordered:
        return 0.0
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def summarize(records: Sequence[LookupRecord], *, partitioned: bool = False) -> dict[str, float]:
    n = len(records)
    if n == 0:
        return {"lookups": 0}
    hops = [r.hops for r in records]
    queries = [r.queries for r in records]
    latency_ms = [r.latency * 1000 for r in records]
    exact = sum(r.exact for r in records)
    out: dict[str, float] = {
        "lookups": n,
        "success_rate": _rate(exact, n),
        "failures": n - exact,
        "incomplete": sum(not r.complete for r in records),
        "closest_found_rate": _rate(sum(r.closest_found for r in records), n),
        "recall_mean": round(statistics.fmean(r.recall for r in records), 6),
        "hops_median": statistics.median(hops),
        "hops_mean": round(statistics.fmean(hops), 3),
        "hops_p99": percentile(hops, 99),
        "queries_per_lookup_median": statistics.median(queries),
        "queries_per_lookup_mean": round(statistics.fmean(queries), 3),
        "queries_per_lookup_p99": percentile(queries, 99),
        "messages_per_lookup": round(statistics.fmean(r.messages for r in records), 3),
        "timeouts_per_lookup": round(statistics.fmean(r.timeouts for r in records), 3),
        "latency_ms_p50": round(percentile(latency_ms, 50), 3),
        "latency_ms_p99": round(percentile(latency_ms, 99), 3),
        "latency_ms_mean": round(statistics.fmean(latency_ms), 3),
    }
    if partitioned:
        out["same_side_success_rate"] = _rate(sum(r.same_side for r in records), n)
        out["cross_side_result_rate"] = _rate(sum(r.cross_side for r in records), n)
    return out


def _rate(hits: int, n: int) -> float:
    return round(hits / n, 6)
