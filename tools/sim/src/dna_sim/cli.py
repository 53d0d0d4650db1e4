"""`dna-sim` entry point (filled in by the simulator)."""


def main() -> None:
    raise SystemExit("dna-sim: not built yet")
