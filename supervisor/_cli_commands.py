"""The subcommands of ``supervise`` (click): the group, ``check``, ``doctor``, ``completion``
and ``man``; ``run`` is declared here only for completion and the man page (runs are parsed by
hand in ``cli``).

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


@cli.command(
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
    add_help_option=False,
)
@click.option("-p", "--policy", type=click.Path(dir_okay=False), help="The policy file.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a value.")
@click.option("--agent", metavar="ID", help="The agent this run belongs to.")
@click.option("--session", metavar="ID", help="The session this run belongs to.")
@click.option("-w", "--workspace", type=click.Path(file_okay=False), help="Work in DIR, jailed.")
@click.option("--store", metavar="URL", help="The budget ledger.")
@click.option("--audit", type=click.Path(dir_okay=False), help="The audit log.")
@click.option("--json", "json_file", type=click.Path(dir_okay=False), help="The result as JSON.")
@click.option("--live", is_flag=True, help="Gauges of every limit on stderr while it runs.")
@click.option("-q", "--quiet", is_flag=True, help="No summary on stderr; errors only.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def run(**_: object) -> None:  # pragma: no cover - cli.run_cli parses runs itself
    """Run COMMAND under a policy's limits (the same as `supervise [OPTIONS] -- COMMAND`)."""


@cli.command()
@click.argument("policies", nargs=-1, metavar="[POLICY]...", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a value.")
@click.option("--quiet", "-q", is_flag=True, help="Only report problems.")
def check(policies: tuple[str, ...], overrides: tuple[str, ...], quiet: bool) -> None:
    """Validate policy files and print each effective policy, every size and duration with
    its value in bytes or seconds.  Without POLICY, the one a run would take: $SUPERVISE_POLICY,
    ./supervise.yaml, $XDG_CONFIG_HOME/supervise/policy.yaml, else the built-in default."""
    from .cli import find_policy
    from .policy import Policy

    sources: list[tuple[str | None, str]] = [(p, "") for p in policies] or [find_policy(None)]
    bad = 0
    for path, found in sources:
        try:
            policy = Policy.default() if path is None else Policy.load(path)
            if overrides:
                policy = policy.with_overrides(list(overrides))
        except PolicyError as e:
            bad += 1
            for problem in e.problems:
                click.echo(f"supervise: {problem}", err=True)
            continue
        if not quiet:
            name = path if path is not None else found
            how = f" (from {found})" if found and path is not None else ""
            click.echo(f"# {name}{how}: ok (sha256 {policy.sha256()})")
            click.echo(annotated_yaml(policy.to_yaml()).rstrip())
    if bad:
        sys.exit(125)


_SIZES = ("memory", "address_space", "file_size", "quota", "max_file_size", "max_size")
_DURATIONS = ("wall_time", "cpu_time", "step_time", "grace")


def annotated_yaml(text: str) -> str:
    """The policy's YAML with each size and duration followed by what it means exactly:
    ``memory: 2GiB  # 2147483648 bytes``, ``wall_time: 10m  # 600 seconds``."""
    from ._units import format_size, parse_duration, parse_size

    out = []
    for line in text.splitlines():
        key, colon, value = line.strip().partition(": ")
        value = value.strip("'\"")
        if colon and value and value != "null":
            if key in _SIZES:
                size = parse_size(value)
                line += f"  # {size} bytes" + (f" = {format_size(size)}" if size >= 1024 else "")
            elif key in _DURATIONS:
                line += f"  # {parse_duration(value):g} seconds"
        out.append(line)
    return "\n".join(out) + "\n"


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


@cli.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the shell completion script for SHELL.  Install it with, for bash,
    `supervise completion bash > ~/.local/share/bash-completion/completions/supervise`;
    zsh: into a directory of $fpath as `_supervise`; fish: into
    ~/.config/fish/completions/supervise.fish."""
    from click.shell_completion import get_completion_class

    cls = get_completion_class(shell)
    assert cls is not None  # click.Choice lets only the shells click knows through
    click.echo(cls(cli, {}, "supervise", "_SUPERVISE_COMPLETE").source())


@cli.command()
def man() -> None:
    """Print the manual page, supervise(1), made from this help (view it: `supervise man |
    man -l -`).  The package ships the same page as supervisor/supervise.1."""
    from ._cli_man import man_page

    click.echo(man_page(), nl=False)


for _command in (audit, budget, models, report):
    cli.add_command(_command)


def commands(args: list[str]) -> int:
    """Run a subcommand; click's usage errors become one line, ``supervise: ...`` with the
    fix, and exit 125 like every supervise error."""
    import os

    if "_SUPERVISE_COMPLETE" in os.environ:
        cli.main(args, prog_name="supervise", complete_var="_SUPERVISE_COMPLETE")
    try:
        cli.main(args, prog_name="supervise", standalone_mode=False)
    except click.exceptions.Exit as e:
        return int(e.exit_code)
    except click.exceptions.Abort:
        return 130
    except click.UsageError as e:
        where = e.ctx.command_path if e.ctx is not None else "supervise"
        message = e.format_message().rstrip(".")
        message = message[:1].lower() + message[1:]
        name = where.partition(" ")[2] or "supervise"
        click.echo(f"supervise: {name}: {message} (see {where} --help)", err=True)
        return 125
    except click.ClickException as e:
        click.echo(f"supervise: {e.format_message()}", err=True)
        return 125
    except SupervisorError as e:
        click.echo(f"supervise: {e}", err=True)
        return 125
    except SystemExit as e:
        code: Any = e.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0
