"""The subcommands of ``supervise`` (click): the group, ``check`` and ``doctor``.

``commands`` runs one and maps its errors to exit statuses. ``audit`` is in ``_cli_audit``;
``budget``, ``models`` and ``report`` (the ledger's) in ``_cli_budget``. Imported only when
a subcommand is named, so runs never pay for click.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from . import __version__
from ._cli_audit import audit
from ._cli_budget import budget, models, report
from .errors import PolicyError, SupervisorError


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


for _command in (audit, budget, models, report):
    cli.add_command(_command)


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
