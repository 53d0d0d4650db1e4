"""Redis mailbox backend, for operators who already run Redis.

How expiry is decided: by the ``expires_ms`` stored in the index, compared with the caller's
``now_ms`` on every read and write, exactly as in SQLite (``common.py``), and removal is GC's
alone (``expire``, against the node's ``ExpiryClock``). No key expires natively: a
``PEXPIREAT`` is the Redis server's clock, so a step on the Redis host (a bad NTP server)
deleted blobs and tombstones early, past the node's clock protection, and a tombstone gone
early lets a deleted blob come back through repair. A node reads keys written with a native
TTL by an older version and removes their TTL once, when it connects (``LAYOUT``); a key
that vanished anyway (before that, or deleted by hand) is treated as gone, and reads lazily
clean its index entries. Durability comes from the server: AOF with
``appendfsync always`` (which Redis already group-commits per event-loop turn), and no key
eviction; ``connect`` logs a warning when the server is configured otherwise
(docs/operations.md, "Redis backend").

Layout (``P`` = prefix, IDs hex-encoded, ``M`` = mailbox, ``B`` = blob ID):

* ``P b:M:B`` hash ``d`` payload, ``s`` stored_ms, ``e`` expires_ms, ``q`` seq, ``w`` the put's
  proof of work (``common.encode_pow``; absent on blobs stored before it was kept)
* ``P t:M:B`` hash ``d`` deleted_ms, ``e`` expires_ms; tombstones stored before
  signed deletes were shared also hold ``a``, their authorization (read as before, gone
  within a tombstone lifetime)
* ``P tr:M`` hash B -> H, the hex SHA-256 of the tombstone's signed delete (its authorization)
* ``P sd:H`` hash ``a`` the signed delete (stored once, not once per tombstone; removed with
  the last tombstone referencing it; docs/storage.md)
* ``P sr`` hash H -> tombstones referencing it; ``P sz`` hash H -> its bytes: the counts stay
  exact when a key vanished before GC reached it
* ``P s:M`` zset B -> seq (cursor fetch); ``P e:M`` zset B -> expires_ms (usage, liveness)
* ``P z:M`` hash B -> size; ``P u:M`` hash ``bytes`` (usage without reading payloads)
* ``P eh:M`` hash hour of expiry (expires_ms // ``EXPIRY_HOUR_MS``) -> bytes of the blobs
  expiring in it: usage subtracts the hours gone without reading each expired blob (layout 3)
* ``P tu:M`` hash B -> 1: the tombstones stored where the node held neither the blob nor a
  live tombstone of a held ID, counted node-wide in ``P totals`` ``unheld_tombstones``
* ``P ti:M`` zset B -> tombstone expires_ms; ``P q:M`` seq counter (INCR, never reset)
* ``P l:M`` / ``P tl:M`` zsets of the blob / tombstone IDs, score 0: by ID (``ZRANGE BYLEX``),
  so a sync list page reads its page, not the whole mailbox (layout 3)
* ``P x`` zset ``b:M:B`` / ``t:M:B`` -> expires_ms: the node-wide GC queue
* ``P m`` zset of mailbox IDs, score 0 (lexicographic range scans for digests)
* ``P totals`` hash ``blobs``, ``bytes``, ``signed_deletes``, ``signed_delete_bytes``,
  ``unheld_tombstones``
* ``P incarnation`` 8 random bytes, set when the first call finds none (fetch cursors)
* ``P gc_time`` the time GC last expired against (``save_gc_time``: a restart resumes it)
* ``P layout`` ``LAYOUT``: 2 once no key holds a native TTL, 3 once every mailbox has its
  ID indexes (``l:``, ``tl:``), 4 once tombstones for IDs not held are counted; a node
  refuses a store of a layout newer than its own
* ``P checked`` the node-wide counters (``totals``, the size of ``x`` and its first and last
  entries) as a node of this layout last left them: a connect that finds them so skips the
  full index check

Every write is one Lua script (atomic: a put cannot slip past a concurrent delete, and a
duplicate never takes a seq). Scripts build key names from the prefix, so this backend targets
a standalone Redis (or one hash slot), not Redis Cluster.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import os
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, ParamSpec, TypeVar

import redis.asyncio as aioredis
from dna_core.errors import DnaError
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, ReadOnlyError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from dna_storage.backends.base import (
    MailboxDigest,
    Page,
    PutOutcome,
    Quota,
    StorageFullError,
    StoredBlob,
    StoreUnavailableError,
    SyncIndex,
    Tombstone,
    TombstoneBounds,
    Usage,
)
from dna_storage.backends.common import (
    check_limit,
    decode_pow,
    delete_steps,
    encode_pow,
    in_range,
    mailbox_digest,
    per_authorization,
    refused_at_step,
    unique,
)

log = logging.getLogger("dna.storage.redis")
# What "acknowledged = durable" needs from the server, and why (docs/operations.md).
DURABLE_CONFIG = {
    "appendonly": ("yes", "without the AOF, writes since the last snapshot die with the server"),
    "appendfsync": ("always", "otherwise the last ~1 s of acknowledged writes can be lost"),
    "maxmemory-policy": ("noeviction", "an evicting policy silently drops stored blobs"),
}
_OUTCOMES = [
    PutOutcome.STORED, PutOutcome.DUPLICATE, PutOutcome.TOMBSTONED, PutOutcome.EXPIRED,
    PutOutcome.OVER_QUOTA,
]  # fmt: skip
_NO_ROOM = ("OOM", "MISCONF")  # replies of a Redis that refuses writes for lack of room
REDIS_CONNECTIONS = 64  # to the Redis server, shared by every call of the node
REDIS_WAIT_S = 30.0  # a call waits this long for a free connection, then fails
# A server that stops answering (hung, or cut off without a reset) fails a call after this
# long (StoreUnavailableError) instead of holding it and its connection: redis-py's default
# since 6.x, set here so an upgrade of it does not change it (docs/operations.md).
REDIS_TIMEOUT_S = 5.0
_PIPELINE_CHUNK = 256  # commands per pipeline round trip
# The key layout's version (``P layout``; absent: 1). 2: no key has a native TTL (in 1, blob,
# tombstone and signed delete keys had a PEXPIREAT, the Redis server's clock). 3: each mailbox's
# blob and tombstone IDs are indexed by ID (``l:M``, ``tl:M``: sync list pages read a page).
# 4: tombstones stored for IDs not held are marked (``tu:M``) and counted, and every write
# leaves ``P checked`` (a node of layout 3 would keep neither, and refuses a layout 4 store).
LAYOUT = 4
_SCAN_CHUNK = 64  # index entries per fetch round trip (beyond limit + 1)
# A mailbox holding more expired blobs (GC has not reached) than live ones, and no more live
# ones than this, is paged from its live blobs (``e:M`` past now), not by walking its seq
# index past every expired entry: 100,000 expired took 3.5 s a fetch (one round trip per
# ``_SCAN_CHUNK``).
_FEW_LIVE = 4096
_ID_CHUNK = 4096  # IDs per round trip when a mailbox's whole ID index is read (repair)
WRITE_CHUNK = 100  # tombstones (or IDs forgotten) per script: each holds the whole server
EXPIRY_HOUR_MS = 3_600_000  # the width of an ``eh:`` bucket (the scripts say 3600000)
_BLOB_FIELDS = ["d", "s", "e", "q", "w"]
# Replies of a store that cannot serve now (down, restarting, loading its data, a read-only
# replica, too slow): UNAVAILABLE, not a bug (``StoreUnavailableError``).
_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, ReadOnlyError)
P = ParamSpec("P")
T = TypeVar("T")


class StoreLayoutError(DnaError):
    """The store was written by a node of a newer key layout (``LAYOUT``): refused at
    connect, not served half-understood."""


# Helpers shared by every script: ARGV[1] is always the prefix.
_PRELUDE = """
local P = ARGV[1]
local function bkey(mb, id) return P .. 'b:' .. mb .. ':' .. id end
local function tkey(mb, id) return P .. 't:' .. mb .. ':' .. id end
local function count_hour(mb, expires, size)
  local hour = math.floor(tonumber(expires) / 3600000)
  if redis.call('HINCRBY', P .. 'eh:' .. mb, hour, size) <= 0 then
    redis.call('HDEL', P .. 'eh:' .. mb, hour)
  end
end
local function drop_blob(mb, id)
  local size = tonumber(redis.call('HGET', P .. 'z:' .. mb, id) or '0')
  local expires = redis.call('ZSCORE', P .. 'e:' .. mb, id)
  if redis.call('ZREM', P .. 'e:' .. mb, id) == 1 then
    count_hour(mb, expires, -size)
    redis.call('HINCRBY', P .. 'u:' .. mb, 'bytes', -size)
    redis.call('HINCRBY', P .. 'totals', 'blobs', -1)
    redis.call('HINCRBY', P .. 'totals', 'bytes', -size)
  end
  redis.call('ZREM', P .. 's:' .. mb, id)
  redis.call('ZREM', P .. 'l:' .. mb, id)
  redis.call('HDEL', P .. 'z:' .. mb, id)
  redis.call('ZREM', P .. 'x', 'b:' .. mb .. ':' .. id)
  redis.call('DEL', bkey(mb, id))
end
local function skey(h) return P .. 'sd:' .. h end
local function count_signed_delete(sign, size)
  redis.call('HINCRBY', P .. 'totals', 'signed_deletes', sign)
  redis.call('HINCRBY', P .. 'totals', 'signed_delete_bytes', sign * size)
end
-- Release the tombstone's signed delete; the last reference removes it.
local function unref_tomb(mb, id)
  local h = redis.call('HGET', P .. 'tr:' .. mb, id)
  if not h then return end  -- none, or one stored with its authorization inline
  redis.call('HDEL', P .. 'tr:' .. mb, id)
  if redis.call('HINCRBY', P .. 'sr', h, -1) > 0 then return end
  count_signed_delete(-1, tonumber(redis.call('HGET', P .. 'sz', h) or '0'))
  redis.call('HDEL', P .. 'sr', h)
  redis.call('HDEL', P .. 'sz', h)
  redis.call('DEL', skey(h))
end
-- Reference signed delete h from tombstone (mb, id); store it if this is its first.
local function ref_tomb(mb, id, h, auth)
  redis.call('HSET', P .. 'tr:' .. mb, id, h)
  if redis.call('HINCRBY', P .. 'sr', h, 1) == 1 then
    redis.call('HSET', P .. 'sz', h, #auth)
    count_signed_delete(1, #auth)
  end
  redis.call('HSETNX', skey(h), 'a', auth)  -- again if its key vanished
end
-- The node-wide count of tombstones for IDs not held follows ``tu:M`` (HDEL says whether the
-- tombstone was one), so it stays exact whatever else of the tombstone vanished.
local function mark_unheld(mb, id)
  if redis.call('HSET', P .. 'tu:' .. mb, id, 1) == 1 then
    redis.call('HINCRBY', P .. 'totals', 'unheld_tombstones', 1)
  end
end
local function unmark_unheld(mb, id)
  if redis.call('HDEL', P .. 'tu:' .. mb, id) == 1 then
    redis.call('HINCRBY', P .. 'totals', 'unheld_tombstones', -1)
  end
end
-- A mark naming no tombstone is one an older node's GC left (layout 2 kept no marks): not
-- counted since the full check (``RedisBackend._index_ids``), so dropped without counting.
local function drop_stale_mark(mb, id)
  if not redis.call('ZSCORE', P .. 'ti:' .. mb, id) then
    redis.call('HDEL', P .. 'tu:' .. mb, id)
  end
end
local function drop_tomb(mb, id)
  unmark_unheld(mb, id)
  unref_tomb(mb, id)
  redis.call('ZREM', P .. 'ti:' .. mb, id)
  redis.call('ZREM', P .. 'tl:' .. mb, id)
  redis.call('ZREM', P .. 'x', 't:' .. mb .. ':' .. id)
  redis.call('DEL', tkey(mb, id))
end
-- What a node of this layout last left the store as: the node-wide counters every layout
-- keeps (an older node writing here changes them), set by each write script that found
-- them as last left and by the full index check (``RedisBackend._index_ids``). A connect
-- that finds them so skips that check (O(1)); one that does not (an older node wrote, or
-- a check was cut short) runs it.
-- The GC queue's first and last entries are in it too: an older node's GC takes the first
-- and its delete adds a last one (expiring a tombstone lifetime from now, after every
-- entry before it), so writes that balance the counts (a put and a GC) still show.
local function written_state()
  local t = redis.call('HMGET', P .. 'totals', 'blobs', 'bytes', 'signed_deletes',
    'signed_delete_bytes')
  local parts = {}
  for i = 1, 4 do parts[i] = tostring(tonumber(t[i] or '0')) end
  parts[5] = tostring(redis.call('ZCARD', P .. 'x'))
  for _, ends in ipairs({{0, 0}, {-1, -1}}) do
    local item = redis.call('ZRANGE', P .. 'x', ends[1], ends[2], 'WITHSCORES')
    parts[#parts + 1] = (item[1] or '') .. '@' .. (item[2] or '')
  end
  return table.concat(parts, ' ')
end
local function as_left() return redis.call('GET', P .. 'checked') == written_state() end
local function leave(was) if was then redis.call('SET', P .. 'checked', written_state()) end end
-- A mailbox's live blobs and their bytes at ``now``: the bytes held minus the hours of
-- expiry gone (``eh:``) and the blobs of this hour that expired. Reading every expired
-- blob's size held the server 205 ms a put at 100,000 expired GC had not reached.
local function live_usage(mb, now)
  local count = redis.call('ZCOUNT', P .. 'e:' .. mb, '(' .. now, '+inf')
  local bytes = tonumber(redis.call('HGET', P .. 'u:' .. mb, 'bytes') or '0')
  local hour = math.floor(tonumber(now) / 3600000)
  local hours = redis.call('HGETALL', P .. 'eh:' .. mb)
  for i = 1, #hours, 2 do
    if tonumber(hours[i]) < hour then bytes = bytes - tonumber(hours[i + 1]) end
  end
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', P .. 'e:' .. mb, hour * 3600000, now)) do
    bytes = bytes - tonumber(redis.call('HGET', P .. 'z:' .. mb, id) or '0')
  end
  return count, bytes
end
local function prune_mailbox(mb)
  if redis.call('ZCARD', P .. 'e:' .. mb) == 0 and redis.call('ZCARD', P .. 'ti:' .. mb) == 0 then
    redis.call('ZREM', P .. 'm', mb)
    redis.call('DEL', P .. 'u:' .. mb, P .. 'z:' .. mb, P .. 's:' .. mb, P .. 'tr:' .. mb,
      P .. 'l:' .. mb, P .. 'tl:' .. mb, P .. 'eh:' .. mb, P .. 'tu:' .. mb)
  end
end
"""

# ARGV: prefix, now, the quota's blobs and bytes (0: none, ``Quota``), then (mailbox,
# blob_id, blob, stored_ms, expires_ms, pow) per blob (pow: "" when none is kept).
# Returns one code per blob: 0 stored, 1 duplicate, 2 tombstoned, 3 expired, 4 over the
# quota (nothing of it written: judged before its writes, atomically with them).
_PUT = """
local now = tonumber(ARGV[2])
local max_blobs, max_bytes = tonumber(ARGV[3]), tonumber(ARGV[4])
-- Mailbox -> {blobs, bytes, exact} it holds: read at its first blob, counted on. First
-- what it holds with the expired blobs GC has not reached (two O(1) reads): a blob that
-- fits that fits; one that does not is judged against ``live_usage`` (what the admission
-- reads; its HGETALL of up to 720 hours of expiry held the server ~0.5 ms), read then:
-- this script's blobs stored so far included.
local room = {}
local function over(held, size) return held[1] >= max_blobs or held[2] + size > max_bytes end
local function fits(mb, size, grows)
  if max_blobs == 0 or not grows then return true end
  local held = room[mb]
  if not held then
    held = {redis.call('ZCARD', P .. 'e:' .. mb),
            tonumber(redis.call('HGET', P .. 'u:' .. mb, 'bytes') or '0'), false}
  end
  if not held[3] and over(held, size) then
    local count, bytes = live_usage(mb, now)
    held = {count, bytes, true}
  end
  room[mb] = held
  if over(held, size) then return false end
  held[1], held[2] = held[1] + 1, held[2] + size
  return true
end
local function put_one(mb, id, blob, stored, expires, proof)
  if tonumber(expires) <= now then return 3 end
  local texp = redis.call('ZSCORE', P .. 'ti:' .. mb, id)
  if texp and tonumber(texp) > now then return 2 end
  local held = redis.call('ZSCORE', P .. 'e:' .. mb, id)
  local live = held and tonumber(held) > now
  if live and redis.call('EXISTS', bkey(mb, id)) == 1 then return 1 end
  -- A live index entry whose key vanished is in the usage already: its copy does not grow it.
  if not fits(mb, #blob, not live) then return 4 end
  if held then drop_blob(mb, id) end
  local seq = redis.call('INCR', P .. 'q:' .. mb)
  redis.call('HSET', bkey(mb, id), 'd', blob, 's', stored, 'e', expires, 'q', seq)
  if proof ~= '' then redis.call('HSET', bkey(mb, id), 'w', proof) end
  redis.call('ZADD', P .. 's:' .. mb, seq, id)
  redis.call('ZADD', P .. 'e:' .. mb, expires, id)
  redis.call('ZADD', P .. 'l:' .. mb, 0, id)
  redis.call('HSET', P .. 'z:' .. mb, id, #blob)
  redis.call('HINCRBY', P .. 'u:' .. mb, 'bytes', #blob)
  count_hour(mb, expires, #blob)
  redis.call('HINCRBY', P .. 'totals', 'blobs', 1)
  redis.call('HINCRBY', P .. 'totals', 'bytes', #blob)
  redis.call('ZADD', P .. 'x', expires, 'b:' .. mb .. ':' .. id)
  redis.call('ZADD', P .. 'm', 0, mb)
  return 0
end
local was = as_left()
local out = {}
for i = 5, #ARGV, 6 do
  out[#out + 1] = put_one(ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4], ARGV[i + 5])
end
leave(was)
return out
"""

# ARGV: prefix, now, the mailbox's and the node's bounds for tombstones for IDs not held (0:
# none, ``TombstoneBounds``), n, n x (digest, signed delete), then (mailbox, blob_id,
# deleted_ms, expires_ms, digest) each: a signed delete crosses once, however many tombstones
# it has. Returns {live blobs dropped}; or, over a bound, {-1, scope (0 the mailbox's, 1 the
# node's), what the mailbox or the node holds, the tombstones for IDs not held it would add},
# having written nothing: the script judges every tombstone before it writes any.
_DELETE = """
local now = tonumber(ARGV[2])
local box_bound, node_bound = tonumber(ARGV[3]), tonumber(ARGV[4])
local auths, first = {}, 6 + 2 * tonumber(ARGV[5])
for i = 6, first - 1, 2 do auths[ARGV[i]] = ARGV[i + 1] end
-- What a tombstone does, read-only: whether it drops a live blob, its expiry (extended to
-- outlive that blob), whether it is stored, whether it is for an ID held neither as a live
-- blob nor as a live tombstone of a held ID (the service's ``held``), and whether the one
-- it replaces was counted so.
local function judge(mb, id, expires)
  local removed = 0
  local held = redis.call('ZSCORE', P .. 'e:' .. mb, id)
  if held and tonumber(held) > now and redis.call('EXISTS', bkey(mb, id)) == 1 then
    removed = 1
    if tonumber(held) > tonumber(expires) then expires = held end
  end
  if tonumber(expires) <= now then return removed, expires, false, false, false end
  local old = redis.call('ZSCORE', P .. 'ti:' .. mb, id)
  if old and tonumber(old) >= tonumber(expires) then
    return removed, expires, false, false, false
  end
  local was = old and redis.call('HEXISTS', P .. 'tu:' .. mb, id) == 1
  local unheld = removed == 0 and ((not old) or tonumber(old) <= now or was)
  return removed, expires, true, unheld, was
end
local function delete_one(mb, id, deleted, expires, h)
  local removed, stored, unheld
  removed, expires, stored, unheld = judge(mb, id, expires)
  if redis.call('ZSCORE', P .. 'e:' .. mb, id) then drop_blob(mb, id) end
  if not stored then
    prune_mailbox(mb)
    return removed
  end
  drop_stale_mark(mb, id)
  if unheld then mark_unheld(mb, id) else unmark_unheld(mb, id) end
  unref_tomb(mb, id)
  redis.call('DEL', tkey(mb, id))
  ref_tomb(mb, id, h, auths[h])
  redis.call('HSET', tkey(mb, id), 'd', deleted, 'e', expires)
  redis.call('ZADD', P .. 'ti:' .. mb, expires, id)
  redis.call('ZADD', P .. 'tl:' .. mb, 0, id)
  redis.call('ZADD', P .. 'x', expires, 't:' .. mb .. ':' .. id)
  redis.call('ZADD', P .. 'm', 0, mb)
  return removed
end
-- How much each mailbox's, and the node's, count of tombstones for IDs not held would grow
-- (an ID named twice counted at its first: the second finds the first's tombstone live).
local function growth()
  local grown, node, seen = {}, 0, {}
  for i = first, #ARGV, 5 do
    local mb, id = ARGV[i], ARGV[i + 1]
    if not seen[mb .. id] then
      local _, _, stored, unheld, was = judge(mb, id, ARGV[i + 3])
      if stored then
        seen[mb .. id] = true
        local d = (unheld and 1 or 0) - (was and 1 or 0)
        grown[mb] = (grown[mb] or 0) + d
        node = node + d
      end
    end
  end
  return grown, node
end
if box_bound > 0 or node_bound > 0 then
  local grown, node = growth()
  for mb, d in pairs(grown) do
    local held = redis.call('ZCARD', P .. 'ti:' .. mb)
    if box_bound > 0 and d > 0 and held + d > box_bound then return {-1, 0, held, d} end
  end
  local held = tonumber(redis.call('HGET', P .. 'totals', 'unheld_tombstones') or '0')
  if node_bound > 0 and node > 0 and held + node > node_bound then return {-1, 1, held, node} end
end
local was = as_left()
local removed = 0
for i = first, #ARGV, 5 do
  removed = removed + delete_one(ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4])
end
leave(was)
return {removed}
"""

# ARGV: prefix, now, limit. Oldest expiry first; ties: blobs ('b:') before tombstones ('t:').
_EXPIRE = """
local was = as_left()
local items = redis.call('ZRANGEBYSCORE', P .. 'x', '-inf', ARGV[2], 'LIMIT', 0, ARGV[3])
for _, item in ipairs(items) do
  local kind, mb, id = string.match(item, '^(%a):(%x*):(%x*)$')
  if kind == 'b' then drop_blob(mb, id) else drop_tomb(mb, id) end
  redis.call('ZREM', P .. 'x', item)
  prune_mailbox(mb)
end
leave(was)
return #items
"""

# ARGV: prefix, mailbox, number of blob IDs, the blob IDs, then the tombstone IDs.
# Drops them without a tombstone; the seq counter stays. Returns how many were held.
_FORGET = """
local mb, blobs = ARGV[2], tonumber(ARGV[3])
local was = as_left()
local removed = 0
for i = 4, #ARGV do
  local id = ARGV[i]
  if i < 4 + blobs then
    if redis.call('ZSCORE', P .. 'e:' .. mb, id) then removed = removed + 1 end
    drop_blob(mb, id)
  else
    if redis.call('ZSCORE', P .. 'ti:' .. mb, id) then removed = removed + 1 end
    drop_tomb(mb, id)
  end
end
prune_mailbox(mb)
leave(was)
return removed
"""

# ARGV: prefix, mailbox, then blob IDs whose payload key a read found missing.
# Drops them only if the key is still missing (a concurrent re-put may have restored it).
_CLEAN = """
local mb = ARGV[2]
local was = as_left()
local cleaned = 0
for i = 3, #ARGV do
  if redis.call('EXISTS', bkey(mb, ARGV[i])) == 0 then
    drop_blob(mb, ARGV[i])
    cleaned = cleaned + 1
  end
end
prune_mailbox(mb)
leave(was)
return cleaned
"""

# ARGV: prefix, mailbox, now. Returns {live blobs, their bytes} (``live_usage``).
_USAGE = """
local count, bytes = live_usage(ARGV[2], ARGV[3])
return {count, bytes}
"""

# ARGV: prefix, then mailboxes. Returns "mailbox expiry index" for each ID index (``l:``,
# ``tl:``) whose size differs from its expiry index's (``e:``, ``ti:``), and "mailbox e eh"
# for a mailbox whose bytes per hour of expiry do not add up to its bytes: ones to rebuild.
_INDEX_CHECK = """
local stale = {}
for i = 2, #ARGV do
  local mb = ARGV[i]
  for _, pair in ipairs({{'e', 'l'}, {'ti', 'tl'}}) do
    local e, l = pair[1], pair[2]
    if redis.call('ZCARD', P .. e .. ':' .. mb) ~= redis.call('ZCARD', P .. l .. ':' .. mb) then
      stale[#stale + 1] = mb .. ' ' .. e .. ' ' .. l
    end
  end
  local hours = 0
  for _, n in ipairs(redis.call('HVALS', P .. 'eh:' .. mb)) do hours = hours + tonumber(n) end
  if hours ~= tonumber(redis.call('HGET', P .. 'u:' .. mb, 'bytes') or '0') then
    stale[#stale + 1] = mb .. ' e eh'
  end
end
return stale
"""


# ARGV: prefix, then mailboxes. Drops each mailbox's marks of tombstones for IDs not held
# (``tu:M``) that name no tombstone (an older node's GC removed it and kept no marks), and
# returns how many marks are left: the node-wide count, summed over every mailbox.
_UNHELD_RECOUNT = """
local count = 0
for i = 2, #ARGV do
  local mb = ARGV[i]
  for _, id in ipairs(redis.call('HKEYS', P .. 'tu:' .. mb)) do
    drop_stale_mark(mb, id)
  end
  count = count + redis.call('HLEN', P .. 'tu:' .. mb)
end
return count
"""


async def durability_problems(client: aioredis.Redis) -> list[str]:
    """What in the server's configuration breaks "an acknowledged write is durable"."""
    problems = []
    for name, (wanted, why) in DURABLE_CONFIG.items():
        try:
            reply: dict[Any, Any] = await client.config_get(name)
        except ResponseError as exc:  # CONFIG renamed or forbidden (managed Redis)
            return [f"cannot read the configuration ({exc}); check {', '.join(DURABLE_CONFIG)}"]
        raw = next(iter(reply.values()), b"")
        value = raw.decode() if isinstance(raw, bytes) else str(raw)
        if value != wanted:
            problems.append(f"{name} is {value!r}, not {wanted!r}: {why}")
    return problems


def _hex(data: bytes) -> str:
    return data.hex()


def _unhex(member: bytes | str) -> bytes:
    """An ID back from a hex zset member (bytes with this client; str tolerated)."""
    return bytes.fromhex(member.decode() if isinstance(member, bytes) else member)


def _auth_digest(authorization: bytes) -> str:
    """The key a signed delete is stored under (content-addressed: equal bytes, one key)."""
    return hashlib.sha256(authorization).hexdigest()


def _live(ids: Sequence[bytes], scores: Sequence[float | None], now_ms: int) -> set[bytes]:
    """The IDs whose expiry score is past ``now_ms`` (a missing member scores None)."""
    return {i for i, score in zip(ids, scores, strict=True) if score is not None and score > now_ms}


def _ids_of(reply: Iterable[Any]) -> list[bytes]:
    return [_unhex(m) for m in reply]


def _unavailable_as_ours(method: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    @functools.wraps(method)
    async def mapped(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await method(*args, **kwargs)
        except _UNAVAILABLE as exc:
            raise StoreUnavailableError(f"the mailbox store is unavailable: redis: {exc}") from exc

    return mapped


def _store_errors_mapped(cls: type[T]) -> type[T]:
    """Every public coroutine of the backend answers a store that cannot serve with
    ``StoreUnavailableError``: one place at the boundary, so no caller sees a Redis
    exception (before, each request then logged a traceback and answered INTERNAL)."""
    for name, attr in list(vars(cls).items()):
        if not name.startswith("_") and inspect.iscoroutinefunction(attr):
            setattr(cls, name, _unavailable_as_ours(attr))
    return cls


@_store_errors_mapped
class RedisBackend:
    """``MailboxBackend`` on a Redis server (see the module docstring for the layout)."""

    def __init__(self, client: aioredis.Redis, prefix: str) -> None:
        self._r = client
        self._p = prefix
        self._put = client.register_script(_PRELUDE + _PUT)
        self._delete = client.register_script(_PRELUDE + _DELETE)
        self._expire = client.register_script(_PRELUDE + _EXPIRE)
        self._clean = client.register_script(_PRELUDE + _CLEAN)
        self._forget = client.register_script(_PRELUDE + _FORGET)
        self._usage = client.register_script(_PRELUDE + _USAGE)
        self._index_check = client.register_script(_PRELUDE + _INDEX_CHECK)
        self._unheld_recount = client.register_script(_PRELUDE + _UNHELD_RECOUNT)
        self._as_left = client.register_script(_PRELUDE + "return as_left() and 1 or 0")
        self._leave = client.register_script(_PRELUDE + "leave(true)")

    @classmethod
    async def connect(cls, url: str, *, prefix: str = "dna:") -> RedisBackend:
        """Connect and check the server answers (fail at startup, not on the first put)."""
        # A blocking pool: a call finding every connection in use waits for one. redis-py's
        # default pool refuses it instead (MaxConnectionsError at 100): 100 clients fetching
        # at once failed some of their fetches with INTERNAL. The cap also bounds what the
        # node holds of replies in flight. A call whose connection turns out closed is made
        # once more on a new one: after the server restarted, every pooled connection is
        # closed, and each failed its next call (40 puts at once after a restart: 40
        # failed, the server up). Safe, as every write here is idempotent.
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=REDIS_CONNECTIONS, timeout=REDIS_WAIT_S, decode_responses=False,
            socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )  # fmt: skip
        client = aioredis.Redis(connection_pool=pool)
        try:
            await client.ping()
        except BaseException:
            await client.aclose()
            raise
        for problem in await durability_problems(client):
            log.warning("redis is not configured for durable writes: %s", problem)
        backend = cls(client, prefix)
        try:
            await backend._upgrade_layout()
        except BaseException:
            await client.aclose()
            raise
        return backend

    async def _upgrade_layout(self) -> None:
        """Bring a store of an older key layout to ``LAYOUT`` (each step idempotent: one
        cut short is made again at the next connect), or refuse one of a newer layout,
        whose writes this node would not keep consistent."""
        layout = int(await self._r.get(self._p + "layout") or 1)
        if layout > LAYOUT:
            raise StoreLayoutError(
                f"the store at prefix {self._p!r} has key layout {layout}, newer than this"
                f" node's {LAYOUT}: run a node of that version (or newer)"
            )
        if layout < 2:
            await self._remove_native_expiry()
        if layout < LAYOUT or not await self._as_left(keys=[], args=[self._p]):
            await self._index_ids()
            await self._leave(keys=[], args=[self._p])  # only once the check is complete
        if layout < LAYOUT:
            await self._r.set(self._p + "layout", LAYOUT)

    async def _index_ids(self) -> None:
        """Layout 3: each mailbox's blob and tombstone IDs indexed by ID (``l:M``, ``tl:M``).
        Run at the upgrade, and at a connect after a node of layout 2 started on the store
        (a downgrade: it writes without the index, and does not keep ``P checked``), or
        after a check cut short (it sets ``P checked`` only at its end). A mailbox whose ID
        index and expiry index differ in size has its ID index rebuilt from the expiry
        index (four ``ZCARD`` per mailbox, in a script per 4,096: 0.22 s per 10,000
        mailboxes, and the rebuild reads only the mailboxes that need it). The node's count
        of tombstones for IDs not held is counted again from the marks (``tu:M``), those of
        tombstones an older node's GC removed dropped: it kept the count too high by them."""
        mailboxes: list[str] = []
        unheld = 0
        async for member, _ in self._r.zscan_iter(self._p + "m", count=_ID_CHUNK):
            mailboxes.append(member.decode() if isinstance(member, bytes) else member)
            if len(mailboxes) >= _ID_CHUNK:
                unheld += await self._reindex(mailboxes)
        unheld += await self._reindex(mailboxes)
        await self._r.hset(self._p + "totals", "unheld_tombstones", unheld)

    async def _reindex(self, mailboxes: list[str]) -> int:
        """Rebuild the ID indexes of those of ``mailboxes`` that differ from their expiry
        indexes (``_index_ids``; compared by one script per chunk), and empty the list;
        returns their tombstones for IDs not held."""
        if not mailboxes:
            return 0
        unheld = int(await self._unheld_recount(keys=[], args=[self._p, *mailboxes]))
        stale: list[Any] = await self._index_check(keys=[], args=[self._p, *mailboxes])
        for item in stale:
            mailbox, expiry, index = (item.decode() if isinstance(item, bytes) else item).split()
            if index == "eh":
                await self._recount_hours(mailbox)
                continue
            ids: list[Any] = await self._r.zrange(f"{self._p}{expiry}:{mailbox}", 0, -1)
            await self._r.delete(f"{self._p}{index}:{mailbox}")
            for i in range(0, len(ids), _ID_CHUNK):
                await self._r.zadd(
                    f"{self._p}{index}:{mailbox}", dict.fromkeys(ids[i : i + _ID_CHUNK], 0)
                )
        mailboxes.clear()
        return unheld

    async def _recount_hours(self, mailbox: str) -> None:
        """Rebuild a mailbox's bytes per hour of expiry (``eh:M``) from its expiry index and
        sizes (layout 3; a store an older node wrote to)."""
        expiries: list[Any] = await self._r.zrange(f"{self._p}e:{mailbox}", 0, -1, withscores=True)
        sizes: dict[Any, Any] = await self._r.hgetall(f"{self._p}z:{mailbox}")
        hours: dict[int, int] = {}
        for member, expires in expiries:
            hour = int(expires) // EXPIRY_HOUR_MS
            hours[hour] = hours.get(hour, 0) + int(sizes.get(member, 0))
        await self._r.delete(f"{self._p}eh:{mailbox}")
        if hours:
            await self._r.hset(f"{self._p}eh:{mailbox}", mapping=hours)  # type: ignore[arg-type]

    async def _remove_native_expiry(self) -> None:
        """Keys written by a node of layout 1 expire natively, by the Redis server's clock:
        remove those TTLs (``PERSIST``) once, walking the GC queue (blob and tombstone keys)
        and the signed delete references (``sd:`` keys), so GC alone removes them."""
        keys: list[str] = []
        async for member, _ in self._r.zscan_iter(self._p + "x", count=_PIPELINE_CHUNK):
            keys.append(self._p + (member.decode() if isinstance(member, bytes) else member))
            if len(keys) >= _PIPELINE_CHUNK:
                await self._persist(keys)
        async for digest, _ in self._r.hscan_iter(self._p + "sr", count=_PIPELINE_CHUNK):
            keys.append(f"{self._p}sd:{digest.decode() if isinstance(digest, bytes) else digest}")
            if len(keys) >= _PIPELINE_CHUNK:
                await self._persist(keys)
        await self._persist(keys)

    async def _persist(self, keys: list[str]) -> None:
        """``PERSIST`` each key (one round trip), and empty the list."""
        async with self._r.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.persist(key)
            await pipe.execute()
        keys.clear()

    async def incarnation(self) -> bytes:
        """Read on every call, not cached: a Redis flushed under a running node must not
        keep answering with the incarnation of the data it lost."""
        key = f"{self._p}incarnation"
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.set(key, os.urandom(8), nx=True)
            pipe.get(key)
            _, value = await pipe.execute()
        return bytes(value)

    async def _write(self, script: Any, args: list[Any]) -> Any:
        """Run a writing script; Redis out of memory (``maxmemory`` with ``noeviction``) or
        refusing writes after a failed snapshot (MISCONF) is a lack of room, not a bug."""
        try:
            return await script(keys=[], args=args)
        except ResponseError as exc:
            if isinstance(exc, OutOfMemoryError) or str(exc).startswith(_NO_ROOM):
                raise StorageFullError(f"storage is full: redis: {exc}") from exc
            raise

    def _key(self, kind: str, mailbox_id: bytes, blob_id: bytes | None = None) -> str:
        tail = "" if blob_id is None else ":" + _hex(blob_id)
        return f"{self._p}{kind}:{_hex(mailbox_id)}{tail}"

    async def put_many(
        self, blobs: Sequence[StoredBlob], now_ms: int, quota: Quota | None = None
    ) -> list[PutOutcome]:
        """One script; with ``quota``, each blob judged against it in the script, before
        its writes (atomic: no other write runs between)."""
        if not blobs:
            return []
        limits = [0, 0] if quota is None else [quota.max_blobs, quota.max_bytes]
        args: list[Any] = [self._p, now_ms, *limits]
        for b in blobs:
            args += [_hex(b.mailbox_id), _hex(b.blob_id), b.blob, b.stored_ms, b.expires_ms]
            args.append(encode_pow(b.pow) or b"")
        codes = await self._write(self._put, args)
        return [_OUTCOMES[int(c)] for c in codes]

    async def delete(
        self, tombstones: Sequence[Tombstone], now_ms: int, bounds: TombstoneBounds | None = None
    ) -> int:
        """One script per ``WRITE_CHUNK`` tombstones: a script holds the whole Redis server,
        every other client's call waiting (1,000 in one: 47 ms). With ``bounds``, those for
        IDs not held first, in one script (``delete_steps``), each script judging them
        against the bounds before it writes anything."""
        digests = per_authorization([t.authorization for t in tombstones], _auth_digest)
        held = None if bounds is None else self.held
        pairs = list(zip(tombstones, digests, strict=True))
        limits = [0, 0] if bounds is None else [bounds.mailbox, bounds.node]
        removed = 0
        for n, part in enumerate(await delete_steps(pairs, WRITE_CHUNK, now_ms, held)):
            auths = {digest: t.authorization for t, digest in part}
            args: list[Any] = [self._p, now_ms, *limits, len(auths)]
            for digest, auth in auths.items():
                args += [digest, auth]
            for t, digest in part:
                args += [_hex(t.mailbox_id), _hex(t.blob_id), t.deleted_ms, t.expires_ms, digest]
            reply = await self._write(self._delete, args)
            if int(reply[0]) < 0:
                assert bounds is not None  # the script refuses only against bounds given
                _, scope, holds, unheld = map(int, reply)
                check = bounds.check_mailbox if scope == 0 else bounds.check_node
                with refused_at_step(n):
                    check(holds, unheld)  # raises: the same refusal as the admission's
            removed += int(reply[0])
        return removed

    async def expire(self, now_ms: int, limit: int) -> int:
        """One script per ``WRITE_CHUNK``, as ``delete`` (1,000 in one: 27 ms of the server)."""
        removed = 0
        while removed < limit:
            step = min(WRITE_CHUNK, limit - removed)
            done = int(await self._write(self._expire, [self._p, now_ms, step]))
            removed += done
            if done < step:
                break
        return removed

    async def forget(
        self, mailbox_id: bytes, blob_ids: Sequence[bytes], tombstone_ids: Sequence[bytes]
    ) -> int:
        blobs, tombs = unique(blob_ids), unique(tombstone_ids)
        removed = 0
        for i in range(0, len(blobs) + len(tombs), WRITE_CHUNK):  # one script each, as delete
            part_blobs = [_hex(b) for b in blobs[i : i + WRITE_CHUNK]]
            part_tombs = tombs[max(0, i - len(blobs)) : max(0, i + WRITE_CHUNK - len(blobs))]
            args: list[Any] = [self._p, _hex(mailbox_id), len(part_blobs), *part_blobs]
            removed += int(await self._write(self._forget, [*args, *map(_hex, part_tombs)]))
        return removed

    async def fetch(
        self, mailbox_id: bytes, cursor: int, limit: int, now_ms: int, max_bytes: int = 0
    ) -> Page:
        """Walk the seq index in chunks until ``limit + 1`` live blobs are found, it ends,
        or (``max_bytes``) the next blob's size, read first, would pass the budget. Expired
        entries are dropped by their expiry scores before any size or payload is read: read
        and counted in the budget, 50,000 expired blobs of 2 KB GC had not reached made a
        fetch 48 empty pages and 5.6 s."""
        check_limit(limit)
        entries_after = await self._seq_entries(mailbox_id, cursor, now_ms)
        live: list[StoredBlob] = []
        position, size = cursor, 0
        while len(live) <= limit:
            want = limit + 1 - len(live) + _SCAN_CHUNK
            entries = await entries_after(position, want)
            chunk = await self._unexpired(mailbox_id, entries, now_ms)
            over = False
            if max_bytes and chunk:
                chunk, over = await self._within(mailbox_id, chunk, max_bytes - size, bool(live))
            if chunk:
                loaded = await self._load(mailbox_id, chunk, now_ms)
                live += loaded
                size += sum(len(b.blob) for b in loaded)
            if over:  # the next blob would pass the budget: the page ends at the last taken
                page = live[:limit]
                return Page(page, page[-1].seq if page else chunk[-1][1], True)
            if len(entries) < want:
                break
            position = entries[-1][1]
        page = live[:limit]
        return Page(page, page[-1].seq if page else cursor, len(live) > limit)

    async def _seq_entries(
        self, mailbox_id: bytes, cursor: int, now_ms: int
    ) -> Callable[[int, int], Awaitable[list[tuple[bytes, int]]]]:
        """Where a fetch reads its (blob ID, seq) entries past a position, ``want`` at a
        time, in seq order: the seq index, or, for a mailbox of few live blobs behind an
        expired backlog (``_FEW_LIVE``), its live blobs read once (two counts and, only
        then, the live IDs and their seqs: O(live), not O(expired))."""
        expiry = self._key("e", mailbox_id)
        async with self._r.pipeline(transaction=False) as pipe:
            pipe.zcard(expiry)
            pipe.zcount(expiry, "-inf", now_ms)
            held, expired = await pipe.execute()
        few = int(held) - int(expired)
        if few <= _FEW_LIVE and int(expired) > few:
            ids: list[Any] = await self._r.zrangebyscore(expiry, f"({now_ms}", "+inf")
            seqs = await self._r.zmscore(self._key("s", mailbox_id), ids) if ids else []
            found = [(_unhex(i), int(q)) for i, q in zip(ids, seqs, strict=True) if q is not None]
            ordered = sorted((e for e in found if e[1] > cursor), key=lambda e: e[1])

            async def from_live(position: int, want: int) -> list[tuple[bytes, int]]:
                return [e for e in ordered if e[1] > position][:want]

            return from_live

        async def from_index(position: int, want: int) -> list[tuple[bytes, int]]:
            reply: list[Any] = await self._r.zrangebyscore(
                self._key("s", mailbox_id), f"({position}", "+inf", 0, want, withscores=True
            )
            return [(_unhex(member), int(score)) for member, score in reply]

        return from_index

    async def _unexpired(
        self, mailbox_id: bytes, entries: list[tuple[bytes, int]], now_ms: int
    ) -> list[tuple[bytes, int]]:
        """The index entries whose blobs have not expired, by the expiry index's scores."""
        if not entries:
            return []
        expires = await self._r.zmscore(self._key("e", mailbox_id), [_hex(i) for i, _ in entries])
        return [
            entry for entry, e in zip(entries, expires, strict=True) if e is not None and e > now_ms
        ]

    async def _within(
        self, mailbox_id: bytes, chunk: list[tuple[bytes, int]], budget: int, have_some: bool
    ) -> tuple[list[tuple[bytes, int]], bool]:
        """The first entries of ``chunk`` whose sizes (``z``, read before any payload) fit
        ``budget`` (at least one if none is taken yet), and whether some were left out."""
        sizes = await self._r.hmget(self._key("z", mailbox_id), [_hex(i) for i, _ in chunk])
        total = 0
        for n, held in enumerate(sizes):
            total += int(held or 0)
            if total > budget and (have_some or n > 0):
                return chunk[:n], True
        return chunk, False

    async def _load(
        self, mailbox_id: bytes, entries: list[tuple[bytes, int]], now_ms: int
    ) -> list[StoredBlob]:
        """Read index entries' payloads; skip expired ones, clean the ones whose key is gone."""
        fields = await self._hmget_all(
            [self._key("b", mailbox_id, blob_id) for blob_id, _ in entries], _BLOB_FIELDS
        )
        live: list[StoredBlob] = []
        gone: list[str] = []
        for (blob_id, seq), (blob, stored, expires, stored_seq, proof) in zip(
            entries, fields, strict=True
        ):
            if blob is None:
                gone.append(_hex(blob_id))
            elif int(expires) > now_ms and int(stored_seq) == seq:
                live.append(
                    StoredBlob(
                        mailbox_id,
                        blob_id,
                        blob,
                        int(stored),
                        int(expires),
                        seq,
                        decode_pow(proof),
                    )
                )
        if gone:
            await self._clean(keys=[], args=[self._p, _hex(mailbox_id), *gone])
        return live

    async def _hmget_all(self, keys: list[str], names: list[str]) -> list[list[Any]]:
        out: list[list[Any]] = []
        for i in range(0, len(keys), _PIPELINE_CHUNK):
            async with self._r.pipeline(transaction=False) as pipe:
                for key in keys[i : i + _PIPELINE_CHUNK]:
                    pipe.hmget(key, names)
                out += await pipe.execute()
        return out

    async def get_blobs(
        self, mailbox_id: bytes, blob_ids: Sequence[bytes], now_ms: int
    ) -> list[StoredBlob]:
        wanted = unique(blob_ids)
        fields = await self._hmget_all(
            [self._key("b", mailbox_id, i) for i in wanted], _BLOB_FIELDS
        )
        return [
            StoredBlob(
                mailbox_id, blob_id, blob, int(stored), int(expires), int(seq), decode_pow(proof)
            )
            for blob_id, (blob, stored, expires, seq, proof) in zip(wanted, fields, strict=True)
            if blob is not None and int(expires) > now_ms
        ]

    async def _tombstones(
        self, mailbox_id: bytes, blob_ids: list[bytes], now_ms: int
    ) -> list[Tombstone]:
        """The live ones among ``blob_ids``, each with its signed delete (read once each)."""
        if not blob_ids:
            return []
        fields = await self._hmget_all(
            [self._key("t", mailbox_id, i) for i in blob_ids], ["d", "e", "a"]
        )
        digests = await self._auth_digests(mailbox_id, blob_ids)
        auths = await self._signed_deletes_by_digest({d for d in digests if d})
        out = []
        for blob_id, (deleted, expires, inline), digest in zip(
            blob_ids, fields, digests, strict=True
        ):
            auth = inline if inline is not None else auths.get(digest)
            if deleted is not None and auth is not None and int(expires) > now_ms:
                out.append(Tombstone(mailbox_id, blob_id, int(deleted), int(expires), auth))
        return out

    async def _signed_delete_sizes(self, digests: set[bytes]) -> dict[bytes, int]:
        if not digests:
            return {}
        ordered = sorted(digests)
        found = await self._r.hmget(self._p + "sz", ordered)
        return {d: int(n) for d, n in zip(ordered, found, strict=True) if n is not None}

    async def _auth_digests(self, mailbox_id: bytes, blob_ids: list[bytes]) -> list[bytes]:
        """Each tombstone's signed delete digest (hex); b"": none, or one stored inline."""
        reply = await self._r.hmget(self._key("tr", mailbox_id), [_hex(i) for i in blob_ids])
        return [d.encode() if isinstance(d, str) else d or b"" for d in reply]

    async def _signed_deletes_by_digest(self, digests: set[bytes]) -> dict[bytes, bytes]:
        ordered = sorted(digests)
        found = await self._hmget_all([f"{self._p}sd:{d.decode()}" for d in ordered], ["a"])
        return {d: a for d, (a,) in zip(ordered, found, strict=True) if a is not None}

    async def sync_index(
        self, mailbox_id: bytes, now_ms: int, after: bytes = b"", limit: int = 0
    ) -> SyncIndex:
        """Each kind read in ID order from ``after`` on (``l:M``, ``tl:M``) until ``limit`` live
        ones are found: a list page reads its page (and what expired in it that GC has not
        reached), not the whole mailbox, which cost 0.35 s a page at 100,000 blobs. Blobs
        are read before tombstones, so a blob deleted meanwhile is seen as one or the other.
        Without ``limit`` (repair's whole index) both expiry indexes are read at once by score:
        along the ID index a chunk at a time, 100,000 blobs took 2.3 s, by score 0.35 s."""
        if limit:
            blob_ids = await self._live_by_id(mailbox_id, "blobs", after, limit, now_ms)
            tombs = await self._live_by_id(mailbox_id, "tombstones", after, limit, now_ms)
        else:
            blob_ids, tombs = await self._all_live(mailbox_id, after, now_ms)
        sizes = await self._authorization_sizes(mailbox_id, tombs)
        # 0: the tombstone's key vanished; a later chunk stands in for it.
        kept = [(t, n) for t, n in zip(tombs, sizes, strict=True) if n]
        while limit and len(tombs) == limit and len(kept) < limit:
            more = await self._live_by_id(
                mailbox_id, "tombstones", tombs[-1], limit - len(kept), now_ms
            )
            if not more:
                break
            tombs = more
            sizes = await self._authorization_sizes(mailbox_id, more)
            kept += [(t, n) for t, n in zip(more, sizes, strict=True) if n]
        return SyncIndex(blob_ids, kept)

    async def _all_live(
        self, mailbox_id: bytes, after: bytes, now_ms: int
    ) -> tuple[list[bytes], list[bytes]]:
        """Every unexpired blob and tombstone ID > ``after``, sorted (one snapshot)."""
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.zrangebyscore(self._key("e", mailbox_id), f"({now_ms}", "+inf")
            pipe.zrangebyscore(self._key("ti", mailbox_id), f"({now_ms}", "+inf")
            blob_members, tomb_members = await pipe.execute()
        return (
            sorted(i for i in _ids_of(blob_members) if i > after),
            sorted(i for i in _ids_of(tomb_members) if i > after),
        )

    async def _live_by_id(
        self, mailbox_id: bytes, kind: str, after: bytes, limit: int, now_ms: int
    ) -> list[bytes]:
        """The unexpired blob or tombstone IDs > ``after``, in ID order, the first ``limit``,
        read a chunk at a time along the ID index, judged by the expiry index."""
        index, expiry = ("l", "e") if kind == "blobs" else ("tl", "ti")
        low = f"({_hex(after)}" if after else "-"
        found: list[bytes] = []
        while len(found) < limit:
            want = limit - len(found) + _SCAN_CHUNK
            members: list[Any] = await self._r.zrange(
                self._key(index, mailbox_id), low, "+", bylex=True, offset=0, num=want
            )
            if not members:
                break
            expires = await self._r.zmscore(self._key(expiry, mailbox_id), members)
            live = zip(members, expires, strict=True)
            found += [_unhex(m) for m, e in live if e is not None and e > now_ms]
            if len(members) < want:
                break
            low = "(" + members[-1].decode()
        return found[:limit]

    async def _authorization_sizes(self, mailbox_id: bytes, blob_ids: list[bytes]) -> list[int]:
        """Each tombstone's signed delete size without reading it; 0 for a tombstone whose key
        is gone (its signed delete's size is kept in ``sz``, an inline one in the key)."""
        if not blob_ids:
            return []
        digests = await self._auth_digests(mailbox_id, blob_ids)
        sizes = await self._signed_delete_sizes({d for d in digests if d})
        replies: list[int] = []
        for i in range(0, len(blob_ids), _PIPELINE_CHUNK):
            async with self._r.pipeline(transaction=False) as pipe:
                for blob_id in blob_ids[i : i + _PIPELINE_CHUNK]:
                    pipe.exists(self._key("t", mailbox_id, blob_id))
                    pipe.hstrlen(self._key("t", mailbox_id, blob_id), "a")
                replies += await pipe.execute()
        held, inline = replies[0::2], replies[1::2]
        return [
            int(n) or sizes.get(d, 0) if exists else 0
            for exists, d, n in zip(held, digests, inline, strict=True)
        ]

    async def get_tombstones(
        self, mailbox_id: bytes, blob_ids: Sequence[bytes], now_ms: int
    ) -> list[Tombstone]:
        return await self._tombstones(mailbox_id, sorted(unique(blob_ids)), now_ms)

    async def held(
        self, mailbox_id: bytes, ids: Sequence[bytes], now_ms: int
    ) -> tuple[set[bytes], set[bytes]]:
        """By the expiry indexes (a payload key that vanished early still counts as held
        until a read cleans it: the next sync offer sees it gone): one ``ZMSCORE`` per index,
        both in one round trip (every delete asks, for its admission: a pipeline of one
        ``ZSCORE`` per ID and index took 9 ms for 200 IDs)."""
        wanted = unique(ids)
        if not wanted:
            return set(), set()
        members = [_hex(i) for i in wanted]
        async with self._r.pipeline(transaction=False) as pipe:
            pipe.zmscore(self._key("e", mailbox_id), members)
            pipe.zmscore(self._key("ti", mailbox_id), members)
            blob_scores, tomb_scores = await pipe.execute()
        return _live(wanted, blob_scores, now_ms), _live(wanted, tomb_scores, now_ms)

    async def digests(self, start: bytes, end: bytes, now_ms: int) -> list[MailboxDigest]:
        if end and start >= end:
            return []
        low = f"[{_hex(start)}" if start else "-"
        high = f"({_hex(end)}" if end else "+"
        mailboxes = _ids_of(await self._r.zrangebylex(self._p + "m", low, high))
        out: list[MailboxDigest] = []
        for i in range(0, len(mailboxes), _PIPELINE_CHUNK):
            out += await self._digest_chunk(mailboxes[i : i + _PIPELINE_CHUNK], now_ms)
        return [d for d in out if (d.blobs or d.tombstones) and in_range(d.mailbox_id, start, end)]

    async def digests_of(self, mailbox_ids: Sequence[bytes], now_ms: int) -> list[MailboxDigest]:
        out: list[MailboxDigest] = []
        for i in range(0, len(mailbox_ids), _PIPELINE_CHUNK):
            out += await self._digest_chunk(list(mailbox_ids[i : i + _PIPELINE_CHUNK]), now_ms)
        return out

    async def _digest_chunk(self, mailboxes: list[bytes], now_ms: int) -> list[MailboxDigest]:
        async with self._r.pipeline(transaction=True) as pipe:
            for m in mailboxes:
                pipe.zrangebyscore(self._key("e", m), f"({now_ms}", "+inf")
                pipe.zrangebyscore(self._key("ti", m), f"({now_ms}", "+inf")
            replies = await pipe.execute()
        return [
            mailbox_digest(m, _ids_of(replies[2 * k]), _ids_of(replies[2 * k + 1]))
            for k, m in enumerate(mailboxes)
        ]

    async def usage(self, mailbox_id: bytes, now_ms: int) -> Usage:
        count, size = await self._usage(keys=[], args=[self._p, _hex(mailbox_id), now_ms])
        return Usage(int(count), int(size))

    async def tombstones(self, mailbox_id: bytes) -> int:
        """The size of the mailbox's tombstone expiry index."""
        return int(await self._r.zcard(self._key("ti", mailbox_id)))

    async def unheld_tombstones(self) -> int:
        """``P totals`` ``unheld_tombstones`` (the write scripts keep it, with ``tu:M``)."""
        count = await self._r.hget(self._p + "totals", "unheld_tombstones")
        return int(count or 0)

    async def totals(self) -> Usage:
        """Everything held, expired-but-not-yet-collected blobs included (it is memory used)."""
        blobs, size = await self._r.hmget(self._p + "totals", ["blobs", "bytes"])
        return Usage(int(blobs or 0), int(size or 0))

    async def signed_deletes(self) -> Usage:
        """Signed deletes held (each once, however many tombstones reference it), their bytes."""
        count, size = await self._r.hmget(
            self._p + "totals", ["signed_deletes", "signed_delete_bytes"]
        )
        return Usage(int(count or 0), int(size or 0))

    async def mailboxes(self) -> int:
        return int(await self._r.zcard(self._p + "m"))  # pruned once a mailbox is empty

    async def gc_time(self) -> int | None:
        value = await self._r.get(self._p + "gc_time")
        return None if value is None else int(value)

    async def save_gc_time(self, now_ms: int) -> None:
        try:
            await self._r.set(self._p + "gc_time", now_ms)
        except ResponseError as exc:
            if isinstance(exc, OutOfMemoryError) or str(exc).startswith(_NO_ROOM):
                raise StorageFullError(f"storage is full: redis: {exc}") from exc
            raise

    async def configuration_problems(self) -> list[str]:
        return await durability_problems(self._r)

    async def close(self) -> None:
        await self._r.aclose()
