"""The subcommands and informational options of the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
from _helpers import supervise

POLICIES = sorted(str(p) for p in Path(__file__).parent.parent.joinpath("policies").glob("*.yaml"))


def test_check_validates_every_shipped_policy_and_prints_it() -> None:
    """supervise check policies/*.yaml exits 0 and prints each effective policy."""
    done = supervise("check", *POLICIES)
    assert done.returncode == 0, done.stderr
    for path in POLICIES:
        assert f"# {path}: ok (sha256 " in done.stdout
    assert "wall_time: 30s" in done.stdout  # strict.yaml, rendered back with its unit


def test_check_reports_every_bad_file_with_line_and_exits_125(tmp_path: Path) -> None:
    """A bad file among good ones: each problem on its own line, exit 125."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\non_violation: kil\nlimits:\n  memroy: 1GiB\n")
    done = supervise("check", POLICIES[0], str(bad))
    assert done.returncode == 125
    assert f"{bad}:2 on_violation:" in done.stderr
    assert f"{bad}:4 limits.memroy:" in done.stderr and "did you mean memory" in done.stderr


def test_check_with_set_shows_the_override() -> None:
    """supervise check --set prints the policy with the override applied."""
    done = supervise("check", POLICIES[0], "--set", "limits.memory=512MiB")
    assert done.returncode == 0 and "memory: 512MiB" in done.stdout


def test_doctor_reports_each_mechanism_and_its_fallback() -> None:
    """doctor --json names every mechanism, whether it is here, and the fallback."""
    done = supervise("doctor", "--json")
    assert done.returncode == 0
    caps = json.loads(done.stdout)
    assert {"reaper_helper", "pidfd", "subreaper", "landlock", "process_cap"} <= set(caps)
    for row in caps.values():
        assert set(row) == {"available", "detail", "fallback"}
        assert row["fallback"] is None if row["available"] else row["fallback"]
    table = supervise("doctor")
    assert table.returncode == 0 and "reaper_helper" in table.stdout


def test_help_and_version() -> None:
    """--help prints the usage and the exit statuses; --version the version; both exit 0."""
    helped = supervise("--help")
    assert helped.returncode == 0 and "124 stopped for a limit violation" in helped.stdout
    version = supervise("--version")
    assert version.returncode == 0 and version.stdout.startswith("supervise 0.")


def test_subcommand_usage_error_exits_125() -> None:
    """A bad option to a subcommand is supervise's own failure: 125."""
    done = supervise("audit", "--bogus")
    assert done.returncode == 125 and "--bogus" in done.stderr


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["audit", "--bogus"], "supervise: audit: no such option '--bogus' (see supervise audit"),
        (["budget", "reset"], "supervise: budget reset: missing option '--agent' (see supervise"),
        (["completion", "tcsh"], "supervise: completion: invalid value for"),
    ],
)
def test_subcommand_usage_errors_are_one_line_like_runs(args: list[str], line: str) -> None:
    """A subcommand's usage error is one `supervise: ...` line with the fix, exit 125, as a
    run's errors are (not click's three-line Usage/Try/Error block)."""
    done = supervise(*args)
    assert done.returncode == 125
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(line), done.stderr
    assert "--help)" in done.stderr and "Usage:" not in done.stderr
    run = supervise("--bogus", "--", "true")
    assert run.returncode == 125 and run.stderr.count("\n") == 1


def test_check_prints_what_each_size_and_duration_means(tmp_path: Path) -> None:
    """check says the parsed value of each size (2G = 2GiB, 2gb = 10**9) and duration."""
    done = supervise("check", "--set", "limits.memory=2G", "--set", "limits.file_size=2gb")
    assert done.returncode == 0, done.stderr
    assert "memory: 2GiB  # 2147483648 bytes = 2.0 GiB" in done.stdout
    assert "file_size: 2GB  # 2000000000 bytes = 1.9 GiB" in done.stdout
    assert "wall_time: 10m  # 600 seconds" in done.stdout


def _discover(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("SUPERVISE_POLICY",)}
    return supervise(*args, cwd=cwd, env={**clean, **env})


def test_policy_discovery_order_and_check_says_which(tmp_path: Path) -> None:
    """Without --policy: $SUPERVISE_POLICY, then ./supervise.yaml, then
    $XDG_CONFIG_HOME/supervise/policy.yaml, then the default; check names the one taken and
    a run enforces it."""
    config, work = tmp_path / "config", tmp_path / "work"
    (config / "supervise").mkdir(parents=True)
    work.mkdir()
    env = {"XDG_CONFIG_HOME": str(config)}
    done = _discover(work, env, "check")
    assert done.stdout.startswith("# the built-in default policy: ok"), done.stdout
    (config / "supervise" / "policy.yaml").write_text("version: 1\nname: xdg\n")
    done = _discover(work, env, "check")
    assert done.stdout.startswith(f"# {config}/supervise/policy.yaml (from $XDG_CONFIG_HOME)")
    (work / "supervise.yaml").write_text("version: 1\nname: here\nlimits: {wall_time: 1s}\n")
    done = _discover(work, env, "check")
    assert done.stdout.startswith("# supervise.yaml (from the working directory): ok")
    stopped = _discover(work, env, "--", "sleep", "30")
    assert stopped.returncode == 124 and "wall_time limit exceeded" in stopped.stderr
    chosen = tmp_path / "chosen.yaml"
    chosen.write_text("version: 1\nname: chosen\n")
    done = _discover(work, {**env, "SUPERVISE_POLICY": str(chosen)}, "check")
    assert done.stdout.startswith(f"# {chosen} (from $SUPERVISE_POLICY): ok")
    done = _discover(work, {**env, "SUPERVISE_POLICY": str(chosen)}, "check", POLICIES[0])
    assert done.stdout.startswith(f"# {POLICIES[0]}: ok")  # named files win


def test_completion_scripts_and_completing(tmp_path: Path) -> None:
    """completion prints a script for bash, zsh and fish; the completer offers subcommands
    and run's options."""
    for shell, marker in (("bash", "complete "), ("zsh", "compdef"), ("fish", "complete ")):
        done = supervise("completion", shell)
        assert (
            done.returncode == 0 and marker in done.stdout and "_SUPERVISE_COMPLETE" in done.stdout
        )
    env = {**os.environ, "_SUPERVISE_COMPLETE": "bash_complete", "COMP_CWORD": "1"}
    done = supervise(env={**env, "COMP_WORDS": "supervise ch"})
    assert done.returncode == 0 and "plain,check" in done.stdout.split()
    done = supervise(env={**env, "COMP_WORDS": "supervise run --li", "COMP_CWORD": "2"})
    assert "plain,--live" in done.stdout.split()


def test_man_page_is_the_help_and_is_shipped() -> None:
    """supervise man prints a roff page made from the help (every subcommand, every run
    option) and the packaged supervisor/supervise.1 is that same page."""
    done = supervise("man")
    assert done.returncode == 0 and done.stdout.startswith(".TH SUPERVISE 1")
    for word in ("check", "audit", "budget reset", "completion", "--live", "--workspace"):
        assert word.replace("-", "\\-") in done.stdout, word
    assert "124 stopped for a limit violation" in done.stdout
    shipped = resources.files("supervisor").joinpath("supervise.1").read_text()
    assert shipped == done.stdout, "regenerate: supervise man > supervisor/supervise.1"


def test_relative_command_in_a_workspace_says_where_it_was_looked_up(tmp_path: Path) -> None:
    """A relative command found only in the workspace fails 127 with the path to give."""
    tool = tmp_path / "ws" / "venv" / "bin" / "tool"
    tool.parent.mkdir(parents=True)
    tool.write_text("#!/bin/sh\necho hi\n")
    tool.chmod(0o755)
    done = supervise("-q", "-w", "ws", "--", "venv/bin/tool", cwd=tmp_path)
    assert done.returncode == 127
    assert "not in the workspace: give ws/venv/bin/tool)" in done.stderr
    done = supervise("-q", "-w", "ws", "--", "ws/venv/bin/tool", cwd=tmp_path)
    assert done.returncode == 0 and done.stdout == "hi\n"


def test_report_is_a_subcommand_not_a_program() -> None:
    """report runs the subcommand (an empty ledger says so), never a program named report;
    -- report runs the program."""
    done = supervise("report")
    assert done.returncode == 0 and "no LLM spend" in done.stdout
    done = supervise("--quiet", "--", "report")
    assert done.returncode == 127


BUDGETED = """
from supervisor import client
b = client.connect()
for _ in range(2):
    with b.reserve(model="m1", input_tokens=1000, max_output_tokens=1000) as r:
        r.commit(input_tokens=900, output_tokens=500)
"""


def test_summary_of_a_budgeted_run_shows_calls_and_usd(tmp_path: Path) -> None:
    """A run with a budget ends with its calls and exact USD against the run's limits."""
    policy = tmp_path / "p.yaml"
    policy.write_text(
        "version: 1\nbudget:\n"
        f"  store: sqlite:///{tmp_path}/b.db\n"
        "  run: {calls: 10, usd: 1}\n"
        "  pricing: {m1: {input: 1, output: 2}}\n"
    )
    done = supervise("-p", str(policy), "--", sys.executable, "-c", BUDGETED)
    assert done.returncode == 0, done.stderr
    assert done.stderr.rstrip().endswith("· calls 2/10 · usd $0.0038/$1.00"), done.stderr
    plain = supervise("--", "true")
    assert "calls" not in plain.stderr and "usd" not in plain.stderr


def test_default_workspace_holds_a_data_science_venv(tmp_path: Path) -> None:
    """The default workspace takes the measured data-science venv's 12,242 entries (pandas,
    matplotlib, scipy; the old 10,000 stopped it halfway) and a 143 MiB git pack file."""
    code = (
        "import os\n"
        "for d in range(124):\n"
        "    os.mkdir(f'd{d}')\n"
        "    for f in range(99):\n"
        "        open(f'd{d}/f{f}', 'w').close()\n"
        "with open('pack', 'wb') as f:\n"
        "    f.truncate(143 << 20)\n"  # sparse: the size counts for max_file_size
    )
    done = supervise("-w", str(tmp_path / "ws"), "--", sys.executable, "-c", code)
    assert done.returncode == 0, done.stderr
    assert "files 12401/100000" in done.stderr


def test_budget_subcommands_take_the_discovered_policy(tmp_path: Path) -> None:
    """Without --policy, models (and budget) read ./supervise.yaml as a run would."""
    (tmp_path / "supervise.yaml").write_text(
        "version: 1\nbudget:\n  pricing: {house-model-x: {input: 0.5, output: 1}}\n"
    )
    done = _discover(tmp_path, {"XDG_CONFIG_HOME": str(tmp_path)}, "models", "house-model-x")
    assert done.returncode == 0 and "house-model-x" in done.stdout, done.stderr
