"""A put as a node of Redis key layout 2 made it (its script, verbatim but for the unused
helpers): no ID index (``l:M``), no bytes per hour of expiry, no ``P checked``. What a
downgraded node writes to a store of a newer layout, for the tests of its mending."""

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
