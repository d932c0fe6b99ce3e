"""The Redis ledger store: budgets shared by supervisors on several machines.

Every operation is one Lua script (EVALSHA), so it is atomic on the server: a reservation
checks and holds every scope in one step. Windows and expiries use the server's clock
(``TIME``), never a client's; period keys (``2026-11-23``) come from the server's time,
read when the store is opened and carried forward on the client's monotonic clock. Every
key of an agent carries the hash tag ``{agent}`` and the script is routed by one of them,
so the whole budget of an agent lives in one Redis Cluster slot. The history is a stream per agent
(``XADD``, never trimmed). A lost connection raises StoreUnavailable: nothing is granted.
The scripts are in ``ledger.lua`` beside this module, read once.
"""

from __future__ import annotations

import json
import os
import time

from supervisor.budget._store import KEEP_FINISHED
from supervisor.errors import StoreUnavailable

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from supervisor.budget._store import (
        AddRunOp,
        AgentOp,
        Charged,
        CommitOp,
        Event,
        HoldInfo,
        HoldOp,
        LiveRun,
        RecordOp,
        ReleaseOp,
        Reserved,
        ReserveOp,
        ResetOp,
        ResetScope,
        Row,
        RunOp,
        SettledHold,
        SettleOp,
        UsageOp,
        UsageRows,
    )

__all__ = ["RedisStore"]

_KEEP_MS = str(KEEP_FINISHED * 1000)  # ARGV[2] of every script
_LUA: dict[str, str] = {}  # script name -> its text with the prelude; read once


def _scripts() -> dict[str, str]:
    """The scripts of ``ledger.lua`` by name, each after the shared prelude."""
    if not _LUA:
        with open(os.path.join(os.path.dirname(__file__), "ledger.lua"), encoding="utf-8") as f:
            prelude, *sections = f.read().split("\n--- script ")
        for section in sections:
            name, _, body = section.partition("\n")
            _LUA[name] = prelude + "\n" + body
    return _LUA


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _rows(flat: list[Any]) -> dict[str, Row]:
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
            name: self._client.register_script(text) for name, text in _scripts().items()
        }

    def _key(self, agent: str) -> str:
        """The key the scripts are routed by (its hash tag is the agent)."""
        key = self._keys.get(agent)
        if key is None:
            key = self._keys[agent] = f"sv:{{{_tag(agent)}}}:scopes"
        return key

    def _run(self, name: str, agent: str, payload: str) -> Any:
        """Run one script on the agent's key with ARGV ``payload`` (JSON) and the retention."""
        try:
            return self._scripts[name](keys=[self._key(agent)], args=[payload, _KEEP_MS])
        except self._errors as error:
            raise StoreUnavailable(self.url, str(error) or type(error).__name__) from None

    def time(self) -> float:
        return time.monotonic() + self._skew

    def reserve(self, op: ReserveOp) -> Reserved:
        out = self._run("reserve", op["agent"], json.dumps(_reserve_args(op)))
        verdict = _text(out[0])
        if verdict == "grant" or verdict == "replay":
            return {"verdict": "replay" if verdict == "replay" else "grant",
                    "hold_id": _text(out[1]), "usd": int(out[2]), "tokens": int(out[3]),
                    "expires": float(_text(out[4]))}  # fmt: skip
        if verdict == "deny":
            return {"verdict": "deny", "scope": _text(out[1]), "limit": int(out[2]),
                    "used": int(out[3]), "held": int(out[4]),
                    "limit_value": int(out[5])}  # fmt: skip
        return {"verdict": "rate", "limit": int(out[1]), "used": int(out[2]),
                "limit_value": int(out[3]), "retry_after": float(_text(out[4]))}  # fmt: skip

    def hold(self, op: HoldOp) -> HoldInfo | None:
        out = self._run("hold", op["agent"], json.dumps(op))
        if not out:
            return None
        model, provider, state = (_text(v) for v in out)
        info = {"model": model, "provider": provider or None, "state": state}
        return info  # type: ignore[return-value]  # state: a HoldState, as the scripts write it

    def commit(self, op: CommitOp) -> Charged | None:
        return _charged(self._run("commit", op["agent"], json.dumps(op)))

    def record(self, op: RecordOp) -> Charged:
        charged = _charged(self._run("record", op["agent"], json.dumps(op)))
        assert charged is not None  # record never answers 'missing'
        return charged

    def release(self, op: ReleaseOp) -> bool:
        return _text(self._run("release", op["agent"], json.dumps(op))) != "missing"

    def usage(self, op: UsageOp) -> UsageRows:
        out = self._run("usage", op["agent"], json.dumps(op))
        return {"rate": [int(out[0]), int(out[1])], "scopes": _rows(out[2:])}

    def settle_open(self, op: SettleOp) -> list[SettledHold]:
        out = self._run("settle", op["agent"], json.dumps(op))
        return [
            {"hold_id": _text(out[i]), "usd": int(out[i + 1]), "tokens": int(out[i + 2]),
             "model": _text(out[i + 3]), "label": _text(out[i + 4]) or None}
            for i in range(0, len(out), 5)
        ]  # fmt: skip

    def reset(self, op: ResetOp) -> list[ResetScope]:
        out = self._run("reset", op["agent"], json.dumps(op))
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

    def add_run(self, op: AddRunOp) -> None:
        """Note a live run and its owner (the supervisor: host, boot, pid, start time)."""
        key = f"sv:{{{_tag(op['agent'])}}}:runs"
        self._call("hset", key, op["run_id"], json.dumps(op["owner"], sort_keys=True))

    def forget_run(self, op: RunOp) -> None:
        self._call("hdel", f"sv:{{{_tag(op['agent'])}}}:runs", op["run_id"])

    def runs(self, op: AgentOp) -> list[LiveRun]:
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

    def events(self, agent: str | None = None) -> list[Event]:
        """The history of one agent (or of every agent, one after the other), oldest first."""
        if agent is None:
            return [event for name in self.agents() for event in self.events(name)]
        try:
            entries = self._client.xrange(f"sv:{{{_tag(agent)}}}:events")
        except self._errors as error:
            raise StoreUnavailable(self.url, str(error) or type(error).__name__) from None
        found: list[Event] = []
        for _, fields in entries or []:
            event = {_text(k): _text(v) for k, v in (fields or {}).items()}
            packed = event.pop("e", None)  # a grant's fields, written as one JSON value
            if packed is not None:
                event.update((k, str(v)) for k, v in json.loads(packed).items())
            found.append(event)  # type: ignore[arg-type]  # the stream's fields are Event's keys
        return found

    def close(self) -> None:
        self._client.close()


def _reserve_args(op: ReserveOp) -> list[Any]:
    """ARGV[1] of the reserve script: the flat array ``ledger.lua`` documents (A[1]...)."""
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
    return args


def _charged(out: list[Any]) -> Charged | None:
    """A commit's or record's answer from the script's flat reply; None: no such hold."""
    if _text(out[0]) == "missing":
        return None
    if _text(out[0]) == "replay":
        return {"usd": int(out[1]), "tokens": int(out[2]), "price_source": _text(out[3]),
                "delta": [0, 0, 0], "scopes": _rows(out[4:]), "replayed": True}  # fmt: skip
    return {"usd": int(out[1]), "tokens": int(out[2]), "price_source": _text(out[3]),
            "delta": [int(v) for v in out[4:7]], "scopes": _rows(out[7:])}  # fmt: skip
