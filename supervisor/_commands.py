"""The subcommands of ``supervise`` (click): check, audit, doctor, budget and models.

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
@click.option("--json", "as_json", is_flag=True, help="The matching events as JSON Lines.")
def audit(
    logs: tuple[str, ...],
    verify: bool,
    agent: str | None,
    session: str | None,
    event: str | None,
    limit: str | None,
    since: str | None,
    as_json: bool,
) -> None:
    """Read, filter and verify the audit log (default: the user's log)."""
    from . import audit as _audit

    paths = list(logs) or [str(_audit.default_audit_path())]
    try:
        if verify:
            report = _audit.verify(paths)
            if report.ok:
                click.echo(f"supervise: {', '.join(paths)}: {report}")
                return
            click.echo(f"supervise: {report}", err=True)
            sys.exit(1)
        when = _audit.parse_since(since) if since else None
        events = _audit.filter_events(
            _audit.read_events(paths),
            agent=agent,
            session=session,
            event=event,
            limit=limit,
            since=when,
        )
        for record in events:
            if as_json:
                click.echo(json.dumps(record, sort_keys=True, separators=(",", ":")))
            else:
                click.echo(_audit.format_event(record))
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    except AuditError as e:
        click.echo(f"supervise: {e}", err=True)
        sys.exit(125)


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
