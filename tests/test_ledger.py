"""Ledger tests against real stores: a SQLite file and a real redis-server on loopback."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from _helpers import GLOBAL_TIMEOUT, RedisServer, python

from supervisor.budget._policy import BudgetPolicy
from supervisor.budget.ledger import Ledger, default_store_url, open_store
from supervisor.errors import (
    BudgetExceeded,
    RateLimited,
    StoreUnavailable,
    SupervisorError,
    UnknownModel,
    UnknownReservation,
)

PRICED = {"m": {"input": 1, "output": 2}}  # $1 / $2 per million tokens: 1 / 2 micro-USD a token
DAY = 86400.0
T0 = 1_795_000_000.0  # 2026-11-19T..., a fixed clock for period tests


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of a fresh store: a SQLite file, or a flushed real redis-server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/budget.db"
    server: RedisServer = request.getfixturevalue("redis_server")
    server.flush()
    return server.url


class Clock:
    """A clock tests move by hand."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def make(store_url: str) -> Iterator[Callable[..., Ledger]]:
    """Open ledgers on the test's store (closed after the test)."""
    opened: list[Ledger] = []

    def open_(budget: dict[str, Any], **kw: Any) -> Ledger:
        kw.setdefault("run_id", "r1")
        kw.setdefault("agent", "bot")
        kw.setdefault("session", "s1")
        ledger = Ledger.open(
            BudgetPolicy.model_validate({"pricing": PRICED, **budget}), store=store_url, **kw
        )
        opened.append(ledger)
        return ledger

    yield open_
    for ledger in opened:
        ledger.close()


def scope(ledger: Ledger, name: str) -> Any:
    return next(u for u in ledger.usage() if u.scope == name)


def test_reserve_then_commit_charges_the_actual_usage(make: Callable[..., Ledger]) -> None:
    """A hold covers the worst case on every scope; commit frees it and charges the actual."""
    ledger = make({"run": {"usd": 1}})
    hold = ledger.reserve(model="m", input_tokens=1000, max_output_tokens=500)
    assert (hold.usd_held, hold.tokens_held) == (Decimal("0.002"), 1500)
    for usage in ledger.usage()[:4]:
        assert (usage.calls.held, usage.tokens.held, usage.usd.held) == (1, 1500, Decimal("0.002"))
    charge = ledger.commit(hold.id, input_tokens=900, output_tokens=100)
    assert (charge.usd, charge.tokens) == (Decimal("0.0011"), 1000)
    assert charge.usage.usd.used == Decimal("0.0011") and charge.usage.usd.held == 0
    assert [u.scope for u in ledger.usage()] == ["run", "session", "daily", "monthly", "rate"]
    assert all(u.usd.used == Decimal("0.0011") for u in ledger.usage()[:4])


def test_commit_over_the_hold_is_written_then_raised(make: Callable[..., Ledger]) -> None:
    """Usage past the hold and past a limit is recorded anyway, then BudgetExceeded carries it."""
    ledger = make({"run": {"tokens": 2000}})
    hold = ledger.reserve(model="m", input_tokens=1000, max_output_tokens=500)
    with pytest.raises(BudgetExceeded) as info:
        ledger.commit(hold.id, input_tokens=1000, output_tokens=1500)
    error = info.value
    assert (error.scope, error.limit, error.used, error.limit_value) == (
        "run",
        "tokens",
        2500,
        2000,
    )
    assert error.charge is not None and error.charge.tokens == 2500
    assert scope(ledger, "run").tokens.used == 2500 and scope(ledger, "run").tokens.held == 0


def test_record_over_a_limit_is_written_then_raised(make: Callable[..., Ledger]) -> None:
    """record is always written; breaking a limit raises after the write (never drops spend)."""
    ledger = make({"daily": {"usd": "0.001"}})
    ledger.record(model="m", input_tokens=500, output_tokens=0)
    with pytest.raises(BudgetExceeded) as info:
        ledger.record(model="m", input_tokens=600, output_tokens=0)
    assert info.value.scope == "daily" and info.value.used == Decimal("0.0011")
    assert scope(ledger, "daily").usd.used == Decimal("0.0011")
    assert "(the spend was recorded)" in str(info.value)


def test_all_or_nothing_across_scopes(make: Callable[..., Ledger]) -> None:
    """Daily has room, monthly does not: denied, naming monthly, and nothing held anywhere."""
    ledger = make({"daily": {"usd": 10}, "monthly": {"usd": "0.0015"}})
    ledger.record(model="m", input_tokens=1000, output_tokens=0)
    with pytest.raises(BudgetExceeded) as info:
        ledger.reserve(model="m", input_tokens=1000)
    error = info.value
    assert (error.scope, error.limit) == ("monthly", "usd")
    assert (error.used, error.held, error.requested) == (Decimal("0.001"), 0, Decimal("0.001"))
    assert error.limit_value == Decimal("0.0015") and error.charge is None
    for usage in ledger.usage():
        assert (usage.calls.held, usage.tokens.held, usage.usd.held) == (0, 0, 0)


def test_reserve_counts_holds_of_other_runs(make: Callable[..., Ledger]) -> None:
    """Two runs of one agent share the daily budget: the second run's hold sees the first's."""
    first = make({"daily": {"calls": 1}}, run_id="r1")
    second = make({"daily": {"calls": 1}}, run_id="r2")
    first.reserve(model="m", input_tokens=10)
    with pytest.raises(BudgetExceeded) as info:
        second.reserve(model="m", input_tokens=10)
    assert (info.value.scope, info.value.used, info.value.held) == ("daily", 0, 1)


def test_idempotency_key_makes_a_retry_free(make: Callable[..., Ledger]) -> None:
    """The same key returns the first hold and the first charge; nothing is charged twice."""
    ledger = make({})
    hold = ledger.reserve(model="m", input_tokens=100, key="call-1")
    again = ledger.reserve(model="m", input_tokens=100, key="call-1")
    assert again.id == hold.id and again.replayed and not hold.replayed
    first = ledger.commit(hold.id, input_tokens=100, output_tokens=10)
    retry = ledger.commit(hold.id, input_tokens=100, output_tokens=10)
    assert retry.replayed and retry.usd == first.usd
    ledger.record(model="m", input_tokens=7, output_tokens=0, key="rec-1")
    replay = ledger.record(model="m", input_tokens=7, output_tokens=0, key="rec-1")
    assert replay.replayed
    run = scope(ledger, "run")
    assert (run.calls.used, run.tokens.used, run.usd.used) == (2, 117, Decimal("0.000127"))


def test_expired_hold_is_charged_at_its_input_estimate(make: Callable[..., Ledger]) -> None:
    """A hold past its expiry stops holding and is charged what its input costs."""
    clock = Clock()
    ledger = make({}, clock=clock, hold_ttl=30)
    ledger.reserve(model="m", input_tokens=1000, max_output_tokens=9000)
    clock.now += 29
    assert scope(ledger, "run").usd.held == Decimal("0.019")
    clock.now += 2
    run = scope(ledger, "run")
    assert (run.usd.held, run.usd.used, run.tokens.used, run.calls.used) == (
        0, Decimal("0.001"), 1000, 1
    )  # fmt: skip


def test_a_reserve_that_would_be_denied_expires_holds_first(make: Callable[..., Ledger]) -> None:
    """Holds expired a moment ago (before any sweep) do not cause a denial: swept, then granted."""
    clock = Clock()
    ledger = make({"run": {"usd": "0.02"}}, clock=clock, hold_ttl=0.5)
    ledger.reserve(model="m", input_tokens=1000, max_output_tokens=9000)  # holds $0.019
    clock.now += 0.6  # expired, and within the same second as the last sweep
    ledger.reserve(model="m", input_tokens=1000, max_output_tokens=9000)  # 0.001 + 0.019 fits
    run = scope(ledger, "run")
    assert (run.usd.used, run.usd.held, run.calls.used, run.calls.held) == (
        Decimal("0.001"), Decimal("0.019"), 1, 1
    )  # fmt: skip
    with pytest.raises(BudgetExceeded) as info:
        ledger.reserve(model="m", input_tokens=1)
    assert (info.value.used, info.value.held) == (Decimal("0.001"), Decimal("0.019"))
    assert scope(ledger, "run").usd.held == Decimal("0.019")  # the denied hold was taken back


def test_commit_after_expiry_charges_the_actual_once(make: Callable[..., Ledger]) -> None:
    """A late commit replaces the expiry's estimate with the actual usage (not both)."""
    clock = Clock()
    ledger = make({}, clock=clock, hold_ttl=5)
    hold = ledger.reserve(model="m", input_tokens=1000, max_output_tokens=1000)
    clock.now += 10
    ledger.usage()  # the expiry happens here
    charge = ledger.commit(hold.id, input_tokens=1000, output_tokens=500)
    assert charge.usage.usd.used == Decimal("0.002") and charge.usage.calls.used == 1


def test_periods_roll_over(make: Callable[..., Ledger]) -> None:
    """A full day denies until midnight UTC; a full month until the 1st."""
    clock = Clock(1_796_083_200.0 - 60)  # 2026-11-30T23:59:00Z
    ledger = make({"daily": {"calls": 1}, "monthly": {"calls": 2}}, clock=clock)
    ledger.record(model="m", input_tokens=1, output_tokens=0)
    with pytest.raises(BudgetExceeded) as info:
        ledger.reserve(model="m", input_tokens=1)
    assert (info.value.scope, info.value.key) == ("daily", "2026-11-30")
    clock.now += 120  # 2026-12-01
    ledger.reserve(model="m", input_tokens=1)
    keys = {u.scope: u.key for u in ledger.usage()}
    assert (keys["daily"], keys["monthly"]) == ("2026-12-01", "2026-12")


def test_timezone_moves_the_day(make: Callable[..., Ledger]) -> None:
    """budget.timezone decides when a day starts: 23:30 UTC is already tomorrow in Tokyo."""
    clock = Clock(1_796_083_200.0 - 1800)  # 2026-11-30T23:30:00Z
    ledger = make({"timezone": "Asia/Tokyo"}, clock=clock)
    assert {u.scope: u.key for u in ledger.usage()}["daily"] == "2026-12-01"


def test_settle_open_charges_open_holds_at_their_estimate(make: Callable[..., Ledger]) -> None:
    """At child exit every open hold of the run is charged at its input estimate, once."""
    ledger = make({})
    done = ledger.reserve(model="m", input_tokens=10)
    ledger.commit(done.id, input_tokens=10, output_tokens=0)
    open_ = ledger.reserve(model="m", input_tokens=2000, max_output_tokens=5000, label="triage")
    settled = ledger.settle_open()
    assert [(s.hold_id, s.usd, s.tokens, s.label) for s in settled] == [
        (open_.id, Decimal("0.002"), 2000, "triage")
    ]
    assert ledger.settle_open() == []
    run = scope(ledger, "run")
    assert (run.usd.used, run.usd.held, run.calls.used) == (Decimal("0.00201"), 0, 2)


def test_release_frees_the_hold_and_charges_nothing(make: Callable[..., Ledger]) -> None:
    """release gives the whole hold back; an unknown id is UnknownReservation."""
    ledger = make({})
    hold = ledger.reserve(model="m", input_tokens=1000, max_output_tokens=1000)
    ledger.release(hold.id)
    ledger.release(hold.id)  # twice is harmless
    run = scope(ledger, "run")
    assert (run.usd.used, run.usd.held, run.calls.used, run.calls.held) == (0, 0, 0, 0)
    with pytest.raises(UnknownReservation):
        ledger.release("nope")
    with pytest.raises(UnknownReservation):
        ledger.commit("nope", input_tokens=1, output_tokens=1)


def test_rate_limit_denies_with_retry_after(make: Callable[..., Ledger]) -> None:
    """calls_per_minute is a sliding window: the next call waits for the oldest to leave."""
    clock = Clock()
    ledger = make({"rate": {"calls_per_minute": 2}}, clock=clock)
    ledger.reserve(model="m", input_tokens=1)
    clock.now += 10
    ledger.reserve(model="m", input_tokens=1)
    with pytest.raises(RateLimited) as info:
        ledger.reserve(model="m", input_tokens=1)
    assert info.value.limit == "calls_per_minute" and 49 <= info.value.retry_after <= 50
    clock.now += 51
    ledger.reserve(model="m", input_tokens=1)


def test_tokens_per_minute(make: Callable[..., Ledger]) -> None:
    """tokens_per_minute counts held and used tokens in the window."""
    ledger = make({"rate": {"tokens_per_minute": 1000}}, clock=Clock())
    ledger.reserve(model="m", input_tokens=600)
    with pytest.raises(RateLimited) as info:
        ledger.reserve(model="m", input_tokens=600)
    assert (info.value.limit, info.value.used) == ("tokens_per_minute", 600)


def test_unknown_model_is_denied_naming_the_fix(make: Callable[..., Ledger]) -> None:
    """unknown_model: deny refuses a model without a price and says how to price it."""
    ledger = make({})
    with pytest.raises(UnknownModel) as info:
        ledger.reserve(model="my-secret-model", input_tokens=10)
    assert "my-secret-model" in str(info.value) and "budget.pricing" in str(info.value)
    free = make({"unknown_model": "free"}, run_id="r2")
    assert free.reserve(model="my-secret-model", input_tokens=10).usd_held == 0


def test_a_callers_usd_never_lowers_the_table_nor_admits_an_unknown_model(
    make: Callable[..., Ledger],
) -> None:
    """usd: 0 neither admits an unknown model under deny nor makes a priced call free; a
    higher usd (a price supervise does not know) is what is held and charged."""
    ledger = make({})
    with pytest.raises(UnknownModel):
        ledger.reserve(model="mystery", input_tokens=10, usd=Decimal(0))
    with pytest.raises(UnknownModel):
        ledger.record(model="mystery", input_tokens=10, output_tokens=0, usd=Decimal(1))
    huge = ledger.record(model="m", input_tokens=2_000_000_000, output_tokens=0, usd=Decimal(0))
    assert huge.usd == Decimal(2000) and huge.price_source != "caller"
    hold = ledger.reserve(model="m", input_tokens=100, max_output_tokens=100, usd=Decimal(0))
    assert hold.usd_held == Decimal("0.0003")  # the table's worst case, not the caller's 0
    assert ledger.commit(hold.id, input_tokens=100, output_tokens=100, usd=Decimal(0)).usd == (
        Decimal("0.0003")
    )
    dear = ledger.record(model="m", input_tokens=1, output_tokens=0, usd=Decimal("0.5"))
    assert dear.usd == Decimal("0.5") and dear.price_source == "caller"
    free = make({"unknown_model": "free"}, run_id="r2")
    assert free.reserve(model="mystery", input_tokens=10, usd=Decimal("0.25")).usd_held == (
        Decimal("0.25")
    )


def test_maintained_prices_are_used(make: Callable[..., Ledger]) -> None:
    """A known model is priced from genai-prices, and the history names its version."""
    ledger = make({})
    charge = ledger.record(model="gpt-4o-mini", input_tokens=1_000_000, output_tokens=0)
    assert charge.usd == Decimal("0.15") and charge.price_source == "genai-prices"


def test_bad_token_counts_are_refused_before_the_store(make: Callable[..., Ledger]) -> None:
    """Negative counts and parts larger than their whole are ValueError; nothing changes."""
    ledger = make({})
    for bad in ({"input_tokens": -1}, {"input_tokens": 10, "cached_input_tokens": 11}):
        with pytest.raises(ValueError):
            counts: dict[str, Any] = {"input_tokens": 0, **bad}
            ledger.record(model="m", output_tokens=0, **counts)
    assert scope(ledger, "run").calls.used == 0


def test_tiny_charges_add_up_exactly(make: Callable[..., Ledger]) -> None:
    """Thousands of sub-cent charges sum to the exact micro-USD total (a float sum would not)."""
    ledger = make({})
    amounts = [Decimal("0.000001"), Decimal("0.000003"), Decimal("0.000007")] * 1000
    for usd in amounts:
        ledger.record(model="m", input_tokens=1, output_tokens=0, usd=usd)
    assert scope(ledger, "run").usd.used == sum(amounts) == Decimal("0.011")
    assert sum(float(a) for a in amounts) != 0.011


def test_a_million_tiny_charges_in_the_sqlite_store(tmp_path: Path) -> None:
    """A million 1 micro-USD charges in one transaction add up to exactly $1.000000."""
    from supervisor.budget.sqlite import SQLiteStore

    budget = BudgetPolicy.model_validate({"unknown_model": "free"})
    store = SQLiteStore("sqlite:///x", str(tmp_path / "b.db"))
    ledger = Ledger(budget, store, run_id="r", agent="a", session=None)
    one = Decimal("0.000001")
    with store.batch():
        ledger.record(model="x", input_tokens=1, output_tokens=0, usd=one)
        assert store._db is not None
        store._db.executemany(
            "UPDATE scopes SET usd_used = usd_used + ?, calls_used = calls_used + 1"
            " WHERE agent = 'a' AND id LIKE 'run:%'",
            ((1,) for _ in range(999_999)),
        )
    run = scope(ledger, "run")
    assert (run.usd.used, run.calls.used) == (Decimal("1.000000"), 1_000_000)
    ledger.close()


def test_history_keeps_raw_counts_and_price_version(store_url: str) -> None:
    """Every operation appends an event with raw token counts, model, label and price source."""
    budget = BudgetPolicy.model_validate({"daily": {"calls": 1}})
    with Ledger.open(budget, run_id="r", agent="bot", session=None, store=store_url) as ledger:
        hold = ledger.reserve(model="gpt-4o-mini", input_tokens=100, label="triage")
        ledger.commit(hold.id, input_tokens=100, output_tokens=20, cached_input_tokens=50)
        with pytest.raises(BudgetExceeded):
            ledger.reserve(model="gpt-4o-mini", input_tokens=100)
        events = ledger.store.events("bot")
    kinds = [e["kind"] for e in events]
    assert kinds == ["grant", "commit", "deny"]
    commit = events[1]
    assert str(commit["cached_input_tokens"]) == "50" and str(commit["output_tokens"]) == "20"
    assert commit["price_version"].startswith("genai-prices ") and commit["label"] == "triage"


def test_sqlite_history_is_append_only(tmp_path: Path) -> None:
    """The events table refuses UPDATE and DELETE."""
    url = f"sqlite:///{tmp_path}/b.db"
    budget = BudgetPolicy.model_validate({"pricing": PRICED})
    with Ledger.open(budget, run_id="r", agent="a", session=None, store=url) as ledger:
        ledger.record(model="m", input_tokens=1, output_tokens=1)
    db = sqlite3.connect(tmp_path / "b.db")
    for sql in ("UPDATE events SET usd = 0", "DELETE FROM events"):
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            db.execute(sql)
    db.close()


def test_default_store_lives_in_the_state_dir(isolated_state: Path) -> None:
    """Without a store URL the ledger is $XDG_STATE_HOME/supervise/budget.db."""
    assert default_store_url() == f"sqlite:///{isolated_state}/supervise/budget.db"
    store = open_store(None)
    store.close()
    assert (isolated_state / "supervise" / "budget.db").exists()


def test_bad_or_unreachable_store_fails_closed(tmp_path: Path) -> None:
    """A bad URL, an unwritable path or a dead Redis is StoreUnavailable (exit 125), naming it."""
    (tmp_path / "file").write_text("x")
    for url in ("mysql://x", f"sqlite:///{tmp_path}/file/b.db", "redis://127.0.0.1:1/0"):
        with pytest.raises(StoreUnavailable) as info:
            open_store(url)
        assert url in str(info.value) and info.value.exit_code == 125
        assert isinstance(info.value, SupervisorError)


CONTENDER = """
import json, sys
from decimal import Decimal
from supervisor.budget._policy import BudgetPolicy
from supervisor.budget.ledger import Ledger
from supervisor.errors import BudgetExceeded
url, n = sys.argv[1], int(sys.argv[2])
daily = {"calls": 10000, "usd": 10}
budget = BudgetPolicy.model_validate({"daily": daily, "unknown_model": "free"})
granted = denied = 0
with Ledger.open(budget, run_id=sys.argv[3], agent="crowd", session=None, store=url) as ledger:
    for _ in range(n):
        try:
            ledger.reserve(model="m", usd=Decimal("0.001"))
            granted += 1
        except BudgetExceeded:
            denied += 1
print(json.dumps([granted, denied]))
"""


def contend(url: str, procs: int = 8, each: int = 2000) -> list[list[int]]:
    """Run ``procs`` processes making ``each`` reservations on one store; their counts."""
    children = [
        subprocess.Popen(
            [*python(CONTENDER), url, str(each), f"run{i}"], stdout=subprocess.PIPE, text=True
        )
        for i in range(procs)
    ]
    results = []
    for child in children:
        out, _ = child.communicate(timeout=GLOBAL_TIMEOUT)
        assert child.returncode == 0
        results.append(json.loads(out))
    return results


@pytest.mark.slow
def test_eight_processes_never_overspend(store_url: str) -> None:
    """8 processes x 2000 reservations against 10000: exactly 10000 granted, never more held."""
    started = time.monotonic()
    results = contend(store_url)
    assert sum(g for g, _ in results) == 10000 and sum(d for _, d in results) == 6000
    budget = BudgetPolicy.model_validate(
        {"daily": {"calls": 10000, "usd": 10}, "unknown_model": "free"}
    )
    with Ledger.open(budget, run_id="x", agent="crowd", session=None, store=store_url) as ledger:
        daily = scope(ledger, "daily")
    assert (daily.calls.held, daily.usd.held) == (10000, Decimal("10.000000"))
    assert time.monotonic() - started < GLOBAL_TIMEOUT


@pytest.mark.redis
def test_redis_lost_mid_run_denies_and_spends_nothing() -> None:
    """A Redis that goes away mid-run makes every operation StoreUnavailable: no free spend."""
    server = RedisServer()
    budget = BudgetPolicy.model_validate({"pricing": PRICED})
    try:
        ledger = Ledger.open(budget, run_id="r", agent="a", session=None, store=server.url)
        hold = ledger.reserve(model="m", input_tokens=10)
        server.stop()
        with pytest.raises(StoreUnavailable, match=server.url.replace(".", r"\.")):
            ledger.reserve(model="m", input_tokens=10)
        with pytest.raises(StoreUnavailable):
            ledger.commit(hold.id, input_tokens=10, output_tokens=0)
        with pytest.raises(StoreUnavailable):
            ledger.record(model="m", input_tokens=10, output_tokens=0)
        ledger.close()
        with pytest.raises(StoreUnavailable):
            Ledger.open(budget, run_id="r", agent="a", session=None, store=server.url)
    finally:
        server.stop()


def test_import_of_the_run_path_stays_light() -> None:
    """Loading a policy without a budget does not import sqlite3, redis or genai_prices."""
    code = (
        "import sys; from supervisor.policy import Policy; Policy.default();"
        "print(sorted(m for m in ('sqlite3', 'redis', 'genai_prices', 'supervisor.budget.ledger')"
        " if m in sys.modules))"
    )
    done = subprocess.run(python(code), capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
    assert sys.executable
