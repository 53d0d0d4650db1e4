"""The committed protobuf stubs are exactly what proto/dna/v1 generates."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _generator() -> object:
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_protos"] = module
    spec.loader.exec_module(module)
    return module


def _sources(root: Path) -> dict[Path, bytes]:
    return {
        p.relative_to(root): p.read_bytes()
        for p in root.rglob("*")
        if p.suffix in {".py", ".pyi"} and "__pycache__" not in p.parts
    }


@pytest.mark.process  # protoc runs its mypy plugins as processes (from native code)
def test_committed_stubs_match_the_protos(tmp_path: Path) -> None:
    gen = _generator()
    gen.generate(tmp_path)  # type: ignore[attr-defined]
    committed_dir = gen.DEFAULT_OUT  # type: ignore[attr-defined]
    fresh, committed = _sources(tmp_path), _sources(committed_dir)
    assert fresh.keys() == committed.keys(), "stub files added or removed: run `make protos`"
    stale = sorted(str(name) for name in fresh if fresh[name] != committed[name])
    assert not stale, f"stale stubs {stale}: run `make protos` and commit"
    assert len(fresh) >= 6 * 4  # six protos, each .py/.pyi and grpc .py/.pyi
