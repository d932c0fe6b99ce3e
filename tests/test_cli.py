"""The subcommands and informational options of the command line."""

from __future__ import annotations

import json
from pathlib import Path

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


def test_report_is_a_subcommand_not_a_program() -> None:
    """report runs the subcommand (an empty ledger says so), never a program named report;
    -- report runs the program."""
    done = supervise("report")
    assert done.returncode == 0 and "no LLM spend" in done.stdout
    done = supervise("--quiet", "--", "report")
    assert done.returncode == 127
