"""The metrics reference in docs/operations.md: the committed table is what the roles'
registries give, a stale or unmarked one is named, and the table reads labels, types and
series names right."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from support import load_script

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "scripts" / "gen_metrics_docs.py"
DOC = Path("docs/operations.md")


def _generator() -> ModuleType:
    return load_script("gen_metrics_docs")


GEN = _generator()


def run(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--root", str(root)],
        check=False, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def copy_doc(tmp_path: Path, edit: tuple[str, str] | None = None) -> Path:
    target = tmp_path / DOC
    target.parent.mkdir(parents=True)
    shutil.copy(ROOT / DOC, target)
    if edit is not None:
        text = target.read_text(encoding="utf-8")
        assert edit[0] in text
        target.write_text(text.replace(edit[0], edit[1]), encoding="utf-8")
    return target


@pytest.mark.process  # starts a bootstrap and a storage node (in the script's process)
def test_the_committed_metrics_reference_is_current() -> None:
    out = run(ROOT, "--check")
    assert (out.returncode, out.stderr) == (0, ""), out.stderr


@pytest.mark.process  # starts a bootstrap and a storage node (in the script's process)
def test_a_stale_reference_is_named_then_regenerated(tmp_path: Path) -> None:
    row = "| `dna_storage_blobs` | gauge |"
    doc = copy_doc(tmp_path, (row, "| `dna_storage_blobz` | gauge |"))
    out = run(tmp_path, "--check")
    assert out.returncode == 1
    assert "docs/operations.md: metrics reference not current" in out.stderr
    assert "dna_storage_blobz" in doc.read_text(encoding="utf-8")  # --check wrote nothing
    assert run(tmp_path).returncode == 0
    assert doc.read_text(encoding="utf-8") == (ROOT / DOC).read_text(encoding="utf-8")


def test_a_doc_without_the_markers_is_refused_and_left_alone(tmp_path: Path) -> None:
    doc = "# guide\nno markers here\n"
    with pytest.raises(SystemExit, match="markers"):
        GEN.render(doc, "table")


def test_metrics_of_reads_labels_before_any_child_and_names_the_exposed_series() -> None:
    registry = CollectorRegistry()
    Counter("demo_refused", "Refusals, by reason", ["reason"], registry=registry)
    Gauge("demo_open", "Open | now", registry=registry)
    Histogram("demo_seconds", "Latency", registry=registry)
    metrics = {m.name: m for m in GEN.metrics_of(registry)}
    assert metrics["demo_refused"].labels == ("reason",)  # no child yet, labels still known
    assert metrics["demo_refused"].exposed == "`demo_refused_total`"
    assert metrics["demo_seconds"].exposed == (
        "`demo_seconds_bucket`, `demo_seconds_sum`, `demo_seconds_count`"
    )
    table = GEN.table({"a": list(metrics.values()), "b": [metrics["demo_open"]]})
    assert "| `demo_open` | gauge | - | all | Open \\| now |" in table  # a pipe is escaped
    assert "| `demo_refused_total` | counter | `reason` | a | Refusals, by reason |" in table
