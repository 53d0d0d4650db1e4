"""The profile's files survive a kill or a full disk at any point (dna_core.files,
dna_peer.profile): real `dna` processes, SIGKILLed between any two steps of their writes
(DNA_TEST_KILL_AT_STEP), or writing to a tmpfs that fills up (mounted in a mount
namespace of its own: root, as tests/services/test_node_start_errors.py). Afterwards the
profile is either whole or not there, no file is torn, and the next command works or
says in one line what to do."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from dna_core.crypto import keystore
from dna_core.files import TEST_KILL_ENV
from dna_peer.armor import LOCKED_KEY_FILE, dearmor
from dna_testnet.network import Testnet
from support import BIN, run_script

pytestmark = pytest.mark.process  # every test runs the dna command

PASS = {"DNA_PASSPHRASE": "correct horse"}
# identity create --offline writes the `creating` mark, device.json and identity.key, each
# in three steps (half written, whole but not in place, in place): step 10 is never reached
CREATE_STEPS = 9
EXPORT_STEPS = 3


def dna(home: Path, *args: str, env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess[str]:  # fmt: skip
    return run_script("dna", "--home", str(home), *args, env={**PASS, **(env or {})})


def one_line_error(out: subprocess.CompletedProcess[str], *words: str) -> str:
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert out.stderr.startswith("dna: error: "), out.stderr
    for word in words:
        assert word in out.stderr, out.stderr
    return out.stderr.strip()


def assert_whole_profile(home: Path) -> None:
    """A usable profile: the key file decodes, owner-only; the cache opens (search runs,
    and, as every command, drops a `creating` mark left by a kill just after the key
    file); no temporary file is left."""
    keystore.read_public((home / "identity.key").read_bytes())
    assert (home / "identity.key").stat().st_mode & 0o777 == 0o600
    found = dna(home, "--json", "search", "x")
    assert found.returncode == 0 and json.loads(found.stdout) == [], found.stderr
    assert sorted(p.name for p in home.iterdir()) == [
        "cache.db", "device.json", "identity.key", "lock"], list(home.iterdir())  # fmt: skip
    for path in home.iterdir():
        assert path.stat().st_mode & 0o777 == 0o600, path


def test_a_create_killed_at_any_step_leaves_a_whole_profile_or_one_the_next_create_replaces(
    tmp_path: Path,
) -> None:
    for step in range(1, CREATE_STEPS + 2):
        home = tmp_path / f"killed-at-{step}"
        killed = dna(home, "identity", "create", "--offline", env={TEST_KILL_ENV: str(step)})
        if step > CREATE_STEPS:  # every step passed: the create finished
            assert killed.returncode == 0, killed.stderr
            assert_whole_profile(home)
            continue
        assert killed.returncode == -signal.SIGKILL, (step, killed.stderr)
        if (home / "identity.key").exists():  # killed after the key file: the profile is done
            assert step == CREATE_STEPS and (home / "creating").exists()  # the mark, stale
            assert_whole_profile(home)
            assert "refusing to overwrite" in dna(home, "identity", "create", "--offline").stderr
            continue
        for path in home.iterdir():  # nothing readable by others, even half made
            assert path.stat().st_mode & 0o777 == 0o600, path
        # a command that needs the identity says what happened and what to do
        one_line_error(dna(home, "identity", "show"), "was cut short", "run it again")
        again = dna(home, "--json", "identity", "create", "--offline")
        assert again.returncode == 0, (step, again.stderr)
        assert "was cut short there; removed what it left" in again.stderr, again.stderr
        assert_whole_profile(home)


# `identity link CODE` writes what `identity create` writes (the creating mark, device.json,
# the cache with the device list, identity.key), then deletes the used offer.
LINK_STEPS = CREATE_STEPS


def test_a_link_killed_at_any_step_keeps_the_offer_until_the_new_device_is_whole(
    testnet: Testnet, tmp_path: Path
) -> None:
    """The offer was deleted before the new device's files were written: a kill (or a full
    disk) there lost the link, the code then finding nothing. Now the profile is whole
    first, with the device list; the offer is deleted after, so a link cut short at any
    step of its writes runs again with the same code, or is whole already (and its first
    sync deletes the offer, so the code cannot make a second device)."""
    net = ["--bootstrap", ",".join(f"{h}:{p}" for h, p in testnet.seeds)]
    phone = tmp_path / "phone"
    assert dna(phone, *net, "identity", "create", "--offline").returncode == 0
    for step in range(1, LINK_STEPS + 1):
        offer = dna(phone, *net, "--json", "identity", "link", "--device-name", f"d{step}")
        assert offer.returncode == 0, offer.stderr
        code, device_id = (json.loads(offer.stdout)[k] for k in ("code", "device_id"))
        home = tmp_path / f"linked-{step}"
        killed = dna(home, *net, "identity", "link", code, env={TEST_KILL_ENV: str(step)})
        assert killed.returncode == -signal.SIGKILL, (step, killed.stderr)
        if not (home / "identity.key").exists():  # cut short: the same code again
            again = dna(home, *net, "--json", "identity", "link", code)
            assert again.returncode == 0, (step, again.stderr)
            assert "was cut short there; removed what it left" in again.stderr, again.stderr
        assert_whole_profile(home)
        assert json.loads((home / "device.json").read_text())["id"] == device_id
        synced = dna(home, *net, "--json", "sync")  # the device works, from its files alone
        assert synced.returncode == 0, (step, synced.stderr)
        if step == LINK_STEPS:  # killed before it deleted the offer: its first sync did
            again = dna(tmp_path / "again", *net, "identity", "link", code)
            assert again.returncode == 1 and "no link offer found" in again.stderr, again.stderr


def test_what_an_older_dna_left_is_cleared_and_a_lost_key_file_is_not_taken_for_it(
    tmp_path: Path,
) -> None:
    """A device.json alone (the reported defect: an older dna's create that failed at the
    key file) is cleared by the next create; a cache without its key file and without the
    `creating` mark may hold a history (the key file lost by hand): it is refused, kept."""
    home = tmp_path / "me"
    home.mkdir()
    (home / "device.json").write_text('{"id": "00112233445566778899aabbccddeeff", "name": "x"}')
    created = dna(home, "identity", "create", "--offline")
    assert created.returncode == 0 and "removed what it left (device.json)" in created.stderr
    assert_whole_profile(home)

    (home / "identity.key").unlink()
    kept = sorted(p.read_bytes() for p in home.iterdir())
    for args in (["identity", "create", "--offline"], ["search", "x"]):
        line = one_line_error(dna(home, *args), "no identity.key")
        assert f"mv {home} {home}.damaged && dna --home {home} identity import BACKUP" in line
    assert sorted(p.read_bytes() for p in home.iterdir()) == kept


# A rotation's switch on this device (Profile.replace_identity, as Peer._adopt calls it),
# in a process of its own: identity.key.new written (three steps), the cache re-keyed,
# the new key file renamed over the old (step 4 just before).
ROTATE_SCRIPT = """
import sys
from pathlib import Path
from dna_core.crypto import Identity
from dna_peer.cache import cache_key
from dna_peer.profile import Profile

profile = Profile(Path(sys.argv[1]))
old = profile.unlock("pw")
new = Identity.generate()
print(new.fingerprint.hex(), flush=True)
cache = profile.open_cache(old)
device = profile.device().device_id
profile.replace_identity(new, "pw", lambda: cache.rekey(cache_key(new, device)))
"""
ROTATE_STEPS = 4
CHECK_SCRIPT = """
import sys
from pathlib import Path
from dna_peer.profile import Profile

profile = Profile(Path(sys.argv[1]))
identity = profile.unlock("pw")
profile.open_cache(identity).close()
print(identity.fingerprint.hex())
"""


def python(script: str, *args: str, env: dict[str, str] | None = None
           ) -> subprocess.CompletedProcess[str]:  # fmt: skip
    return subprocess.run([sys.executable, "-c", script, *args], check=False,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})  # fmt: skip


def test_a_rotation_killed_at_any_step_keeps_the_old_keys_or_the_new_never_neither(
    tmp_path: Path,
) -> None:
    for step in range(1, ROTATE_STEPS + 2):
        home = tmp_path / f"rotated-{step}"
        assert dna(home, "identity", "create", "--offline", env={"DNA_PASSPHRASE": "pw"}
                   ).returncode == 0  # fmt: skip
        old = keystore.read_public((home / "identity.key").read_bytes()).fingerprint.hex()
        rotated = python(ROTATE_SCRIPT, str(home), env={TEST_KILL_ENV: str(step)})
        new = rotated.stdout.strip()
        if step > ROTATE_STEPS:
            assert rotated.returncode == 0, rotated.stderr
        else:
            assert rotated.returncode == -signal.SIGKILL, (step, rotated.stderr)
        checked = python(CHECK_SCRIPT, str(home))  # unlock finishes or undoes the switch
        assert checked.returncode == 0, (step, checked.stderr)
        # the new keys once the cache was re-keyed (step 4 on), the old ones before
        assert checked.stdout.strip() == (new if step >= ROTATE_STEPS else old), step
        assert not (home / "identity.key.new").exists()
        assert (home / "identity.key").stat().st_mode & 0o777 == 0o600


def test_an_export_killed_at_any_step_leaves_the_backup_whole_or_absent(tmp_path: Path) -> None:
    home = tmp_path / "me"
    assert dna(home, "identity", "create", "--offline").returncode == 0
    for step in range(1, EXPORT_STEPS + 1):
        out = tmp_path / f"backup-{step}.txt"
        args = ("identity", "export", "--private", "--out", str(out))
        killed = dna(home, *args, env={TEST_KILL_ENV: str(step)})
        assert killed.returncode == -signal.SIGKILL, (step, killed.stderr)
        if out.exists():
            assert out.stat().st_mode & 0o777 == 0o600
        else:
            assert dna(home, *args).returncode == 0
        assert dearmor(out.read_bytes())[0] == LOCKED_KEY_FILE
        for left in tmp_path.glob(f".{out.name}.*.tmp"):  # a kill's litter, never readable
            assert left.stat().st_mode & 0o777 == 0o600, left


@dataclass
class TinyDisk:
    """A tmpfs of ``size_kib`` mounted at ``mount`` in a mount namespace held by a sleeping
    process; `dna` runs inside it, the test reads its files through /proc/PID/root."""

    holder: subprocess.Popen[bytes]
    mount: Path

    @property
    def view(self) -> Path:
        return Path(f"/proc/{self.holder.pid}/root") / self.mount.relative_to("/")

    def dna(self, home: str, *args: str) -> subprocess.CompletedProcess[str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith("DNA_")}
        return subprocess.run(
            ["nsenter", "-t", str(self.holder.pid), "-m", "--", str(BIN / "dna"), "--home",
             str(self.mount / home), *args],
            check=False, capture_output=True, text=True, timeout=120, env={**base, **PASS},
            stdin=subprocess.DEVNULL,
        )  # fmt: skip

    def leave_free(self, free: int) -> None:
        """Fill the disk with a file (made again each time) until ``free`` bytes are left."""
        filler = self.view / "filler"
        filler.unlink(missing_ok=True)
        st = os.statvfs(self.view)
        room = st.f_bavail * st.f_frsize - free
        with filler.open("wb") as f:
            f.write(b"\0" * max(room, 0))

    def free_up(self) -> None:
        (self.view / "filler").unlink(missing_ok=True)


@contextlib.contextmanager
def tiny_disk(tmp_path: Path, size_kib: int) -> Iterator[TinyDisk]:
    mount = tmp_path / "disk"
    mount.mkdir()
    script = f'mount -t tmpfs -o size={size_kib}k tmpfs "{mount}" && echo up && exec sleep 600'
    holder = subprocess.Popen(["unshare", "-m", "sh", "-c", script], stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"up\n"
        yield TinyDisk(holder, mount)
    finally:
        holder.kill()
        holder.wait()


FULL_DISK = ("No space left on device", "disk is full")


def test_a_create_on_a_disk_that_fills_up_is_whole_or_leaves_nothing_in_the_way(
    tmp_path: Path,
) -> None:
    """Free room from none to enough, in steps: a create that fails says so in one line
    and the same create succeeds once there is room; nothing in between needs a hand."""
    outcomes = []
    with tiny_disk(tmp_path, 2048) as disk:
        for free_kib in (0, 4, 8, 32, 64, 128, 192, 256, 320, 384, 512, 1024):
            home = f"free-{free_kib}k"
            disk.leave_free(free_kib * 1024)
            first = disk.dna(home, "--json", "identity", "create", "--offline")
            disk.free_up()
            if first.returncode == 0:
                outcomes.append("created")
            else:
                error = json.loads(first.stderr.strip().splitlines()[-1])
                outcomes.append(Path(error["error"].split(":")[0]).name)  # the file refused
                assert any(words in error["error"] for words in FULL_DISK), (free_kib, error)
                assert error["kind"] != "InternalError", error
                left = sorted(p.name for p in (disk.view / home).iterdir())
                assert left in ([], ["lock"]), (free_kib, left)  # what it wrote, removed
                again = disk.dna(home, "--json", "identity", "create", "--offline")
                assert again.returncode == 0, (free_kib, again.stderr)
            found = disk.dna(home, "--json", "search", "x")
            assert found.returncode == 0 and json.loads(found.stdout) == [], found.stderr
            for path in (disk.view / home).iterdir():
                assert path.stat().st_mode & 0o777 == 0o600, path
            shutil.rmtree(disk.view / home)  # each step alone: the profiles made do not add up
    print("free KiB -> the file refused:", outcomes)
    # the disk filled up at each file a create writes (here: device.json with no room,
    # the cache up to about 300 KiB with its journal, the key file, written last, at 320-384)
    assert {"device.json", "cache.db", "identity.key"} <= set(outcomes), outcomes
    assert outcomes[-1] == "created", outcomes


def test_an_export_or_an_import_on_a_full_disk_leaves_nothing_torn_in_the_way(
    tmp_path: Path,
) -> None:
    with tiny_disk(tmp_path, 1024) as disk:
        assert disk.dna("me", "identity", "create", "--offline").returncode == 0
        backup = str(disk.mount / "backup.txt")
        for private in (["--private"], []):
            disk.leave_free(0)
            full = disk.dna("me", "identity", "export", *private, "--out", backup)
            one_line_error(full, "backup.txt: No space left on device")
            assert not (disk.view / "backup.txt").exists()
            disk.free_up()
            assert disk.dna("me", "identity", "export", *private, "--out", backup).returncode == 0
            kind, _ = dearmor((disk.view / "backup.txt").read_bytes())
            assert kind == (LOCKED_KEY_FILE if private else "DNA PUBLIC KEY SET")
            if private:  # a restore from it on the full disk: refused, nothing in the way
                disk.leave_free(0)
                refused = disk.dna("restored", "identity", "import", backup)
                one_line_error(refused, "device.json: No space left on device")
                assert sorted(p.name for p in (disk.view / "restored").iterdir()) == ["lock"]
                disk.free_up()
                assert disk.dna("restored", "identity", "import", backup).returncode == 0
            (disk.view / "backup.txt").unlink()


def test_a_full_disk_is_said_as_such_when_the_cache_opens_not_taken_for_a_wrong_key(
    tmp_path: Path,
) -> None:
    """Opening the cache writes its WAL index: on a full disk that fails like a wrong key
    did (SQLCipher cannot read page 1), and "move the file aside" would have lost the
    history. It is one line saying the disk is full, and the cache is fine after."""
    with tiny_disk(tmp_path, 1024) as disk:
        assert disk.dna("me", "identity", "create", "--offline").returncode == 0
        disk.leave_free(0)
        full = disk.dna("me", "--json", "search", "x")
        assert full.returncode == 1, full.stderr
        error = json.loads(full.stderr)
        assert error["kind"] == "CacheWriteError", error
        assert "the disk is full or failing" in error["error"], error
        assert "aside" not in error["error"] and "wrong key" not in error["error"], error
        disk.free_up()
        found = disk.dna("me", "--json", "search", "x")
        assert found.returncode == 0 and json.loads(found.stdout) == [], found.stderr


def test_a_restored_device_whose_first_open_hits_a_full_disk_still_asks_for_the_history(
    tmp_path: Path,
) -> None:
    """A restore makes no cache: the first open makes it, marked lost. On a full disk that
    failed after SQLite had written its first page, and the next open took the page for a
    whole cache: never marked lost, the device asked nobody for the history (and deleted
    without waiting for the other devices)."""
    with tiny_disk(tmp_path, 2048) as disk:
        assert disk.dna("me", "identity", "create", "--offline").returncode == 0
        backup = str(disk.mount / "backup.txt")
        assert disk.dna("me", "identity", "export", "--private", "--out", backup).returncode == 0
        for free_kib in (0, 8, 64):
            home = f"restored-{free_kib}k"
            assert disk.dna(home, "identity", "import", backup).returncode == 0
            disk.leave_free(free_kib * 1024)
            one_line_error(disk.dna(home, "search", "x"), "the disk is full or failing")
            disk.free_up()
            inbox = disk.dna(home, "inbox", "--offline")
            assert inbox.returncode == 0, inbox.stderr
            assert "this device is new or restored" in inbox.stdout, (free_kib, inbox.stdout)


# Run inside the disk's mount namespace: SQLite resolves /proc/PID/root (a symlink) to
# the directory under the mount, so the test process cannot open the cache there itself.
FULL_CACHE_SCRIPT = """
import json, os, sys
from pathlib import Path
from dna_core.crypto import Identity
from dna_peer.cache import Cache, CacheWriteError, Message, cache_key

disk = Path(sys.argv[1])
me = Identity.generate()
cache = Cache.open(disk / "cache.db", cache_key(me, b"d" * 16))
first = Message(b"1" * 16, b"c" * 16, me.fingerprint, b"b" * 32, 1, "kept", True)
big = Message(b"2" * 16, b"c" * 16, me.fingerprint, b"b" * 32, 2, "x" * 200_000, True)
cache.add_message(first)
filler = disk / "filler"
st = os.statvfs(disk)
filler.write_bytes(bytes(st.f_bavail * st.f_frsize))
try:
    cache.add_message(big)
    refused = None
except CacheWriteError as exc:
    refused = str(exc)
after_refusal = [m.body for m in cache.messages()]
filler.unlink()
again = cache.add_message(big)
print(json.dumps({"refused": refused, "after_refusal": after_refusal, "again": again,
                  "bodies": [m.body[:4] for m in cache.messages()],
                  "integrity": cache.integrity_check()}))
"""


def test_a_cache_write_the_full_disk_refuses_keeps_nothing_of_it_and_loses_nothing(
    tmp_path: Path,
) -> None:
    with tiny_disk(tmp_path, 1024) as disk:
        out = subprocess.run(
            ["nsenter", "-t", str(disk.holder.pid), "-m", "--", sys.executable, "-c",
             FULL_CACHE_SCRIPT, str(disk.mount)],
            check=False, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert "the disk is full or failing" in result["refused"], result
    assert result["after_refusal"] == ["kept"], result  # rolled back: nothing of it, nothing lost
    assert result["again"] is True, result  # the same step, run again once there is room
    assert result["bodies"] == ["kept", "xxxx"] and result["integrity"] == "ok", result
