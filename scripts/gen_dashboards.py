"""Regenerate the Grafana dashboards in deploy/grafana/dashboards from code.

Usage: uv run python scripts/gen_dashboards.py [--out DIR]   (or `make dashboards`)

The dashboards are built with grafana-foundation-sdk's typed builders and written as JSON
with a fixed ``uid`` and no ``id``, so Grafana (compose's file provisioning, the chart's
dashboard ConfigMap) can load them as they are. The output is deterministic:
tests/deploy/test_dashboards.py regenerates into a temporary directory and compares byte
for byte, and checks that every metric a query names is one the nodes export.

Three dashboards: the overlay (every node), storage health (storage nodes) and the
STUN/TURN relays (`dna-stun`).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from grafana_foundation_sdk.builders import bargauge, stat, timeseries
from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus as prom
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as model
from grafana_foundation_sdk.models import prometheus as prom_model

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "deploy" / "grafana" / "dashboards"
DATASOURCE = model.DataSourceRef(type_val="prometheus", uid="${datasource}")
# Every query keeps to the nodes picked in the `instance` variable (all by default).
SEL = 'instance=~"$instance"'
RATE = "$__rate_interval"
# The storage node's replica factor (dna_storage.replication: 5 replicas per mailbox) and the
# write quorum W = 3: the replica-count histogram's buckets are 0..5.
REPLICAS = 5
QUORUM = 3

LAST = common_builders.ReduceDataOptions().calcs(["lastNotNull"])


def query(expr: str, legend: str = "", ref: str = "A") -> prom.Dataquery:
    q = prom.Dataquery().expr(expr).ref_id(ref).datasource(DATASOURCE)
    return q.legend_format(legend) if legend else q


def series(
    title: str, description: str, unit: str, *queries: prom.Dataquery, width: int = 12
) -> timeseries.Panel:
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .height(8)
        .span(width)
        .fill_opacity(10)
        .legend(
            common_builders.VizLegendOptions()
            .display_mode(common.LegendDisplayMode.TABLE)
            .placement(common.LegendPlacement.BOTTOM)
            .show_legend(True)
            .calcs(["lastNotNull", "max"])
        )
    )
    for q in queries:
        panel = panel.with_target(q)
    return panel


def single_stat(title: str, description: str, unit: str, expr: str, width: int = 6) -> stat.Panel:
    return (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .height(4)
        .span(width)
        .reduce_options(LAST)
        .with_target(query(expr).instant())
    )


def base(uid: str, title: str, description: str, nodes: str = "dna_build_info") -> db.Dashboard:
    """A dashboard with the datasource and instance variables every panel uses; ``nodes``:
    the series whose instances the variable lists."""
    return (
        db.Dashboard(title)
        .uid(uid)
        .description(description)
        .tags(["dna"])
        .refresh("30s")
        .time("now-3h", "now")
        .timezone("browser")
        .tooltip(model.DashboardCursorSync.CROSSHAIR)
        .with_variable(db.DatasourceVariable("datasource").label("Data source").type("prometheus"))
        .with_variable(
            db.QueryVariable("instance")
            .label("Node")
            .datasource(DATASOURCE)
            .query(f"label_values({nodes}, instance)")
            .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .multi(True)
            .include_all(True)
            .all_value(".*")
            .sort(model.VariableSort.ALPHABETICAL_ASC)
        )
    )


def overlay_dashboard() -> db.Dashboard:
    d = base(
        "dna-overlay",
        "DNA overlay",
        "Every DNA node (bootstrap and storage): readiness, routing, overlay RPCs, records, "
        "gRPC errors, load shedding and the process. Metrics: docs/operations.md.",
    )
    d = d.with_row(db.Row("Nodes"))
    d = d.with_panel(
        single_stat(
            "Nodes ready",
            "Nodes whose /readyz answers 200 (dna_ready), of all scraped.",
            "none",
            f"sum(dna_ready{{{SEL}}})",
        )
    )
    d = d.with_panel(
        single_stat(
            "Nodes not ready",
            "Nodes up but failing /readyz: joining, shutting down or over the disk "
            "high-water mark.",
            "none",
            f"count(dna_ready{{{SEL}}} == 0) or vector(0)",
        )
    )
    d = d.with_panel(
        single_stat(
            "Bootstrap nodes",
            "Processes reporting role=bootstrap.",
            "none",
            f'count(dna_build_info{{role="bootstrap",{SEL}}}) or vector(0)',
        )
    )
    d = d.with_panel(
        single_stat(
            "Storage nodes",
            "Processes reporting role=storage.",
            "none",
            f'count(dna_build_info{{role="storage",{SEL}}}) or vector(0)',
        )
    )
    d = d.with_panel(
        series(
            "Readiness",
            "1 while /readyz answers 200. A node that keeps dropping to 0 is flapping "
            "(alert DnaNodeReadinessFlapping).",
            "none",
            query(f"dna_ready{{{SEL}}}", "{{instance}}"),
        )
    )
    d = d.with_panel(
        series(
            "Routing table size",
            "Contacts in each node's routing table.",
            "none",
            query(f"dna_overlay_routing_table_size{{{SEL}}}", "{{instance}}"),
        )
    )
    d = d.with_row(db.Row("Overlay traffic"))
    d = d.with_panel(
        series(
            "Overlay RPCs",
            "Overlay RPCs per second by direction, method and outcome.",
            "reqps",
            query(
                f"sum by (direction, method, outcome) "
                f"(rate(dna_overlay_rpcs_total{{{SEL}}}[{RATE}]))",
                "{{direction}} {{method}} {{outcome}}",
            ),
        )
    )
    d = d.with_panel(
        series(
            "Refused by the overlay, by reason",
            "Datagrams, contacts and records the overlay refused, per second.",
            "ops",
            query(
                f"sum by (reason) (rate(dna_overlay_rejected_total{{{SEL}}}[{RATE}]))",
                "{{reason}}",
            ),
        )
    )
    d = d.with_panel(
        series(
            "Lookup latency",
            "Iterative lookups: median, 95th and 99th percentile over all selected nodes.",
            "s",
            *(
                query(
                    f"histogram_quantile({q}, sum by (le) "
                    f"(rate(dna_overlay_lookup_seconds_bucket{{{SEL}}}[{RATE}])))",
                    f"p{round(q * 100)}",
                    ref,
                )
                for q, ref in ((0.5, "A"), (0.95, "B"), (0.99, "C"))
            ),
        )
    )
    d = d.with_panel(
        series(
            "Records held",
            "Signed records (identities, names, presence) each node holds, and evictions "
            "per second when a store is full.",
            "none",
            query(f"dna_overlay_records{{{SEL}}}", "{{instance}}"),
            query(
                f"rate(dna_overlay_records_evicted_total{{{SEL}}}[{RATE}])",
                "evicted/s {{instance}}",
                "B",
            ),
        )
    )
    d = d.with_panel(
        series(
            "gRPC errors",
            "Requests refused at decoding (malformed) and handler failures (internal), "
            "per second, by method.",
            "reqps",
            query(
                f"sum by (method) (rate(dna_grpc_malformed_requests_total{{{SEL}}}[{RATE}]))",
                "malformed {{method}}",
            ),
            query(
                f"sum by (method) (rate(dna_grpc_internal_errors_total{{{SEL}}}[{RATE}]))",
                "internal {{method}}",
                "B",
            ),
        )
    )
    d = d.with_panel(
        series(
            "Record bytes",
            "Bytes of records each node holds (bounded by records.max_bytes).",
            "bytes",
            query(f"dna_overlay_record_bytes{{{SEL}}}", "{{instance}}"),
        )
    )
    d = d.with_panel(
        series(
            "Deleted records remembered",
            "Keys of deleted records each node remembers so an older version is not taken "
            "back (a rollback), at most 20,000; and keys forgotten early per second to stay "
            "within that: once they move, such keys can be rolled back.",
            "none",
            query(f"dna_overlay_records_gone{{{SEL}}}", "{{instance}}"),
            query(
                f"rate(dna_overlay_records_gone_dropped_total{{{SEL}}}[{RATE}])",
                "forgotten/s {{instance}}",
                "B",
            ),
        )
    )
    d = d.with_row(db.Row("Load shedding"))
    d = d.with_panel(
        series(
            "gRPC connections",
            "Connections open through the connection guard, and those it closed at accept "
            "(per source or total cap), per second.",
            "short",
            query(f"dna_grpc_connections{{{SEL}}}", "open {{instance}}"),
            query(
                f"sum by (reason) (rate(dna_grpc_connections_refused_total{{{SEL}}}[{RATE}]))",
                "refused {{reason}}",
                "B",
            ),
        )
    )
    d = d.with_panel(
        series(
            "Large unary answers",
            "Answers (a mailbox page, a record) built or waiting for their client to read "
            "them, and calls refused with no slot free (busy) or ended unread (stalled), per "
            "second: grpc_answers_max bounds the first.",
            "short",
            query(f"dna_grpc_answers_held{{{SEL}}}", "held {{instance}}"),
            query(
                f"sum by (reason) (rate(dna_grpc_answers_refused_total{{{SEL}}}[{RATE}]))",
                "{{reason}}",
                "B",
            ),
        )
    )
    d = d.with_row(db.Row("Process"))
    d = d.with_panel(
        series(
            "CPU",
            "CPU time per second (1 = one core).",
            "percentunit",
            query(f"rate(process_cpu_seconds_total{{{SEL}}}[{RATE}])", "{{instance}}"),
            width=8,
        )
    )
    d = d.with_panel(
        series(
            "Resident memory",
            "Resident set size.",
            "bytes",
            query(f"process_resident_memory_bytes{{{SEL}}}", "{{instance}}"),
            width=8,
        )
    )
    return d.with_panel(
        series(
            "Open files",
            "Open file descriptors as a share of the limit (a node holds one per connection).",
            "percentunit",
            query(
                f"process_open_fds{{{SEL}}} / process_max_fds{{{SEL}}}",
                "{{instance}}",
            ),
            width=8,
        )
    )


def replica_histogram() -> bargauge.Panel:
    """Per bucket, not cumulative: Grafana turns `le` buckets into counts per bucket when
    the query's format is heatmap."""
    expr = f"sum by (le) (increase(dna_storage_mailbox_replicas_bucket{{{SEL}}}[$__range]))"
    return (
        bargauge.Panel()
        .title("Replica count per mailbox (over the time range)")
        .description(
            "Each repair pass observes, per mailbox held, how many of its "
            f"{REPLICAS} replicas hold its least-replicated blob or tombstone. A healthy "
            f"network observes {REPLICAS}; below {QUORUM} a write quorum is at risk."
        )
        .datasource(DATASOURCE)
        .unit("none")
        .height(8)
        .span(12)
        .orientation(common.VizOrientation.VERTICAL)
        .display_mode(common.BarGaugeDisplayMode.BASIC)
        .reduce_options(LAST)
        .with_target(query(expr, "{{le}}").format(prom_model.PromQueryFormat.HEATMAP).instant())
    )


def storage_dashboard() -> db.Dashboard:
    d = base(
        "dna-storage",
        "DNA storage health",
        "Storage nodes: replica counts, anti-entropy repair, refusals by reason, garbage "
        "collection and the disk high-water mark. Metrics: docs/storage.md.",
    )
    d = d.with_row(db.Row("Replication"))
    d = d.with_panel(replica_histogram())
    below = "dna_storage_mailbox_replicas_bucket"
    count = f"sum(rate(dna_storage_mailbox_replicas_count{{{SEL}}}[{RATE}]))"
    d = d.with_panel(
        series(
            "Mailbox observations under-replicated",
            f"Share of repair observations with fewer than {REPLICAS} replicas (below k) "
            f"and fewer than {QUORUM} (below the write quorum). Repair should bring both "
            "back to 0 within a few passes (alerts DnaStorageReplicasBelowK, "
            "DnaStorageReplicasBelowQuorum).",
            "percentunit",
            query(
                f'sum(rate({below}{{le="{REPLICAS - 1}.0",{SEL}}}[{RATE}])) / {count}',
                f"below k ({REPLICAS})",
            ),
            query(
                f'sum(rate({below}{{le="{QUORUM - 1}.0",{SEL}}}[{RATE}])) / {count}',
                f"below quorum ({QUORUM})",
                "B",
            ),
        )
    )
    d = d.with_panel(
        series(
            "Repair lag",
            "Seconds since each node's last anti-entropy pass ended (alert "
            "DnaStorageRepairStalled), and how long that pass took.",
            "s",
            query(
                f"time() - dna_storage_repair_last_pass_timestamp_seconds{{{SEL}}}",
                "since last pass {{instance}}",
            ),
            query(
                f"dna_storage_repair_last_pass_duration_seconds{{{SEL}}}",
                "pass took {{instance}}",
                "B",
            ),
        )
    )
    d = d.with_panel(
        series(
            "Repair traffic and failures",
            "Blobs and tombstones pulled and pushed by repair, hand-off items dropped once "
            "every rightful replica held them, failed sync exchanges by reason, and sync "
            "calls that waited for a peer's rate limit (held by the pace, or refused and "
            "sent again after the retry-after), per second.",
            "ops",
            query(f"sum(rate(dna_storage_repair_pulled_total{{{SEL}}}[{RATE}]))", "pulled"),
            query(f"sum(rate(dna_storage_repair_pushed_total{{{SEL}}}[{RATE}]))", "pushed", "B"),
            query(
                f"sum(rate(dna_storage_handoff_dropped_total{{{SEL}}}[{RATE}]))",
                "hand-off dropped",
                "C",
            ),
            query(
                f"sum by (reason) (rate(dna_storage_repair_failures_total{{{SEL}}}[{RATE}]))",
                "failed: {{reason}}",
                "D",
            ),
            query(
                f"sum by (cause) (rate(dna_storage_repair_rate_waits_total{{{SEL}}}[{RATE}]))",
                "waited: {{cause}}",
                "E",
            ),
        )
    )
    d = d.with_panel(
        series(
            "Repair compare",
            "Mailboxes per second (one per peer they are shared with) whose exchange a "
            "SyncCompare decided: same (not exchanged), differ, unsupported (an older peer) "
            "or failed (both exchanged). Mostly 'same' in a healthy network.",
            "ops",
            query(
                f"sum by (outcome) (rate(dna_storage_repair_compared_total{{{SEL}}}[{RATE}]))",
                "{{outcome}}",
            ),
        )
    )
    d = d.with_row(db.Row("Requests and refusals"))
    d = d.with_panel(
        series(
            "Requests by method",
            "Mailbox requests per second by method and outcome.",
            "reqps",
            query(
                f"sum by (method, outcome) (rate(dna_storage_requests_total{{{SEL}}}[{RATE}]))",
                "{{method}} {{outcome}}",
            ),
        )
    )
    d = d.with_panel(
        series(
            "Refusals by reason",
            "Refused requests per second: a put by reason (size, pow, rate, quota, disk, "
            "other), a fetch, delete or sync as refused; and backend writes that found no "
            "room (alert DnaStorageRefusalSpike).",
            "reqps",
            query(
                f"sum by (method, outcome) "
                f'(rate(dna_storage_requests_total{{outcome!="ok",{SEL}}}[{RATE}]))',
                "{{method}}: {{outcome}}",
            ),
            query(
                f"sum(rate(dna_storage_write_no_room_total{{{SEL}}}[{RATE}]))",
                "write found no room",
                "B",
            ),
        )
    )
    d = d.with_row(db.Row("Holdings and garbage collection"))
    d = d.with_panel(
        series(
            "Blobs held",
            "Blobs each node holds, expired ones not yet collected included (updated every "
            "GC interval).",
            "none",
            query(f"dna_storage_blobs{{{SEL}}}", "{{instance}}"),
            width=8,
        )
    )
    d = d.with_panel(
        series(
            "Bytes held",
            "Bytes of blobs each node holds.",
            "bytes",
            query(f"dna_storage_bytes{{{SEL}}}", "{{instance}}"),
            width=8,
        )
    )
    d = d.with_panel(
        series(
            "Garbage collection",
            "Expired blobs and tombstones removed per second, and mailboxes held.",
            "ops",
            query(f"sum(rate(dna_storage_gc_removed_total{{{SEL}}}[{RATE}]))", "removed/s"),
            query(f"sum(dna_storage_mailboxes{{{SEL}}})", "mailboxes held", "B"),
            width=8,
        )
    )
    d = d.with_panel(
        series(
            "Tombstones for IDs not held",
            "Tombstones each node stores for IDs it held neither as a blob nor as a "
            "tombstone (updated every GC interval), and the bound it runs with: deletes "
            "naming such IDs are refused past admission.node_max_tombstones_unheld "
            "(1,000,000 by default; alert DnaStorageTombstonesUnheldNearLimit at 80%). "
            "Refusals per second, this bound's and the per-mailbox max_tombstones_unheld's "
            "together.",
            "none",
            query(f"dna_storage_tombstones_unheld{{{SEL}}}", "{{instance}}"),
            query(
                f'dna_storage_limit{{limit="node_max_tombstones_unheld",{SEL}}}',
                "limit {{instance}}",
                "C",
            ),
            query(
                f'sum(rate(dna_storage_requests_total{{method="delete",outcome="tombstones",'
                f"{SEL}}}[{RATE}]))",
                "refused/s",
                "B",
            ),
            width=24,
        )
    )
    d = d.with_row(db.Row("Disk"))
    d = d.with_panel(
        series(
            "Disk used vs high-water mark",
            "Used share of each node's data file system (SQLite; Redis gives no reading) "
            "and its high-water mark: over it the node refuses writes and turns unready "
            "(alerts DnaStorageDiskNearHighWater, DnaStorageRefusingWrites).",
            "percentunit",
            query(f"dna_storage_disk_used_ratio{{{SEL}}}", "used {{instance}}"),
            query(
                f'dna_storage_limit{{limit="disk_high_water",{SEL}}}',
                "high-water {{instance}}",
                "B",
            ),
        )
    )
    return d.with_panel(
        series(
            "Refusing writes",
            "1 while a node refuses writes for lack of room.",
            "none",
            query(f"dna_storage_refusing_writes{{{SEL}}}", "{{instance}}"),
        )
    )


def stun_dashboard() -> db.Dashboard:
    d = base(
        "dna-stun",
        "DNA STUN/TURN relays",
        "dna-stun relays: allocations, relayed traffic by direction, requests by method, "
        "refusals by reason and failed credentials. Metrics: docs/operations.md.",
        nodes='dna_build_info{role="stun"}',
    )
    d = d.with_row(db.Row("Relays"))
    d = d.with_panel(
        single_stat(
            "Relays ready",
            "Relays whose /readyz answers 200 (alert DnaStunRelayDown when one stops reporting).",
            "none",
            f'sum(dna_ready{{{SEL}}} and on (instance) dna_build_info{{role="stun",{SEL}}})',
        )
    )
    d = d.with_panel(
        single_stat(
            "Allocations held",
            "TURN allocations held now, over the selected relays.",
            "none",
            f"sum(dna_stun_allocations{{{SEL}}})",
        )
    )
    d = d.with_panel(
        single_stat(
            "Relayed now",
            "Payload bytes per second relayed, both directions.",
            "Bps",
            f"sum(rate(dna_stun_relayed_bytes_total{{{SEL}}}[{RATE}]))",
        )
    )
    d = d.with_panel(
        single_stat(
            "Refused by quota",
            "Allocate requests refused per second because the relay (508) or the user (486) "
            "holds its quota of allocations (alert DnaStunAllocationQuotaReached).",
            "reqps",
            f'sum(rate(dna_stun_refusals_total{{reason=~"quota_total|quota_user",{SEL}}}[{RATE}]))'
            " or vector(0)",
        )
    )
    d = d.with_row(db.Row("Allocations"))
    d = d.with_panel(
        series(
            "Allocations held",
            "TURN allocations each relay holds ([relay] max_allocations caps them).",
            "none",
            query(f"dna_stun_allocations{{{SEL}}}", "{{instance}}"),
        )
    )
    d = d.with_panel(
        series(
            "Allocations granted",
            "New allocations per second.",
            "ops",
            query(
                f"rate(dna_stun_allocations_created_total{{{SEL}}}[{RATE}])",
                "{{instance}}",
            ),
        )
    )
    d = d.with_row(db.Row("Relayed traffic"))
    d = d.with_panel(
        series(
            "Relayed bytes by direction",
            "Payload bytes per second, client_to_peer and peer_to_client ([relay] "
            "bandwidth_bytes_per_s caps each allocation).",
            "Bps",
            query(
                f"sum by (direction) (rate(dna_stun_relayed_bytes_total{{{SEL}}}[{RATE}]))",
                "{{direction}}",
            ),
        )
    )
    d = d.with_panel(
        series(
            "Relayed packets by direction",
            "Datagrams per second, client_to_peer and peer_to_client.",
            "pps",
            query(
                f"sum by (direction) (rate(dna_stun_relayed_packets_total{{{SEL}}}[{RATE}]))",
                "{{direction}}",
            ),
        )
    )
    d = d.with_row(db.Row("Requests, refusals and credentials"))
    d = d.with_panel(
        series(
            "Requests by method",
            "STUN/TURN requests per second: binding, allocate, refresh, create_permission, "
            "channel_bind, and binding_indication (NAT keepalives).",
            "reqps",
            query(
                f"sum by (method) (rate(dna_stun_requests_total{{{SEL}}}[{RATE}]))",
                "{{method}}",
            ),
            width=8,
        )
    )
    d = d.with_panel(
        series(
            "Refusals by reason",
            "Requests refused and datagrams dropped per second. `unauthenticated` is the "
            "normal first 401 of every TURN exchange (alert DnaStunRefusalSpike leaves it "
            "out).",
            "ops",
            query(
                f"sum by (reason) (rate(dna_stun_refusals_total{{{SEL}}}[{RATE}]))",
                "{{reason}}",
            ),
            width=8,
        )
    )
    return d.with_panel(
        series(
            "Failed credentials by reason",
            "Requests whose credentials failed per second: unknown user, expired "
            "time-limited credential, bad integrity (a wrong password or secret), wrong "
            "realm (alert DnaStunAuthFailureSpike).",
            "reqps",
            query(
                f"sum by (reason) (rate(dna_stun_auth_failures_total{{{SEL}}}[{RATE}]))",
                "{{reason}}",
            ),
            width=8,
        )
    )


DASHBOARDS: dict[str, Callable[[], db.Dashboard]] = {
    "dna-overlay.json": overlay_dashboard,
    "dna-storage.json": storage_dashboard,
    "dna-stun.json": stun_dashboard,
}


def render(build: Callable[[], db.Dashboard]) -> str:
    dashboard = build().build()
    # Panel IDs in layout order, unique within the dashboard (the builders leave panels
    # without one and every row at 0; Grafana's links and "view panel" need them unique).
    for number, panel in enumerate(dashboard.panels or [], start=1):
        panel.id_val = number
    return json.dumps(dashboard, cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


def generate(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, build in DASHBOARDS.items():
        path = out / name
        path.write_text(render(build))
        written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    for path in generate(args.out):
        print(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)


if __name__ == "__main__":
    main()
