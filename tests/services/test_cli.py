"""The console scripts, run as real processes the way a person or operator would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from dna_core.crypto import PublicKeySet
from dna_core.crypto.node import puzzle_bits

BIN = Path(sys.executable).parent


def run(
    cmd: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a console script with no terminal; the passphrase comes only from ``env``."""
    base = {k: v for k, v in os.environ.items() if k != "DNA_PASSPHRASE"}
    return subprocess.run(
        [str(BIN / cmd), *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env={**base, **(env or {})},
        stdin=subprocess.DEVNULL,
    )


def test_demo_runs_the_whole_flow() -> None:
    out = run("dna", "demo")
    assert out.returncode == 0, out.stderr
    assert "'Hello Bob, this is post-quantum.'" in out.stdout
    assert "(alice: True)" in out.stdout
    assert "refused: the same envelope replayed" in out.stdout
    assert "refused: a copy with one flipped bit" in out.stdout
    assert out.stdout.rstrip().endswith("demo complete")


def test_identity_create_show_export(tmp_path: Path) -> None:
    keyfile = tmp_path / "me" / "identity.key"
    env = {"DNA_PASSPHRASE": "correct horse"}
    created = run("dna", "--json", "identity", "create", "--keyfile", str(keyfile), env=env)
    assert created.returncode == 0, created.stderr
    info = json.loads(created.stdout)
    assert keyfile.stat().st_mode & 0o777 == 0o600

    shown = json.loads(run("dna", "--json", "identity", "show", "--keyfile", str(keyfile)).stdout)
    assert shown["fingerprint"] == info["fingerprint"]

    pub = tmp_path / "me.pub"
    exported = run(
        "dna", "identity", "export", "--keyfile", str(keyfile), "--out", str(pub), env=env
    )
    assert exported.returncode == 0, exported.stderr
    assert PublicKeySet.decode(pub.read_bytes()).fingerprint.hex() == info["fingerprint"]

    again = run("dna", "identity", "create", "--keyfile", str(keyfile), env=env)
    assert again.returncode == 1 and "refusing to overwrite" in again.stderr


def test_wrong_passphrase_is_one_clear_line(tmp_path: Path) -> None:
    keyfile = tmp_path / "identity.key"
    run("dna", "identity", "create", "--keyfile", str(keyfile), env={"DNA_PASSPHRASE": "right"})
    out = run(
        "dna", "identity", "export", "--keyfile", str(keyfile), "--out", str(tmp_path / "x"),
        env={"DNA_PASSPHRASE": "wrong"},
    )  # fmt: skip
    assert out.returncode == 1
    assert out.stderr.strip() == "dna: error: wrong passphrase (or the key file was altered)"


def test_no_passphrase_without_a_terminal_is_a_clear_error(tmp_path: Path) -> None:
    out = run("dna", "identity", "create", "--keyfile", str(tmp_path / "k"))
    assert out.returncode == 1 and "DNA_PASSPHRASE" in out.stderr


def test_missing_key_file_is_a_clear_error(tmp_path: Path) -> None:
    out = run("dna", "identity", "show", "--keyfile", str(tmp_path / "absent.key"))
    assert out.returncode == 1 and out.stderr.startswith("dna: error:")


@pytest.mark.parametrize("service", ["dna-bootstrap", "dna-storage-node", "dna-stun"])
def test_service_keygen_mints_a_puzzle_solving_key(service: str, tmp_path: Path) -> None:
    keyfile = tmp_path / "node.key"
    out = run(service, "keygen", "--out", str(keyfile), "--puzzle-bits", "6")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert puzzle_bits(bytes.fromhex(info["node_id"])) >= 6
    assert keyfile.stat().st_mode & 0o777 == 0o600
    assert run(service, "--version").stdout.startswith(service)
