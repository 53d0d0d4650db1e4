"""`dna identity create/publish --name` with a taken or invalid name (issue 11 item 3),
as a person runs it: the real `dna` against a real local testnet."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from dna_peer.link import new_code
from dna_testnet.network import Testnet
from support import run_script

pytestmark = pytest.mark.process  # every test runs the dna command


def dna(home: Path, *args: str, net: Testnet | None = None) -> subprocess.CompletedProcess[str]:
    seeds = ["--bootstrap", ",".join(f"{h}:{p}" for h, p in net.seeds)] if net else []
    return run_script("dna", "--home", str(home), *seeds, *args,
                      env={"DNA_PASSPHRASE": "correct horse"})  # fmt: skip


def ok(out: subprocess.CompletedProcess[str]) -> Any:
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def nothing_written(home: Path) -> bool:
    return not (home / "identity.key").exists() and not (home / "cache.db").exists()


def test_a_taken_name_is_an_error_and_writes_nothing(testnet: Testnet, tmp_path: Path) -> None:
    bob_name = f"bob{str(time.time_ns())[-6:]}"
    bob, eve = tmp_path / "bob", tmp_path / "eve"
    bob_fp = ok(dna(bob, "--json", "identity", "create", "--name", bob_name, net=testnet))[
        "fingerprint"
    ]

    taken = dna(eve, "identity", "create", "--name", bob_name.upper(), net=testnet)
    assert taken.returncode == 1, taken.stdout
    assert f"the name {bob_name!r} is taken" in taken.stderr
    assert "name:" not in taken.stdout
    assert nothing_written(eve)

    for bad in (["--name", "b"], ["--name", "bad name!"], ["--display-name", "x" * 200],
                ["--display-name", "\x1b[2Jboss"]):  # fmt: skip
        refused = dna(eve, "identity", "create", *bad, net=testnet)
        assert refused.returncode == 1 and refused.stderr.startswith("dna: error:"), bad
        assert nothing_written(eve), bad

    eve_fp = ok(dna(eve, "--json", "identity", "create", "--name", f"eve{bob_name}",
                    net=testnet))["fingerprint"]  # fmt: skip
    stolen = dna(eve, "identity", "publish", "--name", bob_name, net=testnet)
    assert stolen.returncode == 1 and f"the name {bob_name!r} is taken" in stolen.stderr
    assert ok(dna(eve, "--json", "contacts", "add", bob_name, net=testnet))["fingerprint"] == bob_fp
    # her own name still works, and republishing it is fine
    assert ok(dna(eve, "--json", "identity", "publish", "--name", f"eve{bob_name}",
                  net=testnet))["name"] == f"eve{bob_name}"  # fmt: skip
    assert eve_fp != bob_fp


def test_linking_into_an_existing_identity_fails_at_once(tmp_path: Path) -> None:
    """The same class: `identity link CODE` checked the profile only after waiting a minute
    for the offer; it is refused before any network wait (here, no network at all)."""
    home = tmp_path / "me"
    ok(dna(home, "--json", "identity", "create", "--offline"))
    started = time.monotonic()
    out = dna(home, "--bootstrap", "127.0.0.250:7400", "identity", "link", new_code())
    assert out.returncode == 1 and "refusing to overwrite" in out.stderr, out.stderr
    assert time.monotonic() - started < 15


def test_a_link_code_that_cannot_be_one_is_said_at_once(tmp_path: Path) -> None:
    """A code with a character no code has (0 for O, 1 for I) was looked for on the
    network: a 10 s wait and "no link offer found", or, with the network down, a
    bootstrap error that says nothing of the code. It is refused at once, naming the
    characters, with nothing written."""
    for code, says in (("ABCD-EFGH-IJKL-MN0P", "not '0'"), ("abcd efgh ijk1 8nop", "'1', '8'"),
                       ("ABCD-EFGH", "has 16 letters and digits")):  # fmt: skip
        home = tmp_path / "new"
        started = time.monotonic()
        out = dna(home, "--bootstrap", "127.0.0.250:7400", "identity", "link", code)
        assert out.returncode == 1 and says in out.stderr, out.stderr
        assert (
            out.stderr.startswith("dna: error: a link code has")
            and len(out.stderr.splitlines()) == 1
        )
        # before the 10 s network wait it took (a `dna` start on a loaded CI can take 5 s)
        assert time.monotonic() - started < 9 and not home.exists()
