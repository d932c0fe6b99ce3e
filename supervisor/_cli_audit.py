"""``supervise audit``: summarize, list, follow and verify the audit log.

Registered on the click group of ``_cli_commands``; imported only when a subcommand is named.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click

from .errors import AuditError

__all__ = ["audit"]


@click.command()
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
    from ._audit_chain import log_files
    from ._audit_read import read_events
    from ._audit_read import verify as verify_log
    from ._audit_view import filter_events, format_summary, parse_since, summarize
    from ._audit_view import follow as follow_log
    from .audit import default_audit_file

    path = logs[0] if logs else default_audit_file()
    paths = log_files(path) if len(logs) <= 1 else list(logs)
    if not logs and not follow and not any(os.path.exists(p) for p in paths):
        # A fresh machine: nothing has run yet, which is not an error.
        click.echo(f"supervise: no audit log yet ({path}): no run has been supervised", err=True)
        if verify and as_json:
            click.echo(json.dumps(verify_log([]).to_dict(), sort_keys=True))
        return
    try:
        if verify:
            if follow:
                raise click.UsageError("--verify reads the log once; drop --follow")
            report = verify_log(paths)
            if as_json:
                click.echo(json.dumps(report.to_dict(), sort_keys=True))
            elif report.ok:
                click.echo(f"supervise: {', '.join(paths)}: {report}")
            else:
                click.echo(f"supervise: {report}", err=True)
            sys.exit(0 if report.ok else 1)
        when = parse_since(since) if since else None
        filters = {"agent": agent, "session": session, "event": event, "limit": limit}
        if follow:
            if len(logs) > 1:
                raise click.UsageError("--follow follows one log (with its rotations)")
            live = follow_log(path, replay=when is not None)
            for record in filter_events(live, **filters, since=when):
                _echo_event(record, as_json)
            return
        # A torn line (a crash mid-write) does not hide the rest: it is said, and --verify
        # names it as the chain's first bad line.
        torn: list[str] = []
        events = filter_events(
            read_events(paths, strict=False, skipped=torn), **filters, since=when
        )
        if as_json or as_list:
            for record in events:
                _echo_event(record, as_json)
        else:
            click.echo(format_summary(summarize(events)))
        for line in torn[:10]:
            click.echo(f"supervise: skipped {line} (supervise audit --verify)", err=True)
        if len(torn) > 10:
            click.echo(f"supervise: skipped {len(torn) - 10} more bad lines", err=True)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    except AuditError as e:
        click.echo(f"supervise: {e}", err=True)
        sys.exit(125)


def _echo_event(record: dict[str, Any], as_json: bool) -> None:
    from ._audit_view import format_event

    if as_json:
        click.echo(json.dumps(record, sort_keys=True, separators=(",", ":")))
    else:
        click.echo(format_event(record))
    sys.stdout.flush()
