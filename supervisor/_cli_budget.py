"""The ledger's commands: ``supervise budget status|reset``, ``models`` and ``report``.

Registered on the click group of ``_cli_commands``; imported only when a subcommand is named.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click

from ._units import format_money


def _budget_of(policy_path: str | None) -> tuple[Any, str | None]:
    """(BudgetPolicy, the policy's agent) of --policy FILE, else of the policy a run would
    take ($SUPERVISE_POLICY, ./supervise.yaml, the XDG one, the default)."""
    from .budget._policy import BudgetPolicy
    from .cli import find_policy
    from .policy import Policy

    path = find_policy(policy_path or None)[0]
    policy = Policy.load(path) if path else Policy.default()
    return policy.budget or BudgetPolicy(), policy.agent


def _store_of(url: str | None, budget: Any) -> Any:
    from .budget.ledger import open_store

    return open_store(url or budget.store)


def _cell(value: Any, money: bool) -> str:
    if value is None:
        return "-"
    return format_money(value) if money else str(value)


@click.group()
def budget() -> None:
    """The budget ledger: what each scope used, held and may spend."""


@budget.command()
@click.option("--agent", help="The agent (default: the policy's agent).")
@click.option("--session", help="Also show this session's scope.")
@click.option("--store", "store_url", metavar="URL", help="sqlite:///PATH or redis://HOST:PORT/DB.")
@click.option("--policy", "-p", "policy_path", metavar="FILE", help="Limits from this policy.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object (SPEC's shape).")
def status(
    agent: str | None,
    session: str | None,
    store_url: str | None,
    policy_path: str | None,
    as_json: bool,
) -> None:
    """Each scope of an agent now: used, held, limit and % of calls, tokens and usd."""
    from .budget.ledger import status as ledger_status

    limits, policy_agent = _budget_of(policy_path)
    agent = agent or policy_agent
    if agent is None:
        raise click.UsageError("no agent: pass --agent ID (or a --policy that names one)")
    store = _store_of(store_url, limits)
    try:
        scopes = ledger_status(limits, agent=agent, session=session, store=store)
    finally:
        store.close()
    if as_json:
        doc = {"agent": agent, "store": store.url, "scopes": [s.to_dict() for s in scopes]}
        click.echo(json.dumps(doc, separators=(",", ":")))
        return
    click.echo(f"agent {agent} · store {store.url}")
    header = ("scope", "key", "of", "used", "held", "limit", "%")
    lines: list[tuple[str, ...]] = [header]
    for usage in scopes:
        for name in ("calls", "tokens", "usd"):
            amount = getattr(usage, name)
            if usage.scope == "rate" and name == "usd":
                continue
            money = name == "usd"
            share = "-"
            if amount.limit:
                share = f"{(amount.used + amount.held) * 100 / amount.limit:.1f}"
            lines.append(
                (
                    usage.scope,
                    usage.key,
                    name,
                    _cell(amount.used, money),
                    _cell(amount.held, money),
                    _cell(amount.limit, money),
                    share,
                )
            )
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    for row in lines:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))


@budget.command()
@click.option("--agent", required=True, help="The agent whose spend to forget.")
@click.option(
    "--period",
    type=click.Choice(["run", "session", "daily", "monthly"]),
    help="Only these scopes (default: all of them).",
)
@click.option("--store", "store_url", metavar="URL", help="sqlite:///PATH or redis://HOST:PORT/DB.")
@click.option("--policy", "-p", "policy_path", metavar="FILE", help="The store from this policy.")
@click.option("--audit", "audit_path", metavar="FILE", help="The audit log (default: the user's).")
def reset(
    agent: str,
    period: str | None,
    store_url: str | None,
    policy_path: str | None,
    audit_path: str | None,
) -> None:
    """Set used back to 0 on an agent's scopes (open holds stay); written to the audit log."""
    from .audit import AuditLog, default_audit_file
    from .budget.ledger import new_id
    from .budget.ledger import reset as ledger_reset

    limits, _ = _budget_of(policy_path)
    store = _store_of(store_url, limits)
    # Audit first: a reset that cannot be logged does not happen.
    with AuditLog(audit_path or default_audit_file()) as log:
        try:
            done = ledger_reset(store, agent=agent, period=period)
        finally:
            store.close()
        log.append(
            "budget_reset",
            run_id=f"reset-{new_id()}",
            agent=agent,
            action="reset",
            detail={
                "store": store.url,
                "period": period or "all",
                "user": os.environ.get("USER") or str(os.getuid()),
                "scopes": [{**row, "usd": format_money(_usd(row["usd"]))} for row in done],
            },
        )
    if not done:
        click.echo(
            f"supervise: nothing to reset: agent {agent} has no spend in {store.url} "
            "(supervise report --by agent lists the agents)",
            err=True,
        )
        sys.exit(1)
    window = [row for row in done if row["scope"].startswith("rate:")]  # per-minute buckets
    for row in done:
        if row not in window:
            click.echo(
                f"reset {row['scope']}: was {row['calls']} calls, {row['tokens']} tokens, "
                f"{format_money(_usd(row['usd']))}"
            )
    if window:
        calls, tokens = sum(r["calls"] for r in window), sum(r["tokens"] for r in window)
        click.echo(f"reset the rate window: was {calls} calls, {tokens} tokens")


def _usd(micro: int) -> Any:
    from .budget.ledger import to_usd

    return to_usd(micro)


@click.command()
@click.argument("pattern", required=False)
@click.option("--policy", "-p", "policy_path", metavar="FILE", help="Include its budget.pricing.")
@click.option("--json", "as_json", is_flag=True, help="The rows as JSON Lines.")
def models(pattern: str | None, policy_path: str | None, as_json: bool) -> None:
    """The price table in use, USD per million tokens (a glob or a substring filters it)."""
    from .budget.pricing import Prices, source_version

    limits, _ = _budget_of(policy_path)
    rows = Prices(limits.pricing).table(pattern)
    fields = ("input", "output", "cached_input", "cache_write", "cache_write_1h", "reasoning",
              "web_searches")  # fmt: skip
    if as_json:
        for row in rows:
            doc = row._asdict()
            doc.update({k: None if doc[k] is None else float(doc[k]) for k in fields})
            click.echo(json.dumps(doc, separators=(",", ":")))
        return
    click.echo(
        f"USD per million tokens (web searches: per thousand) · source: {source_version()} "
        "(policy overrides first)"
    )
    header = ("provider", "model", "input", "output", "cache read", "cache write",
              "cache write 1h", "reasoning", "web searches")  # fmt: skip
    lines: list[tuple[str, ...]] = [header]
    for row in rows:
        prices = [getattr(row, f) for f in fields]
        cells = ["-" if p is None else f"{p.normalize():f}" for p in prices]
        if row.tiered:
            cells[0] += " (tiers)"
        lines.append((row.provider, row.model, *cells))
    if len(lines) == 1:
        click.echo(f"supervise: no model matches {pattern!r}", err=True)
        sys.exit(1)
    widths = [max(len(r[i]) for r in lines) for i in range(len(header))]
    for line in lines:
        click.echo("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())


@click.command()
@click.option("--since", help="Only spend since: ISO time, or 30m, 1h, 7d ago.")
@click.option("--agent", help="Only this agent's spend.")
@click.option(
    "--by",
    "dimensions",
    multiple=True,
    type=click.Choice(["agent", "model", "label", "session", "run", "day"]),
    help="A table by this (repeatable; default: agent, model and label).",
)
@click.option("--store", "store_url", metavar="URL", help="sqlite:///PATH or redis://HOST:PORT/DB.")
@click.option("--policy", "-p", "policy_path", metavar="FILE", help="The store from this policy.")
@click.option("--json", "as_json", is_flag=True, help="The report as one JSON object.")
@click.option("--html", "html_path", metavar="FILE", help="Also write a page with the chart.")
@click.option("--png", "png_path", metavar="FILE", help="Also write the chart as a PNG.")
def report(
    since: str | None,
    agent: str | None,
    dimensions: tuple[str, ...],
    store_url: str | None,
    policy_path: str | None,
    as_json: bool,
    html_path: str | None,
    png_path: str | None,
) -> None:
    """What LLM calls cost, from the budget ledger: by agent, model and label (hand-off
    step), session, run or day, each with its share of the total; then spend per day per
    agent as a chart."""
    from ._audit_view import parse_since
    from .report import costs, render_text, to_json

    try:
        floor = parse_since(since).timestamp() if since else None
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--since") from None
    by = list(dimensions) or ["agent", "model", "label"]
    limits, _ = _budget_of(policy_path)
    store = _store_of(store_url, limits)
    try:
        charges = costs(store, agent=agent, since=floor)
    finally:
        store.close()
    if html_path or png_path:
        from ._chart import write_html, write_png

        if png_path:
            write_png(png_path, charges)
        if html_path:
            write_html(html_path, charges, by, f"LLM spend · {store.url}")
    if as_json:
        click.echo(json.dumps({"store": store.url, **to_json(charges, by)}))
        return
    click.echo(f"LLM spend · store {store.url}" + (f" · since {since}" if since else ""))
    click.echo(render_text(charges, by))
    for path in (html_path, png_path):
        if path:
            click.echo(f"supervise: wrote {path}", err=True)
