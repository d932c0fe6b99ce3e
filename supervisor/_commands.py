"""The subcommands of ``supervise`` (click): check, audit, report, doctor, budget and models.

Imported only when a subcommand is named, so runs never pay for click.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from . import __version__
from .errors import AuditError, PolicyError, SupervisorError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="supervise")
def cli() -> None:
    """Run AI agents and their tools under hard limits (see `supervise --help`)."""


@cli.command()
@click.argument("policies", nargs=-1, required=True, metavar="POLICY...")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a value.")
@click.option("--quiet", "-q", is_flag=True, help="Only report problems.")
def check(policies: tuple[str, ...], overrides: tuple[str, ...], quiet: bool) -> None:
    """Validate policy files and print each effective policy."""
    from .policy import Policy

    bad = 0
    for path in policies:
        try:
            policy = Policy.load(path)
            if overrides:
                policy = policy.with_overrides(list(overrides))
        except PolicyError as e:
            bad += 1
            for problem in e.problems:
                click.echo(f"supervise: {problem}", err=True)
            continue
        if not quiet:
            click.echo(f"# {path}: ok (sha256 {policy.sha256()})")
            click.echo(policy.to_yaml().rstrip())
    if bad:
        sys.exit(125)


@cli.command()
@click.argument("logs", nargs=-1, metavar="[LOG]...")
@click.option("--verify", is_flag=True, help="Check the hash chain; name the first bad line.")
@click.option("--agent", help="Only events of this agent.")
@click.option("--session", help="Only events of this session.")
@click.option("--event", "event", help="Only this kind of event (violation, warning, ...).")
@click.option("--limit", "limit", help="Only events about this limit (wall_time, memory, ...).")
@click.option("--since", help="Only events since: ISO time, or 30m, 1h, 7d ago.")
@click.option("--list", "as_list", is_flag=True, help="One line per event, not the summary.")
@click.option("--json", "as_json", is_flag=True, help="The matching events as JSON Lines.")
@click.option("--follow", "-f", is_flag=True, help="Print events as they are written.")
def audit(
    logs: tuple[str, ...],
    verify: bool,
    agent: str | None,
    session: str | None,
    event: str | None,
    limit: str | None,
    since: str | None,
    as_list: bool,
    as_json: bool,
    follow: bool,
) -> None:
    """Summarize, list, follow and verify the audit log (default: the user's log).

    One LOG stands for its rotated files too (LOG.1, LOG.2, ... then LOG); several LOGs are
    read in the order given. By default, a table per agent: runs, runs stopped, violations
    by limit, warnings, denials, LLM calls and spend.
    """
    from . import _audit_view
    from . import audit as _audit

    path = logs[0] if logs else str(_audit.default_audit_path())
    paths = _audit.log_files(path) if len(logs) <= 1 else list(logs)
    try:
        if verify:
            if follow:
                raise click.UsageError("--verify reads the log once; drop --follow")
            report = _audit.verify(paths)
            if as_json:
                click.echo(json.dumps(report.to_dict(), sort_keys=True))
            elif report.ok:
                click.echo(f"supervise: {', '.join(paths)}: {report}")
            else:
                click.echo(f"supervise: {report}", err=True)
            sys.exit(0 if report.ok else 1)
        when = _audit.parse_since(since) if since else None
        filters = {"agent": agent, "session": session, "event": event, "limit": limit}
        if follow:
            if len(logs) > 1:
                raise click.UsageError("--follow follows one log (with its rotations)")
            live = _audit_view.follow(path, replay=when is not None)
            for record in _audit.filter_events(live, **filters, since=when):
                _show_event(record, as_json)
            return
        events = _audit.filter_events(_audit.read_events(paths), **filters, since=when)
        if as_json or as_list:
            for record in events:
                _show_event(record, as_json)
            return
        click.echo(_audit_view.format_summary(_audit_view.summarize(events)))
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    except AuditError as e:
        click.echo(f"supervise: {e}", err=True)
        sys.exit(125)


def _show_event(record: dict[str, Any], as_json: bool) -> None:
    from .audit import format_event

    if as_json:
        click.echo(json.dumps(record, sort_keys=True, separators=(",", ":")))
    else:
        click.echo(format_event(record))
    sys.stdout.flush()


@cli.command()
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
    from ._budget_commands import _budget_of, _store_of
    from .audit import parse_since
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


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="The findings as one JSON object.")
def doctor(as_json: bool) -> None:
    """What this machine can enforce, and what falls back."""
    from ._linux import capabilities

    caps = capabilities()
    if as_json:
        click.echo(json.dumps(caps, sort_keys=True))
        return
    width = max(len(k) for k in caps)
    for key, row in caps.items():
        mark = "yes" if row["available"] else "no "
        click.echo(f"{key:<{width}}  {mark}  {row['detail']}")
        if row["fallback"]:
            click.echo(f"{'':<{width}}       fallback: {row['fallback']}")


def _add_budget_commands() -> None:
    from ._budget_commands import budget, models

    cli.add_command(budget)
    cli.add_command(models)


_add_budget_commands()


def commands(args: list[str]) -> int:
    """Run a subcommand; click's usage errors exit 125 like every supervise error."""
    try:
        cli.main(args, prog_name="supervise", standalone_mode=False)
    except click.exceptions.Exit as e:
        return int(e.exit_code)
    except click.exceptions.Abort:
        return 130
    except click.ClickException as e:
        e.show()
        return 125
    except SupervisorError as e:
        click.echo(f"supervise: {e}", err=True)
        return 125
    except SystemExit as e:
        code: Any = e.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0
