"""The Lua scripts of :class:`gateway.outbound.redis_outbox.RedisOutbox`: each outbox operation
that reads and writes several keys runs as one script, atomically (the key layout is in
``redis_outbox``'s docstring). ``KEYS`` are never used: every script gets the prefix in
``ARGV[1]`` and builds its keys, so one script serves any prefix.
"""

from __future__ import annotations

from gateway.outbound.outbox import RANK

UNSETTLED = "9000000000000000"  # the `to` index score of records that do not expire (yet)

COMMON = "local RANK = {" + ", ".join(f"{s} = {r}" for s, r in RANK.items()) + "}\n" + """
local function rank(state) return RANK[state] or 0 end
-- A record's fields, with its request and error (kept as strings of their own, so that the hash
-- of small fields stays compact) appended; {} when there is no such record.
local function record(p, id)
  local f = redis.call('HGETALL', p .. ':out:rec:' .. id)
  if #f == 0 then return f end
  f[#f + 1] = 'request'
  f[#f + 1] = redis.call('GET', p .. ':out:req:' .. id) or ''
  local err = redis.call('GET', p .. ':out:err:' .. id)
  if err then
    f[#f + 1] = 'error'
    f[#f + 1] = err
  end
  return f
end
-- Whether `pmid` is one of the provider ids in `list` (one per line; nil: none).
local function superseded(list, pmid)
  if not list or pmid == '' then return false end
  return string.find('\\n' .. list .. '\\n', '\\n' .. pmid .. '\\n', 1, true) ~= nil
end
local function open_state(state)
  return state == 'queued' or state == 'sending' or state == 'uncertain'
end
-- The record will not be sent again: out of the queue; it and its idempotency key and provider id
-- index entry expire after the retention period (renewed by every later change).
local function settle(p, id, ttl_ms, expire_at_ms)
  local rec = p .. ':out:rec:' .. id
  local f = redis.call('HMGET', rec, 'channel', 'account_id', 'recipient', 'idempotency_key',
                       'provider_message_id', 'owner')
  redis.call('ZREM', p .. ':out:due:' .. f[1] .. ':' .. f[2], id)
  if f[6] then redis.call('SREM', p .. ':out:sending:' .. f[6], id) end
  redis.call('PEXPIRE', rec, ttl_ms)
  redis.call('PEXPIRE', p .. ':out:req:' .. id, ttl_ms)
  redis.call('PEXPIRE', p .. ':out:err:' .. id, ttl_ms)
  if f[4] then redis.call('PEXPIRE', p .. ':out:idem:' .. f[4], ttl_ms) end
  if f[5] then redis.call('SET', p .. ':out:pmid:' .. f[5], id, 'PX', ttl_ms) end
  local to = p .. ':out:to:' .. f[1] .. ':' .. f[3]
  redis.call('ZADD', to, expire_at_ms, id)
  local top = redis.call('ZRANGE', to, -1, -1, 'WITHSCORES')
  if tonumber(top[2]) < 9e15 then redis.call('PEXPIREAT', to, top[2]) end
end
-- Records a replica claimed and never settled become uncertain (due at `at`).
local function orphan(p, owner, at)
  local set = p .. ':out:sending:' .. owner
  local n = 0
  for _, id in ipairs(redis.call('SMEMBERS', set)) do
    local rec = p .. ':out:rec:' .. id
    local f = redis.call('HMGET', rec, 'state', 'owner', 'channel', 'account_id')
    if f[1] == 'sending' and f[2] == owner then
      redis.call('HSET', rec, 'state', 'uncertain', 'next_at', at)
      redis.call('ZADD', p .. ':out:due:' .. f[3] .. ':' .. f[4], at, id)
      n = n + 1
    end
  end
  redis.call('DEL', set)
  redis.call('SREM', p .. ':out:owners', owner)
  return n
end
"""

# ARGV: prefix, id, idempotency key ('' none), channel, account, recipient, type, request, now,
# now_ms. Returns {1 new | 0 existing, the record's fields}.
ADD = COMMON + """
local p, id, key = ARGV[1], ARGV[2], ARGV[3]
local rec = p .. ':out:rec:' .. id
if redis.call('EXISTS', rec) == 1 then return {1, record(p, id)} end  -- a retry
if key ~= '' then
  local idem = p .. ':out:idem:' .. key
  local existing = redis.call('GET', idem)
  if existing then
    local fields = record(p, existing)
    if #fields > 0 then return {0, fields} end
  end
  redis.call('SET', idem, id)
end
local channel, account, recipient, now = ARGV[4], ARGV[5], ARGV[6], ARGV[9]
redis.call('HSET', rec, 'id', id, 'channel', channel, 'account_id', account,
           'recipient', recipient, 'type', ARGV[7], 'state', 'queued',
           'attempts', 0, 'next_at', now, 'created_at', now, 'updated_at', now)
redis.call('SET', p .. ':out:req:' .. id, ARGV[8])
if key ~= '' then redis.call('HSET', rec, 'idempotency_key', key) end
redis.call('ZADD', p .. ':out:due:' .. channel .. ':' .. account, now, id)
local to = p .. ':out:to:' .. channel .. ':' .. recipient
redis.call('ZREMRANGEBYSCORE', to, '-inf', '(' .. ARGV[10])  -- records that expired meanwhile
redis.call('ZADD', to, '""" + UNSETTLED + """', id)
redis.call('PERSIST', to)
redis.call('PUBLISH', p .. ':out:wake', channel .. '\\n' .. account)
return {1, record(p, id)}
"""

# ARGV: prefix, channel, account, now, limit, owner, token, token ttl ms.
# Returns, per record handed out: its fields (now `sending`), 'state attempts updated_at' before.
CLAIM = COMMON + """
local p, now, owner = ARGV[1], ARGV[4], ARGV[6]
local token = p .. ':out:claim:' .. ARGV[7]
local out = {}
local before = redis.call('HGETALL', token)
if #before > 0 then  -- this very call ran and its reply was lost: the same records again
  for i = 1, #before, 2 do
    local rec = p .. ':out:rec:' .. before[i]
    local f = redis.call('HMGET', rec, 'state', 'owner')
    if f[1] == 'sending' and f[2] == owner then
      out[#out + 1] = record(p, before[i])
      out[#out + 1] = before[i + 1]
    end
  end
  return out
end
local due = p .. ':out:due:' .. ARGV[2] .. ':' .. ARGV[3]
local mine = p .. ':out:sending:' .. owner
local left = tonumber(ARGV[5])
while left > 0 do
  local ids = redis.call('ZRANGEBYSCORE', due, '-inf', now, 'LIMIT', 0, left)
  if #ids == 0 then break end
  for _, id in ipairs(ids) do
    redis.call('ZREM', due, id)  -- every id read is removed: the loop ends
    local rec = p .. ':out:rec:' .. id
    local f = redis.call('HMGET', rec, 'state', 'attempts', 'updated_at')
    if f[1] == 'queued' or f[1] == 'uncertain' then
      local snapshot = f[1] .. ' ' .. f[2] .. ' ' .. f[3]
      redis.call('HSET', rec, 'state', 'sending', 'updated_at', now, 'owner', owner)
      redis.call('HINCRBY', rec, 'attempts', 1)
      redis.call('SADD', mine, id)
      redis.call('HSET', token, id, snapshot)
      out[#out + 1] = record(p, id)
      out[#out + 1] = snapshot
      left = left - 1
    end
  end
end
if #out > 0 then
  redis.call('PEXPIRE', token, ARGV[8])
  redis.call('SADD', p .. ':out:owners', owner)
end
return out
"""

# ARGV: prefix, id, provider message id ('' none), now, ttl ms, expire at ms, max attempts
# ('' none).
# Returns 1 (sent), 0 (nothing: unknown, or settled already), 2 (queued again: Meta failed this
# send before its answer came, REQUEUE noted it) or 3 (failed: that, with max attempts made).
SENT = COMMON + """
local p, id, pmid, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local rec = p .. ':out:rec:' .. id
local f = redis.call('HMGET', rec, 'state', 'provider_message_id', 'sent_at', 'superseded',
                     'attempts', 'owner', 'channel', 'account_id')
if not f[1] then return 0 end
if pmid ~= '' and superseded(f[4], pmid) then  -- Meta failed this send before it answered
  if not open_state(f[1]) then return 0 end
  if ARGV[7] ~= '' and tonumber(f[5]) >= tonumber(ARGV[7]) then
    redis.call('HSET', rec, 'state', 'failed', 'updated_at', now)  -- its error is kept
    settle(p, id, ARGV[5], ARGV[6])
    return 3
  end
  redis.call('HSET', rec, 'state', 'queued', 'next_at', now, 'updated_at', now)
  if f[6] then redis.call('SREM', p .. ':out:sending:' .. f[6], id) end
  redis.call('ZADD', p .. ':out:due:' .. f[7] .. ':' .. f[8], now, id)
  return 2
end
if open_state(f[1]) then
  redis.call('HSET', rec, 'state', 'sent')
  redis.call('DEL', p .. ':out:err:' .. id)  -- a record a status settled keeps its error
end
if not f[2] and pmid ~= '' then redis.call('HSET', rec, 'provider_message_id', pmid) end
if not f[3] then redis.call('HSET', rec, 'sent_at', now) end
redis.call('HSET', rec, 'updated_at', now)
settle(p, id, ARGV[5], ARGV[6])
if open_state(f[1]) then return 1 end
return 0
"""

# ARGV: prefix, id, error, now, ttl ms, expire at ms, attempts ('' unchanged).
FAILED = COMMON + """
local p, id = ARGV[1], ARGV[2]
local rec = p .. ':out:rec:' .. id
if redis.call('EXISTS', rec) == 0 then return 0 end
redis.call('HSET', rec, 'state', 'failed', 'updated_at', ARGV[4])
if ARGV[7] ~= '' then redis.call('HSET', rec, 'attempts', ARGV[7]) end
redis.call('SET', p .. ':out:err:' .. id, ARGV[3])
settle(p, id, ARGV[5], ARGV[6])
return 1
"""

# ARGV: prefix, id, at, error ('' none), now, '1' to give back the attempt the claim counted.
# Only a record still in the queue (queued, sending, uncertain) goes back to `queued`: a status
# that made it sent/delivered/read/failed meanwhile is never undone.
RETRY = COMMON + """
local p, id, at = ARGV[1], ARGV[2], ARGV[3]
local rec = p .. ':out:rec:' .. id
local f = redis.call('HMGET', rec, 'state', 'owner', 'channel', 'account_id')
if not open_state(f[1]) then return 0 end
redis.call('HSET', rec, 'state', 'queued', 'next_at', at, 'updated_at', ARGV[5])
if ARGV[4] ~= '' then redis.call('SET', p .. ':out:err:' .. id, ARGV[4])
else redis.call('DEL', p .. ':out:err:' .. id) end
if ARGV[6] == '1' and f[1] == 'sending' then redis.call('HINCRBY', rec, 'attempts', -1) end
if f[2] then redis.call('SREM', p .. ':out:sending:' .. f[2], id) end
redis.call('ZADD', p .. ':out:due:' .. f[3] .. ':' .. f[4], at, id)
return 1
"""

# ARGV: prefix, record id ('' = by provider id), provider message id ('' none), status,
# error ('' none), now, ttl ms, expire at ms. Moves the record forward only, and never by a
# status of a send it superseded (see REQUEUE); returns its fields if it moved, {} if not.
STATUS = COMMON + """
local p, id, pmid, status, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[6]
if id == '' then
  if pmid == '' then return {} end
  id = redis.call('GET', p .. ':out:pmid:' .. pmid)
  if not id then return {} end
end
local rec = p .. ':out:rec:' .. id
local f = redis.call('HMGET', rec, 'state', 'provider_message_id', 'sent_at', 'superseded')
if not f[1] then return {} end
if ARGV[2] == '' and f[2] ~= pmid then return {} end
if rank(f[1]) >= rank(status) then return {} end
if superseded(f[4], pmid) then return {} end
redis.call('HSET', rec, 'state', status, 'updated_at', now)
if ARGV[5] ~= '' then redis.call('SET', p .. ':out:err:' .. id, ARGV[5]) end
if not f[2] and pmid ~= '' then redis.call('HSET', rec, 'provider_message_id', pmid) end
if not f[3] then redis.call('HSET', rec, 'sent_at', now) end
settle(p, id, ARGV[7], ARGV[8])
return record(p, id)
"""

# ARGV: prefix, id ('' = by provider id), provider message id, at, error, now, max attempts,
# ttl ms, expire at ms, error when it fails. A `sent` record with that provider id goes back to
# the queue (due at `at`, its provider id forgotten and added to `superseded`, so that a late
# status of that send moves nothing) or, after max attempts, fails. A record `id` names whose
# send is in flight (no answer yet) only notes the failed provider id in `superseded`, with the
# error: SENT queues it again if the answer is that send's. Returns its fields, or {}.
REQUEUE = COMMON + """
local p, id, pmid, at, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[6]
if id == '' then
  id = redis.call('GET', p .. ':out:pmid:' .. pmid)
  if not id then return {} end
end
local rec = p .. ':out:rec:' .. id
local f = redis.call('HMGET', rec, 'state', 'provider_message_id', 'attempts', 'channel',
                     'account_id', 'recipient', 'idempotency_key', 'superseded')
if ARGV[2] ~= '' and (f[1] == 'sending' or f[1] == 'uncertain') and not f[2] then
  -- in flight, no answer yet: mark the failed send; its answer (SENT) queues the record again.
  -- The send in flight may be a later one (an earlier attempt timed out): its answer is not
  -- that send's, and the record is sent.
  if superseded(f[8], pmid) then return {} end
  redis.call('HSET', rec, 'superseded', f[8] and (f[8] .. '\\n' .. pmid) or pmid,
             'updated_at', now)
  redis.call('SET', p .. ':out:err:' .. id, ARGV[5])
  return record(p, id)
end
if f[1] ~= 'sent' or f[2] ~= pmid then return {} end
if tonumber(f[3]) >= tonumber(ARGV[7]) then
  redis.call('SET', p .. ':out:err:' .. id, ARGV[10])
  redis.call('HSET', rec, 'state', 'failed', 'updated_at', now)
  settle(p, id, ARGV[8], ARGV[9])
  return record(p, id)
end
redis.call('SET', p .. ':out:err:' .. id, ARGV[5])
redis.call('HSET', rec, 'state', 'queued', 'next_at', at, 'updated_at', now)
redis.call('HDEL', rec, 'provider_message_id', 'sent_at')
redis.call('HSET', rec, 'superseded', f[8] and (f[8] .. '\\n' .. pmid) or pmid)
redis.call('PERSIST', rec)
redis.call('PERSIST', p .. ':out:req:' .. id)
if f[7] then redis.call('PERSIST', p .. ':out:idem:' .. f[7]) end
if redis.call('GET', p .. ':out:pmid:' .. pmid) == id then
  redis.call('DEL', p .. ':out:pmid:' .. pmid)
end
redis.call('ZADD', p .. ':out:due:' .. f[4] .. ':' .. f[5], at, id)
local to = p .. ':out:to:' .. f[4] .. ':' .. f[6]
redis.call('ZADD', to, '""" + UNSETTLED + """', id)
redis.call('PERSIST', to)
redis.call('PUBLISH', p .. ':out:wake', f[4] .. '\\n' .. f[5])
return record(p, id)
"""

# ARGV: prefix, then channel and account pairs. Records waiting to be sent: due (queued,
# uncertain) on those accounts, and claimed but not settled (sending) by any replica.
WAITING = """
local p, n = ARGV[1], 0
for i = 2, #ARGV, 2 do
  n = n + redis.call('ZCARD', p .. ':out:due:' .. ARGV[i] .. ':' .. ARGV[i + 1])
end
for _, owner in ipairs(redis.call('SMEMBERS', p .. ':out:owners')) do
  n = n + redis.call('SCARD', p .. ':out:sending:' .. owner)
end
return n
"""

# ARGV: prefix, channel, account, contact, opted out ('1', '0'), said at. Consent said earlier
# than what is stored changes nothing (the latest word wins, by its time).
CONSENT = """
local p, account, at = ARGV[1], ARGV[3], ARGV[6]
local key = p .. ':out:customer:' .. ARGV[2] .. ':' .. ARGV[4]
local said = redis.call('HGET', key, 'optat:' .. account)
if said and tonumber(at) < tonumber(said) then return 0 end
redis.call('HSET', key, 'opt:' .. account, ARGV[5], 'optat:' .. account, at)
return 1
"""

# ARGV: prefix, channel, account, contact, at, message id, '1' if there is a message id,
# opted out ('' unknown, '1', '0'). Consent is kept with its time (`optat:`): an older word does
# not replace a newer one.
INBOUND = """
local p, account, at = ARGV[1], ARGV[3], ARGV[5]
local key = p .. ':out:customer:' .. ARGV[2] .. ':' .. ARGV[4]
local old = redis.call('HGET', key, 'at:' .. account)
local said = redis.call('HGET', key, 'optat:' .. account)
if ARGV[8] ~= '' then
  if not said or tonumber(at) >= tonumber(said) then
    redis.call('HSET', key, 'opt:' .. account, ARGV[8], 'optat:' .. account, at)
  end
elseif redis.call('HEXISTS', key, 'opt:' .. account) == 0 then
  redis.call('HSET', key, 'opt:' .. account, '0')
end
if not old or tonumber(at) >= tonumber(old) then
  redis.call('HSET', key, 'at:' .. account, at)
  if ARGV[7] == '1' then redis.call('HSET', key, 'mid:' .. account, ARGV[6])
  else redis.call('HDEL', key, 'mid:' .. account) end
end
return 1
"""

# ARGV: prefix, channel, contact. Returns {records deleted, customer rows deleted}.
ERASE = """
local p, channel, contact = ARGV[1], ARGV[2], ARGV[3]
local to = p .. ':out:to:' .. channel .. ':' .. contact
local sends = 0
for _, id in ipairs(redis.call('ZRANGE', to, 0, -1)) do
  local rec = p .. ':out:rec:' .. id
  local f = redis.call('HMGET', rec, 'channel', 'recipient', 'account_id', 'idempotency_key',
                       'provider_message_id', 'owner')
  if f[1] == channel and f[2] == contact then
    redis.call('ZREM', p .. ':out:due:' .. channel .. ':' .. f[3], id)
    if f[6] then redis.call('SREM', p .. ':out:sending:' .. f[6], id) end
    local idem = f[4] and (p .. ':out:idem:' .. f[4])
    if idem and redis.call('GET', idem) == id then redis.call('DEL', idem) end
    local pmid = f[5] and (p .. ':out:pmid:' .. f[5])
    if pmid and redis.call('GET', pmid) == id then redis.call('DEL', pmid) end
    redis.call('DEL', rec, p .. ':out:req:' .. id, p .. ':out:err:' .. id)
    sends = sends + 1
  end
end
redis.call('DEL', to)
local customer = p .. ':out:customer:' .. channel .. ':' .. contact
local known = 0
for _, field in ipairs(redis.call('HKEYS', customer)) do
  if string.sub(field, 1, 3) == 'at:' then known = known + 1 end
end
redis.call('DEL', customer)
return {sends, known}
"""

# ARGV: prefix, id. One record, read consistently.
GET = COMMON + """
return record(ARGV[1], ARGV[2])
"""

# ARGV: prefix, owner, alive ms, now, reconcile at. The heartbeat: records of replicas whose
# heartbeat expired (this one's too, if it lapsed) become uncertain; then this one is alive.
BEAT = COMMON + """
local p, me = ARGV[1], ARGV[2]
local n = 0
for _, owner in ipairs(redis.call('SMEMBERS', p .. ':out:owners')) do
  if redis.call('EXISTS', p .. ':out:alive:' .. owner) == 0 then
    n = n + orphan(p, owner, ARGV[5])
  end
end
redis.call('SET', p .. ':out:alive:' .. me, ARGV[4], 'PX', ARGV[3])
redis.call('SADD', p .. ':out:owners', me)
return n
"""

# ARGV: prefix, owner, reconcile at. A graceful stop: what is still sending becomes uncertain.
RETIRE = COMMON + """
local n = orphan(ARGV[1], ARGV[2], ARGV[3])
redis.call('DEL', ARGV[1] .. ':out:alive:' .. ARGV[2])
return n
"""
