"""``python -m bench``: run every benchmark module in turn (``make bench``).

Arguments are passed to each module unchanged, so only the options every module
shares (``--rounds``, ``--n``, ``--quick``; see ``bench.harness.arg_parser``) belong here.
The machine line is printed once, before the first figure.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

# Every benchmark module, in run order. Each exposes ``main(argv) -> int``. The network
# benchmarks each stay within ~3 minutes (overlay, storage: budget 165-170 s; e2e: ~75-90 s).
MODULES: tuple[str, ...] = ("crypto", "transport", "overlay", "storage", "repair", "e2e", "turn")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    status = 0
    for name in MODULES:
        module = importlib.import_module(f"bench.{name}")
        status = max(status, int(module.main(args)))
    return status


if __name__ == "__main__":
    raise SystemExit(main())
