"""The committed protobuf stubs are exactly what proto/dna/v1 generates."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest
from support import load_script

ROOT = Path(__file__).resolve().parents[2]


def _generator() -> ModuleType:
    return load_script("gen_protos")


def _sources(root: Path) -> dict[Path, bytes]:
    return {
        p.relative_to(root): p.read_bytes()
        for p in root.rglob("*")
        if p.suffix in {".py", ".pyi"} and "__pycache__" not in p.parts
    }


@pytest.mark.process  # protoc runs its mypy plugins as processes (from native code)
def test_committed_stubs_match_the_protos(tmp_path: Path) -> None:
    gen = _generator()
    gen.generate(tmp_path)
    committed_dir = gen.DEFAULT_OUT
    fresh, committed = _sources(tmp_path), _sources(committed_dir)
    assert fresh.keys() == committed.keys(), "stub files added or removed: run `make protos`"
    stale = sorted(str(name) for name in fresh if fresh[name] != committed[name])
    assert not stale, f"stale stubs {stale}: run `make protos` and commit"
    assert len(fresh) >= 6 * 4  # six protos, each .py/.pyi and grpc .py/.pyi
