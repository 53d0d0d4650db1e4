"""A put and a GC pass as a node of Redis key layout 2 made them (its scripts, verbatim but
for the unused helpers): no ID index (``l:M``), no bytes per hour of expiry, no marks of
tombstones for IDs not held (``tu:M``), no ``P checked``. What a downgraded node writes to a
store of a newer layout, for the tests of its mending."""

from __future__ import annotations

from typing import Any

from dna_core.mailbox import StoredBlob

PUT_V2 = """
local P = ARGV[1]
local function bkey(mb, id) return P .. 'b:' .. mb .. ':' .. id end
local function drop_blob(mb, id)
  local size = tonumber(redis.call('HGET', P .. 'z:' .. mb, id) or '0')
  if redis.call('ZREM', P .. 'e:' .. mb, id) == 1 then
    redis.call('HINCRBY', P .. 'u:' .. mb, 'bytes', -size)
    redis.call('HINCRBY', P .. 'totals', 'blobs', -1)
    redis.call('HINCRBY', P .. 'totals', 'bytes', -size)
  end
  redis.call('ZREM', P .. 's:' .. mb, id)
  redis.call('HDEL', P .. 'z:' .. mb, id)
  redis.call('ZREM', P .. 'x', 'b:' .. mb .. ':' .. id)
  redis.call('DEL', bkey(mb, id))
end
local now = tonumber(ARGV[2])
local function put_one(mb, id, blob, stored, expires, proof)
  if tonumber(expires) <= now then return 3 end
  local texp = redis.call('ZSCORE', P .. 'ti:' .. mb, id)
  if texp and tonumber(texp) > now then return 2 end
  local held = redis.call('ZSCORE', P .. 'e:' .. mb, id)
  if held then
    if tonumber(held) > now and redis.call('EXISTS', bkey(mb, id)) == 1 then return 1 end
    drop_blob(mb, id)
  end
  local seq = redis.call('INCR', P .. 'q:' .. mb)
  redis.call('HSET', bkey(mb, id), 'd', blob, 's', stored, 'e', expires, 'q', seq)
  if proof ~= '' then redis.call('HSET', bkey(mb, id), 'w', proof) end
  redis.call('ZADD', P .. 's:' .. mb, seq, id)
  redis.call('ZADD', P .. 'e:' .. mb, expires, id)
  redis.call('HSET', P .. 'z:' .. mb, id, #blob)
  redis.call('HINCRBY', P .. 'u:' .. mb, 'bytes', #blob)
  redis.call('HINCRBY', P .. 'totals', 'blobs', 1)
  redis.call('HINCRBY', P .. 'totals', 'bytes', #blob)
  redis.call('ZADD', P .. 'x', expires, 'b:' .. mb .. ':' .. id)
  redis.call('ZADD', P .. 'm', 0, mb)
  return 0
end
local out = {}
for i = 3, #ARGV, 6 do
  out[#out + 1] = put_one(ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4], ARGV[i + 5])
end
return out
"""


async def put_as_layout_2(raw: Any, prefix: str, blob: StoredBlob, now_ms: int) -> None:
    """Store ``blob`` as a layout 2 node's put did (``raw``: a redis.asyncio client)."""
    args = [prefix, now_ms, blob.mailbox_id.hex(), blob.blob_id.hex(), blob.blob]
    args += [blob.stored_ms, blob.expires_ms, b""]
    assert await raw.eval(PUT_V2, 0, *args) == [0]


EXPIRE_V2 = """
local P = ARGV[1]
local function bkey(mb, id) return P .. 'b:' .. mb .. ':' .. id end
local function tkey(mb, id) return P .. 't:' .. mb .. ':' .. id end
local function drop_blob(mb, id)
  local size = tonumber(redis.call('HGET', P .. 'z:' .. mb, id) or '0')
  if redis.call('ZREM', P .. 'e:' .. mb, id) == 1 then
    redis.call('HINCRBY', P .. 'u:' .. mb, 'bytes', -size)
    redis.call('HINCRBY', P .. 'totals', 'blobs', -1)
    redis.call('HINCRBY', P .. 'totals', 'bytes', -size)
  end
  redis.call('ZREM', P .. 's:' .. mb, id)
  redis.call('HDEL', P .. 'z:' .. mb, id)
  redis.call('ZREM', P .. 'x', 'b:' .. mb .. ':' .. id)
  redis.call('DEL', bkey(mb, id))
end
local function skey(h) return P .. 'sd:' .. h end
local function count_signed_delete(sign, size)
  redis.call('HINCRBY', P .. 'totals', 'signed_deletes', sign)
  redis.call('HINCRBY', P .. 'totals', 'signed_delete_bytes', sign * size)
end
local function unref_tomb(mb, id)
  local h = redis.call('HGET', P .. 'tr:' .. mb, id)
  if not h then return end
  redis.call('HDEL', P .. 'tr:' .. mb, id)
  if redis.call('HINCRBY', P .. 'sr', h, -1) > 0 then return end
  count_signed_delete(-1, tonumber(redis.call('HGET', P .. 'sz', h) or '0'))
  redis.call('HDEL', P .. 'sr', h)
  redis.call('HDEL', P .. 'sz', h)
  redis.call('DEL', skey(h))
end
local function drop_tomb(mb, id)
  unref_tomb(mb, id)
  redis.call('ZREM', P .. 'ti:' .. mb, id)
  redis.call('ZREM', P .. 'x', 't:' .. mb .. ':' .. id)
  redis.call('DEL', tkey(mb, id))
end
local function prune_mailbox(mb)
  if redis.call('ZCARD', P .. 'e:' .. mb) == 0 and redis.call('ZCARD', P .. 'ti:' .. mb) == 0 then
    redis.call('ZREM', P .. 'm', mb)
    redis.call('DEL', P .. 'u:' .. mb, P .. 'z:' .. mb, P .. 's:' .. mb, P .. 'tr:' .. mb)
  end
end
local items = redis.call('ZRANGEBYSCORE', P .. 'x', '-inf', ARGV[2], 'LIMIT', 0, ARGV[3])
for _, item in ipairs(items) do
  local kind, mb, id = string.match(item, '^(%a):(%x*):(%x*)$')
  if kind == 'b' then drop_blob(mb, id) else drop_tomb(mb, id) end
  redis.call('ZREM', P .. 'x', item)
  prune_mailbox(mb)
end
return #items
"""


async def expire_as_layout_2(raw: Any, prefix: str, now_ms: int, limit: int) -> int:
    """A GC pass of a layout 2 node: removes what expired by ``now_ms``, up to ``limit``."""
    return int(await raw.eval(EXPIRE_V2, 0, prefix, now_ms, limit))
