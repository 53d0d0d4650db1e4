"""The encrypted local cache: a device's history, contacts and sync state.

SQLCipher 4 (AES-256 pages, HMAC per page) keyed with a raw 32-byte key that is
derived from the identity's seeds and this device's ID (`cache_key`), so it
can only be opened after the passphrase unlocked the key file (Argon2id,
memory-hard). The cache is the source of truth for the UI; everything in it
can be rebuilt from the network (the own mailbox and the other devices).

Crash safety: every unit of work (one fetched blob and its effects, a cursor
advance) is one transaction, and messages are keyed by their envelope message
ID and blobs by their content ID, so a process killed mid-sync leaves either
the whole unit or nothing, and redoing it adds no duplicates.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlcipher3.dbapi2 as sqlcipher
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from dna_core.crypto import Identity, PublicKeySet
from dna_core.crypto import primitives as p
from dna_core.errors import DnaError, WrongPassphraseError

# The cache's layout (`PRAGMA user_version`); a cache of a later one is refused (Cache.open).
# Bump it with every change an older `dna` would misread: 2 `contacts.chosen`; 3
# `deferred_blobs`, whose blobs an older `dna` takes as handled and never opens; 4
# `blobs.mailbox`, so a mailbox rotated away from is forgotten at its grace period's end.
# Not bumped for `conversations.unread` (_add_unread_count): its triggers are in the file, so
# an older `dna` writing to the cache keeps the count too (and counts from the rows itself).
SCHEMA_VERSION = 4
PAGE_BYTES = 4096  # SQLCipher 4's page size: a whole cache file is a multiple of it
MAX_ROTATION_HOPS = 8  # rotations followed for one contact (a chain, never a cycle, ends)
# State key (`set_state`) written by the peer and cleared by the inbox: this device lost its
# cache and no other device has told it the device list since (the value: when, in ms).
RECOVERING = "recovering"
# State key: this device lost its cache and has not yet asked the others for the history
# (set with RECOVERING when the lost cache is made again, cleared once the ask is posted).
HISTORY_WANTED = "history-wanted"
# State key: contacts (fingerprints, hex, JSON) confirmed verified on this device whose card
# the other devices have yet to get (`confirm_verified`; posted by the next sync).
CARDS_DUE = "cards-due"
# A link offer's device is waited for by deletes (never listed) at most this long: the
# code's hour, and an hour for a link made at its end to say hello.
OFFER_HOLD_MS = 2 * 3_600_000
# A blob's outcome while it waits in `deferred_blobs` for its sender's lookup: recorded (so
# acknowledged: it is held here, not on the replicas) but not handled yet.
DEFERRED = "deferred"
DEFERRED_EXPIRED = "rejected: deferred past the replay window (its sender never looked up)"
DEFERRED_DROPPED = "rejected: deferred for a mailbox no longer read (its grace period ended)"
DEFERRED_EVICTED = (
    "rejected: deferred, then evicted for another source's blob (its source"
    " held the most of the full deferred blobs)"
)
_UNREAD_OF_NEW = (
    "SELECT count(*) FROM messages WHERE conversation = new.id AND outgoing = 0"
    " AND timestamp_ms > new.read_up_to_ms"
)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS contacts(
  fingerprint BLOB PRIMARY KEY,
  keys BLOB NOT NULL,
  name TEXT,
  verified INTEGER NOT NULL DEFAULT 0,
  pinned_ms INTEGER NOT NULL,
  conversation BLOB NOT NULL,
  replaced_by BLOB,
  chosen INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX IF NOT EXISTS contacts_by_name ON contacts(name) WHERE name IS NOT NULL;
-- forget_strangers: a contact row by its conversation, not a scan of every key set (19 ms
-- per request forgotten at 2,500 contacts without it).
CREATE INDEX IF NOT EXISTS contacts_by_conversation ON contacts(conversation);
CREATE TABLE IF NOT EXISTS conversations(
  id BLOB PRIMARY KEY,
  peer BLOB NOT NULL,
  last_ms INTEGER NOT NULL DEFAULT 0,
  read_up_to_ms INTEGER NOT NULL DEFAULT 0,
  unread INTEGER NOT NULL DEFAULT 0 -- received after read_up_to_ms (_UNREAD_COUNT keeps it)
);
CREATE TABLE IF NOT EXISTS messages(
  message_id BLOB PRIMARY KEY,
  conversation BLOB NOT NULL,
  sender BLOB NOT NULL,
  recipient BLOB NOT NULL,
  timestamp_ms INTEGER NOT NULL,
  body TEXT NOT NULL,
  outgoing INTEGER NOT NULL,
  delivered INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages(conversation, timestamp_ms);
-- last_written (every sync with receipts due, every presence publish) and has_our_keys (every
-- send) read these, not the whole table: 1.4 s and 0.2-0.3 s at 100,000 messages.
CREATE INDEX IF NOT EXISTS written_by_conversation ON messages(conversation, timestamp_ms)
  WHERE outgoing = 1;
CREATE INDEX IF NOT EXISTS received_by_sender ON messages(sender) WHERE outgoing = 0;
CREATE INDEX IF NOT EXISTS delivered_by_recipient ON messages(recipient)
  WHERE outgoing = 1 AND delivered = 1;
CREATE VIRTUAL TABLE IF NOT EXISTS messages_text USING fts5(
  body, content='messages', content_rowid='rowid'
);
CREATE TRIGGER IF NOT EXISTS messages_text_add AFTER INSERT ON messages BEGIN
  INSERT INTO messages_text(rowid, body) VALUES (new.rowid, new.body);
END;
CREATE TABLE IF NOT EXISTS groups(
  id BLOB PRIMARY KEY,
  title TEXT NOT NULL,
  members BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS blobs(
  blob_id BLOB PRIMARY KEY,
  outcome TEXT NOT NULL,
  seen_ms INTEGER NOT NULL,
  deleted INTEGER NOT NULL DEFAULT 0,
  mailbox BLOB -- the fingerprint whose mailbox it came from; NULL: from before schema 4
);
-- The storage nodes that returned a blob that did not verify here (rejected, or deferred for
-- its sender's keys): its delete goes to them only (`unverified_blobs`).
CREATE TABLE IF NOT EXISTS blob_sources(
  blob_id BLOB NOT NULL,
  node_id BLOB NOT NULL,
  PRIMARY KEY (blob_id, node_id)
);
CREATE TABLE IF NOT EXISTS envelopes_seen(
  message_id BLOB PRIMARY KEY,
  timestamp_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS devices(
  device_id BLOB PRIMARY KEY,
  name TEXT NOT NULL,
  added_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS offered_devices(
  device_id BLOB PRIMARY KEY,
  until_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS acks(
  blob_id BLOB NOT NULL,
  device_id BLOB NOT NULL,
  PRIMARY KEY (blob_id, device_id)
);
CREATE TABLE IF NOT EXISTS ack_blobs(
  ack_blob BLOB NOT NULL,
  covers BLOB NOT NULL,
  PRIMARY KEY (ack_blob, covers)
);
CREATE TABLE IF NOT EXISTS cursors(
  node_id BLOB PRIMARY KEY,
  cursor BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS state(
  key TEXT PRIMARY KEY,
  value BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS deferred_blobs(
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  blob_id BLOB NOT NULL UNIQUE,
  mailbox BLOB NOT NULL,
  sender BLOB NOT NULL,
  blob BLOB NOT NULL,
  deferred_ms INTEGER NOT NULL,
  source BLOB -- the one node that returned it; NULL: several did (or not from a fetch)
);
CREATE INDEX IF NOT EXISTS deferred_by_mailbox ON deferred_blobs(mailbox, sender);
CREATE TABLE IF NOT EXISTS outbox(
  message_id BLOB PRIMARY KEY,
  recipient BLOB NOT NULL,
  body TEXT NOT NULL,
  envelope BLOB NOT NULL,
  queued_ms INTEGER NOT NULL,
  pid INTEGER NOT NULL
);
"""


# Each conversation's count of received messages after its read marker, kept by SQLite in
# the transaction of every write that changes it (whichever statement writes), so that the
# conversation list reads one row a conversation: counting the rows took 80 ms at 10,000
# unread. Marking read counts what stays unread (an index range, nothing once all is read).
_UNREAD_COUNT = (
    """CREATE TRIGGER IF NOT EXISTS unread_on_add AFTER INSERT ON messages
  WHEN new.outgoing = 0 BEGIN
  UPDATE conversations SET unread = unread + 1
    WHERE id = new.conversation AND read_up_to_ms < new.timestamp_ms;
END""",
    """CREATE TRIGGER IF NOT EXISTS unread_on_delete AFTER DELETE ON messages
  WHEN old.outgoing = 0 BEGIN
  UPDATE conversations SET unread = unread - 1
    WHERE id = old.conversation AND read_up_to_ms < old.timestamp_ms;
END""",
    # a message moved to another conversation (a stranger merged into a rotated contact)
    """CREATE TRIGGER IF NOT EXISTS unread_on_move
  AFTER UPDATE OF conversation, timestamp_ms, outgoing ON messages BEGIN
  UPDATE conversations SET unread = unread - 1 WHERE old.outgoing = 0
    AND id = old.conversation AND read_up_to_ms < old.timestamp_ms;
  UPDATE conversations SET unread = unread + 1 WHERE new.outgoing = 0
    AND id = new.conversation AND read_up_to_ms < new.timestamp_ms;
END""",
    # a conversation's row is made after its first message (add_message)
    f"""CREATE TRIGGER IF NOT EXISTS unread_on_conversation AFTER INSERT ON conversations BEGIN
  UPDATE conversations SET unread = ({_UNREAD_OF_NEW}) WHERE id = new.id;
END""",
    f"""CREATE TRIGGER IF NOT EXISTS unread_on_read
  AFTER UPDATE OF read_up_to_ms ON conversations BEGIN
  UPDATE conversations SET unread = ({_UNREAD_OF_NEW}) WHERE id = new.id;
END""",
)


class CacheDamagedError(DnaError):
    """The cache file is cut short or its pages are malformed (a crash or a disk fault),
    not under another key: nothing in it is touched."""


class CacheNewerError(DnaError):
    """The cache was written by a newer `dna` (a later SCHEMA_VERSION): refused, untouched.
    Opened, its newer state would be silently left alone (the blobs a newer `dna` deferred
    for their sender's lookup are acknowledged, so deleted from the replicas: this one
    would never open them), and its version lowered to this one's."""


class CacheAccessError(DnaError):
    """This user may not read and write the cache file, its journal files or its directory
    (modes, another owner, a read-only mount): said before anything is opened, so nothing
    is touched, and not taken for a damaged cache or another key, whose way back (move the
    file aside) would lose the history."""


class CacheWriteError(DnaError):
    """The disk refused a write to the cache (full, or failing): the transaction was rolled
    back, so nothing of the step is kept and it can be run again once there is room."""


def _cannot_write(path: Path, error: sqlcipher.Error) -> DnaError | None:
    """SQLITE_FULL or SQLITE_IOERR (any of its extended codes), or a write refused for want
    of access, as one clear error, None for any other error (a defect, reported as one)."""
    code = getattr(error, "sqlite_errorcode", None)
    if code is not None and code & 0xFF in _NO_ACCESS_CODES:
        return _no_access(path) or CacheAccessError(
            f"{path}: cannot write the cache ({error}: no write access, or a read-only"
            " mount); nothing of this step was kept: give this user write access and run"
            " it again"
        )
    if code is None or code & 0xFF not in (sqlcipher.SQLITE_FULL, sqlcipher.SQLITE_IOERR):
        return None
    return CacheWriteError(
        f"{path}: cannot write the cache ({error}: the disk is full or failing); nothing of"
        " this step was kept: free some space (or mend the disk) and run it again"
    )


# A write SQLite refuses for want of access (the file or its directory made read-only
# while the cache is open; a mount turned read-only): not a defect of dna.
_NO_ACCESS_CODES = (sqlcipher.SQLITE_READONLY, sqlcipher.SQLITE_CANTOPEN, sqlcipher.SQLITE_PERM)


def _no_access(path: Path) -> CacheAccessError | None:
    """Why this process cannot use the cache at ``path``, if it cannot: SQLite needs to read
    and write the file and its WAL files, and to make those in the directory, but says
    only "unable to open database file", "file is not a database" (SQLCipher) or "attempt
    to write a readonly database" (a defect, to the CLI)."""
    names = [path, path.with_name(f"{path.name}-wal"), path.with_name(f"{path.name}-shm")]
    denied = [str(p) for p in names if p.exists() and not os.access(p, os.R_OK | os.W_OK)]
    if not os.access(path.parent, os.W_OK | os.X_OK):
        denied.append(f"{path.parent} (to make the cache's journal files)")
    if not denied:
        return None
    return CacheAccessError(
        f"{path}: cannot open the cache: no permission to read and write {', '.join(denied)};"
        " nothing was changed (the cache is not damaged: do not move it aside). Give this"
        " user read and write access (chmod, chown; or mount the disk read-write) and run"
        " it again"
    )


def _damaged(path: Path, error: sqlcipher.DatabaseError) -> bool:
    """Whether opening failed on a damaged file rather than a wrong key: SQLite says the
    file is malformed, or the file is not a whole number of pages (a torn write; SQLCipher
    cannot tell such a file from one under another key, which is whole)."""
    if getattr(error, "sqlite_errorcode", None) == sqlcipher.SQLITE_CORRUPT:
        return True
    return path.stat().st_size % PAGE_BYTES != 0


def _aside(path: Path) -> str:
    """The way back from a cache that cannot be opened: without it, the device rebuilds."""
    return (f"Move the file aside (mv {path} {path}.damaged) and run again: this device then"
            " rebuilds it from the mailbox and the other devices' history")  # fmt: skip


def cache_key(identity: Identity, device_id: bytes) -> bytes:
    """The raw SQLCipher key: HKDF over the identity seeds, salted per device."""
    hkdf = HKDF(hashes.SHA256(), 32, salt=device_id, info=p.label("cache-key"))
    return hkdf.derive(identity.seeds())


@dataclass(frozen=True, slots=True)
class Contact:
    fingerprint: bytes
    keys: PublicKeySet
    name: str | None
    verified: bool
    pinned_ms: int
    conversation: bytes
    replaced_by: bytes | None = None
    # Added by this identity (by name or fingerprint, here or on another of its devices),
    # not a stranger pinned when it first wrote: presence is sealed to the chosen ones.
    chosen: bool = False


@dataclass(frozen=True, slots=True)
class Message:
    message_id: bytes
    conversation: bytes
    sender: bytes
    recipient: bytes
    timestamp_ms: int
    body: str
    outgoing: bool
    delivered: bool = False


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A sealed message on its way: queued before it is put on the replicas, gone once it
    is stored there, in the history and told to the other devices."""

    message_id: bytes
    recipient: bytes
    body: str
    envelope: bytes
    queued_ms: int
    pid: int  # of the process that queued it: while it lives, the send is under way

    def under_way_elsewhere(self) -> bool:
        """Whether another live process (a `dna send` running now) queued it."""
        if self.pid in (0, os.getpid()):
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # alive, another user's (a profile is one user's)
            return True
        return True


@dataclass(frozen=True, slots=True)
class Conversation:
    id: bytes
    peer: bytes
    last_ms: int
    read_up_to_ms: int
    unread: int


class Cache:
    """One SQLCipher database file; methods that change state commit before returning,
    except inside `transaction()`, which commits once at its end."""

    def __init__(self, conn: Any, path: Path) -> None:
        self._db = conn
        self.path = path
        self._depth = 0
        self.commits = 0  # write transactions committed (each an fsync: synchronous=FULL)

    @classmethod
    def open(cls, path: Path, key: bytes, *, lost_ms: int | None = None) -> Cache:
        """The cache at ``path`` under ``key``, made if there is none. With ``lost_ms``, one
        made here (no file, an empty one, or one whose making was cut short: no tables yet)
        is a lost cache: until another device's history arrives it deletes nothing
        (RECOVERING) and asks for it (HISTORY_WANTED), marks set in the same transaction as
        its tables, so that no making cut short (a kill, a full disk) leaves a cache that passes
        for a whole one and asks nobody for the history."""
        path.parent.mkdir(parents=True, exist_ok=True)
        _create_owner_only(path)
        if (denied := _no_access(path)) is not None:
            raise denied
        try:
            conn = sqlcipher.connect(str(path), isolation_level=None, check_same_thread=False)
        except sqlcipher.OperationalError as exc:  # not a file (a directory), no access
            raise CacheDamagedError(f"{path}: cannot open the cache ({exc}). {_aside(path)}"
                                    ) from None  # fmt: skip
        conn.execute("PRAGMA cipher_log_level = NONE")  # a wrong key is our error, not a log line
        conn.execute(f"PRAGMA key = \"x'{key.hex()}'\"")
        try:
            (tables,) = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlcipher.DatabaseError as exc:
            conn.close()
            # a full disk fails the first read too (its WAL index): not a wrong key, and no
            # reason to move a good cache aside
            if (unwritable := _cannot_write(path, exc)) is not None:
                raise unwritable from None
            if _damaged(path, exc):
                raise CacheDamagedError(
                    f"{path}: the cache is damaged ({exc}); the identity and its key file are"
                    f" fine. {_aside(path)}"
                ) from None
            # The passphrase opened the key file, so the key is this identity's: the file is
            # another device's (or identity's) cache, or not a cache at all.
            raise WrongPassphraseError(
                f"{path}: cannot open the cache (wrong key or not a cache file: not this"
                f" device's cache); the identity and its key file are fine. {_aside(path)}"
            ) from None
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            conn.close()
            raise CacheNewerError(
                f"{path}: the cache was written by a newer dna (cache version {version}; this"
                f" dna reads up to {SCHEMA_VERSION}): run that dna (or a later one). Nothing"
                " was changed; this one would leave what it cannot read there, such as the"
                " messages waiting for their sender's lookup, unread for good"
            )
        try:
            _set_up(conn, lost_ms if tables == 0 else None)
        except sqlcipher.Error as exc:
            conn.close()
            raise _cannot_write(path, exc) or exc from None
        _owner_only(path)
        return cls(conn, path)

    def close(self) -> None:
        self._db.close()

    def rekey(self, key: bytes) -> None:
        """Re-encrypt the cache under a new key (the identity rotated)."""
        self._db.execute(f"PRAGMA rekey = \"x'{key.hex()}'\"")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """All-or-nothing; nests (the outermost commits). A write the disk refuses is
        CacheWriteError, the transaction rolled back."""
        try:
            with self._transaction():
                yield
        except sqlcipher.Error as exc:
            raise _cannot_write(self.path, exc) or exc from None

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        if self._depth == 0:
            self._db.execute("BEGIN IMMEDIATE")
        self._depth += 1
        try:
            yield
        except BaseException:
            self._depth -= 1
            if self._depth == 0:
                self._db.execute("ROLLBACK")
            raise
        self._depth -= 1
        if self._depth == 0:
            self._db.execute("COMMIT")
            self.commits += 1

    def _write(self, sql: str, params: tuple[Any, ...] = ()) -> int:
        with self.transaction():
            cur = self._db.execute(sql, params)
            return int(cur.rowcount)

    def _rows(
        self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()
    ) -> list[tuple[Any, ...]]:
        return list(self._db.execute(sql, params).fetchall())

    def integrity_check(self) -> str:
        return str(self._db.execute("PRAGMA integrity_check").fetchone()[0])

    # -- state ---------------------------------------------------------------------

    def get_state(self, key: str) -> bytes | None:
        rows = self._rows("SELECT value FROM state WHERE key = ?", (key,))
        return bytes(rows[0][0]) if rows else None

    def set_state(self, key: str, value: bytes) -> None:
        self._write("INSERT OR REPLACE INTO state(key, value) VALUES (?, ?)", (key, value))

    def clear_state(self, key: str) -> None:
        self._write("DELETE FROM state WHERE key = ?", (key,))

    # -- the outbox -------------------------------------------------------------------

    def queue_outgoing(self, out: Outgoing) -> None:
        self._write(
            "INSERT OR IGNORE INTO outbox(message_id, recipient, body, envelope, queued_ms,"
            " pid) VALUES (?, ?, ?, ?, ?, ?)",
            (out.message_id, out.recipient, out.body, out.envelope, out.queued_ms, out.pid),
        )

    def outgoing(self, recipient: bytes | None = None) -> list[Outgoing]:
        """Messages still on their way (to ``recipient``, or all), oldest first."""
        where, args = ("WHERE recipient = ?", (recipient,)) if recipient else ("", ())
        rows = self._rows(
            f"SELECT message_id, recipient, body, envelope, queued_ms, pid FROM outbox {where}"
            " ORDER BY queued_ms, rowid",
            args,
        )
        return [Outgoing(bytes(m), bytes(r), b, bytes(e), q, pid) for m, r, b, e, q, pid in rows]

    def unqueue_outgoing(self, message_id: bytes) -> None:
        self._write("DELETE FROM outbox WHERE message_id = ?", (message_id,))

    # -- contacts ------------------------------------------------------------------

    def pin(self, contact: Contact) -> None:
        """Remember a contact's keys the first time they are seen (TOFU)."""
        with self.transaction():
            self._db.execute(
                "INSERT INTO contacts(fingerprint, keys, name, verified, pinned_ms, conversation,"
                " replaced_by, chosen) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    contact.fingerprint, contact.keys.encode(), contact.name,
                    int(contact.verified), contact.pinned_ms, contact.conversation,
                    contact.replaced_by, int(contact.chosen),
                ),
            )  # fmt: skip
            self._db.execute(
                "INSERT OR IGNORE INTO conversations(id, peer) VALUES (?, ?)",
                (contact.conversation, contact.fingerprint),
            )

    def contact(self, fingerprint: bytes) -> Contact | None:
        rows = self._rows(f"SELECT {_CONTACT_COLUMNS} FROM contacts WHERE fingerprint = ?",
                          (fingerprint,))  # fmt: skip
        return _contact(rows[0]) if rows else None

    def current_contact(self, fingerprint: bytes) -> Contact | None:
        """The pinned contact for a fingerprint, after the rotations it went through: at
        most MAX_ROTATION_HOPS of them, and never round a cycle (a contact signs both ends
        of its rotation statements, so it can rotate A -> B -> A)."""
        known, seen = self.contact(fingerprint), {fingerprint}
        while known is not None and known.replaced_by and len(seen) <= MAX_ROTATION_HOPS:
            if known.replaced_by in seen:
                return known
            seen.add(known.replaced_by)
            known = self.contact(known.replaced_by)
        return known

    def contact_named(self, name: str) -> Contact | None:
        rows = self._rows(f"SELECT {_CONTACT_COLUMNS} FROM contacts WHERE name = ?", (name,))
        return _contact(rows[0]) if rows else None

    def contacts(self) -> list[Contact]:
        rows = self._rows(
            f"SELECT {_CONTACT_COLUMNS} FROM contacts WHERE replaced_by IS NULL"
            " ORDER BY coalesce(name, hex(fingerprint))"
        )
        return [_contact(r) for r in rows]

    def chosen_or_written(self) -> list[Contact]:
        """The current contacts this identity added (by name or fingerprint: `chosen`) or
        wrote to; not the strangers only pinned because they wrote first, whom anyone can
        make by the thousand (each a key set to decode)."""
        rows = self._rows(
            f"SELECT {_CONTACT_COLUMNS} FROM contacts WHERE replaced_by IS NULL AND (chosen = 1"
            " OR conversation IN (SELECT conversation FROM messages WHERE outgoing = 1))"
        )
        return [_contact(r) for r in rows]

    def set_contact_name(self, fingerprint: bytes, name: str) -> None:
        self._write("UPDATE contacts SET name = ? WHERE fingerprint = ?", (name, fingerprint))

    def forget_contact(self, fingerprint: bytes) -> bool:
        """Unpin (the conversation and its messages stay); the next add pins afresh."""
        return self._write("DELETE FROM contacts WHERE fingerprint = ?", (fingerprint,)) > 0

    def strangers(self) -> int:
        """How many conversations are message requests (`forget_strangers`)."""
        return int(self._rows(f"SELECT count(*) FROM ({_REQUESTS})")[0][0])

    def forget_strangers(self, *, keep: int, idle_before_ms: int) -> int:
        """Forget the message requests beyond the ``keep`` idle most recently, and those
        idle since before ``idle_before_ms``; returns how many were forgotten. A request is
        the conversation of strangers only: contacts pinned because they wrote first (no
        name, not chosen, not verified) that this identity never wrote to (no message
        sent, none queued). Forgotten: their pins, the conversation, its messages. Anyone
        can make strangers by the thousand (each a put with proof of work), so only these
        are bounded; a contact this identity added or wrote to is never forgotten here.
        Idle: since the later of the last message's time and the pin's."""
        forgotten = self._rows(
            f"SELECT id FROM ({_REQUESTS}) WHERE idle_ms < ?"
            f" UNION SELECT id FROM ({_REQUESTS} ORDER BY idle_ms DESC LIMIT -1 OFFSET ?)",
            (idle_before_ms, max(keep, 0)),
        )
        ids = [(bytes(row[0]),) for row in forgotten]
        with self.transaction():
            for sql in _FORGET_REQUEST:
                self._db.executemany(sql, ids)
        return len(ids)

    def choose(self, fingerprint: bytes) -> None:
        """This identity added the contact (`Contact.chosen`)."""
        self._write("UPDATE contacts SET chosen = 1 WHERE fingerprint = ?", (fingerprint,))

    def set_verified(self, fingerprint: bytes, verified: bool) -> None:
        self._write(
            "UPDATE contacts SET verified = ? WHERE fingerprint = ?", (int(verified), fingerprint)
        )

    def confirm_verified(self, fingerprint: bytes) -> None:
        """`contacts verify --confirm`: verified here, and its card queued for the other
        devices in the same transaction (posted by the next sync, so confirming needs no
        network and a post that fails is tried again)."""
        with self.transaction():
            self.set_verified(fingerprint, True)
            due = set(self.cards_due()) | {fingerprint}
            self.set_state(CARDS_DUE, json.dumps(sorted(f.hex() for f in due)).encode())

    def cards_due(self) -> list[bytes]:
        return [bytes.fromhex(f) for f in json.loads(self.get_state(CARDS_DUE) or b"[]")]

    def cards_posted(self, fingerprints: list[bytes]) -> None:
        """These cards reached the own mailbox (a confirmation since then stays due)."""
        with self.transaction():
            due = set(self.cards_due()) - set(fingerprints)
            if due:
                self.set_state(CARDS_DUE, json.dumps(sorted(f.hex() for f in due)).encode())
            else:
                self.clear_state(CARDS_DUE)

    def replace_contact(self, old: Contact, new_keys: PublicKeySet, now_ms: int) -> Contact:
        """A verified key rotation: the new keys take over the name and the conversation."""
        new = Contact(
            new_keys.fingerprint,
            new_keys,
            old.name,
            False,
            now_ms,
            old.conversation,
            None,
            old.chosen,
        )
        with self.transaction():
            self._db.execute(
                "UPDATE contacts SET name = NULL, replaced_by = ? WHERE fingerprint = ?",
                (new.fingerprint, old.fingerprint),
            )
            known = self.contact(new.fingerprint)
            if known is None:
                self.pin(new)
            elif known.conversation != old.conversation:
                self._merge_stranger(known, old)
            if old.chosen:
                self._db.execute(
                    "UPDATE contacts SET chosen = 1 WHERE fingerprint = ?", (new.fingerprint,)
                )
            self._db.execute(
                "UPDATE conversations SET peer = ? WHERE id = ?",
                (new.fingerprint, old.conversation),
            )
        return self.contact(new.fingerprint) or new

    def _merge_stranger(self, stranger: Contact, old: Contact) -> None:
        """The new keys wrote before their rotation was known, and were pinned as a
        stranger: their messages join the old conversation, and they take the name."""
        self._db.execute(
            "UPDATE messages SET conversation = ? WHERE conversation = ?",
            (old.conversation, stranger.conversation),
        )
        self._db.execute(
            "UPDATE conversations SET last_ms = max(last_ms, (SELECT last_ms FROM conversations"
            " WHERE id = ?)) WHERE id = ?", (stranger.conversation, old.conversation),
        )  # fmt: skip
        self._db.execute("DELETE FROM conversations WHERE id = ?", (stranger.conversation,))
        self._db.execute(
            "UPDATE contacts SET conversation = ?, name = coalesce(name, ?), verified = 0"
            " WHERE fingerprint = ?", (old.conversation, old.name, stranger.fingerprint),
        )  # fmt: skip

    # -- messages ------------------------------------------------------------------

    def add_message(self, msg: Message) -> bool:
        """Store a message; False (and nothing changes) when its ID is already held."""
        with self.transaction():
            cur = self._db.execute(
                "INSERT OR IGNORE INTO messages(message_id, conversation, sender, recipient,"
                " timestamp_ms, body, outgoing, delivered) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    msg.message_id, msg.conversation, msg.sender, msg.recipient,
                    msg.timestamp_ms, msg.body, int(msg.outgoing), int(msg.delivered),
                ),
            )  # fmt: skip
            if cur.rowcount == 0:
                return False
            self._db.execute(
                "INSERT OR IGNORE INTO conversations(id, peer) VALUES (?, ?)",
                (msg.conversation, msg.recipient if msg.outgoing else msg.sender),
            )
            self._db.execute(
                "UPDATE conversations SET last_ms = max(last_ms, ?) WHERE id = ?",
                (msg.timestamp_ms, msg.conversation),
            )
            return True

    def mark_delivered(self, message_ids: list[bytes], *, recipient: bytes) -> int:
        """Receipts count only for messages sent to the identity that sent the receipt."""
        sql = (
            "UPDATE messages SET delivered = 1 WHERE message_id = ? AND recipient = ?"
            " AND outgoing = 1 AND delivered = 0"
        )
        with self.transaction():
            return sum(int(self._db.execute(sql, (m, recipient)).rowcount) for m in message_ids)

    def messages(self, conversation: bytes | None = None, *, limit: int = 10_000) -> list[Message]:
        """The newest ``limit`` messages (a negative limit: all), oldest first."""
        return list(self.iter_messages(conversation, last=limit))

    def iter_messages(self, conversation: bytes | None = None, *, last: int = -1
                      ) -> Iterator[Message]:  # fmt: skip
        """The newest ``last`` messages (negative: all), oldest first, read from the file as
        they are taken: a conversation of any length is shown in bounded memory."""
        where, params = ("WHERE conversation = ?", (conversation,)) if conversation else ("", ())
        if last >= 0:  # the rowids of the newest (the index, backwards), then those in order
            newest = (f"SELECT rowid FROM messages {where}"
                      " ORDER BY timestamp_ms DESC, message_id DESC LIMIT ?")  # fmt: skip
            where = f"{where} {'AND' if where else 'WHERE'} rowid IN ({newest})"
            params = (*params, *params, last)
        cursor = self._db.execute(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages {where} ORDER BY timestamp_ms, message_id",
            params,
        )
        try:
            for row in cursor:
                yield _message(row)
        finally:
            cursor.close()

    def last_message(self, conversation: bytes) -> Message | None:
        """The newest message of a conversation (its preview; what reading it reads up to)."""
        rows = self._rows(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE conversation = ?"
            " ORDER BY timestamp_ms DESC, message_id DESC LIMIT 1",
            (conversation,),
        )
        return _message(rows[0]) if rows else None

    def last_written(self) -> dict[bytes, int]:
        """Per conversation, when this identity last wrote in it (conversations it never
        wrote in are absent)."""
        rows = self._rows("SELECT conversation, max(timestamp_ms) FROM messages"
                          " WHERE outgoing = 1 GROUP BY conversation")  # fmt: skip
        return {bytes(r[0]): int(r[1]) for r in rows}

    def has_our_keys(self, peer: bytes) -> bool:
        """Did ``peer`` prove it holds our keys (it wrote to us, or receipted a message)?"""
        return bool(self._rows(
            "SELECT 1 FROM messages WHERE (sender = ? AND outgoing = 0)"
            " OR (recipient = ? AND outgoing = 1 AND delivered = 1) LIMIT 1", (peer, peer),
        ))  # fmt: skip

    def message_count(self) -> int:
        return int(self._rows("SELECT count(*) FROM messages")[0][0])

    def search(self, text: str, *, limit: int = 100) -> list[Message]:
        """Full-text search over message bodies (FTS5 inside the encrypted file): the newest
        ``limit`` messages that have every word, oldest first."""
        query = _fts_query(text)
        if not query:
            return []
        rows = self._rows(
            f"SELECT * FROM (SELECT {_MESSAGE_COLUMNS} FROM messages WHERE rowid IN"
            " (SELECT rowid FROM messages_text WHERE messages_text MATCH ?)"
            " ORDER BY timestamp_ms DESC, message_id DESC LIMIT ?)"
            " ORDER BY timestamp_ms, message_id",
            (query, limit),
        )
        return [_message(r) for r in rows]

    def search_count(self, text: str) -> int:
        """How many messages have every word (`search` shows at most its limit of them)."""
        query = _fts_query(text)
        if not query:
            return 0
        sql = "SELECT count(*) FROM messages_text WHERE messages_text MATCH ?"
        return int(self._rows(sql, (query,))[0][0])

    # -- conversations and read state -------------------------------------------------

    def conversations(self) -> list[Conversation]:
        rows = self._rows(
            "SELECT id, peer, last_ms, read_up_to_ms, unread FROM conversations"
            " ORDER BY last_ms DESC"
        )
        return [Conversation(bytes(r[0]), bytes(r[1]), r[2], r[3], r[4]) for r in rows]

    def mark_read(self, conversation: bytes, up_to_ms: int) -> bool:
        """Read state only moves forward (so devices converge on the maximum)."""
        changed = self._write(
            "UPDATE conversations SET read_up_to_ms = ? WHERE id = ? AND read_up_to_ms < ?",
            (up_to_ms, conversation, up_to_ms),
        )
        return changed > 0

    def read_state(self) -> dict[bytes, int]:
        rows = self._rows("SELECT id, read_up_to_ms FROM conversations WHERE read_up_to_ms > 0")
        return {bytes(r[0]): r[1] for r in rows}

    # -- mailbox bookkeeping ----------------------------------------------------------

    def blob_outcome(self, blob_id: bytes) -> str | None:
        rows = self._rows("SELECT outcome FROM blobs WHERE blob_id = ?", (blob_id,))
        return str(rows[0][0]) if rows else None

    def record_blob(
        self, blob_id: bytes, outcome: str, now_ms: int, mailbox: bytes | None = None
    ) -> None:
        """The blob, from ``mailbox``'s mailbox (a fingerprint), is handled (``outcome``);
        if it was deferred, it no longer is (its DEFERRED outcome becomes this one; it keeps
        the time it was first seen)."""
        with self.transaction():
            self._db.execute(
                "INSERT INTO blobs(blob_id, outcome, seen_ms, mailbox) VALUES (?, ?, ?, ?)"
                " ON CONFLICT(blob_id) DO UPDATE SET outcome = excluded.outcome"
                " WHERE blobs.outcome = ?",
                (blob_id, outcome, now_ms, mailbox, DEFERRED),
            )
            self._db.execute("DELETE FROM deferred_blobs WHERE blob_id = ?", (blob_id,))

    def defer_blob(
        self,
        mailbox: bytes,
        blob_id: bytes,
        blob: bytes,
        sender: bytes,
        now_ms: int,
        source: bytes | None = None,
    ) -> None:
        """Keep a blob a round could not handle yet (its unknown sender was not looked up:
        over the round's budget), to be handled by a later round (`deferred_blobs`). It is
        recorded as DEFERRED, so this device acknowledges it (it holds it, here) and the
        replicas can delete it: a deferred blob holds no mailbox quota. ``source``: the
        storage node it is counted against, one that returned it (`deferral`; None: from no
        fetch, or, deferred before 2026-12-05, from several nodes)."""
        with self.transaction():
            self._db.execute(
                "INSERT OR IGNORE INTO deferred_blobs(blob_id, mailbox, sender, blob,"
                " deferred_ms, source) VALUES (?, ?, ?, ?, ?, ?)",
                (blob_id, mailbox, sender, blob, now_ms, source),
            )
            self._db.execute(
                "INSERT OR IGNORE INTO blobs(blob_id, outcome, seen_ms, mailbox)"
                " VALUES (?, ?, ?, ?)",
                (blob_id, DEFERRED, now_ms, mailbox),
            )

    def deferred_rows(self) -> list[tuple[bytes | None, bytes, int]]:
        """(source, blob ID, size) of every blob deferred, every mailbox together, oldest
        first (`deferral.DeferredRoom`)."""
        rows = self._rows("SELECT source, blob_id, length(blob) FROM deferred_blobs ORDER BY seq")
        return [(None if r[0] is None else bytes(r[0]), bytes(r[1]), int(r[2])) for r in rows]

    def evict_deferred(self, blob_id: bytes) -> None:
        """A deferred blob pushed out for another source's (`deferral`): recorded rejected
        (it was acknowledged when deferred: the replicas may have deleted it)."""
        with self.transaction():
            self._db.execute("UPDATE blobs SET outcome = ? WHERE blob_id = ? AND outcome = ?",
                             (DEFERRED_EVICTED, blob_id, DEFERRED))  # fmt: skip
            self._db.execute("DELETE FROM deferred_blobs WHERE blob_id = ?", (blob_id,))

    def deferred_blobs(self, mailbox: bytes, senders: int) -> list[tuple[bytes, bytes]]:
        """(blob ID, blob) deferred for ``mailbox``: every one of ``senders`` senders, taken
        in turn from each source (each node's: those counted against it, `deferral`), first
        in first out within each: one node's made-up senders take
        at most their turn of a round's lookups, however many it deferred first. A sender's
        source is its first blob's."""
        rows = self._rows(
            "SELECT blob_id, blob FROM deferred_blobs WHERE mailbox = :box AND sender IN"
            " (SELECT sender FROM (SELECT sender, source, min(seq) AS first FROM deferred_blobs"
            "  WHERE mailbox = :box GROUP BY sender)"
            "  ORDER BY row_number() OVER (PARTITION BY source ORDER BY first), first"
            "  LIMIT :senders) ORDER BY seq",
            {"box": mailbox, "senders": senders},
        )
        return [(bytes(r[0]), bytes(r[1])) for r in rows]

    def deferred_count(self, mailbox: bytes) -> int:
        rows = self._rows("SELECT count(*) FROM deferred_blobs WHERE mailbox = ?", (mailbox,))
        return int(rows[0][0])

    def drop_deferred(self, mailbox: bytes) -> int:
        """Forget what was deferred for a mailbox no longer read (a retired identity past
        its grace period); returns how many blobs."""
        with self.transaction():
            self._db.execute(
                "UPDATE blobs SET outcome = ? WHERE outcome = ? AND blob_id IN"
                " (SELECT blob_id FROM deferred_blobs WHERE mailbox = ?)",
                (DEFERRED_DROPPED, DEFERRED, mailbox),
            )
            return int(
                self._db.execute(
                    "DELETE FROM deferred_blobs WHERE mailbox = ?", (mailbox,)
                ).rowcount
            )

    def claim_untagged_blobs(self, mailbox: bytes) -> None:
        """The blobs recorded before `blobs.mailbox` (schema 4) counted as ``mailbox``'s:
        at a rotation, the mailbox rotated away from (they came from it, or from one
        before it, whose grace period ends sooner: never forgotten early)."""
        self._write("UPDATE blobs SET mailbox = ? WHERE mailbox IS NULL", (mailbox,))

    def forget_mailbox(self, mailbox: bytes) -> None:
        """A mailbox rotated away from whose grace period ended (no longer read): what
        was deferred for it is dropped (`drop_deferred`), and its blobs count as deleted
        (nothing is deleted there: they expired with their TTL, within the grace period),
        so the acknowledgements waiting for them end, an acknowledgement blob that only
        covered them can be deleted, and the daily prune forgets them (before, they stayed
        undeleted forever). One transaction with the caller's (`Peer.retired`)."""
        with self.transaction():
            self.drop_deferred(mailbox)
            self._db.execute("DELETE FROM blob_sources WHERE blob_id IN (SELECT blob_id FROM"
                             " blobs WHERE mailbox = ? AND deleted = 0)", (mailbox,))  # fmt: skip
            self._db.execute("UPDATE blobs SET deleted = 1 WHERE mailbox = ? AND deleted = 0",
                             (mailbox,))  # fmt: skip

    def seen_envelope(self, message_id: bytes) -> bool:
        return bool(self._rows("SELECT 1 FROM envelopes_seen WHERE message_id = ?", (message_id,)))

    def remember_envelope(self, message_id: bytes, timestamp_ms: int) -> None:
        self._write(
            "INSERT OR IGNORE INTO envelopes_seen(message_id, timestamp_ms) VALUES (?, ?)",
            (message_id, timestamp_ms),
        )

    def pruning_now_ms(self, now_ms: int, slack_ms: int) -> int:
        """``now_ms``, but no later than the newest envelope timestamp seen plus ``slack_ms``:
        the time pruning may count as now. Envelope timestamps are other parties' clocks
        (signed by their senders, refused outside the replay window), so a wall clock
        stepped forward (an RTC reset, a bad NTP server) does not make `prune` forget seen
        envelopes and deleted blobs early: a blob still on a replica would come back as new
        once the clock was set right, an envelope replayed would be taken again. A device
        that hears nothing keeps its bookkeeping longer, never shorter."""
        newest = self._rows("SELECT MAX(timestamp_ms) FROM envelopes_seen")[0][0]
        return now_ms if newest is None else min(now_ms, int(newest) + slack_ms)

    def prune(self, *, envelopes_before_ms: int, deleted_blobs_before_ms: int) -> None:
        """Forget what can no longer matter: envelope IDs older than the replay window (such
        an envelope is refused by its timestamp anyway), blobs deferred before it (their
        envelopes were at most 5 minutes ahead then, so they are past the window: each is
        recorded rejected, as its turn would have found it) and deleted blobs, with their
        acknowledgements, seen before anything could bring them back (blob TTL, tombstones)."""
        old = "SELECT blob_id FROM blobs WHERE deleted = 1 AND seen_ms < ?"
        stale = "SELECT blob_id FROM deferred_blobs WHERE deferred_ms < ?"
        with self.transaction():
            self._db.execute("DELETE FROM envelopes_seen WHERE timestamp_ms < ?",
                             (envelopes_before_ms,))  # fmt: skip
            self._db.execute(
                f"UPDATE blobs SET outcome = ? WHERE outcome = ? AND blob_id IN ({stale})",
                (DEFERRED_EXPIRED, DEFERRED, envelopes_before_ms),
            )
            self._db.execute("DELETE FROM deferred_blobs WHERE deferred_ms < ?",
                             (envelopes_before_ms,))  # fmt: skip
            cutoff = (deleted_blobs_before_ms,)
            self._db.execute(f"DELETE FROM acks WHERE blob_id IN ({old})", cutoff)
            self._db.execute(
                f"DELETE FROM ack_blobs WHERE ack_blob IN ({old}) OR covers IN ({old})", cutoff * 2
            )
            self._db.execute(f"DELETE FROM blobs WHERE blob_id IN ({old})", cutoff)

    def cursors(self) -> dict[bytes, bytes]:
        return {bytes(r[0]): bytes(r[1]) for r in self._rows("SELECT node_id, cursor FROM cursors")}

    def clear_cursors(self) -> None:
        self._write("DELETE FROM cursors")

    def save_cursors(self, cursors: dict[bytes, bytes]) -> None:
        with self.transaction():
            for node_id, cursor in cursors.items():
                self._db.execute(
                    "INSERT OR REPLACE INTO cursors(node_id, cursor) VALUES (?, ?)",
                    (node_id, cursor),
                )

    # -- devices and the acknowledgements that decide deletion ---------------------------

    def add_device(self, device_id: bytes, name: str, now_ms: int) -> bool:
        """A device of this identity (linked: it said hello, or a history or link listed
        it); an offer for it ends."""
        with self.transaction():
            self._db.execute("DELETE FROM offered_devices WHERE device_id = ?", (device_id,))
            added = self._db.execute(
                "INSERT OR IGNORE INTO devices(device_id, name, added_ms) VALUES (?, ?, ?)",
                (device_id, name, now_ms),
            )
            return int(added.rowcount) > 0

    def add_offered(self, device_id: bytes, until_ms: int, now_ms: int) -> None:
        """A link offer's device: not a device (`devices` never lists it), but deletes wait
        for its acknowledgements until ``until_ms`` (at most OFFER_HOLD_MS from now), so a
        code used late still finds what arrived after its history. Expired offers go."""
        until = min(until_ms, now_ms + OFFER_HOLD_MS)
        with self.transaction():
            self._db.execute("DELETE FROM offered_devices WHERE until_ms <= ?", (now_ms,))
            if not self._rows("SELECT 1 FROM devices WHERE device_id = ?", (device_id,)):
                self._db.execute(
                    "INSERT OR REPLACE INTO offered_devices(device_id, until_ms) VALUES (?, ?)",
                    (device_id, until),
                )

    def remove_device(self, device_id: bytes) -> None:
        """A device that never came (a link code nobody used): deletes stop waiting for it."""
        self._write("DELETE FROM devices WHERE device_id = ?", (device_id,))

    def offered_devices(self) -> dict[bytes, int]:
        """Link offers noted (`add_offered`), live or expired: device ID -> until (ms)."""
        rows = self._rows("SELECT device_id, until_ms FROM offered_devices")
        return {bytes(r[0]): int(r[1]) for r in rows}

    def drop_expired_offers(self, now_ms: int) -> None:
        """An offer whose code was never used leaves nothing behind (daily upkeep)."""
        self._write("DELETE FROM offered_devices WHERE until_ms <= ?", (now_ms,))

    def offers_pending(self, now_ms: int) -> bool:
        """Is a link offer live (its device may come: what this device sends, it mirrors)?"""
        return bool(self._rows("SELECT 1 FROM offered_devices WHERE until_ms > ?", (now_ms,)))

    def acked_by(self, device_id: bytes) -> bool:
        """Has ``device_id`` acknowledged anything (is it a device that runs)?"""
        return bool(self._rows("SELECT 1 FROM acks WHERE device_id = ? LIMIT 1", (device_id,)))

    def devices(self) -> dict[bytes, str]:
        return {bytes(r[0]): str(r[1]) for r in self._rows("SELECT device_id, name FROM devices")}

    def add_acks(self, device_id: bytes, blob_ids: list[bytes], ack_blob: bytes | None) -> None:
        with self.transaction():
            for blob in blob_ids:
                self._db.execute(
                    "INSERT OR IGNORE INTO acks(blob_id, device_id) VALUES (?, ?)",
                    (blob, device_id),
                )
                if ack_blob is not None:
                    self._db.execute(
                        "INSERT OR IGNORE INTO ack_blobs(ack_blob, covers) VALUES (?, ?)",
                        (ack_blob, blob),
                    )

    def deletable_blobs(self, now_ms: int) -> list[bytes]:
        """Blobs every known device, and every device a live link offer may make,
        acknowledged, and acknowledgements that only cover such blobs (once every device
        holds a blob, or it is deleted, nobody needs to hear who holds it). Only the
        acknowledgements of those devices count. The blobs done are worked out once (a CTE
        materialized): as a subquery they were worked out again for every acknowledgement
        blob's row, 7.9 s for a cache of 20,000 blobs and two devices, on every sync and
        `watch` round."""
        rows = self._rows(
            "WITH waited(device_id) AS ("
            "  SELECT device_id FROM devices UNION"
            "  SELECT device_id FROM offered_devices WHERE until_ms > :now),"
            " done(blob_id) AS MATERIALIZED ("
            "  SELECT blob_id FROM acks WHERE device_id IN (SELECT device_id FROM waited)"
            "  GROUP BY blob_id"
            "  HAVING count(DISTINCT device_id) >= (SELECT count(*) FROM waited)"
            "  UNION SELECT blob_id FROM blobs WHERE deleted = 1)"
            " SELECT blob_id FROM blobs WHERE deleted = 0 AND blob_id IN (SELECT blob_id FROM done)"
            " UNION SELECT a.ack_blob FROM ack_blobs a LEFT JOIN done d ON d.blob_id = a.covers"
            "  WHERE a.ack_blob IN (SELECT blob_id FROM blobs WHERE deleted = 0)"
            "  GROUP BY a.ack_blob HAVING count(d.blob_id) = count(*)",
            {"now": now_ms},
        )
        return [bytes(r[0]) for r in rows]

    def undeleted_blobs(self) -> list[bytes]:
        """Every blob this device handled that it has not deleted from the network."""
        return [bytes(r[0]) for r in self._rows("SELECT blob_id FROM blobs WHERE deleted = 0")]

    def mark_deleted(self, blob_ids: list[bytes]) -> None:
        with self.transaction():
            for blob in blob_ids:
                self._db.execute("UPDATE blobs SET deleted = 1 WHERE blob_id = ?", (blob,))
                self._db.execute("DELETE FROM blob_sources WHERE blob_id = ?", (blob,))

    def record_sources(self, blob_id: bytes, node_ids: Collection[bytes]) -> None:
        """The storage nodes that returned ``blob_id``, a blob that did not verify here."""
        with self.transaction():
            for node in node_ids:
                self._db.execute(
                    "INSERT OR IGNORE INTO blob_sources(blob_id, node_id) VALUES (?, ?)",
                    (blob_id, node),
                )

    def unverified_blobs(self, blob_ids: Collection[bytes]) -> dict[bytes, frozenset[bytes]]:
        """Of ``blob_ids``, those that did not verify here (rejected, or deferred: not
        opened yet), each with the storage nodes that returned it (`record_sources`; empty:
        not known, as for a blob handled before 2026-12-05). Such a blob is only its nodes'
        word: a hostile node makes them up for free, and a delete of one elsewhere stores a
        tombstone for an ID that node never held (`Peer._clean_up`)."""
        wanted = set(blob_ids)
        rows = self._rows(
            "SELECT blob_id FROM blobs WHERE deleted = 0 AND (outcome = ? OR outcome LIKE"
            " 'rejected:%')", (DEFERRED,),
        )  # fmt: skip
        found = {bytes(r[0]): set[bytes]() for r in rows if bytes(r[0]) in wanted}
        for blob, node in self._rows("SELECT blob_id, node_id FROM blob_sources"):
            if (sources := found.get(bytes(blob))) is not None:
                sources.add(bytes(node))
        return {blob: frozenset(nodes) for blob, nodes in found.items()}


# Message requests (`Cache.forget_strangers`): conversations whose contacts are all
# strangers, never written to, with when each was last active.
_STRANGER = "chosen = 0 AND verified = 0 AND name IS NULL"
_REQUESTS = (
    "SELECT c.conversation AS id, max(max(c.pinned_ms), v.last_ms) AS idle_ms"
    " FROM contacts c JOIN conversations v ON v.id = c.conversation GROUP BY c.conversation"
    f" HAVING min({_STRANGER}) = 1"
    " AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.conversation = c.conversation"
    " AND m.outgoing = 1)"
    " AND NOT EXISTS (SELECT 1 FROM outbox o JOIN contacts k ON k.fingerprint = o.recipient"
    " WHERE k.conversation = c.conversation)"
)
_FORGET_REQUEST = (
    "INSERT INTO messages_text(messages_text, rowid, body)"
    " SELECT 'delete', rowid, body FROM messages WHERE conversation = ?",
    "DELETE FROM messages WHERE conversation = ?",
    "DELETE FROM conversations WHERE id = ?",
    "DELETE FROM contacts WHERE conversation = ?",
)
_CONTACT_COLUMNS = "fingerprint, keys, name, verified, pinned_ms, conversation, replaced_by, chosen"
_MESSAGE_COLUMNS = (
    "message_id, conversation, sender, recipient, timestamp_ms, body, outgoing, delivered"
)


def _fts_query(text: str) -> str:
    """Each word as an FTS5 string (quoted: an operator typed is a word like any other)."""
    return " ".join('"' + word.replace('"', '""') + '"' for word in text.split())


def _contact(row: tuple[Any, ...]) -> Contact:
    return Contact(
        bytes(row[0]), PublicKeySet.decode(bytes(row[1])), row[2], bool(row[3]), row[4],
        bytes(row[5]), bytes(row[6]) if row[6] is not None else None, bool(row[7]),
    )  # fmt: skip


def _message(row: tuple[Any, ...]) -> Message:
    return Message(
        bytes(row[0]), bytes(row[1]), bytes(row[2]), bytes(row[3]), row[4], row[5],
        bool(row[6]), bool(row[7]),
    )  # fmt: skip


def _set_up(conn: Any, lost_ms: int | None) -> None:
    """Settings and tables; for a new cache made in place of a lost one (``lost_ms``), its
    tables and the lost marks in one transaction (Cache.open)."""
    conn.execute("PRAGMA busy_timeout = 10000")  # `dna watch` and `dna send` may overlap
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")
    if lost_ms is None:
        conn.executescript(_SCHEMA)  # idempotent (IF NOT EXISTS), so no transaction needed
        _add_columns(conn)
    else:  # the values as the state table holds them (set_state: bytes)
        marks = (f"INSERT OR REPLACE INTO state(key, value) VALUES ('{RECOVERING}',"
                 f" x'{str(lost_ms).encode().hex()}'), ('{HISTORY_WANTED}', x'');")  # fmt: skip
        triggers = "".join(f"{trigger};" for trigger in _UNREAD_COUNT)
        conn.executescript(f"BEGIN IMMEDIATE;{_SCHEMA}{triggers}{marks}COMMIT;")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _add_columns(conn: Any) -> None:
    """What a cache from before each column lacks, in one transaction: each column is looked
    for inside it, so two `dna` opening an old cache at once add it once (checked outside,
    both saw it missing and the second failed on "duplicate column"), and no write between
    adding a count and its triggers goes uncounted."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        _add_chosen(conn)
        _add_deferred_source(conn)
        _add_blob_mailbox(conn)
        _add_unread_count(conn)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _columns(conn: Any, table: str) -> set[str]:
    return {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}


def _add_deferred_source(conn: Any) -> None:
    """A cache from before `deferred_blobs.source`: the column, NULL for the blobs deferred
    then (each counted as several nodes' word, as every one was)."""
    if "source" not in _columns(conn, "deferred_blobs"):
        conn.execute("ALTER TABLE deferred_blobs ADD COLUMN source BLOB")


def _add_blob_mailbox(conn: Any) -> None:
    """A cache from before `blobs.mailbox` (schema 4): the column, NULL for the blobs
    recorded then (the next rotation counts them as the old mailbox's)."""
    if "mailbox" not in _columns(conn, "blobs"):
        conn.execute("ALTER TABLE blobs ADD COLUMN mailbox BLOB")


def _add_unread_count(conn: Any) -> None:
    """A cache from before `conversations.unread`: the column, counted once from the rows,
    and the triggers that keep it; a cache that has them is left as it is."""
    if "unread" not in _columns(conn, "conversations"):
        conn.execute("ALTER TABLE conversations ADD COLUMN unread INTEGER NOT NULL DEFAULT 0")
        conn.execute(
            "UPDATE conversations SET unread = (SELECT count(*) FROM messages m"
            " WHERE m.conversation = conversations.id AND m.outgoing = 0"
            " AND m.timestamp_ms > conversations.read_up_to_ms)"
        )
    for trigger in _UNREAD_COUNT:
        conn.execute(trigger)


def _add_chosen(conn: Any) -> None:
    """A cache from before `Contact.chosen` (schema 1): the column, set for the contacts
    named or verified; one added by fingerprint alone is chosen again by adding it again
    (until then, or until this identity writes to it, it is not told where we are)."""
    if "chosen" not in _columns(conn, "contacts"):
        conn.execute("ALTER TABLE contacts ADD COLUMN chosen INTEGER NOT NULL DEFAULT 0")
        conn.execute("UPDATE contacts SET chosen = 1 WHERE name IS NOT NULL OR verified = 1")


def _create_owner_only(path: Path) -> None:
    """A new cache file is created owner-only (SQLite would create it with the umask's
    mode, until `_owner_only`); an existing one is left as it is. Whatever fails here (a
    directory in its place) fails again, and is reported, when SQLite opens it."""
    with contextlib.suppress(OSError):
        os.close(os.open(path, os.O_RDONLY | os.O_CREAT, 0o600))


def _owner_only(path: Path) -> None:
    """The cache and its WAL files readable by their owner only, as the key file is: the
    contents are encrypted, but who wrote to whom and when shows in their sizes and times.
    SQLite gives WAL files the database file's mode, so later ones follow."""
    for name in (path.name, f"{path.name}-wal", f"{path.name}-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.chmod(path.with_name(name), 0o600)
