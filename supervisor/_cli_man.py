"""``supervise man``: the manual page, supervise(1), in roff, made from the CLI's own help.

The synopsis and the run options come from ``cli.USAGE`` (what ``supervise --help``
prints), every subcommand's text and options from its click command: the page cannot say
anything the help does not.  ``supervisor/supervise.1`` is this output, shipped with the
package; a test keeps the two equal (regenerate: ``supervise man > supervisor/supervise.1``).
"""

from __future__ import annotations

import inspect

import click

from . import __version__
from .cli import USAGE


def _roff(text: str) -> str:
    """Text made safe for roff: backslashes, and a leading dot or quote."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + ln if ln[:1] in (".", "'") else ln for ln in text.splitlines())


def _usage_sections() -> tuple[list[str], str, list[tuple[str, str]], str]:
    """USAGE split: synopsis lines, description, (option, help) pairs, exit status text."""
    head, _, rest = USAGE.partition("\n\n")
    description, _, rest = rest.partition("\n\nOptions:\n")
    options_text, _, exit_text = rest.partition("\n\n")
    synopsis: list[str] = []
    for line in head.splitlines():
        if line.startswith("        "):  # a long synopsis continued on the next line
            synopsis[-1] += " " + line.strip()
        else:
            synopsis.append(line.strip().removeprefix("Usage:").strip())
    options: list[tuple[str, str]] = []
    for line in options_text.splitlines():
        if line.startswith("  ") and not line.startswith("    "):
            name, _, help_text = line.strip().partition("  ")
            options.append((name.strip(), help_text.strip()))
        elif options:
            name, help_text = options[-1]
            options[-1] = (name, f"{help_text} {line.strip()}")
    return synopsis, description.strip(), options, exit_text.strip()


def _command(out: list[str], name: str, command: click.Command, parent: click.Context) -> None:
    ctx = click.Context(command, info_name=name, parent=parent)
    if isinstance(command, click.Group):
        for sub in command.list_commands(ctx):
            child = command.get_command(ctx, sub)
            if child is not None:
                _command(out, sub, child, ctx)
        return
    out.append(f".SS {_roff(ctx.command_path.removeprefix('supervise '))}")
    pieces = command.collect_usage_pieces(ctx)
    out.append(f".B {_roff(ctx.command_path)}\n{_roff(' '.join(pieces))}")
    out.append(".PP")
    out.append(_roff(inspect.cleandoc(click.unstyle(command.help or ""))))
    for param in command.get_params(ctx):
        if not isinstance(param, click.Option):
            continue
        record = param.get_help_record(ctx)
        if record is None:
            continue
        out.append(f".TP\n.B {_roff(record[0])}\n{_roff(record[1])}")


def man_page() -> str:
    """supervise(1) as roff text."""
    from ._cli_commands import cli

    synopsis, description, options, exit_text = _usage_sections()
    out = [
        f'.TH SUPERVISE 1 "" "supervise {__version__}" "User Commands"',
        ".SH NAME",
        "supervise \\- run AI agents and their tools under hard limits",
        ".SH SYNOPSIS",
    ]
    for line in synopsis:
        out.append(f".B {_roff(line.split(' ', 1)[0])}\n{_roff(line.partition(' ')[2])}\n.br")
    out += [".SH DESCRIPTION", _roff(description), ".SH OPTIONS"]
    for name, help_text in options:
        out.append(f".TP\n.B {_roff(name)}\n{_roff(help_text)}")
    out.append(".SH COMMANDS")
    root = click.Context(cli, info_name="supervise")
    for name in cli.list_commands(root):
        command = cli.get_command(root, name)
        if command is not None:
            _command(out, name, command, root)
    out += [
        ".SH FILES",
        "Without \\fB\\-\\-policy\\fR, a run takes the first of: \\fB$SUPERVISE_POLICY\\fR, "
        "\\fB./supervise.yaml\\fR, \\fB$XDG_CONFIG_HOME/supervise/policy.yaml\\fR "
        "(\\fB~/.config\\fR when unset), else the built\\-in default policy; "
        "\\fBsupervise check\\fR says which.",
        ".SH EXIT STATUS",
        _roff(exit_text),
        ".SH SEE ALSO",
        "The contract: docs/SPEC.md in the source repository.",
    ]
    return "\n".join(out) + "\n"
