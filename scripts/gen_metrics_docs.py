"""Write the metrics reference of docs/operations.md from the roles' own registries.

Usage: uv run python scripts/gen_metrics_docs.py [--check] [--root DIR]

Starts each role in this process (a bootstrap node, a storage node on SQLite), on 127.0.0.1
with ports chosen by the OS and its files in a temporary directory, with the connection guard
on, so that every series it can export is registered; reads each metric's name, type, labels
and help from its ``CollectorRegistry``; stops it; and writes the table between the markers
``<!-- metrics:begin -->`` and ``<!-- metrics:end -->`` of docs/operations.md. With --check
it writes nothing and exits 1 when that block is not what the roles give
(tests/core/ops/test_metrics_reference.py runs it in `make test`).

Label names are read from the metric objects (``_labelnames``: prometheus_client keeps no
public accessor for a labelled metric that has no child yet); the process collector's series
from what it collects.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from dna_bootstrap.cli import ENV_PREFIX as BOOTSTRAP_ENV
from dna_core.ops.config import load_config
from dna_core.overlay.aio.server import OverlayServer, OverlayServiceConfig
from dna_core.wire.gen.dna.v1 import common_pb2
from dna_storage.cli import ENV_PREFIX as STORAGE_ENV
from dna_storage.node import StorageNode, StorageNodeConfig
from dna_stun.config import ENV_PREFIX as STUN_ENV
from dna_stun.config import StunServiceConfig
from dna_stun.service import StunServer
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

ROOT = Path(__file__).resolve().parent.parent
DOC = Path("docs/operations.md")
BEGIN, END = "<!-- metrics:begin -->", "<!-- metrics:end -->"
GENERATOR = "scripts/gen_metrics_docs.py"
# What the exposition adds to a metric's name, by type (counters carry no _created series).
SERIES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}


@dataclass(frozen=True)
class Metric:
    name: str
    type: str
    labels: tuple[str, ...]
    help: str

    @property
    def exposed(self) -> str:
        """The series names as scraped (``name_total`` for a counter, ...)."""
        suffixes = SERIES.get(self.type, ("",))
        return ", ".join(f"`{self.name}{suffix}`" for suffix in suffixes)


def toml(root: Path, *, storage: bool) -> str:
    """A role's configuration: loopback, OS-chosen ports, files under ``root``."""
    text = (
        f'[node]\nhost = "127.0.0.1"\nudp_port = 0\ngrpc_port = 0\n'
        f'key_file = "{root / "node.key"}"\npuzzle_bits = 0\n'
        f"[overlay]\nallow_loopback = true\n"
        f'[ops]\nhttp_host = "127.0.0.1"\nhttp_port = 0\n'
        f'[records]\npath = "{root / "records.db"}"\n'
        f"[connections]\ngrpc_connection_guard = true\n"
    )
    if storage:
        text += f'[storage]\ndata_dir = "{root / "data"}"\n'
    return text


def metrics_of(registry: CollectorRegistry) -> list[Metric]:
    """Every metric registered, sorted by name."""
    found: dict[str, Metric] = {}
    collectors = list(registry._collector_to_names)
    for collector in collectors:
        if isinstance(collector, MetricWrapperBase):
            name = collector._name
            found[name] = Metric(
                name,
                str(collector._type),
                tuple(collector._labelnames),
                collector._documentation,
            )
            continue
        for family in collector.collect():  # e.g. the process collector
            labels = sorted({k for s in family.samples for k in s.labels})
            # a custom family with no samples yet still knows its label names
            labels = labels or list(getattr(family, "_labelnames", ()))
            base = family.name
            found[base] = Metric(base, family.type, tuple(labels), family.documentation)
    return [found[name] for name in sorted(found)]


async def _bootstrap_metrics(root: Path) -> list[Metric]:
    path = root / "bootstrap.toml"
    path.write_text(toml(root, storage=False), encoding="utf-8")
    config = load_config(OverlayServiceConfig, path, env_prefix=BOOTSTRAP_ENV, env={})
    server = OverlayServer(config, role=common_pb2.NODE_ROLE_BOOTSTRAP)
    await server.start()
    try:
        return metrics_of(server.registry)
    finally:
        await server.stop()


async def _storage_metrics(root: Path) -> list[Metric]:
    path = root / "storage.toml"
    path.write_text(toml(root, storage=True), encoding="utf-8")
    config = load_config(StorageNodeConfig, path, env_prefix=STORAGE_ENV, env={})
    node = StorageNode(config)
    await node.start()
    try:
        assert node.server is not None
        return metrics_of(node.server.registry)
    finally:
        await node.stop()


async def _stun_metrics(root: Path) -> list[Metric]:
    path = root / "stun.toml"
    path.write_text(
        '[server]\nhost = "127.0.0.1"\nudp_port = 0\n'
        '[ops]\nhttp_host = "127.0.0.1"\nhttp_port = 0\n',
        encoding="utf-8",
    )
    server = StunServer(load_config(StunServiceConfig, path, env_prefix=STUN_ENV, env={}))
    server.warnings = []  # no users, loopback only: meant for this throwaway relay
    await server.start()
    try:
        return metrics_of(server.registry)
    finally:
        await server.stop()


ROLES: tuple[tuple[str, Callable[[Path], Awaitable[list[Metric]]]], ...] = (
    ("bootstrap", _bootstrap_metrics),
    ("storage", _storage_metrics),
    ("stun", _stun_metrics),
)


async def collect() -> dict[str, list[Metric]]:
    """Each role's metrics, each role started in a temporary directory of its own."""
    out = {}
    for role, start in ROLES:
        with tempfile.TemporaryDirectory(prefix=f"dna-metrics-{role}-") as tmp:
            out[role] = await start(Path(tmp))
    return out


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _labels(labels: Iterable[str]) -> str:
    return ", ".join(f"`{label}`" for label in labels) or "-"


def table(by_role: dict[str, list[Metric]]) -> str:
    """The reference: one row per metric, the roles that export it."""
    roles: dict[str, list[str]] = {}
    metric: dict[str, Metric] = {}
    for role, metrics in by_role.items():
        for m in metrics:
            roles.setdefault(m.name, []).append(role)
            metric[m.name] = m
    lines = [
        BEGIN,
        f"<!-- generated by {GENERATOR} from the roles' registries: do not edit by hand -->",
        "",
        "| metric | type | labels | roles | meaning |",
        "|---|---|---|---|---|",
    ]
    for name in sorted(metric):
        m = metric[name]
        who = ", ".join(roles[name]) if len(roles[name]) < len(by_role) else "all"
        lines.append(f"| {m.exposed} | {m.type} | {_labels(m.labels)} | {who} | {_cell(m.help)} |")
    lines.append(END)
    return "\n".join(lines)


def render(doc: str, block: str) -> str:
    """``doc`` with its marked block replaced by ``block``."""
    start, end = doc.find(BEGIN), doc.find(END)
    if start < 0 or end < start:
        raise SystemExit(f"{DOC}: the markers {BEGIN} ... {END} are missing")
    return doc[:start] + block + doc[end + len(END) :]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check the block is current")
    parser.add_argument("--root", type=Path, default=ROOT, help="repository root (default: ours)")
    args = parser.parse_args()
    path = args.root / DOC
    doc = path.read_text(encoding="utf-8")
    wanted = render(doc, table(asyncio.run(collect())))
    if args.check:
        if wanted != doc:
            print(f"{DOC}: metrics reference not current: run `make metrics-docs` and commit",
                  file=sys.stderr)  # fmt: skip
            return 1
        return 0
    path.write_text(wanted, encoding="utf-8")
    print(DOC)
    return 0


if __name__ == "__main__":
    sys.exit(main())
