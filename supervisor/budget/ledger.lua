-- The Redis ledger store's scripts (redis.py runs them with EVALSHA): one per operation.
--
-- Each runs atomically on the server. KEYS[1] is the agent's ``sv:{agent}:scopes`` key (its
-- prefix P names every other key of the agent: one Cluster slot). ARGV[1] is the operation
-- as JSON (the keys of supervisor/budget/_store.py's TypedDicts; reserve: a flat array,
-- below), ARGV[2] how long a finished hold answers idempotent retries, in milliseconds
-- (_store.KEEP_FINISHED). Keys of an agent: s:SCOPE_ID (hash: cu tu uu used, ch th uh
-- held), scopes (set of scope ids), h:HOLD_ID (hash), k:KEY (hold id of an idempotency
-- key), open (sorted set of open holds by expiry), rc and rt (rate buckets: second ->
-- calls, tokens), events (stream).
--
-- redis.py splits this file at the "--- script NAME" lines; each script is the prelude
-- (everything before the first of them) followed by its own section.
local P = string.sub(KEYS[1], 1, -7)
local KEEP_MS = tonumber(ARGV[2])
local now
local function init(at)
  if at == nil or at == cjson.null or at == '' then
    local t = redis.call('TIME')
    now = tonumber(t[1]) + tonumber(t[2]) / 1000000
  else
    now = tonumber(at)
  end
end
local function num(x) return tonumber(x) or 0 end
local function row(sid)
  local r = redis.call('HMGET', P .. 's:' .. sid, 'cu', 'tu', 'uu', 'ch', 'th', 'uh')
  return {num(r[1]), num(r[2]), num(r[3]), num(r[4]), num(r[5]), num(r[6])}
end
local FIELDS = {'cu', 'tu', 'uu', 'ch', 'th', 'uh'}
local function add(sids, used, held)
  for _, sid in ipairs(sids) do
    local k = P .. 's:' .. sid
    for i = 1, 3 do
      if used[i] ~= 0 then redis.call('HINCRBY', k, FIELDS[i], used[i]) end
      if held[i] ~= 0 then redis.call('HINCRBY', k, FIELDS[i + 3], held[i]) end
    end
    redis.call('SADD', P .. 'scopes', sid)
  end
end
local function event(kind, fields)
  local args = {P .. 'events', '*', 'ts', string.format('%.6f', now), 'kind', kind}
  for k, v in pairs(fields) do
    if v ~= nil and v ~= cjson.null then
      args[#args + 1] = k
      args[#args + 1] = type(v) == 'table' and cjson.encode(v) or tostring(v)
    end
  end
  redis.call('XADD', unpack(args))
end
local function hold(id)
  local h = redis.call('HGETALL', P .. 'h:' .. id)
  if #h == 0 then return nil end
  local t = {}
  for i = 1, #h, 2 do t[h[i]] = h[i + 1] end
  return t
end
local function amounts(h, prefix)
  return {num(h[prefix .. 'calls']), num(h[prefix .. 'tokens']), num(h[prefix .. 'usd'])}
end
local function rate_add(when, calls, tokens)
  local s = tostring(math.floor(when))
  if calls ~= 0 then redis.call('HINCRBY', P .. 'rc', s, calls) end
  if tokens ~= 0 then
    local left = redis.call('HINCRBY', P .. 'rt', s, tokens)
    if left < 0 then redis.call('HSET', P .. 'rt', s, 0) end
  end
end
local function window()
  local oldest = math.floor(now) - 59
  local found = {}
  for _, name in ipairs({'rc', 'rt'}) do
    local h = redis.call('HGETALL', P .. name)
    for i = 1, #h, 2 do
      local s = tonumber(h[i])
      if s < oldest then redis.call('HDEL', P .. name, h[i])
      else
        found[s] = found[s] or {0, 0}
        found[s][name == 'rc' and 1 or 2] = tonumber(h[i + 1])
      end
    end
  end
  local seconds = {}
  for s, _ in pairs(found) do seconds[#seconds + 1] = s end
  table.sort(seconds)
  local rows = {}
  for _, s in ipairs(seconds) do rows[#rows + 1] = {s, found[s][1], found[s][2]} end
  return rows
end
local function finish(id, h, charged, state)
  local sids = cjson.decode(h.scopes)
  local already = amounts(h, 'charged_')
  local held = {0, 0, 0}
  if h.state == 'open' then held = amounts(h, '') end
  local delta = {charged[1] - already[1], charged[2] - already[2], charged[3] - already[3]}
  add(sids, delta, {-held[1], -held[2], -held[3]})
  redis.call('HSET', P .. 'h:' .. id, 'state', state, 'charged_calls', charged[1],
    'charged_tokens', charged[2], 'charged_usd', charged[3])
  redis.call('ZREM', P .. 'open', id)
  -- A finished hold answers idempotent retries for a while (KEEP_MS), then goes.
  redis.call('PEXPIRE', P .. 'h:' .. id, KEEP_MS)
  if h.key then redis.call('PEXPIRE', P .. 'k:' .. h.key, KEEP_MS) end
  return sids, delta
end
local function expire(agent)
  local due = redis.call('ZRANGEBYSCORE', P .. 'open', '-inf', now)
  for _, id in ipairs(due) do
    local h = hold(id)
    if h then
      local est = amounts(h, 'est_')
      finish(id, h, est, 'expired')
      event('expire', {agent = agent, run_id = h.run_id, hold_id = id,
        calls = est[1], tokens = est[2], usd = est[3]})
    else
      redis.call('ZREM', P .. 'open', id)
    end
  end
end
local function rows_of(sids)
  local out = {}
  for _, sid in ipairs(sids) do
    local r = row(sid)
    out[#out + 1] = sid
    for i = 1, 6 do out[#out + 1] = r[i] end
  end
  return out
end

--- script reserve
-- ARGV[1]: one flat JSON array, not a JSON object nor one argument per value (redis-py packs
-- each argument in Python, ~1.5 us apiece), built by redis.py's _reserve_args:
--   A[1] now ('' = the server's)  A[2] hold id  A[3] key  A[4] ttl (s)
--   A[5..7] amount  A[8..10] estimate  A[11..12] calls and tokens per minute
--   A[13] agent  A[14] run id  A[15] session  A[16] model  A[17] provider  A[18] label
--   A[19] price source  A[20] the scope ids as JSON (stored with the hold)
--   A[21] the grant event as JSON  A[22..] per scope: id and its three limits
-- '' is "none". The scope rows are read once and written with one HSET each; the grant
-- event is one stream field.
local A = cjson.decode(ARGV[1])
init(A[1])
local id, key, agent = A[2], A[3], A[13]
expire(agent)
if key ~= '' then
  local found = redis.call('GET', P .. 'k:' .. key)
  if found then
    local h = hold(found) or {}
    return {'replay', found, num(h.usd), num(h.tokens), tostring(h.expires)}
  end
end
local amount = {tonumber(A[5]), tonumber(A[6]), tonumber(A[7])}
local keys, rows, new = {}, {}, {}
for j = 22, #A, 4 do
  local sid = A[j]
  local k = P .. 's:' .. sid
  local r = redis.call('HMGET', k, 'cu', 'tu', 'uu', 'ch', 'th', 'uh')
  if not r[1] and not r[4] then new[#new + 1] = sid end
  r = {num(r[1]), num(r[2]), num(r[3]), num(r[4]), num(r[5]), num(r[6])}
  for i = 1, 3 do
    local limit = tonumber(A[j + i])
    if limit and r[i] + r[i + 3] + amount[i] > limit then
      event('deny', {agent = agent, run_id = A[14], session = A[15], scope = sid,
        calls = amount[1], tokens = amount[2], usd = amount[3], model = A[16],
        label = A[18] ~= '' and A[18] or nil,
        detail = {limit = i - 1, used = r[i], held = r[i + 3]}})
      return {'deny', sid, i - 1, r[i], r[i + 3], limit}
    end
  end
  keys[#keys + 1] = k
  rows[#rows + 1] = r
end
local rate = {tonumber(A[11]), tonumber(A[12])}
if rate[1] or rate[2] then
  local rows = window()
  local needs = {1, amount[2]}
  for index = 1, 2 do
    local limit = rate[index]
    local used = 0
    for _, b in ipairs(rows) do used = used + b[index + 1] end
    if limit and used + needs[index] > limit then
      local freed, retry = 0, 60
      for _, b in ipairs(rows) do
        freed = freed + b[index + 1]
        if used - freed + needs[index] <= limit then retry = b[1] + 60 - now; break end
      end
      if retry < 0.001 then retry = 0.001 end
      event('deny', {agent = agent, run_id = A[14], scope = 'rate',
        detail = {limit = index - 1, used = used}})
      return {'rate', index - 1, used, limit, tostring(retry)}
    end
  end
end
-- Every scope checked: hold on each (one HSET of the three held counters per scope).
for n, k in ipairs(keys) do
  local r = rows[n]
  redis.call('HSET', k, 'ch', r[4] + amount[1], 'th', r[5] + amount[2], 'uh', r[6] + amount[3])
end
for _, sid in ipairs(new) do redis.call('SADD', P .. 'scopes', sid) end
local expires = now + tonumber(A[4])
local at = string.format('%.6f', now)
redis.call('HSET', P .. 'h:' .. id, 'agent', agent, 'run_id', A[14], 'session', A[15],
  'state', 'open', 'scopes', A[20], 'calls', amount[1], 'tokens', amount[2],
  'usd', amount[3], 'est_calls', A[8], 'est_tokens', A[9], 'est_usd', A[10],
  'model', A[16], 'provider', A[17], 'label', A[18], 'price_source', A[19],
  'created', at, 'expires', string.format('%.6f', expires))
if key ~= '' then
  redis.call('SET', P .. 'k:' .. key, id)
  redis.call('HSET', P .. 'h:' .. id, 'key', key)
end
redis.call('ZADD', P .. 'open', expires, id)
rate_add(now, 1, amount[2])
-- The grant event: one field with the JSON the client wrote (events() spreads it out).
redis.call('XADD', P .. 'events', '*', 'ts', at, 'kind', 'grant', 'e', A[21])
return {'grant', id, amount[3], amount[2], string.format('%.6f', expires)}

--- script hold
local op = cjson.decode(ARGV[1])
init(op.now)
local h = hold(op.hold_id)
if not h or h.agent ~= op.agent then return nil end
return {h.model, h.provider, h.state}

--- script commit
local op = cjson.decode(ARGV[1])
init(op.now)
local h = hold(op.hold_id)
if not h or h.agent ~= op.agent then return {'missing'} end
if h.state == 'committed' or h.state == 'recorded' then
  local out = {'replay', num(h.charged_usd), num(h.charged_tokens), h.price_source or ''}
  for _, v in ipairs(rows_of(cjson.decode(h.scopes))) do out[#out + 1] = v end
  return out
end
local amount = op.amount
local was = h.state
local sids, delta = finish(op.hold_id, h, amount, 'committed')
redis.call('HSET', P .. 'h:' .. op.hold_id, 'price_source', op.event.price_source)
if was == 'open' then rate_add(tonumber(h.created), 0, amount[2] - num(h.tokens)) end
local ev = op.event
ev.agent = op.agent; ev.run_id = h.run_id; ev.hold_id = op.hold_id; ev.model = h.model
ev.label = h.label; ev.calls = amount[1]; ev.tokens = amount[2]; ev.usd = amount[3]
ev.detail = {delta = delta, was = was}
event('commit', ev)
local out = {'ok', amount[3], amount[2], op.event.price_source, delta[1], delta[2], delta[3]}
for _, v in ipairs(rows_of(sids)) do out[#out + 1] = v end
return out

--- script record
local op = cjson.decode(ARGV[1])
init(op.now)
if op.key ~= nil and op.key ~= cjson.null then
  local id = redis.call('GET', P .. 'k:' .. op.key)
  if id then
    local h = hold(id)
    local out = {'replay', num(h.charged_usd), num(h.charged_tokens), h.price_source or ''}
    for _, v in ipairs(rows_of(cjson.decode(h.scopes))) do out[#out + 1] = v end
    return out
  end
end
local amount = op.amount
local sids = {}
for _, s in ipairs(op.scopes) do sids[#sids + 1] = s[1] end
add(sids, amount, {0, 0, 0})
local ev = op.event
redis.call('HSET', P .. 'h:' .. op.hold_id, 'agent', op.agent, 'run_id', op.run_id,
  'state', 'recorded', 'scopes', cjson.encode(sids), 'charged_calls', amount[1],
  'charged_tokens', amount[2], 'charged_usd', amount[3], 'price_source', ev.price_source)
redis.call('PEXPIRE', P .. 'h:' .. op.hold_id, KEEP_MS)
if op.key ~= nil and op.key ~= cjson.null then
  redis.call('SET', P .. 'k:' .. op.key, op.hold_id, 'PX', KEEP_MS)
end
rate_add(now, 1, amount[2])
ev.agent = op.agent; ev.run_id = op.run_id; ev.session = op.session; ev.hold_id = op.hold_id
ev.key = op.key; ev.calls = amount[1]; ev.tokens = amount[2]; ev.usd = amount[3]
event('record', ev)
local out = {'ok', amount[3], amount[2], ev.price_source, amount[1], amount[2], amount[3]}
for _, v in ipairs(rows_of(sids)) do out[#out + 1] = v end
return out

--- script release
local op = cjson.decode(ARGV[1])
init(op.now)
local h = hold(op.hold_id)
if not h or h.agent ~= op.agent then return 'missing' end
if h.state ~= 'open' and h.state ~= 'expired' and h.state ~= 'settled' then return 'ok' end
local was = h.state
finish(op.hold_id, h, {0, 0, 0}, 'released')
if was == 'open' then rate_add(tonumber(h.created), 0, -num(h.tokens)) end
event('release', {agent = op.agent, run_id = h.run_id, hold_id = op.hold_id,
  detail = {was = was}})
return 'ok'

--- script usage
local op = cjson.decode(ARGV[1])
init(op.now)
expire(op.agent)
local out = {}
local calls, tokens = 0, 0
for _, b in ipairs(window()) do calls = calls + b[2]; tokens = tokens + b[3] end
out[1] = calls; out[2] = tokens
for _, v in ipairs(rows_of(op.scopes)) do out[#out + 1] = v end
return out

--- script settle
local op = cjson.decode(ARGV[1])
init(op.now)
local out = {}
for _, id in ipairs(redis.call('ZRANGE', P .. 'open', 0, -1)) do
  local h = hold(id)
  if h and h.run_id == op.run_id and h.state == 'open' then
    local est = amounts(h, 'est_')
    finish(id, h, est, 'settled')
    event('settle', {agent = op.agent, run_id = op.run_id, hold_id = id, model = h.model,
      label = h.label, calls = est[1], tokens = est[2], usd = est[3]})
    out[#out + 1] = id; out[#out + 1] = est[3]; out[#out + 1] = est[2]
    out[#out + 1] = h.model or ''; out[#out + 1] = h.label or ''
  end
end
return out

--- script reset
local op = cjson.decode(ARGV[1])
init(op.now)
local out = {}
local sids = redis.call('SMEMBERS', P .. 'scopes')
table.sort(sids)
for _, sid in ipairs(sids) do
  if op.prefix == cjson.null or string.sub(sid, 1, #op.prefix) == op.prefix then
    local r = row(sid)
    if r[1] ~= 0 or r[2] ~= 0 or r[3] ~= 0 then
      event('reset', {agent = op.agent, scope = sid, calls = r[1], tokens = r[2], usd = r[3]})
      redis.call('HSET', P .. 's:' .. sid, 'cu', 0, 'tu', 0, 'uu', 0)
      out[#out + 1] = sid; out[#out + 1] = r[1]; out[#out + 1] = r[2]; out[#out + 1] = r[3]
    end
  end
end
return out
