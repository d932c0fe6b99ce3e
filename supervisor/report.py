"""What LLM calls cost, from the ledger's history: by agent, model, label, session, run or day.

The ledger's events (grant, commit, record, settle, expire, release) are replayed hold by
hold: each event that changes what a hold is charged becomes one ``Charge`` of the
difference, dated when it happened and named by the hold's agent, run, session, model and
label (from its grant). So a hold that expired (charged its estimate) and was committed
late counts once, at its actual price; a released one counts nothing. Sums are integer
micro-USD: the totals here are the ledger's, exactly.

``costs(store, ...)`` gives the charges, ``breakdown(charges, by)`` the rows of one table,
``render_text`` the terminal report (tables, and a chart of spend per day per agent);
``supervisor._chart`` writes the HTML and PNG forms.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from ._units import format_money
from .budget.ledger import MICRO, Store, to_usd

__all__ = [
    "DIMENSIONS", "Charge", "Row", "breakdown", "chart_lines", "costs", "daily", "money",
    "render_text", "to_json",
]  # fmt: skip

DIMENSIONS = ("agent", "model", "label", "session", "run", "day")
NONE = "-"  # the name of a group with no value (a call without a label, a run without session)
_CHARGING = ("record", "commit", "settle", "expire", "release")


@dataclass(frozen=True, slots=True)
class Charge:
    """One change of what a hold is charged (usually its whole charge): micro-USD, tokens."""

    ts: float
    agent: str
    run: str
    session: str
    model: str
    label: str
    calls: int
    input_tokens: int
    output_tokens: int
    micro_usd: int

    @property
    def day(self) -> str:
        return time.strftime("%Y-%m-%d", time.gmtime(self.ts))


@dataclass(slots=True)
class Row:
    """One line of a breakdown: a name and what its charges add up to."""

    name: str
    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    micro_usd: int = 0

    @property
    def usd(self) -> Decimal:
        return to_usd(self.micro_usd)

    def share(self, total: int) -> float:
        return self.micro_usd / total if total else 0.0

    def to_dict(self, total: int) -> dict[str, Any]:
        return {
            "name": self.name,
            "calls": self.calls,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "usd": float(self.usd),  # JSON numbers; usd_micro is the exact figure
            "usd_micro": self.micro_usd,
            "share": round(self.share(total), 6),
        }


def _int(value: Any) -> int:
    try:
        return int(value) if value not in (None, "") else 0
    except (TypeError, ValueError):
        return 0


def _name(value: Any) -> str:
    return NONE if value in (None, "") else str(value)


def costs(store: Store, *, agent: str | None = None, since: float | None = None) -> list[Charge]:
    """Every charge in the store's history (of ``agent``; not before ``since``), oldest first."""
    holds: dict[tuple[str, str], dict[str, Any]] = {}
    found: list[Charge] = []
    for event in store.events(agent):
        kind = event.get("kind")
        if kind != "grant" and kind not in _CHARGING:
            continue  # deny, reset: nothing was spent (a reset forgets a limit, not history)
        who = str(event.get("agent") or "")
        key = (who, str(event.get("hold_id") or ""))
        hold = holds.get(key)
        if hold is None or kind in ("grant", "record"):
            hold = holds[key] = {
                "run": _name(event.get("run_id")),
                "session": _name(event.get("session")),
                "model": _name(event.get("model")),
                "label": _name(event.get("label")),
                "charged": (0, 0, 0, 0),  # calls, micro-USD, input tokens, output tokens
            }
        if kind == "grant":
            continue
        if kind in ("record", "commit"):
            tokens_in, tokens_out = (
                _int(event.get("input_tokens")),
                _int(event.get("output_tokens")),
            )
        else:  # settle and expire charge the input estimate; release charges nothing
            tokens_in, tokens_out = _int(event.get("tokens")), 0
        now = (_int(event.get("calls")), _int(event.get("usd")), tokens_in, tokens_out)
        if kind == "release":
            now = (0, 0, 0, 0)
        before = hold["charged"]
        hold["charged"] = now
        delta = [a - b for a, b in zip(now, before, strict=True)]
        ts = float(event.get("ts") or 0)
        if not any(delta) or (since is not None and ts < since):
            continue
        calls, micro, tokens_in, tokens_out = delta
        found.append(
            Charge(
                ts=ts,
                agent=who,
                run=hold["run"],
                session=hold["session"],
                model=hold["model"],
                label=hold["label"],
                calls=calls,
                input_tokens=tokens_in,
                output_tokens=tokens_out,
                micro_usd=micro,
            )
        )
    found.sort(key=lambda charge: charge.ts)
    return found


def breakdown(charges: Iterable[Charge], by: str) -> list[Row]:
    """Rows grouped by one dimension, the most expensive first (then by name)."""
    if by not in DIMENSIONS:
        raise ValueError(f"cannot break costs down by {by!r} (one of {', '.join(DIMENSIONS)})")
    rows: dict[str, Row] = {}
    for charge in charges:
        name = getattr(charge, by)
        row = rows.get(name)
        if row is None:
            row = rows[name] = Row(name)
        row.calls += charge.calls
        row.input_tokens += charge.input_tokens
        row.output_tokens += charge.output_tokens
        row.micro_usd += charge.micro_usd
    if by == "day":
        return [rows[name] for name in sorted(rows)]
    return sorted(rows.values(), key=lambda row: (-row.micro_usd, row.name))


def daily(charges: Iterable[Charge]) -> tuple[list[str], list[str], dict[tuple[str, str], int]]:
    """(days, agents, micro-USD per (day, agent)): the chart's data, days in order."""
    spend: dict[tuple[str, str], int] = {}
    for charge in charges:
        key = (charge.day, charge.agent)
        spend[key] = spend.get(key, 0) + charge.micro_usd
    days = sorted({day for day, _ in spend})
    agents = sorted({agent for _, agent in spend})
    return days, agents, spend


def money(micro: int) -> str:
    """Micro-USD for people, as every supervise report writes money (``$5.00``, ``$0.00045``)."""
    return format_money(to_usd(micro))


def _table(title: str, rows: list[Row], total: int) -> list[str]:
    header = (title, "calls", "input", "output", "cost", "share")
    lines = [header]
    for row in rows:
        lines.append(
            (
                row.name,
                str(row.calls),
                str(row.input_tokens),
                str(row.output_tokens),
                money(row.micro_usd),
                f"{row.share(total):.1%}",
            )
        )
    sums = Row("total")
    for row in rows:
        sums.calls += row.calls
        sums.input_tokens += row.input_tokens
        sums.output_tokens += row.output_tokens
        sums.micro_usd += row.micro_usd
    lines.append(
        (
            "total",
            str(sums.calls),
            str(sums.input_tokens),
            str(sums.output_tokens),
            money(sums.micro_usd),
            "100.0%" if total else "-",
        )
    )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for n, line in enumerate(lines):
        cells = [
            cell.ljust(width) if i == 0 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(line, widths, strict=True))
        ]
        if n == len(lines) - 1:
            out.append("  ".join("-" * width for width in widths))
        out.append("  ".join(cells).rstrip())
    return out


_TITLES = {
    "agent": "agent",
    "model": "model",
    "label": "label (step)",
    "session": "session",
    "run": "run",
    "day": "day (UTC)",
}


def render_text(charges: list[Charge], by: Iterable[str], *, width: int = 40) -> str:
    """The terminal report: one table per dimension, then spend per day per agent as bars."""
    total = sum(charge.micro_usd for charge in charges)
    if not charges:
        return "no LLM spend in the ledger for this selection"
    blocks = ["\n".join(_table(_TITLES[name], breakdown(charges, name), total)) for name in by]
    blocks.append("\n".join(chart_lines(charges, width=width)))
    return "\n\n".join(blocks)


_MARKS = "#=*+%@&~o:"


def chart_lines(charges: list[Charge], *, width: int = 40) -> list[str]:
    """Spend per day per agent as stacked text bars, one mark per agent (legend below)."""
    days, agents, spend = daily(charges)
    per_day = {day: sum(spend.get((day, a), 0) for a in agents) for day in days}
    top = max(per_day.values(), default=0)
    marks = {agent: _MARKS[i % len(_MARKS)] for i, agent in enumerate(agents)}
    lines = ["spend per day (UTC) by agent"]
    for day in days:
        bar = ""
        for agent in agents:
            micro = spend.get((day, agent), 0)
            if micro > 0 and top > 0:
                bar += marks[agent] * max(1, round(micro * width / top))
        lines.append(f"{day}  {bar.ljust(width)}  {money(per_day[day])}")
    legend = "   ".join(f"{marks[a]} {a}" for a in agents)
    lines.append(f"{'':10}  {legend}")
    return lines


def to_json(charges: list[Charge], by: Iterable[str]) -> dict[str, Any]:
    """The report as one JSON document: totals, each breakdown, and the daily series."""
    total = sum(charge.micro_usd for charge in charges)
    days, agents, spend = daily(charges)
    return {
        "total": {
            "calls": sum(c.calls for c in charges),
            "input_tokens": sum(c.input_tokens for c in charges),
            "output_tokens": sum(c.output_tokens for c in charges),
            "usd": float(Decimal(total) / MICRO),
            "usd_micro": total,
        },
        "by": {name: [row.to_dict(total) for row in breakdown(charges, name)] for name in by},
        "daily": [
            {"day": day, "agent": agent, "usd_micro": spend[day, agent]}
            for day in days
            for agent in agents
            if (day, agent) in spend
        ],
    }
