"""Write the configuration reference and schemas from the config models.

Usage: uv run python scripts/gen_config_docs.py [--check] [--root DIR]

Writes docs/configuration.md (every key of every role: type, default, environment variable,
description, secret or not) and deploy/config-schema/<role>.schema.json (the JSON schema of
each role's TOML file, which the Helm chart's values.schema.json embeds). With --check it
writes nothing and exits 1 naming each file that is missing or differs from what the models
generate (tests/core/ops/test_config_reference.py runs that in `make test`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dna_bootstrap.cli import ENV_PREFIX as BOOTSTRAP_ENV
from dna_core.ops.config_reference import SCHEMA_DIR, Role, config_reference, config_schema
from dna_core.overlay.aio.server import OverlayServiceConfig
from dna_storage.cli import ENV_PREFIX as STORAGE_ENV
from dna_storage.node import StorageNodeConfig
from dna_stun.config import ENV_PREFIX as STUN_ENV
from dna_stun.config import StunServiceConfig

ROOT = Path(__file__).resolve().parent.parent
ROLES = (
    Role("bootstrap", "dna-bootstrap", OverlayServiceConfig, BOOTSTRAP_ENV),
    Role("storage", "dna-storage-node", StorageNodeConfig, STORAGE_ENV),
    Role("stun", "dna-stun", StunServiceConfig, STUN_ENV),
)
REFERENCE = Path("docs/configuration.md")


def generated() -> dict[Path, str]:
    """Each generated file (relative to the repository root) and its text."""
    files = {REFERENCE: config_reference(ROLES, generator="scripts/gen_config_docs.py")}
    for role in ROLES:
        text = json.dumps(config_schema(role), indent=2, ensure_ascii=False) + "\n"
        files[Path(SCHEMA_DIR) / f"{role.name}.schema.json"] = text
    return files


def stale(root: Path) -> list[Path]:
    """The generated files under ``root`` that are missing or not what the models give."""
    out = []
    for relative, text in generated().items():
        path = root / relative
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            out.append(relative)
    return out


def write(root: Path) -> list[Path]:
    written = []
    for relative, text in generated().items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(relative)
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check the files are current")
    parser.add_argument("--root", type=Path, default=ROOT, help="repository root (default: ours)")
    args = parser.parse_args()
    if args.check:
        out_of_date = stale(args.root)
        for relative in out_of_date:
            print(f"{relative}: not current: run `make config-docs` and commit", file=sys.stderr)
        return 1 if out_of_date else 0
    for relative in write(args.root):
        print(relative)
    return 0


if __name__ == "__main__":
    sys.exit(main())
