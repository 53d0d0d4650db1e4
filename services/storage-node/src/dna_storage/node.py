"""A storage node process: an overlay member that also serves the Mailbox service.

Composition: the shared OverlayServer (UDP routing, gRPC Overlay service with
records, health, reflection, ops HTTP) plus the Mailbox gRPC service over a
backend (SQLite by default, Redis optionally), an admission controller and a
garbage-collection loop that expires blobs and tombstones incrementally.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import shutil
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, cast

from dna_core.errors import DnaError, cannot_open
from dna_core.expiry import ExpiryClock
from dna_core.mailbox import NonceCache
from dna_core.ops.config import ConfigModel, ConfigPath, SecretStr
from dna_core.ops.grpc_gate import ServiceRegistrar
from dna_core.overlay import OverlayNode, OverlayServer, OverlayServiceConfig
from dna_core.rpc_session_server import SharedSlots, SourceCaps
from dna_core.tasks import stop_tasks
from dna_core.wire import common_pb2, mailbox_pb2
from prometheus_client import CollectorRegistry, Counter, Gauge
from pydantic import Field, model_validator
from redis.exceptions import RedisError

from dna_storage.admission import Admission, AdmissionConfig
from dna_storage.backends.base import (
    WRITE_METHODS,
    MailboxBackend,
    StorageFullError,
    StoreDamagedError,
    StoreUnavailableError,
    Usage,
)
from dna_storage.backends.redis import RedisBackend
from dna_storage.backends.sqlite import SqliteBackend
from dna_storage.mailbox_service import BATCHES_AT_ONCE, DAY_S, Retention
from dna_storage.mailbox_stream import (
    MAX_SUBSCRIPTIONS,
    NODE_PAGES,
    NODE_PAGES_PER_SOURCE,
    SESSIONS,
    SESSIONS_PER_SOURCE,
    STALL_S,
    SUBSCRIPTIONS_PER_SOURCE,
    WINDOW,
    MailboxSessionService,
    NotifyingBackend,
    SessionMetrics,
    SessionRules,
    Subscribers,
)
from dna_storage.replication import (
    SYNC_CALL_BURST,
    SYNC_CALLS_PER_S,
    Repairer,
    ReplicaView,
    SyncRules,
)

log = logging.getLogger("dna.storage")
MAILBOX_DESCRIPTOR = mailbox_pb2.DESCRIPTOR.services_by_name["Mailbox"]
MAILBOX_FILE = "mailboxes.sqlite3"  # the SQLite backend's database, in storage.data_dir
STEP_WARNING_MS = 60_000  # GC's time this far behind the wall clock is a step, and said


class StorageSection(ConfigModel):
    """Where and how long mailboxes are kept (docs/storage.md)."""

    backend: Literal["sqlite", "redis"] = "sqlite"
    """Where mailboxes live: SQLite files in data_dir, or the Redis server at redis_url
    (configured as docs/operations.md requires)."""
    data_dir: ConfigPath = Path("data")
    """SQLite's file (mailboxes.sqlite3), the record file by default, and the disk watched."""
    redis_url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    """The Redis database of this node alone (backend = "redis"); may carry a password."""
    ttl_days: int = 30
    """A blob's lifetime when the client asks for none."""
    max_ttl_days: int = 30
    """The most a client may ask for."""
    gc_interval_s: float = Field(default=30.0, gt=0)
    """Seconds between expiry passes (and disk readings and held-figures refreshes)."""
    gc_batch: int = Field(default=1000, ge=1)
    """Blobs and tombstones expired per GC step."""
    repair_interval_s: float = Field(default=60.0, gt=0)
    """Seconds between anti-entropy passes over every mailbox held."""
    sync_rate_per_s: float = Field(default=SYNC_CALLS_PER_S, gt=0)
    """Replica sync calls per second this node serves each other storage node (and each
    address), after a burst of sync_burst; more are refused with a retry-after, which the
    caller's repair waits (docs/storage.md "Anti-entropy")."""
    sync_burst: float = Field(default=SYNC_CALL_BURST, ge=1)
    """Replica sync calls a storage node may make to this one at once before
    sync_rate_per_s applies. Repair elsewhere paces itself to the defaults."""
    session_window: int = Field(default=WINDOW, ge=1, le=1024)
    """Requests a mailbox session may have unanswered; a client sending more is cut."""
    session_stall_s: float = Field(default=STALL_S, gt=0)
    """Seconds a session's response may wait for the client to read it before the session
    is cut (a client that never reads costs the node nothing more)."""
    sessions_max_per_source: int = Field(default=SESSIONS_PER_SOURCE, ge=1)
    """Mailbox sessions open at once from one address (IPv6: per [admission]
    ipv6_prefix_len); one more is refused (RESOURCE_EXHAUSTED) before it holds anything."""
    sessions_max: int = Field(default=SESSIONS, ge=1)
    """Mailbox sessions open at once on this node, from every address (docs/storage.md,
    "Memory", for what each may hold)."""
    session_pages_max: int = Field(default=NODE_PAGES, ge=1)
    """Pages (fetch or push, 2 MiB) and batches (PutMany, sync, up to 4 MiB) all mailbox
    sessions hold at once, from reading one until its answer is written; a session wanting
    more waits before reading on (docs/storage.md, "Memory": what bounds the node)."""
    session_pages_per_source: int = Field(default=NODE_PAGES_PER_SOURCE, ge=1)
    """Of those, what the sessions of one address hold together."""
    put_batches_at_once: int = Field(default=BATCHES_AT_ONCE, ge=1)
    """PutMany batches (unary or on sessions) judged and written at once; each holds up to
    ~16 MiB while judged, the others wait their turn (docs/storage.md, "Memory")."""
    subscriptions_max_per_source: int = Field(default=SUBSCRIPTIONS_PER_SOURCE, ge=1)
    """Mailbox subscriptions live at once from one address, over all its sessions (each
    session has at most 8)."""

    @model_validator(mode="after")
    def _ttl_within_max(self) -> StorageSection:
        if not 0 < self.ttl_days <= self.max_ttl_days:
            raise ValueError("ttl_days must be > 0 and <= max_ttl_days")
        return self


class StorageNodeConfig(OverlayServiceConfig):
    """A storage node's configuration: a bootstrap node's sections and its own."""

    storage: StorageSection = StorageSection()
    admission: AdmissionConfig = AdmissionConfig()

    def data_dir(self) -> Path:
        """The record file lives beside the mailboxes, in `[storage] data_dir`."""
        return self.storage.data_dir


async def open_backend(section: StorageSection) -> MailboxBackend:
    """The configured backend, or a one-line ``DnaError`` saying why it cannot be used."""
    if section.backend == "redis":
        try:
            return await RedisBackend.connect(section.redis_url.reveal())
        except (RedisError, OSError) as exc:  # the URL is masked: it may carry a password
            where = section.redis_url.masked()
            raise DnaError(f"cannot use redis at {where}: {exc}") from None
    path = section.data_dir / MAILBOX_FILE
    try:
        section.data_dir.mkdir(parents=True, exist_ok=True)
        return await SqliteBackend.open(path)
    except (sqlite3.Error, OSError) as exc:
        raise cannot_open(path, exc) from None
    except StoreUnavailableError as exc:  # SQLite's own error, as the backend's calls say it
        raise cannot_open(path, exc.__cause__ or exc) from None


# [storage] keys that bound what the node takes, exported beside [admission]'s (``limit``).
STORAGE_LIMITS = (
    "max_ttl_days", "sync_rate_per_s", "sync_burst", "sessions_max", "sessions_max_per_source",
    "session_pages_max", "session_pages_per_source", "subscriptions_max_per_source",
)  # fmt: skip


def configured_limits(config: StorageNodeConfig) -> dict[str, float]:
    """The limits a node runs with, by configuration key: every number of [admission] (a
    key added there is exported with no change here) and ``STORAGE_LIMITS``."""
    limits = {
        name: float(value)
        for name, value in config.admission
        if isinstance(value, int | float) and not isinstance(value, bool)
    }
    return limits | {name: float(getattr(config.storage, name)) for name in STORAGE_LIMITS}


class StorageMetrics:
    """The storage node's own series, in the node's registry (docs/storage.md)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "dna_storage_requests",
            "Mailbox requests by method and outcome (ok, or a refusal's kind: size, pow, ...)",
            ["method", "outcome"],
            registry=registry,
        )
        self.blobs = Gauge("dna_storage_blobs", "Blobs stored (incl. expired not yet collected)",
                           registry=registry)  # fmt: skip
        self.bytes = Gauge("dna_storage_bytes", "Bytes of blobs stored", registry=registry)
        self.signed_delete_bytes = Gauge(
            "dna_storage_signed_delete_bytes",
            "Bytes of signed deletes stored as tombstones' authorizations (each once, however "
            "many tombstones it authorizes)",
            registry=registry,
        )
        self.mailboxes = Gauge("dna_storage_mailboxes", "Mailboxes holding blobs or tombstones",
                               registry=registry)  # fmt: skip
        self.tombstones_unheld = Gauge(
            "dna_storage_tombstones_unheld",
            "Tombstones stored for IDs the node held neither as a blob nor as a tombstone, "
            "every mailbox's, as of the last GC pass (deletes are admitted up to "
            "admission.node_max_tombstones_unheld)",
            registry=registry,
        )
        self.gc_removed = Counter(
            "dna_storage_gc_removed", "Expired blobs and tombstones removed", registry=registry
        )
        self.no_room = Counter(
            "dna_storage_write_no_room",
            "Backend writes refused for lack of room (disk full, Redis out of memory)",
            registry=registry,
        )
        self.disk_used = Gauge(
            "dna_storage_disk_used_ratio",
            "Used fraction of the data directory's file system, as of the last disk reading "
            "(every GC interval; SQLite only: 0 on Redis)",
            registry=registry,
        )
        self.limit = Gauge(
            "dna_storage_limit",
            "A limit the node runs with, by its configuration key (every number of "
            "[admission], and [storage]'s caps on TTL, sessions, subscriptions and repair "
            "sync): set at start, to read beside the usage gauges",
            ["limit"],
            registry=registry,
        )
        self.nonces_forgotten = Counter(
            "dna_storage_nonces_forgotten",
            "Request nonces the node forgot inside their 5-minute window, its nonce cache "
            "full: each makes its mailbox refuse requests timestamped at or before it as "
            "replays (a steady rise is a flood of fresh fetches)",
            registry=registry,
        )
        self.refusing_writes = Gauge(
            "dna_storage_refusing_writes",
            "1 while the node refuses writes (over the high-water mark, or a write found "
            "no room), else 0",
            registry=registry,
        )


class _RoomWatch:
    """The backend, tripping the node's high-water mark the moment a write finds no room,
    so `/readyz` fails and admission refuses writes at once, not at the next disk reading;
    telling the node the moment a call finds the store damaged, or unavailable (Redis
    down), and when a call is answered again, saying whether it was a write (its
    ``WRITE_METHODS``) or a read."""

    def __init__(
        self,
        backend: MailboxBackend,
        on_full: Callable[[], None],
        on_damaged: Callable[[StoreDamagedError], None],
        on_unavailable: Callable[[StoreUnavailableError | None, bool], None],
    ) -> None:
        self._backend, self._on_full, self._on_damaged = backend, on_full, on_damaged
        self._on_unavailable = on_unavailable

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._backend, name)
        if not inspect.iscoroutinefunction(attr):
            return attr

        writes = name in WRITE_METHODS

        @functools.wraps(attr)
        async def watched(*args: Any, **kwargs: Any) -> Any:
            try:
                result = await attr(*args, **kwargs)
            except StorageFullError:
                self._on_full()
                raise
            except StoreDamagedError as exc:
                self._on_damaged(exc)
                raise
            except StoreUnavailableError as exc:
                self._on_unavailable(exc, writes)
                raise
            self._on_unavailable(None, writes)  # the store answered
            return result

        return watched


class StorageNode:
    # The Mailbox service served. Tests run a node that serves no sessions, as nodes from
    # before them do, with a subclass of it (its Session answers UNIMPLEMENTED).
    mailbox_service: type[MailboxSessionService] = MailboxSessionService

    def __init__(self, config: StorageNodeConfig) -> None:
        self.config = config
        self.backend: MailboxBackend | None = None
        self.server: OverlayServer | None = None
        self.admission = Admission(config.admission)
        self.metrics = StorageMetrics(CollectorRegistry())  # replaced by the server's at start
        self._tasks: list[asyncio.Task[None]] = []
        self.repairer: Repairer | None = None
        self.replica_view: ReplicaView | None = None  # who may sync with this node
        self.mailbox_rpc: MailboxSessionService | None = None  # its writes end before the backend
        self._full_by_write = False  # a write found no room since the last disk reading
        self._held = Usage(0, 0)  # blobs and bytes held, as of the last GC pass
        self._mailboxes = 0  # mailboxes held, likewise
        self._damage: str | None = None  # what a call found damaged in the store, if one did
        # Why the last read, and the last write, failed for want of the store ({} when the
        # last of each was answered).
        self._unavailable: dict[str, str] = {}
        self.expiry_clock = ExpiryClock()  # the time GC removes expired items against
        self._clock_resumed = False  # from the time the store saved, at the first GC pass
        self._clock_read = False  # the first reading after resuming is said apart
        self.wall_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000  # tests step it
        self._durability: set[str] | None = None  # the store's problems, as last read
        self._store = config.storage.backend  # its name in what the node says

    async def start(self) -> None:
        section = self.config.storage
        opened = await open_backend(section)
        subscribers = Subscribers()  # woken by every write that stores a blob (push)
        watched = cast(
            MailboxBackend,
            _RoomWatch(opened, self._no_room, self._store_damaged, self._store_unavailable),
        )
        self.backend = backend = cast(MailboxBackend, NotifyingBackend(watched, subscribers))
        retention = Retention(section.ttl_days * DAY_S, section.max_ttl_days * DAY_S)
        rules: list[SyncRules] = []  # the service's, for the repairer

        def add_mailbox(register: ServiceRegistrar, node: OverlayNode) -> list[str]:
            self.replica_view = ReplicaView(
                node, rate=section.sync_rate_per_s, burst=section.sync_burst
            )
            service = self.mailbox_service(
                backend, self.admission, retention=retention,
                sync_puzzle_bits=self.config.node.puzzle_bits,
                replica_view=self.replica_view,
                node_id=node.node_id,
                nonces=NonceCache(on_forgotten=self.metrics.nonces_forgotten.inc),
                batches_at_once=section.put_batches_at_once,
                on_outcome=lambda method, outcome: self.metrics.requests.labels(
                    method=method, outcome=outcome
                ).inc(),
            )  # fmt: skip
            rules.append(service.sync_rules)
            self.mailbox_rpc = service
            assert self.server is not None
            site = self.config.admission.site_tier
            service.session_rules = SessionRules(
                service, subscribers, SessionMetrics(self.server.registry),
                window=section.session_window, stall_s=section.session_stall_s,
                sessions=SourceCaps(
                    "session", section.sessions_max_per_source, section.sessions_max, site
                ),
                subscriptions=SourceCaps(
                    "subscriptions", section.subscriptions_max_per_source,
                    section.sessions_max * MAX_SUBSCRIPTIONS, site,
                ),
                ipv6_prefix_len=self.config.admission.ipv6_prefix_len,
                node_pages=SharedSlots(
                    section.session_pages_per_source, section.session_pages_max, site
                ),
            )  # fmt: skip
            return [register(service, MAILBOX_DESCRIPTOR)]

        self.server = OverlayServer(
            self.config,
            role=common_pb2.NODE_ROLE_STORAGE,
            extra_services=add_mailbox,
            extra_readiness=self._disk_readiness,
            extra_status=self._status,
        )
        self.metrics = StorageMetrics(self.server.registry)
        for name, value in configured_limits(self.config).items():
            self.metrics.limit.labels(name).set(value)
        self.metrics.refusing_writes.set_function(lambda: float(self.admission.high_water.tripped))
        try:
            await self.server.start()
        except BaseException:
            await opened.close()
            raise
        node = self.server.node
        assert node is not None
        self.repairer = Repairer(
            node, backend, rules=rules[0],
            registry=self.server.registry, interval_s=section.repair_interval_s,
        )  # fmt: skip
        self._tasks = [
            asyncio.create_task(self._collect_garbage(backend)),
            asyncio.create_task(self.repairer.run_forever()),
        ]

    def _no_room(self) -> None:
        if not self._full_by_write:
            log.warning("storage full: a write found no room; refusing writes")
        self._full_by_write = True
        self.metrics.no_room.inc()
        self.admission.high_water.trip()

    def _store_damaged(self, exc: StoreDamagedError) -> None:
        """Said once, in one line: the requests that hit the damage are answered
        UNAVAILABLE (clients ask other replicas) and the rest of the store is still served,
        so other mailboxes stay readable and repair can copy them; `/readyz` fails."""
        if self._damage is None:
            advice = ("stop the node and restore its data directory from a backup"
                      " (docs/operations.md), or wipe it and let repair refill it")  # fmt: skip
            log.error("%s; unready: %s", exc, advice)
        self._damage = str(exc)

    def _store_unavailable(self, exc: StoreUnavailableError | None, writes: bool) -> None:
        """A read or write call to the store failed for want of the store (``exc``) or was
        answered (None). Said once each way: while the store is away, every request touching
        it answers UNAVAILABLE (clients ask other replicas) and `/readyz` fails; the next
        read and write answered (a request, or the GC pass every interval, which writes and
        reads) make the node ready again. Reads and writes are judged apart: SQLite's reads
        go on while another process holds the file's write lock past the busy timeout, and
        each read answered made the node ready until the next write failed, flapping
        `/readyz` and the log at every request."""
        kind = "write" if writes else "read"
        was_unavailable = bool(self._unavailable)
        if exc is not None:
            self._unavailable[kind] = str(exc)
            if not was_unavailable:
                log.warning("%s; unready until it answers", exc)
        else:
            self._unavailable.pop(kind, None)
            if was_unavailable and not self._unavailable:
                log.info("the mailbox store answers again: ready")

    async def _collect_garbage(self, backend: MailboxBackend) -> None:
        """A GC pass every ``gc_interval_s``; a failed pass is retried at the next interval
        (a full disk must not end GC: GC is what frees room)."""
        while True:
            try:
                await self._collect_pass(backend)
            except (StorageFullError, StoreDamagedError, StoreUnavailableError):  # said, once
                pass
            except Exception:
                log.exception("garbage collection pass failed")
            await asyncio.sleep(self.config.storage.gc_interval_s)

    async def _collect_pass(self, backend: MailboxBackend) -> int:
        """Expire what has expired ``gc_batch`` at a time (one bounded write each, so the
        requests' writes go between them) until a batch comes back short, then refresh the
        held figures once. Refreshed after every batch, a backlog of 100,000 expired blobs
        counted the mailboxes held 100 times (on SQLite before schema 5, each count read
        every tombstone's mailbox: 285 ms at 400,000 tombstones, on the one reader
        connection every fetch waits for)."""
        batch_size = self.config.storage.gc_batch
        if not self._clock_resumed:  # where the last run's GC was, not the wall clock now
            self.expiry_clock = ExpiryClock(await backend.gc_time())
            self._clock_resumed = True
        removed, now_ms = 0, self._expiry_now()
        while True:
            batch = await backend.expire(now_ms, batch_size)
            self._check_disk()
            removed += batch
            self.metrics.gc_removed.inc(batch)
            if batch < batch_size:
                break
        with contextlib.suppress(StorageFullError):  # said once; GC goes on freeing room
            # the latest time GC used (after a clock set back, later than this pass's)
            await backend.save_gc_time(max(now_ms, self.expiry_clock.high_ms or now_ms))
        await self._refresh_held(backend)
        await self._check_durability(backend)
        if removed:
            log.info("expired", extra={"removed": removed})
        return removed

    def _expiry_now(self) -> int:
        """What GC expires against: the wall clock, but a step forward is followed at most
        twice as fast as time passes, across restarts too (``ExpiryClock``, resumed from
        the store's ``gc_time``: GC's removals are not undone when the clock is set right)."""
        first = self.expiry_clock.high_ms is not None and not self._clock_read
        self._clock_read = True
        now = self.expiry_clock.now_ms(self.wall_ms(), time.monotonic_ns() // 1_000_000)
        news = self.expiry_clock.step_news(STEP_WARNING_MS)
        if news == "behind":
            why = ("since the last GC pass before this start: the node was stopped that long,"
                   " or the clock stepped forward" if first else "a step forward?")  # fmt: skip
            log.warning(
                "the wall clock is %.0f s ahead of the time GC follows (%s): "
                "GC catches up at most twice as fast as time passes",
                self.expiry_clock.stepped_ms / 1000,
                why,
            )
        elif news == "caught up":
            log.info("GC follows the wall clock again")
        return now

    async def _check_durability(self, backend: MailboxBackend) -> None:
        """Say when the store's configuration stops (or starts again) keeping acknowledged
        writes durable: a Redis server restarted from a configuration file without the
        settings an operator had made at run time (`CONFIG SET appendfsync always`) lost
        them silently, checked only when the node started (which said so already)."""
        problems = await backend.configuration_problems()
        if self._durability is not None:
            for problem in sorted(set(problems) - self._durability):
                log.warning("%s is not configured for durable writes: %s", self._store, problem)
            if self._durability and not problems:
                log.info("%s is configured for durable writes again", self._store)
        self._durability = set(problems)

    async def _refresh_held(self, backend: MailboxBackend) -> None:
        """What the node holds, for the metrics and `/status` (as of this GC pass)."""
        self._held = totals = await backend.totals()
        self.metrics.blobs.set(totals.blobs)
        self._mailboxes = await backend.mailboxes()
        self.metrics.mailboxes.set(self._mailboxes)
        self.metrics.bytes.set(totals.bytes)
        self.metrics.signed_delete_bytes.set((await backend.signed_deletes()).bytes)
        self.metrics.tombstones_unheld.set(await backend.unheld_tombstones())

    def _check_disk(self) -> None:
        """Over the high-water mark the node refuses writes and turns unready, but keeps
        serving reads and repair (docs/storage.md). A reading replaces a trip by a failed
        write; Redis gives no reading, so there such a trip lasts until this pass."""
        high_water = self.admission.high_water
        if self.config.storage.backend == "sqlite":
            usage = shutil.disk_usage(self.config.storage.data_dir)
            high_water.update(usage.used, usage.total)
            self.metrics.disk_used.set(usage.used / usage.total if usage.total else 1.0)
        elif self._full_by_write:
            high_water.update(0, 1)
        if self._full_by_write and not high_water.tripped:
            log.info("storage has room again: taking writes")
        self._full_by_write = self._full_by_write and high_water.tripped

    def _status(self) -> dict[str, Any]:
        """The storage figures of `/status`: what is held (as of the last GC pass), the
        disk, and whether writes are refused."""
        section = self.config.storage
        held = self._held
        status: dict[str, Any] = {
            "backend": section.backend,
            "mailboxes": self._mailboxes,
            "blobs": held.blobs,
            "bytes": held.bytes,
            "refusing_writes": self.admission.high_water.tripped,
        }
        if section.backend == "sqlite":
            usage = shutil.disk_usage(section.data_dir)
            status["disk"] = {
                "used_bytes": usage.used,
                "total_bytes": usage.total,
                "used_fraction": round(usage.used / usage.total, 4) if usage.total else 1.0,
                "high_water": self.config.admission.disk_high_water,
            }
        return status

    def _disk_readiness(self) -> tuple[bool, str]:
        if self._damage is not None:
            return False, self._damage
        if self._unavailable:
            return False, "; ".join(dict.fromkeys(self._unavailable.values()))
        if self._full_by_write:
            return False, "storage full: a write found no room; refusing writes"
        if self.admission.high_water.tripped:
            return False, "disk over the high-water mark: refusing writes"
        return True, "disk ok"

    async def stop(self) -> None:
        await stop_tasks(self._tasks, failures_to=log)
        if self.repairer is not None:
            await self.repairer.close()
        if self.server is not None:
            await self.server.stop()
        if self.mailbox_rpc is not None:
            await self.mailbox_rpc.drain()
        if self.backend is not None:
            await self.backend.close()
