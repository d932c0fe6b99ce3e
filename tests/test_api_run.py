"""The public run API without traps: argv as words, typed keywords, readable reprs."""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

import pytest
from _helpers import python

from supervisor import Policy, Supervisor
from supervisor._plan import RunPlan
from supervisor.limits import helper_words, rlimit_words, task_cap
from supervisor.result import RunResult, Usage, Violation, exit_status
from supervisor.spawn import Done, Exited, KernelKill, Signalled, Started, parse_event


def test_a_string_command_is_refused_with_the_fix() -> None:
    """run("echo hi") is a TypeError that says to pass words (or a shell), not a run of "e"."""
    with pytest.raises(TypeError, match=r'\["sh", "-c", \'echo hi\'\].*shlex\.split'):
        Supervisor().run("echo hi")  # a str is a Sequence[str]: only the run refuses it
    with pytest.raises(TypeError, match="list of words"):
        Supervisor().start(b"echo hi")  # type: ignore[arg-type]  # bytes: the same trap


def test_run_async_refuses_a_string_too() -> None:
    """run_async("...") raises the same TypeError before any thread starts."""
    with pytest.raises(TypeError, match="list of words"):
        asyncio.run(Supervisor().run_async("true"))


@pytest.mark.parametrize("method", ["run", "start"])
def test_a_misspelt_keyword_is_a_type_error(method: str) -> None:
    """run(..., agnet=...) fails at once instead of being swallowed by **kwargs."""
    call: Any = getattr(Supervisor(), method)
    with pytest.raises(TypeError, match="agnet"):
        call(["true"], agnet="bot")


def test_run_methods_take_only_named_keywords() -> None:
    """run, start and run_async have the same explicit keywords and no **kwargs."""
    names = ["argv", "agent", "session", "env", "cwd", "stdin", "stdout", "stderr"]
    for method in (Supervisor.run, Supervisor.start, Supervisor.run_async):
        params = inspect.signature(method).parameters
        assert list(params)[1:] == names, method
        assert all(p.kind != p.VAR_KEYWORD for p in params.values())


def test_reprs_are_readable() -> None:
    """RunResult, Usage and Violation show what a reader looks for first."""
    result = Supervisor().run(python("print(end='')"), agent="bot")
    text = repr(result)
    assert text.startswith("RunResult(status='ok', exit_code=0, returncode=0, command=[")
    assert "usage=Usage(wall_time=" in text
    usage = Usage()
    assert repr(usage) == "Usage()"
    usage.peak_memory, usage.api_calls = 1024, 2
    assert repr(usage) == "Usage(peak_memory=1024, api_calls=2)"
    v = Violation("memory", 300, 256, "memory limit exceeded: 300 bytes > 256 bytes (tree RSS)")
    assert repr(v) == (
        "Violation(limit='memory', message='memory limit exceeded: 300 bytes > 256 bytes "
        "(tree RSS)')"
    )
    failed = RunResult("r1", None, None, ["x"])
    failed.error = "x: command not found"
    assert "error='x: command not found'" in repr(failed)


def test_plan_limits_are_typed_attributes() -> None:
    """plan.max has each limit as an attribute; a misspelt one is an error, not None."""
    plan = RunPlan.from_policy(Policy.from_dict({"limits": {"wall_time": 5, "processes": 4}}))
    assert plan.max.wall_time == 5 and plan.max.processes == 4 and plan.max.memory is None
    assert plan.max.get("wall_time") == 5
    with pytest.raises(AttributeError):
        plan.max.wal_time  # type: ignore[attr-defined]  # the typo under test  # noqa: B018


def test_the_reapers_words_come_from_limits() -> None:
    """limits.py words the rlimits; the process cap is one formula for both backstops."""
    data = {"limits": {"cpu_time": 1.5, "address_space": 1 << 30, "open_files": 64}}
    plan = RunPlan.from_policy(Policy.from_dict(data))
    assert rlimit_words(plan) == ["cpu=2:3", f"as={1 << 30}", "nofile=64"]
    assert plan.rlimit_words() == rlimit_words(plan)
    assert (task_cap(4), task_cap(100)) == (256, 1600)

    rlimits, words = helper_words(plan, [], [])  # a Confinement that adds nothing
    assert rlimits == rlimit_words(plan) and words[: len(rlimits)] == rlimits
    assert "scope=1" in words and any(w.startswith("oom=") for w in words)


def test_reaper_lines_parse_into_typed_events() -> None:
    """Each line of the reaper's protocol becomes one typed event; garbage is refused."""
    x = parse_event(b"X 42 256 1500000 500000 2048 1000000")
    assert isinstance(x, Exited)
    assert (x.pid, x.wstatus, x.cpu, x.maxrss, x.own_cpu) == (42, 256, 2.0, 2048 * 1024, 1.0)
    r = parse_event(b"R 43 9 3000000")
    assert isinstance(r, KernelKill) and (r.pid, r.wstatus, r.cpu) == (43, 9, 3.0)
    s = parse_event(b"s 15 7 8")
    assert isinstance(s, Signalled) and (s.sig, s.pids) == (15, {7, 8})
    d = parse_event(b"D 250000")
    assert isinstance(d, Done) and d.own_cpu == 0.25
    p = parse_event(b"P 99 1 0")
    assert isinstance(p, Started) and (p.pid, p.pidfd, p.scoped) == (99, True, False)
    assert parse_event(b"") is None and parse_event(b"? 1") is None
    with pytest.raises(ValueError):
        parse_event(b"X 1 2")


def test_exit_status_maps_as_the_spec_says() -> None:
    """exit_status: a kill is 124, a signal 128+N, an unobeyed forwarded signal 128+it."""
    v = Violation("memory", 2, 1, "m")
    assert exit_status(3, None, killed=False) == ("ok", 3)
    assert exit_status(-9, None, killed=False) == ("signaled", 137)
    assert exit_status(-15, v, killed=True) == ("violation", 124)
    assert exit_status(0, v, killed=False) == ("violation", 0)
    assert exit_status(-9, None, killed=False, forwarded=2, killed_after_grace=True) == (
        "signaled",
        130,
    )


def test_a_breach_message_never_reads_as_no_breach() -> None:
    """A value past its limit that rounds to it is shown exactly: never "1s > 1s"."""
    from supervisor.result import breach_message

    assert breach_message("wall_time", 1.0004, 1, "wall clock") == (
        "wall_time limit exceeded: 1.000s > 1s (wall clock)"
    )
    assert breach_message("cpu_time", 1.5, 1, "tree CPU") == (
        "cpu_time limit exceeded: 1.5s > 1s (tree CPU)"
    )
    assert breach_message("memory", 1048577, 1048576, "tree RSS").startswith(
        "memory limit exceeded: 1048577 bytes > 1048576 bytes"
    )
