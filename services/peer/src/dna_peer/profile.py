"""One device's files: the locked identity, the device ID and the encrypted cache.

$DNA_HOME/identity.key   Argon2id + AES-256-GCM key file (dna_core.crypto.keystore)
$DNA_HOME/device.json    this device's random ID and name (not secret)
$DNA_HOME/cache.db       SQLCipher cache (dna_peer.cache)
$DNA_HOME/lock           held by every dna process (shared), by a rotation alone
$DNA_HOME/creating       present while the profile is being created (below)

Every file is written whole or not at all (dna_core.files.write_atomic; the cache is
SQLite's transactions). A new profile is several files, and `identity.key` is written
last: it is what makes the profile exist. The `creating` mark is written first and
removed last, so that a creation cut short (a kill, a full disk) is recognised by the
next create, import or link, which removes what it left and starts again (saying so on
stderr); a command that needs the identity says that a create was cut short.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from dna_core.crypto import Identity, PublicKeySet, keystore
from dna_core.errors import DnaError, MalformedError, WrongPassphraseError
from dna_core.files import crash_point, leftover_temporaries, sync_directory, write_atomic

from dna_peer.cache import Cache, cache_key

DEVICE_ID_SIZE = 16
# What is read of a profile file or a backup, at most: far more than any real one (a key
# file is at most 8 KiB), so that a wrong path (/dev/zero, a disk image) is refused
# instead of filling the memory.
PROFILE_FILE_MAX_BYTES = 64 * 1024
BACKUP_MAX_BYTES = 1024 * 1024  # an armored block may sit inside a mail or a notes file

log = logging.getLogger("dna.peer.profile")


class NoIdentityError(DnaError):
    """The profile has no identity yet."""


class ProfileBusyError(DnaError):
    """Another process uses the profile, and this step must have it alone."""


class ProfileDamagedError(DnaError):
    """A file of the profile is missing or does not decode (a torn write, a disk fault, a
    hand edit): the error names the file and how to start the device again."""


@dataclass(frozen=True)
class Device:
    device_id: bytes
    name: str


@dataclass(frozen=True)
class Profile:
    home: Path

    @classmethod
    def default(cls) -> Profile:
        """$DNA_HOME, else ~/.dna."""
        home = os.environ.get("DNA_HOME")
        if home is None:
            return cls(Path.home() / ".dna")
        if not home.strip():
            raise DnaError("DNA_HOME is set but empty: unset it (for ~/.dna) or name a directory")
        return cls(Path(home))

    @property
    def keyfile(self) -> Path:
        return self.home / "identity.key"

    @property
    def cache_path(self) -> Path:
        return self.home / "cache.db"

    @contextlib.contextmanager
    def in_use(self, *, alone: bool = False, wait_s: float = 5.0) -> Iterator[None]:
        """Hold the profile while a command runs: shared by any number of processes
        (`dna watch` beside `dna send`), or ``alone`` for a step that changes the identity
        under the others' feet (a rotation re-keys the cache they have open). A step that
        must be alone waits ``wait_s`` for the others, then gives up with ProfileBusyError;
        a shared holder waits for such a step to finish (a creation, too). A directory with
        no identity yet has nothing to share."""
        if not self.exists():
            yield
            return
        fd = os.open(self.home / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if alone:
                self._lock_alone(fd, wait_s)
            else:
                fcntl.flock(fd, fcntl.LOCK_SH)
            self._drop_creating_mark()  # a creation killed just after its key file
            yield
        finally:
            os.close(fd)  # releases the lock

    def _lock_alone(self, fd: int, wait_s: float) -> None:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise ProfileBusyError(
                        f"another dna process uses {self.home} (`dna watch`?): stop it, then"
                        " run this again"
                    ) from None
                time.sleep(0.1)

    def exists(self) -> bool:
        return self.keyfile.exists()

    def ensure_absent(self) -> None:
        """Refuse early, before any prompt, network wait or file write, to replace an
        identity that is already here, or a profile whose key file is gone (its cache may
        hold a history: it is not taken for a creation cut short)."""
        if self.exists():
            raise DnaError(f"{self.keyfile} exists; refusing to overwrite an identity")
        leftovers = self._leftovers()
        if leftovers and not self.incomplete():  # a cache, but not a creation's
            names = ", ".join(p.name for p in leftovers)
            raise ProfileDamagedError(
                f"{self.home} holds {names} but no identity.key (the key file is gone): to"
                f" start it from a backup, mv {self.home} {self.home}.damaged && dna --home"
                f" {self.home} identity import BACKUP; else move it aside and run this again"
            )

    def create(
        self,
        identity: Identity,
        passphrase: str,
        device: Device | None = None,
        fill_cache: Callable[[Cache], None] | None = None,
    ) -> Device:
        """Write a new identity (refusing to overwrite one), this device's ID and a cache,
        empty or as ``fill_cache`` makes it (a linked device's device list): a new identity
        has nothing to recover, so from now on a missing cache is a lost one. The cache is
        whole before the key file makes the profile exist."""
        return self._write(keystore.lock(identity, passphrase), device, identity, fill_cache)

    def restore(self, keyfile: bytes, passphrase: str) -> Identity:
        """Start a device from a key file backup (checked with its passphrase). No cache is
        made: the first open takes the lost-cache path (history from the other devices, no
        deletes until the device list is known), which is what a restore is."""
        identity = keystore.unlock(keyfile, passphrase)
        self._write(keyfile, None, None)
        return identity

    @property
    def creating_mark(self) -> Path:
        return self.home / "creating"

    def _write(
        self,
        keyfile: bytes,
        device: Device | None,
        cache_for: Identity | None,
        fill_cache: Callable[[Cache], None] | None = None,
    ) -> Device:
        """The files of a new profile, `identity.key` last and inside the `creating` mark
        (module docstring). One that fails (a full disk) removes what it wrote."""
        self.ensure_absent()
        self._make_home()
        device = device or Device(os.urandom(DEVICE_ID_SIZE), socket.gethostname())
        with self._alone():
            self.ensure_absent()  # another create finished while this one waited
            self._clear_incomplete()
            try:
                write_atomic(self.creating_mark, b"")
                write_atomic(self.device_path, json.dumps(
                    {"id": device.device_id.hex(), "name": device.name}).encode())  # fmt: skip
                if cache_for is not None:
                    cache = Cache.open(self.cache_path, cache_key(cache_for, device.device_id))
                    try:
                        if fill_cache is not None:
                            fill_cache(cache)
                    finally:
                        cache.close()
                write_atomic(self.keyfile, keyfile, overwrite=False)
            except BaseException:
                if not self.exists():
                    self._remove(self._leftovers())
                raise
            self._drop_creating_mark()
        return device

    def _make_home(self) -> None:
        """The profile directory, owner-only when made here, its name made durable."""
        if self.home.is_dir():
            return
        self.home.mkdir(mode=0o700, parents=True, exist_ok=True)
        sync_directory(self.home.parent)

    @contextlib.contextmanager
    def _alone(self) -> Iterator[None]:
        """The profile's lock held alone (a creation, or cleaning up after one)."""
        fd = os.open(self.home / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            self._lock_alone(fd, wait_s=5.0)
            yield
        finally:
            os.close(fd)

    def _leftovers(self) -> list[Path]:
        """What a creation cut short may have left (there is no key file)."""
        cache = [self.home / f"{self.cache_path.name}{end}" for end in ("", "-wal", "-shm")]
        found = [p for p in (self.device_path, *cache, self.creating_mark) if p.exists()]
        for written in (self.creating_mark, self.device_path, self.keyfile):
            found[:0] = leftover_temporaries(written)
        return found

    def incomplete(self) -> bool:
        """No key file, and the files of a creation cut short: with the `creating` mark, any
        of them; without it (a creation from a dna before the mark), none but a cache,
        which may be a profile's whose key file was lost, not a creation's."""
        if self.exists():
            return False
        leftovers = self._leftovers()
        caches = [p for p in leftovers if p.name.startswith(self.cache_path.name)]
        return bool(leftovers) and (self.creating_mark.exists() or not caches)

    def _clear_incomplete(self) -> None:
        """Remove what a creation cut short left (after `ensure_absent`), saying so."""
        leftovers = self._leftovers()
        if not leftovers:
            return
        log.warning("%s: a `dna identity create` (or import, link) was cut short there;"
                    " removed what it left (%s)", self.home,
                    ", ".join(p.name for p in leftovers))  # fmt: skip
        self._remove(leftovers)

    def _remove(self, paths: list[Path]) -> None:
        """Remove a creation's files, the `creating` mark last (a kill meanwhile still leaves
        them marked)."""
        for path in sorted(paths, key=lambda p: p == self.creating_mark):
            path.unlink(missing_ok=True)
        sync_directory(self.home)

    def _drop_creating_mark(self) -> None:
        """The key file is in place: the profile is complete, the mark has done its work."""
        if self.creating_mark.exists():
            self.creating_mark.unlink(missing_ok=True)
            sync_directory(self.home)

    @property
    def fresh_keyfile(self) -> Path:
        return self.home / "identity.key.new"  # a rotation under way

    def replace_identity(
        self, identity: Identity, passphrase: str, rekey_cache: Callable[[], None]
    ) -> None:
        """After a rotation: the new identity is written beside the old one, the cache is
        re-encrypted, then the new key file is renamed over the old. A crash in between is
        finished (or undone) by the next `unlock`, whichever key the cache opens with."""
        write_atomic(self.fresh_keyfile, keystore.lock(identity, passphrase))
        rekey_cache()
        crash_point()  # re-keyed, the new key file not in place yet
        os.replace(self.fresh_keyfile, self.keyfile)
        sync_directory(self.home)

    def _finish_rotation(self, current: Identity, passphrase: str) -> Identity:
        try:
            new = keystore.unlock(self.fresh_keyfile.read_bytes(), passphrase)
        except MalformedError:  # cut short while written: the cache was not re-keyed yet
            self.fresh_keyfile.unlink()
            return current
        try:
            if self.cache_path.exists():
                self.open_cache(new).close()
        except WrongPassphraseError:  # the cache was not re-encrypted: the old key stands
            self.fresh_keyfile.unlink()
            return current
        os.replace(self.fresh_keyfile, self.keyfile)
        sync_directory(self.home)
        return new

    @property
    def device_path(self) -> Path:
        return self.home / "device.json"

    def device(self) -> Device:
        """This device's ID (the cache key's salt) and name. Without it the cache cannot be
        opened; the key file still can, and starts the device again (`dna identity import`)."""
        try:
            data = json.loads(read_bounded(self.device_path, PROFILE_FILE_MAX_BYTES,
                                           "a device file"))  # fmt: skip
            device_id = bytes.fromhex(data["id"])
            if len(device_id) != DEVICE_ID_SIZE or not isinstance(data["name"], str):
                raise ValueError(f"not a {DEVICE_ID_SIZE}-byte device ID and a name")
        except FileNotFoundError:
            raise self._damaged(self.device_path, "missing") from None
        except (ValueError, KeyError, TypeError) as exc:  # JSON, UTF-8, hex, shape
            raise self._damaged(self.device_path, f"damaged ({type(exc).__name__})") from None
        return Device(device_id, data["name"])

    def _damaged(self, path: Path, what: str) -> ProfileDamagedError:
        """A profile file that cannot be read, and the way back: from a backup for the key
        file itself, else from the key file (a new device.json, a new cache)."""
        aside = f"{self.home}.damaged"
        if path == self.keyfile:
            how = (f"restore it from a backup (`dna identity export --private`): mv {self.home}"
                   f" {aside} && dna --home {self.home} identity import BACKUP")  # fmt: skip
        else:
            how = (f"the identity is fine; start this device again from its key file: mv"
                   f" {self.home} {aside} && dna --home {self.home} identity import"
                   f" {aside}/identity.key")  # fmt: skip
        return ProfileDamagedError(f"{path} is {what}: {how}")

    def read_keyfile(self) -> bytes:
        """The key file, checked to decode (the public keys are readable without the
        passphrase)."""
        if not self.exists():
            self.ensure_absent()  # a profile whose key file is gone says so
            if self.incomplete():
                raise NoIdentityError(f"no identity in {self.home}: a `dna identity create`"
                                      " (or import, link) was cut short there; run it again"
                                      " (it removes what was left)")  # fmt: skip
            raise NoIdentityError(f"no identity in {self.home}: run `dna identity create` first")
        data = read_bounded(self.keyfile, PROFILE_FILE_MAX_BYTES, "a key file")
        try:
            keystore.read_public(data)
        except MalformedError as exc:
            raise self._damaged(self.keyfile, f"damaged ({exc})") from None
        return data

    def public_keys(self) -> PublicKeySet:
        return keystore.read_public(self.read_keyfile())

    def unlock(self, passphrase: str) -> Identity:
        identity = keystore.unlock(self.read_keyfile(), passphrase)
        if self.fresh_keyfile.exists():
            identity = self._finish_rotation(identity, passphrase)
        return identity

    def open_cache(self, identity: Identity) -> Cache:
        """The cache. One found lost (gone, empty, or its making cut short) is made again
        marked lost, whichever command opens it first (`dna search`, or one whose network
        then fails): the device still asks its other devices for the history and deletes
        nothing until it came."""
        key = cache_key(identity, self.device().device_id)
        return Cache.open(self.cache_path, key, lost_ms=time.time_ns() // 1_000_000)


def read_bounded(path: Path, limit: int, what: str) -> bytes:
    """The bytes of ``path``, refused (without reading on) when it holds more than
    ``limit``: then it is not ``what``."""
    with path.open("rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise DnaError(f"{path} holds over {limit:,} bytes: not {what}")
    return data
