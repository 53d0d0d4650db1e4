"""Packages meet at their faces (docs/architecture.md "Rules"): services and tools import
``dna_core.overlay``, ``dna_core.wire`` and ``dna_core.mailbox`` from the package, never a
module under it (benches too, for the mailbox), and a service imports no other service.
Read from the source files, so a new import that breaks the rule fails here whatever it
is for."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FACES = ("dna_core.overlay", "dna_core.wire", "dna_core.mailbox")
SERVICES = {p.name for p in (ROOT / "services").glob("*/src/dna_*")}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in ``path``, nested and type-checking ones included."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.lineno, node.module))
    return found


def sources(*patterns: str) -> list[Path]:
    return sorted(p for pattern in patterns for p in ROOT.glob(pattern))


def test_the_rules_see_every_service_and_tool() -> None:
    assert {"dna_bootstrap", "dna_peer", "dna_stun", "dna_storage"} <= SERVICES
    assert len(sources("services/*/src/**/*.py", "tools/*/src/**/*.py")) > 30


def test_services_and_tools_import_overlay_and_wire_only_from_their_faces() -> None:
    deep = [
        f"{path.relative_to(ROOT)}:{line}: {module}"
        for path in sources("services/*/src/**/*.py", "tools/*/src/**/*.py")
        for line, module in imported_modules(path)
        if module.startswith(tuple(f"{face}." for face in FACES))
    ]
    assert deep == [], "import these from the package face instead:\n" + "\n".join(deep)


def test_benches_import_the_mailbox_only_from_its_face() -> None:
    deep = [
        f"{path.relative_to(ROOT)}:{line}: {module}"
        for path in sources("bench/**/*.py")
        for line, module in imported_modules(path)
        if module.startswith("dna_core.mailbox.")
    ]
    assert sources("bench/**/*.py") and deep == [], "\n".join(deep)


def test_a_service_imports_no_other_service() -> None:
    crossing = [
        f"{path.relative_to(ROOT)}:{line}: {module}"
        for path in sources("services/*/src/**/*.py")
        for line, module in imported_modules(path)
        if (other := module.partition(".")[0]) in SERVICES and other not in path.parts
    ]
    assert crossing == [], "\n".join(crossing)


@pytest.mark.parametrize("face", FACES)
def test_every_name_a_face_exports_resolves(face: str) -> None:
    module = importlib.import_module(face)
    missing = [name for name in module.__all__ if getattr(module, name, None) is None]
    assert missing == []
    with pytest.raises(AttributeError):
        _ = module.no_such_name


@pytest.mark.process
def test_the_overlay_cores_load_without_asyncio_or_grpc() -> None:
    """The adapter's names load on first use (overlay/__init__.py): the simulator and the
    crypto suite do not pay for them. A fresh interpreter, so nothing is loaded before."""
    probe = (
        "import sys, dna_core.overlay, dna_core.wire\n"
        "print(sorted(m for m in ('asyncio', 'grpc', 'fastapi') if m in sys.modules))\n"
        "dna_core.overlay.OverlayNode\n"
        "print(sorted(m for m in ('asyncio', 'grpc') if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["[]", "['asyncio', 'grpc']"]


@pytest.mark.process
def test_the_mailbox_codec_and_planner_load_without_asyncio_or_grpc() -> None:
    """The storage node's rules and the client's planner are sans-I/O: only the adapter
    (`MailboxClient`, loaded on first use) brings asyncio and grpc in."""
    probe = (
        "import sys, dna_core.mailbox\n"
        "print(sorted(m for m in ('asyncio', 'grpc') if m in sys.modules))\n"
        "dna_core.mailbox.MailboxClient\n"
        "print(sorted(m for m in ('asyncio', 'grpc') if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["[]", "['asyncio', 'grpc']"]
