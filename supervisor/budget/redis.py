"""The Redis ledger store: budgets shared by supervisors on several machines.

Every operation is one Lua script (EVALSHA), so it is atomic on the server: a reservation
checks and holds every scope in one step. Windows and expiries use the server's clock
(``TIME``), never a client's; period keys (``2026-11-23``) come from the server's time,
read when the store is opened and carried forward on the client's monotonic clock. Every
key of an agent carries the hash tag ``{agent}`` and the script is routed by one of them,
so the whole budget of an agent lives in one Redis Cluster slot. The history is a stream per agent
(``XADD``, never trimmed). A lost connection raises StoreUnavailable: nothing is granted.
"""

from __future__ import annotations

import json
import time
from typing import Any

from supervisor.errors import StoreUnavailable

__all__ = ["RedisStore"]

_PRELUDE = r"""
local P = string.sub(KEYS[1], 1, -7)
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
  -- A finished hold answers idempotent retries for a week, then goes.
  redis.call('PEXPIRE', P .. 'h:' .. id, 604800000)
  if h.key then redis.call('PEXPIRE', P .. 'k:' .. h.key, 604800000) end
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
"""

# ARGV[1]: one flat JSON array, not a JSON object nor one argument per value (redis-py packs
# each argument in Python, ~1.5 us apiece): now ('' = the server's), hold id, key, ttl,
# amount (3), estimate (3), calls and tokens per minute, agent, run id, session, model,
# provider, label, price source, the scope ids as JSON (stored with the hold), the grant
# event as JSON, then per scope: id and its three limits. '' is "none". The scope rows
# are read once and written with one HSET each; the grant event is one stream field.
_RESERVE = r"""
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
"""

_HOLD = r"""
local op = cjson.decode(ARGV[1])
init(op.now)
local h = hold(op.hold_id)
if not h or h.agent ~= op.agent then return nil end
return {h.model, h.provider, h.state}
"""

_COMMIT = r"""
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
"""

_RECORD = r"""
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
redis.call('PEXPIRE', P .. 'h:' .. op.hold_id, 7 * 86400 * 1000)
if op.key ~= nil and op.key ~= cjson.null then
  redis.call('SET', P .. 'k:' .. op.key, op.hold_id, 'PX', 7 * 86400 * 1000)
end
rate_add(now, 1, amount[2])
ev.agent = op.agent; ev.run_id = op.run_id; ev.session = op.session; ev.hold_id = op.hold_id
ev.key = op.key; ev.calls = amount[1]; ev.tokens = amount[2]; ev.usd = amount[3]
event('record', ev)
local out = {'ok', amount[3], amount[2], ev.price_source, amount[1], amount[2], amount[3]}
for _, v in ipairs(rows_of(sids)) do out[#out + 1] = v end
return out
"""

_RELEASE = r"""
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
"""

_USAGE = r"""
local op = cjson.decode(ARGV[1])
init(op.now)
expire(op.agent)
local out = {}
local calls, tokens = 0, 0
for _, b in ipairs(window()) do calls = calls + b[2]; tokens = tokens + b[3] end
out[1] = calls; out[2] = tokens
for _, v in ipairs(rows_of(op.scopes)) do out[#out + 1] = v end
return out
"""

_SETTLE = r"""
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
"""

_RESET = r"""
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
"""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _rows(flat: list[Any]) -> dict[str, list[int]]:
    return {_text(flat[i]): [int(v) for v in flat[i + 1 : i + 7]] for i in range(0, len(flat), 7)}


def _tag(agent: str) -> str:
    """The agent as a hash tag's content: no braces, so the tag is exactly the agent."""
    return agent.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")


def _untag(tag: str) -> str:
    return tag.replace("%7D", "}").replace("%7B", "{").replace("%25", "%")


class RedisStore:
    """A ledger store on a Redis server (or Cluster: one slot per agent)."""

    def __init__(self, url: str, *, timeout: float = 2.0) -> None:
        self.url = url
        try:
            import redis
        except ImportError:  # pragma: no cover - redis is a dependency
            raise StoreUnavailable(url, "the redis package is not installed") from None
        self._errors = (redis.exceptions.RedisError, OSError)
        try:
            self._client = redis.Redis.from_url(
                url, socket_timeout=timeout, socket_connect_timeout=timeout
            )
            self._keys: dict[str, str] = {}
            seconds, micros = self._client.time()
            # The server's time as an offset from this machine's monotonic clock: a jump of
            # this machine's wall clock (NTP, a hand-set date) never moves a budget period.
            self._skew = seconds + micros / 1e6 - time.monotonic()
        except self._errors as error:
            raise StoreUnavailable(url, str(error) or type(error).__name__) from None
        except ValueError as error:  # a malformed URL
            raise StoreUnavailable(url, str(error), hint="fix budget.store or --store") from None
        self._scripts = {
            name: self._client.register_script(_PRELUDE + body)
            for name, body in (
                ("reserve", _RESERVE), ("hold", _HOLD), ("commit", _COMMIT),
                ("record", _RECORD), ("release", _RELEASE), ("usage", _USAGE),
                ("settle", _SETTLE), ("reset", _RESET),
            )
        }  # fmt: skip

    def _key(self, agent: str) -> str:
        """The key the scripts are routed by (its hash tag is the agent)."""
        key = self._keys.get(agent)
        if key is None:
            key = self._keys[agent] = f"sv:{{{_tag(agent)}}}:scopes"
        return key

    def _run(self, name: str, op: dict[str, Any], args: list[Any] | None = None) -> Any:
        try:
            return self._scripts[name](keys=[self._key(op["agent"])], args=args or [json.dumps(op)])
        except self._errors as error:
            raise StoreUnavailable(self.url, str(error) or type(error).__name__) from None

    def time(self) -> float:
        return time.monotonic() + self._skew

    def reserve(self, op: dict[str, Any]) -> dict[str, Any]:
        event, amount, now = op["event"], op["amount"], op["now"]
        sids = [sid for sid, _ in op["scopes"]]
        grant = {
            "agent": op["agent"], "run_id": op["run_id"], "session": op["session"],
            "hold_id": op["hold_id"], "key": op["key"], "calls": amount[0],
            "tokens": amount[1], "usd": amount[2], **event,
        }  # fmt: skip
        args: list[Any] = [
            "" if now is None else repr(now), op["hold_id"], op["key"] or "", op["ttl"],
            *amount, *op["estimate"], *("" if x is None else x for x in op["rate"]),
            op["agent"], op["run_id"], op["session"] or "", event["model"],
            event["provider"] or "", event["label"] or "", event["price_source"],
            json.dumps(sids), json.dumps({k: v for k, v in grant.items() if v is not None}),
        ]  # fmt: skip
        for sid, limits in op["scopes"]:
            args.append(sid)
            args.extend("" if x is None else x for x in limits)
        out = self._run("reserve", op, [json.dumps(args)])
        verdict = _text(out[0])
        if verdict in ("grant", "replay"):
            return {"verdict": verdict, "hold_id": _text(out[1]), "usd": int(out[2]),
                    "tokens": int(out[3]), "expires": float(_text(out[4]))}  # fmt: skip
        if verdict == "deny":
            return {"verdict": "deny", "scope": _text(out[1]), "limit": int(out[2]),
                    "used": int(out[3]), "held": int(out[4]),
                    "limit_value": int(out[5])}  # fmt: skip
        return {"verdict": "rate", "limit": int(out[1]), "used": int(out[2]),
                "limit_value": int(out[3]), "retry_after": float(_text(out[4]))}  # fmt: skip

    def hold(self, op: dict[str, Any]) -> dict[str, Any] | None:
        out = self._run("hold", op)
        if not out:
            return None
        model, provider, state = (_text(v) for v in out)
        return {"model": model, "provider": provider or None, "state": state}

    def _charge(self, out: list[Any]) -> dict[str, Any]:
        if _text(out[0]) == "missing":
            return {"missing": True}
        if _text(out[0]) == "replay":
            return {"usd": int(out[1]), "tokens": int(out[2]), "price_source": _text(out[3]),
                    "delta": [0, 0, 0], "scopes": _rows(out[4:]), "replayed": True}  # fmt: skip
        return {"usd": int(out[1]), "tokens": int(out[2]), "price_source": _text(out[3]),
                "delta": [int(v) for v in out[4:7]], "scopes": _rows(out[7:])}  # fmt: skip

    def commit(self, op: dict[str, Any]) -> dict[str, Any]:
        return self._charge(self._run("commit", op))

    def record(self, op: dict[str, Any]) -> dict[str, Any]:
        return self._charge(self._run("record", op))

    def release(self, op: dict[str, Any]) -> dict[str, Any]:
        return {"missing": True} if _text(self._run("release", op)) == "missing" else {}

    def usage(self, op: dict[str, Any]) -> dict[str, Any]:
        out = self._run("usage", op)
        return {"rate": [int(out[0]), int(out[1])], "scopes": _rows(out[2:])}

    def settle_open(self, op: dict[str, Any]) -> list[dict[str, Any]]:
        out = self._run("settle", op)
        return [
            {"hold_id": _text(out[i]), "usd": int(out[i + 1]), "tokens": int(out[i + 2]),
             "model": _text(out[i + 3]), "label": _text(out[i + 4]) or None}
            for i in range(0, len(out), 5)
        ]  # fmt: skip

    def reset(self, op: dict[str, Any]) -> list[dict[str, Any]]:
        out = self._run("reset", op)
        return [
            {"scope": _text(out[i]), "calls": int(out[i + 1]), "tokens": int(out[i + 2]),
             "usd": int(out[i + 3])}
            for i in range(0, len(out), 4)
        ]  # fmt: skip

    def _call(self, name: str, *args: Any) -> Any:
        try:
            return getattr(self._client, name)(*args)
        except self._errors as error:
            raise StoreUnavailable(self.url, str(error) or type(error).__name__) from None

    def add_run(self, op: dict[str, Any]) -> None:
        """Note a live run and its owner (the supervisor: host, boot, pid, start time)."""
        key = f"sv:{{{_tag(op['agent'])}}}:runs"
        self._call("hset", key, op["run_id"], json.dumps(op["owner"], sort_keys=True))

    def forget_run(self, op: dict[str, Any]) -> None:
        self._call("hdel", f"sv:{{{_tag(op['agent'])}}}:runs", op["run_id"])

    def runs(self, op: dict[str, Any]) -> list[dict[str, Any]]:
        """The runs of an agent noted live: [{run_id, owner}]."""
        found = self._call("hgetall", f"sv:{{{_tag(op['agent'])}}}:runs") or {}
        return [{"run_id": _text(k), "owner": json.loads(_text(v))} for k, v in found.items()]

    def agents(self) -> list[str]:
        """Every agent with a history in this database (a SCAN: for reports, not runs)."""
        try:
            keys = list(self._client.scan_iter(match="sv:{*}:events", count=1000))
        except self._errors as error:
            raise StoreUnavailable(self.url, str(error) or type(error).__name__) from None
        return sorted({_untag(_text(key)[4:-8]) for key in keys})

    def events(self, agent: str | None = None) -> list[dict[str, Any]]:
        """The history of one agent (or of every agent, one after the other), oldest first."""
        if agent is None:
            return [event for name in self.agents() for event in self.events(name)]
        try:
            entries = self._client.xrange(f"sv:{{{_tag(agent)}}}:events")
        except self._errors as error:
            raise StoreUnavailable(self.url, str(error) or type(error).__name__) from None
        found = []
        for _, fields in entries or []:
            event = {_text(k): _text(v) for k, v in (fields or {}).items()}
            packed = event.pop("e", None)  # a grant's fields, written as one JSON value
            if packed is not None:
                event.update((k, str(v)) for k, v in json.loads(packed).items())
            found.append(event)
        return found

    def close(self) -> None:
        self._client.close()
