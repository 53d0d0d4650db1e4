"""The service console scripts, run as real processes the way an operator would."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from dna_core.crypto.node import puzzle_bits
from support import BIN, run_script

pytestmark = pytest.mark.process  # every test runs a service's command


def test_the_relay_offers_no_keygen() -> None:
    # dna-stun is no overlay member and reads no node key; its keygen minted one anyway,
    # a file an operator would keep and back up for nothing.
    out = run_script("dna-stun", "keygen", "--out", "/dev/null")
    assert out.returncode == 2 and "invalid choice: 'keygen'" in out.stderr, out.stderr
    assert "keygen" not in run_script("dna-stun", "--help").stdout
    assert run_script("dna-stun", "--version").stdout.startswith("dna-stun")


@pytest.mark.parametrize("service", ["dna-bootstrap", "dna-storage-node"])
def test_service_keygen_mints_a_puzzle_solving_key(service: str, tmp_path: Path) -> None:
    keyfile = tmp_path / "node.key"
    out = run_script(service, "keygen", "--out", str(keyfile), "--puzzle-bits", "6")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert puzzle_bits(bytes.fromhex(info["node_id"])) >= 6
    assert keyfile.stat().st_mode & 0o777 == 0o600
    assert run_script(service, "--version").stdout.startswith(service)


@pytest.mark.parametrize("service", ["dna-bootstrap", "dna-storage-node"])
def test_keygen_refuses_a_bad_puzzle_and_an_existing_key_file(service: str, tmp_path: Path) -> None:
    """`--puzzle-bits -3` (or 99) ended in a ValueError traceback from the minting; an
    existing --out said "[Errno 17] File exists" only after minting a key to throw away."""
    keyfile = tmp_path / "node.key"
    for bits in ("-3", "33", "eight"):
        out = run_script(service, "keygen", "--out", str(keyfile), "--puzzle-bits", bits)
        assert out.returncode == 2, out.stderr
        assert f"--puzzle-bits: {bits!r} is not 0-32" in out.stderr, out.stderr
        assert "Traceback" not in out.stderr and not keyfile.exists()
    keyfile.write_bytes(b"the operator's key")
    out = run_script(service, "keygen", "--out", str(keyfile), "--puzzle-bits", "0")
    assert out.returncode == 1 and out.stdout == "", out.stdout
    assert out.stderr == (f"{service}: error: {keyfile} exists: a node key is never"
                          " overwritten\n")  # fmt: skip
    assert keyfile.read_bytes() == b"the operator's key"


@pytest.mark.parametrize(
    "command", ["dna-bootstrap", "dna-storage-node", "dna-stun", "dna-testnet"]
)
def test_ctrl_c_while_a_command_loads_is_a_quiet_exit(command: str) -> None:
    """SIGINT while the command still imports its modules (a few tenths of a second, seconds
    on a loaded machine): status 130 and no traceback, as docs/operations.md ("Shutdown")
    says. It printed the traceback of the import it interrupted."""
    interrupted = 0
    for delay in (0.15, 0.3, 0.5):  # before 0.1 s: Python's own start-up (site)
        proc = subprocess.Popen([str(BIN / command), "--help"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=60)
        assert "Traceback" not in err, (delay, err)
        # 130, or killed by the signal before Python set its handler; 0: it was done
        assert proc.returncode in (0, 130, -signal.SIGINT), (delay, proc.returncode, err)
        interrupted += proc.returncode != 0
    assert interrupted, "every run ended before its SIGINT: no moment of loading was tried"
