"""Write the compose testnet's files from the testnet topology (`make compose`):
docker-compose.yml, deploy/compose/nodes/*.toml, deploy/compose/prometheus.yml.

`--check` writes nothing and exits 1 naming every file that differs (the test suite runs it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dna_testnet.compose import NODES_DIR, render, stale_files
from dna_testnet.topology import TESTNET

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="only report stale files")
    args = parser.parse_args()
    if args.check:
        stale = stale_files(ROOT, TESTNET)
        if stale:
            sys.exit(f"stale (run `make compose`): {', '.join(stale)}")
        return
    (ROOT / NODES_DIR).mkdir(parents=True, exist_ok=True)
    for extra in (ROOT / NODES_DIR).glob("*.toml"):
        extra.unlink()
    for path, text in render(TESTNET).items():
        (ROOT / path).write_text(text)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
