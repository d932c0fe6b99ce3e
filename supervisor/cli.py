"""The ``supervise`` command: a fast path for runs, click for everything else.

``supervise [options] [--] COMMAND...`` is parsed by hand: click, pydantic and yaml cost
~9x a bare ``python -c pass`` to import, and a supervisor that wraps every tool call must
start fast.  The subcommands (``check``, ``audit``, ``report``, ``budget``, ``models``,
``doctor``) go through click.
Errors map to exit statuses here: 125 supervise's own, 126/127 the command's.
"""

from __future__ import annotations

import os
import signal
import sys

# typing costs ~5 ms to import; mypy honours any constant named TYPE_CHECKING.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

if TYPE_CHECKING:
    from ._plan import RunPlan
    from .result import RunResult

SUBCOMMANDS = ("run", "check", "audit", "report", "doctor", "budget", "models", "completion", "man")

USAGE = """\
Usage: supervise [OPTIONS] [--] COMMAND [ARGS]...
       supervise run [OPTIONS] [--] COMMAND [ARGS]...
       supervise check [POLICY]... [--set KEY=VALUE] [-q]
       supervise audit [LOG]... [--verify] [--agent ID] [--session ID] [--event KIND]
                       [--limit NAME] [--since WHEN] [--list] [--json] [--follow]
       supervise report [--since WHEN] [--agent ID] [--by agent|model|label|session|run|day]
                        [--store URL] [--json] [--html FILE] [--png FILE]
       supervise budget status [--agent ID] [--session ID] [--store URL] [--policy FILE] [--json]
       supervise budget reset --agent ID [--period run|session|daily|monthly] [--store URL]
       supervise models [PATTERN] [--policy FILE] [--json]
       supervise doctor [--json]
       supervise completion bash|zsh|fish
       supervise man

Run COMMAND under a policy's limits; stop the whole process tree on a breach.

Options:
  -p, --policy FILE     the policy (default: $SUPERVISE_POLICY, else ./supervise.yaml, else
                        $XDG_CONFIG_HOME/supervise/policy.yaml, else the built-in default)
  --set KEY=VALUE       override a policy value, e.g. --set limits.wall_time=10s (repeatable)
  --agent ID            the agent this run belongs to (overrides the policy's)
  --session ID          the session this run belongs to
  -w, --workspace DIR   work in DIR, jailed and under the quota (--set workspace.path=DIR)
  --store URL           the budget ledger: sqlite:///PATH or redis://HOST:PORT/DB
  --audit FILE          the audit log (default: $XDG_STATE_HOME/supervise/audit.jsonl)
  --json FILE           write the run result as JSON to FILE ('-': stdout, after the child)
  --live                gauges of every limit on stderr while it runs (on a terminal)
  -q, --quiet           no summary on stderr; errors only
  --version             print the version and exit
  -h, --help            show this message and exit

Exit status: the command's own; 124 stopped for a limit violation; 128+N killed by
signal N that supervise did not send; 125 supervise failed; 126 command not executable;
127 command not found.
"""

_VALUE_OPTIONS = {
    "-p": "policy",
    "--policy": "policy",
    "--set": "set",
    "--agent": "agent",
    "--session": "session",
    "--audit": "audit",
    "--json": "json",
    "-w": "workspace",
    "--workspace": "workspace",
    "--store": "store",
}
_FLAG_OPTIONS = {"-q": "quiet", "--quiet": "quiet", "--live": "live"}


DEFAULT = "the built-in default policy"


def find_policy(given: str | None) -> tuple[str | None, str]:
    """(path or None for the built-in default, where it came from) for ``--policy given``:
    given, else $SUPERVISE_POLICY (empty: the default), else ./supervise.yaml, else
    $XDG_CONFIG_HOME/supervise/policy.yaml (~/.config when unset), else the default."""
    if given is not None:
        return given, "--policy"
    env = os.environ.get("SUPERVISE_POLICY")
    if env is not None:
        return (
            (env, "$SUPERVISE_POLICY") if env else (None, DEFAULT + " ($SUPERVISE_POLICY is empty)")
        )
    if os.path.isfile("supervise.yaml"):
        return "supervise.yaml", "the working directory"
    config = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    path = os.path.join(config, "supervise", "policy.yaml")
    if os.path.isfile(path):
        return path, "$XDG_CONFIG_HOME" if os.environ.get("XDG_CONFIG_HOME") else "~/.config"
    return None, DEFAULT


class UsageError(Exception):
    """A bad option or argument on the command line (exit 125)."""


def _parse_run(args: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Split run options from the command: the first non-option word, or what follows --."""
    opts: dict[str, Any] = {"set": []}
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--":
            return opts, args[i + 1 :]
        if not a.startswith("-") or a == "-":
            return opts, args[i:]
        name, eq, value = a.partition("=") if a.startswith("--") else (a, "", "")
        if name in ("-h", "--help"):
            opts["help"] = True
        elif name == "--version":
            opts["version"] = True
        elif name in _FLAG_OPTIONS:
            opts[_FLAG_OPTIONS[name]] = True
        elif name in _VALUE_OPTIONS:
            if not eq:
                i += 1
                if i >= len(args):
                    raise UsageError(f"option {name} needs a value")
                value = args[i]
            key = _VALUE_OPTIONS[name]
            if key == "set":
                opts["set"].append(value)
            elif key in ("workspace", "store"):
                import json

                # --workspace DIR is --set workspace.path=DIR, --store URL is
                # --set budget.store=URL (JSON text is YAML too).
                path = "workspace.path" if key == "workspace" else "budget.store"
                opts["set"].append(f"{path}={json.dumps(value)}")
            else:
                opts[key] = value
        else:
            raise UsageError(f"no such option: {name} (see supervise --help)")
        i += 1
    return opts, []


def _err(message: str) -> None:
    sys.stderr.write(f"supervise: {message}\n")


def main(argv: list[str] | None = None) -> None:
    """The console script: exits with the status of SPEC's table."""
    sys.exit(run_cli(sys.argv[1:] if argv is None else argv))


def run_cli(args: list[str]) -> int:
    if "_SUPERVISE_COMPLETE" in os.environ or (args and args[0] in SUBCOMMANDS[1:]):
        from ._cli_commands import commands

        return commands(args)
    if args and args[0] == "run":
        args = args[1:]
    try:
        opts, command = _parse_run(args)
        if opts.get("help"):
            sys.stdout.write(USAGE)
            return 0
        if opts.get("version"):
            from . import __version__

            sys.stdout.write(f"supervise {__version__}\n")
            return 0
        if not command:
            raise UsageError("no command given (usage: supervise [OPTIONS] -- COMMAND [ARGS]...)")
    except UsageError as e:
        _err(str(e))
        return 125
    from ._plan import load_plan
    from .errors import PolicyError, SupervisorError

    try:
        plan = load_plan(find_policy(opts.get("policy"))[0], opts["set"])
    except PolicyError as e:
        for problem in e.problems:
            _err(problem)
        return 125
    except SupervisorError as e:
        _err(str(e))
        return 125
    return _run(plan, opts, command)


def _run(plan: RunPlan, opts: dict[str, Any], command: list[str]) -> int:
    from ._linux import make_undumpable
    from .supervisor import Supervisor

    make_undumpable()  # a same-uid tree cannot read our /proc/PID/environ (its withheld env)

    sup = Supervisor(plan, audit=opts.get("audit"))
    run = sup.start(command, agent=opts.get("agent"), session=opts.get("session"))
    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
    previous = {s: signal.signal(s, lambda sig, _frame: run.interrupt(sig)) for s in handled}
    largest: int | None = None
    try:
        if opts.get("live") and sys.stderr.isatty():
            from ._live import LiveGauges

            with LiveGauges(plan, run=run) as gauges:
                run.on_sample = gauges.update
                result = run.execute()
            largest = gauges.largest_file
        else:
            result = run.execute()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    error = getattr(run, "error", None)
    if error is not None:
        _err(str(error) + _relative_hint(error, plan, command))
    elif not opts.get("quiet"):
        if result.violation is not None:
            prefix = "" if plan.on_violation == "kill" else "warning: "
            _err(prefix + result.violation.message)
        _err(summary(result, plan, largest_file=largest))
    if opts.get("json") and not _write_json(result, opts["json"]) and result.exit_code == 0:
        return 125  # the result was asked for and lost: never a silent success
    return result.exit_code


def _relative_hint(error: object, plan: RunPlan, command: list[str]) -> str:
    """Why a relative command in a workspace was not found, and the path that would be."""
    from .errors import CommandNotFound

    word = command[0]
    if not isinstance(error, CommandNotFound) or plan.workspace is None:
        return ""
    if "/" not in word or os.path.isabs(word):
        return ""
    hint = " (a relative command is found from where supervise runs, not in the workspace"
    ws = plan.workspace.get("path")
    if ws and os.path.exists(os.path.join(ws, word)):
        return f"{hint}: give {os.path.join(ws, word)})"
    return f"{hint}: give its path from here)"


def _write_json(result: RunResult, target: str) -> bool:
    """Write the result line; False (said on stderr) when it could not be written.

    To stdout, through the fd, blocking: the tree shares that open file and may have left
    it O_NONBLOCK, which would turn a slow reader into a lost line."""
    import json

    text = json.dumps(result.to_dict(), separators=(",", ":")) + "\n"
    if target == "-":
        import os

        data = text.encode()
        try:
            sys.stdout.flush()
            os.set_blocking(1, True)
            while data:
                data = data[os.write(1, data) :]
        except OSError as e:
            _err(f"cannot write the run result to stdout: {e.strerror}")
            return False
        return True
    try:
        with open(target, "w") as f:
            f.write(text)
    except OSError as e:
        _err(f"cannot write the run result to {target}: {e.strerror}")
        return False
    return True


def summary(result: RunResult, plan: RunPlan, largest_file: int | None = None) -> str:
    """One line: the outcome, then each limit as used / limit (``-``: not measured; the
    largest file written only ``--live`` measures), then a budgeted run's calls and USD."""
    from .result import format_limit

    u = result.usage
    outcome = {
        "ok": f"exit {result.exit_code}",
        "violation": f"violation, exit {result.exit_code}",
        "signaled": f"killed by signal {result.exit_code - 128}, exit {result.exit_code}",
        "failed": f"failed, exit {result.exit_code}",
    }[result.status]

    lim = plan.limits
    used = {
        "wall_time": u.wall_time,
        "cpu_time": u.cpu_time,
        "memory": u.peak_memory or None,
        "processes": u.peak_processes or None,
        "open_files": u.peak_open_files or None,
        "file_size": largest_file,  # a per-process kernel limit: --live looks at the files
        "address_space": None,
    }
    ws = plan.workspace
    if ws is not None:
        lim = {**lim, "storage": ws.get("quota"), "files": ws.get("max_files")}
        used.update(storage=u.storage_bytes, files=u.files)
    parts = []
    for name, value in used.items():
        limit = lim.get(name)
        if name == "address_space" and limit is None:
            continue
        shown = "-" if value is None else format_limit(name, value)
        parts.append(f"{name} {shown}/{'none' if limit is None else format_limit(name, limit)}")
    run_budget = (plan.budget or {}).get("run") or {}
    if plan.budget:
        from decimal import Decimal

        from ._units import format_money

        calls, usd = run_budget.get("calls"), run_budget.get("usd")
        parts.append(f"calls {u.api_calls}/{'none' if calls is None else calls}")
        cap = "none" if usd is None else format_money(Decimal(str(usd)))
        parts.append(f"usd {format_money(u.usd)}/{cap}")
    return f"run {result.run_id} {outcome} · " + " · ".join(parts)
