"""The core run: exit statuses, kernel rlimits, the wall clock, the whole-tree stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from _helpers import (
    GLOBAL_TIMEOUT,
    margin,
    needs_landlock_scope,
    python,
    supervise,
    tagged_pids,
    wait_until,
)

from supervisor import Policy, Supervisor
from supervisor.audit import read_events, verify


def policy(**limits: Any) -> Policy:
    """A policy with only the given limits (everything else off), grace 0.5 s."""
    extra: dict[str, Any] = {
        k: limits.pop(k) for k in ("on_violation", "grace", "env") if k in limits
    }
    return Policy.from_dict({"limits": limits, "grace": "500ms", **extra})


def run(argv: list[str], **limits: Any) -> Any:
    return Supervisor(policy(**limits)).run(argv)


def events(log: Path, kind: str) -> list[dict[str, Any]]:
    return [e for e in read_events([log]) if e["event"] == kind]


# -- the exit-status table ------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "status", "exit_code"),
    [
        (["true"], "ok", 0),
        (["sh", "-c", "exit 3"], "ok", 3),
        (["sh", "-c", "exit 255"], "ok", 255),
        (["sh", "-c", "kill -KILL $$"], "signaled", 137),
        (["sh", "-c", "kill -TERM $$"], "signaled", 143),
        (["no-such-command-here"], "failed", 127),
        (["/etc/passwd"], "failed", 126),
        (["/"], "failed", 126),
    ],
)
def test_exit_status_table(argv: list[str], status: str, exit_code: int) -> None:
    """Each row of SPEC's exit-status table comes out exactly."""
    result = run(argv)
    assert (result.status, result.exit_code) == (status, exit_code)


def test_cli_exit_statuses() -> None:
    """The command line exits with the same statuses, and says why on stderr."""
    assert supervise("--", "true").returncode == 0
    assert supervise("--", "sh", "-c", "exit 7").returncode == 7
    missing = supervise("--", "no-such-command-here")
    assert missing.returncode == 127
    assert "no-such-command-here: command not found" in missing.stderr
    assert supervise("--", "/etc/passwd").returncode == 126
    bad = supervise("--bogus", "--", "true")
    assert bad.returncode == 125
    assert "no such option: --bogus" in bad.stderr


def test_cli_without_double_dash_first_word_is_the_command() -> None:
    """Without --, the first word that is not an option is the command."""
    done = supervise("--quiet", "sh", "-c", "echo hi")
    assert (done.returncode, done.stdout, done.stderr) == (0, "hi\n", "")


def test_cli_subcommand_name_after_double_dash_is_a_program(tmp_path: Path) -> None:
    """``supervise -- check x`` runs a program named check, not the subcommand."""
    prog = tmp_path / "check"
    prog.write_text('#!/bin/sh\necho program-check "$@"\n')
    prog.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    done = supervise("-q", "--", "check", "x", env=env)
    assert (done.returncode, done.stdout) == (0, "program-check x\n")


def test_cli_no_command_and_bad_policy_exit_125(tmp_path: Path) -> None:
    """No command, or a bad policy, is supervise's own failure: 125 and a clear line."""
    none = supervise("--quiet")
    assert none.returncode == 125 and "no command given" in none.stderr
    bad = tmp_path / "p.yaml"
    bad.write_text("version: 1\nlimits:\n  memory: 2 gigs\n")
    done = supervise("--policy", str(bad), "--", "true")
    assert done.returncode == 125
    assert f'{bad}:3 limits.memory: "2 gigs" is not a size (try 2GiB)' in done.stderr
    unset = supervise("--set", "limits.wall_time=soon", "--", "true")
    assert unset.returncode == 125 and "--set limits.wall_time=soon" in unset.stderr


def test_cli_store_option_is_the_budget_store(tmp_path: Path) -> None:
    """--store URL is --set budget.store=URL: a bad URL is refused with 125, naming it."""
    done = supervise("--store", "ftp://x", "--", "true")
    assert done.returncode == 125 and "ftp://x" in done.stderr


# -- wall_time ----------------------------------------------------------------------


def test_wall_time_exceeded_stops_the_run(audit_log: Path) -> None:
    """Past wall_time the tree is stopped: 124, a wall_time violation and an audit line."""
    t = time.monotonic()
    result = run(["sleep", "30"], wall_time="500ms")
    took = time.monotonic() - t
    assert (result.status, result.exit_code) == ("violation", 124)
    assert result.violation.limit == "wall_time"
    assert result.violation.limit_value == 0.5
    assert 0.5 <= result.violation.observed < margin(1.5)
    assert took < margin(2.5)
    (v,) = events(audit_log, "violation")
    assert (v["limit"], v["limit_value"], v["action"], v["unit"]) == (
        "wall_time",
        0.5,
        "kill",
        "seconds",
    )
    assert verify([audit_log]).ok


def test_wall_time_raised_passes() -> None:
    """The same command passes when wall_time is above what it needs."""
    result = run(["sleep", "0.2"], wall_time="5s")
    assert (result.status, result.exit_code, result.violation) == ("ok", 0, None)


def test_wall_time_off_passes() -> None:
    """wall_time null means no wall clock limit at all."""
    result = run(["sleep", "0.2"], wall_time=None)
    assert (result.status, result.exit_code) == ("ok", 0)


def test_wall_time_cli_line_names_the_limit() -> None:
    """The CLI prints one line naming the limit, the observed value and the limit value."""
    done = supervise("--set", "limits.wall_time=1s", "--", "sleep", "30")
    assert done.returncode == 124
    first = done.stderr.splitlines()[0]
    assert first.startswith("supervise: wall_time limit exceeded: 1.0")
    assert "> 1s (wall clock); killed 1 process" in first
    assert not first.startswith("supervise: wall_time limit exceeded: 1s >")


def test_wall_time_warn_does_not_kill(audit_log: Path) -> None:
    """Under on_violation: warn the child runs on, its status is its own, the log says warn."""
    result = run(python("import time; time.sleep(0.8)"), wall_time="200ms", on_violation="warn")
    assert (result.status, result.exit_code) == ("violation", 0)
    assert result.violation.limit == "wall_time"
    (v,) = events(audit_log, "violation")
    assert v["action"] == "warn"


# -- cpu_time (RLIMIT_CPU) ------------------------------------------------------------

SPIN = "import time\nend = time.process_time() + {secs}\nwhile time.process_time() < end: pass"


def test_cpu_time_exceeded_is_sigxcpu(audit_log: Path) -> None:
    """A spinner past cpu_time dies of SIGXCPU: 124 and a cpu_time violation, never a guess."""
    result = run(python("while True: pass"), cpu_time="1s")
    assert (result.status, result.exit_code) == ("violation", 124)
    assert result.violation.limit == "cpu_time"
    assert "SIGXCPU" in result.violation.message
    assert result.violation.observed >= 1.0
    (v,) = events(audit_log, "violation")
    assert v["limit"] == "cpu_time"


def test_cpu_time_in_an_orphaned_grandchild_is_a_violation() -> None:
    """A descendant that the reaper reaps dying of SIGXCPU is a cpu_time violation too."""
    spin = f"{sys.executable} -c 'while True: pass'"
    result = run(["sh", "-c", f"({spin} &); sleep 30"], cpu_time="1s", wall_time="20s")
    assert (result.status, result.exit_code) == ("violation", 124)
    assert result.violation.limit == "cpu_time"


@pytest.mark.slow
def test_cpu_time_sigxcpu_ignored_still_dies_at_hard_limit() -> None:
    """A child that ignores SIGXCPU is killed at the hard limit (soft + 1 s): still cpu_time."""
    code = "import signal; signal.signal(signal.SIGXCPU, signal.SIG_IGN)\nwhile True: pass"
    result = run(python(code), cpu_time="1s")
    assert (result.status, result.exit_code) == ("violation", 124)
    assert result.violation.limit == "cpu_time"


def test_cpu_time_raised_passes() -> None:
    """The same spinner passes with a higher cpu_time."""
    result = run(python(SPIN.format(secs=1.2)), cpu_time="10s")
    assert (result.status, result.exit_code) == ("ok", 0)
    assert result.usage.cpu_time >= 1.0


def test_cpu_time_off_passes() -> None:
    """cpu_time null sets no RLIMIT_CPU."""
    code = "import resource; assert resource.getrlimit(resource.RLIMIT_CPU)[0] == -1\n"
    result = run(python(code + SPIN.format(secs=1.2)), cpu_time=None)
    assert (result.status, result.exit_code) == ("ok", 0)


# -- file_size (RLIMIT_FSIZE) ---------------------------------------------------------

WRITE = (
    "import signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_DFL)\n"
    "open(sys.argv[1], 'wb').write(b'x' * int(sys.argv[2]))"
)


def test_file_size_boundary(tmp_path: Path, audit_log: Path) -> None:
    """file_size 10: 10 bytes fit, 11 die of SIGXFSZ (124, file_size, audit line)."""
    ok = run([*python(WRITE), str(tmp_path / "a"), "10"], file_size=10)
    assert (ok.status, ok.exit_code) == ("ok", 0)
    assert (tmp_path / "a").stat().st_size == 10
    bad = run([*python(WRITE), str(tmp_path / "b"), "11"], file_size=10)
    assert (bad.status, bad.exit_code) == ("violation", 124)
    assert bad.violation.limit == "file_size"
    assert "SIGXFSZ" in bad.violation.message
    (v,) = events(audit_log, "violation")
    assert (v["limit"], v["limit_value"]) == ("file_size", 10)


def test_file_size_exceeded_by_a_shell_tool(tmp_path: Path) -> None:
    """A tool that does not ignore SIGXFSZ (head) is stopped at the limit: file_size."""
    target = tmp_path / "big"
    result = run(["sh", "-c", f"exec head -c 2000000 /dev/zero > {target}"], file_size="1MiB")
    assert (result.status, result.exit_code) == ("violation", 124)
    assert result.violation.limit == "file_size"
    assert target.stat().st_size == 1024 * 1024


def test_file_size_raised_passes(tmp_path: Path) -> None:
    """The same write passes with a higher file_size."""
    result = run([*python(WRITE), str(tmp_path / "a"), "2000000"], file_size="4MiB")
    assert (result.status, result.exit_code) == ("ok", 0)


def test_file_size_off_passes(tmp_path: Path) -> None:
    """file_size null sets no RLIMIT_FSIZE."""
    result = run([*python(WRITE), str(tmp_path / "a"), "2000000"], file_size=None)
    assert (result.status, result.exit_code) == ("ok", 0)


# -- open_files (RLIMIT_NOFILE) and address_space (RLIMIT_AS): kernel refusals -----------

OPEN = (
    "import os, sys\nfds = []\ntry:\n"
    "    for _ in range(int(sys.argv[1])): fds.append(os.open('/dev/null', os.O_RDONLY))\n"
    "except OSError as e:\n    print(len(fds), e.errno); sys.exit(3)\nprint(len(fds))"
)


def test_open_files_boundary() -> None:
    """open_files 20: fds 0..19 fit (17 opens after stdio), the 18th open gets EMFILE."""
    ok = supervise("-q", "--set", "limits.open_files=20", "--", *python(OPEN), "17")
    assert (ok.returncode, ok.stdout) == (0, "17\n")
    bad = supervise("-q", "--set", "limits.open_files=20", "--", *python(OPEN), "18")
    assert (bad.returncode, bad.stdout) == (3, "17 24\n")  # 24 = EMFILE


def test_open_files_raised_and_off_pass() -> None:
    """The same 500 opens pass with open_files 1024, and with open_files null."""
    for value in ("1024", "null"):
        done = supervise("-q", "--set", f"limits.open_files={value}", "--", *python(OPEN), "500")
        assert (done.returncode, done.stdout) == (0, "500\n")


ALLOC = "import sys; b = bytearray(int(sys.argv[1])); print('ok')"


def test_address_space_exceeded_is_refused() -> None:
    """RLIMIT_AS refuses an allocation past address_space: the child sees MemoryError."""
    result = run([*python(ALLOC), str(600 << 20)], address_space="400MiB")
    assert result.exit_code == 1 and result.status == "ok"


def test_address_space_raised_and_off_pass() -> None:
    """The same allocation passes under a larger address_space, and with none."""
    assert run([*python(ALLOC), str(600 << 20)], address_space="2GiB").exit_code == 0
    assert run([*python(ALLOC), str(600 << 20)], address_space=None).exit_code == 0


def test_rlimits_are_set_in_the_child_before_exec() -> None:
    """The child sees exactly the planned rlimits: CPU soft/hard, AS, FSIZE, NOFILE."""
    code = (
        "import resource as r\n"
        "print(r.getrlimit(r.RLIMIT_CPU), r.getrlimit(r.RLIMIT_AS), "
        "r.getrlimit(r.RLIMIT_FSIZE), r.getrlimit(r.RLIMIT_NOFILE))"
    )
    done = supervise(
        "-q",
        "--set",
        "limits.cpu_time=7s",
        "--set",
        "limits.address_space=3GiB",
        "--set",
        "limits.file_size=1MiB",
        "--set",
        "limits.open_files=99",
        "--",
        *python(code),
    )
    assert done.stdout.strip() == (f"(7, 8) ({3 << 30}, {3 << 30}) ({1 << 20}, {1 << 20}) (99, 99)")


# -- the child's setup ------------------------------------------------------------------


def test_child_runs_in_its_own_session_with_raised_oom_score() -> None:
    """The child leads a new session and its oom_score_adj is above the supervisor's."""
    code = "import os; print(os.getsid(0) == os.getpid(), open('/proc/self/oom_score_adj').read())"
    done = supervise("-q", "--", *python(code))
    leader, score = done.stdout.split()
    own = int(Path("/proc/self/oom_score_adj").read_text())
    assert leader == "True" and int(score) == min(1000, own + 500)


def test_no_fd_of_the_parent_leaks_into_the_child() -> None:
    """Only stdin, stdout and stderr reach the child, even from an inheritable parent fd."""
    r, w = os.pipe()
    os.set_inheritable(r, True)
    try:
        code = "import os; print(sorted(int(f) for f in os.listdir('/proc/self/fd')))"
        out_r, out_w = os.pipe()
        result = Supervisor(policy()).run(python(code), stdout=out_w)
        os.close(out_w)
        with os.fdopen(out_r) as f:
            fds = json.loads(f.read())
    finally:
        os.close(r)
        os.close(w)
    assert result.exit_code == 0
    assert fds[:3] == [0, 1, 2] and len(fds) == 4  # the 4th is listdir's own fd


def test_environment_follows_the_policy() -> None:
    """env.inherit false passes nothing but env.set and SUPERVISE_*; a list passes those names."""
    code = "import os, json; print(json.dumps(dict(os.environ)))"
    p = policy(env={"inherit": False, "set": {"A": "1"}})
    r, w = os.pipe()
    Supervisor(p).run(python(code), stdout=w, env={"B": "2", "PATH": "/usr/bin"})
    os.close(w)
    with os.fdopen(r) as f:
        env = json.loads(f.read())
    assert env["A"] == "1" and "B" not in env and "PATH" not in env
    assert set(env) - {"A", "LC_CTYPE"} == {"SUPERVISE_RUN_ID"}
    p2 = policy(env={"inherit": ["B"], "set": {}})
    r, w = os.pipe()
    Supervisor(p2).run(python(code), stdout=w, env={"B": "2", "C": "3"})
    os.close(w)
    with os.fdopen(r) as f:
        env = json.loads(f.read())
    assert env.get("B") == "2" and "C" not in env


# -- the whole tree -----------------------------------------------------------------------

DAEMON = (
    "import os, sys, time\n"
    "if os.fork() == 0:\n"
    "    os.setsid()\n"
    "    if os.fork() == 0:\n"
    "        time.sleep(100)\n"
    "    os._exit(0)\n"
    "time.sleep(float(sys.argv[1]))\n"
)


def test_double_forked_setsid_daemon_is_gone_when_run_returns(no_leftovers: str) -> None:
    """A daemon that double-forked and called setsid is killed when the run ends."""
    result = run([*python(DAEMON), "0.3"])
    assert (result.status, result.exit_code) == ("ok", 0)
    assert tagged_pids(no_leftovers) == []


def test_deadline_stops_every_process_of_the_tree(no_leftovers: str) -> None:
    """At the deadline, children, grandchildren and setsid escapees all die."""
    code = "sh -c 'sleep 100 & sleep 100 & setsid sleep 100 & wait'"
    result = run(["sh", "-c", code], wall_time="700ms")
    assert result.exit_code == 124
    assert "killed 5 processes" in result.violation.message
    assert tagged_pids(no_leftovers) == []


def test_processes_that_ignore_sigterm_are_killed_and_named() -> None:
    """After grace, SIGKILL; the message names the pids that ignored SIGTERM."""
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    t = time.monotonic()
    result = run(python(code), wall_time="300ms", grace="300ms")
    assert result.exit_code == 124
    assert time.monotonic() - t < margin(3)
    assert "ignored SIGTERM" in result.violation.message


def test_each_process_gets_sigterm_once(tmp_path: Path) -> None:
    """A stop signals the command's group and the escapees, none twice: a second SIGTERM
    would cut short the handler of a process that is shutting down cleanly."""
    code = (
        "import os, signal, sys, time\n"
        "hits = []\n"
        "signal.signal(signal.SIGTERM, lambda *a: hits.append(1))\n"
        "if os.fork() == 0:\n"
        "    if sys.argv[1] == 'escape': os.setsid()\n"
        "    name = 'child'\n"
        "else:\n"
        "    name = 'parent'\n"
        "while not hits: time.sleep(0.01)\n"
        "time.sleep(0.2)\n"
        "open(os.path.join(sys.argv[2], name), 'w').write(str(len(hits)))\n"
    )
    for mode in ("group", "escape"):
        out = tmp_path / mode
        out.mkdir()
        result = run([*python(code), mode, str(out)], wall_time="300ms", grace="2s")
        assert result.exit_code == 124
        assert (out / "parent").read_text() == "1" and (out / "child").read_text() == "1", mode


def test_grace_zero_kills_at_once() -> None:
    """grace 0 sends SIGKILL at the deadline, without a SIGTERM first."""
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    t = time.monotonic()
    result = run(python(code), wall_time="200ms", grace=0)
    assert result.exit_code == 124 and time.monotonic() - t < margin(1.5)
    assert "ignored SIGTERM" not in result.violation.message


def test_supervise_sigkilled_leaves_nothing_alive(no_leftovers: str) -> None:
    """supervise SIGKILLed mid-run: its child and grandchildren (setsid ones too) die."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "supervisor",
            "-q",
            "--",
            "sh",
            "-c",
            "sleep 100 & setsid sleep 100 & sleep 100",
        ],
    )
    assert wait_until(lambda: len(tagged_pids(no_leftovers)) >= 5, timeout=10)
    proc.kill()
    proc.wait(timeout=GLOBAL_TIMEOUT)
    assert wait_until(lambda: not tagged_pids(no_leftovers), timeout=5)


@needs_landlock_scope
def test_tree_cannot_signal_the_reaper_or_supervise() -> None:
    """Landlock's signal scope: kill -9 / -STOP of the reaper or of supervise is refused."""
    script = (
        "for sig in KILL STOP; do for pid in $PPID $SUPERVISE_PID; do "
        "kill -$sig $pid 2>/dev/null && echo sent || echo refused; done; done"
    )
    r, w = os.pipe()
    result = Supervisor(policy(wall_time="20s")).run(
        ["sh", "-c", script], stdout=w, env={**os.environ, "SUPERVISE_PID": str(os.getpid())}
    )
    os.close(w)
    with os.fdopen(r) as f:
        assert f.read().split() == ["refused"] * 4
    assert (result.status, result.exit_code) == ("ok", 0)


def test_tree_cannot_forge_the_reapers_reports() -> None:
    """Writing "the tree is empty" into the reaper's or supervise's fds fails: still 124."""
    script = (
        "for fd in /proc/$PPID/fd/* /proc/$SUPERVISE_PID/fd/*; do "
        "printf 'X 1 0 0 0 0 0\\nD 0\\n' > $fd 2>/dev/null; done; sleep 5"
    )
    env = {**os.environ, "SUPERVISE_PID": str(os.getpid())}
    result = Supervisor(policy(wall_time="700ms")).run(["sh", "-c", script], env=env)
    assert (result.status, result.exit_code) == ("violation", 124)
    assert result.violation is not None
    assert result.violation.limit == "wall_time"


def test_embedding_program_that_ignores_sigchld() -> None:
    """A host that set SIGCHLD to SIG_IGN still gets exact results, and run() returns."""
    code = (
        "import signal\nsignal.signal(signal.SIGCHLD, signal.SIG_IGN)\n"
        "from supervisor import Policy, Supervisor\n"
        "p = Policy.from_dict({'limits': {'wall_time': '5s'}})\n"
        "r = Supervisor(p).run(['sh', '-c', 'exit 3'])\n"
        "print(r.status, r.exit_code)"
    )
    done = subprocess.run(python(code), capture_output=True, text=True, timeout=GLOBAL_TIMEOUT)
    assert done.stdout.split() == ["ok", "3"], done.stderr


def sleeps(tag: str) -> int:
    """How many live ``sleep`` processes carry the test's ``tag``."""
    names = []
    for pid in tagged_pids(tag):
        try:
            names.append(Path(f"/proc/{pid}/comm").read_text().strip())
        except OSError:
            pass
    return names.count("sleep")


def test_reaper_killed_from_outside_fails_the_run_and_leaves_nothing(no_leftovers: str) -> None:
    """If the reaper dies before the tree is empty: 125, and what was left is killed."""
    sup = Supervisor(policy(wall_time="20s"))
    run_ = sup.start(["sh", "-c", "sleep 100 & setsid sleep 100 & sleep 100"])
    samples: list[float] = []
    run_.on_sample = lambda _usage, current: samples.append(current["processes"])
    holder: list[Any] = []
    thread = threading.Thread(target=lambda: holder.append(run_.execute()))
    thread.start()

    assert wait_until(lambda: sleeps(no_leftovers) == 3, timeout=10)
    # The watcher knows the tree from its samples: one escaping into a new session
    # between the last sample and the reaper's death is out of its sight (README).
    # Two more samples: the second began after all three sleeps were there.
    seen = len(samples)
    assert wait_until(lambda: len(samples) >= seen + 2, timeout=10)
    assert run_.child is not None
    os.kill(run_.child.reaper_pid, signal.SIGKILL)
    thread.join(GLOBAL_TIMEOUT)
    (result,) = holder
    assert (result.status, result.exit_code) == ("failed", 125)
    assert "reaper helper died" in result.error
    assert wait_until(lambda: not tagged_pids(no_leftovers), timeout=5)


def test_sigint_to_supervise_is_forwarded_to_the_tree() -> None:
    """SIGINT to supervise reaches the child, which handles it: the status is the child's."""
    # 'ready' is printed inside the try, so a SIGINT right after it is still handled.
    code = (
        "import time\ntry:\n    print('ready', flush=True)\n    time.sleep(60)\n"
        "except KeyboardInterrupt:\n    raise SystemExit(5)"
    )
    with subprocess.Popen(
        [sys.executable, "-m", "supervisor", "-q", "--", *python(code)], stdout=subprocess.PIPE
    ) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=GLOBAL_TIMEOUT) == 5


def test_sigterm_to_supervise_stops_a_tree_that_ignores_it() -> None:
    """SIGTERM to supervise is forwarded; a tree that ignores it is killed after grace: 143."""
    code = (
        "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ready', flush=True)\ntime.sleep(60)"
    )
    with subprocess.Popen(
        [sys.executable, "-m", "supervisor", "-q", "--set", "grace=300ms", "--", *python(code)],
        stdout=subprocess.PIPE,
    ) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=GLOBAL_TIMEOUT) == 143


# -- results and the audit log ----------------------------------------------------------


def test_json_result_comes_after_the_child_output() -> None:
    """--json - prints the RunResult as one line on stdout after the child's own output."""
    done = supervise("-q", "--json", "-", "--agent", "bot", "--session", "s1", "--", "echo", "hi")
    first, second = done.stdout.splitlines()
    assert first == "hi"
    result = json.loads(second)
    assert result["status"] == "ok" and result["exit_code"] == 0 and result["returncode"] == 0
    assert (result["agent"], result["session"], result["command"]) == ("bot", "s1", ["echo", "hi"])
    assert set(result["usage"]) >= {"wall_time", "cpu_time", "peak_memory", "usd", "by_model"}
    assert result["started_at"].endswith("Z") and result["violation"] is None


def test_audit_records_run_start_and_run_end(audit_log: Path) -> None:
    """run_start names the policy's SHA-256 and what was enforced; run_end the outcome."""
    p = policy(wall_time="5s", cpu_time="3s")
    result = Supervisor(p).run(["true"], agent="bot", session="s1")
    start, end = list(read_events([audit_log]))
    assert start["event"] == "run_start" and end["event"] == "run_end"
    assert start["run_id"] == end["run_id"] == result.run_id
    assert (start["agent"], start["session"]) == ("bot", "s1")
    assert start["detail"]["policy_sha256"] == p.sha256()
    assert start["detail"]["enforced"]["rlimits"] == ["cpu=3:4"]
    assert end["detail"]["exit_code"] == 0 and end["action"] == "ok"
    assert verify([audit_log]).ok


def test_unwritable_audit_log_fails_before_the_child_runs(tmp_path: Path) -> None:
    """An audit log that cannot be written is supervise's failure (125): nothing runs."""
    marker = tmp_path / "ran"
    blocker = tmp_path / "file"
    blocker.write_text("")
    done = supervise("--audit", str(blocker / "audit.jsonl"), "--", "touch", str(marker))
    assert done.returncode == 125
    assert "audit" in done.stderr and str(blocker) in done.stderr
    assert not marker.exists()


def test_cli_audit_verify_names_the_first_bad_line(audit_log: Path) -> None:
    """supervise audit --verify passes on a real log and names the line after an edit."""
    for _ in range(2):
        assert supervise("-q", "--", "true").returncode == 0
    ok = supervise("audit", str(audit_log), "--verify")
    assert ok.returncode == 0, ok.stderr
    lines = audit_log.read_text().splitlines(keepends=True)
    lines[2] = lines[2].replace('"run_start"', '"run_end"')
    audit_log.write_text("".join(lines))
    bad = supervise("audit", str(audit_log), "--verify")
    assert bad.returncode == 1 and "line 3" in bad.stderr


# -- the embedded API -------------------------------------------------------------------


def test_hooks_are_called_and_a_raising_hook_does_not_stop_the_kill() -> None:
    """on_violation and on_end run; one that raises is reported and the kill still happens."""
    seen: list[str] = []

    def bad_hook(v: Any) -> None:
        seen.append(v.limit)
        raise RuntimeError("hook bug")

    sup = Supervisor(
        policy(wall_time="200ms"), on_violation=bad_hook, on_end=lambda r: seen.append(r.status)
    )
    result = sup.run(["sleep", "30"])
    assert result.exit_code == 124
    assert seen == ["wall_time", "violation"]


def test_runs_from_several_threads_at_once() -> None:
    """Runs from many threads are independent; a thread's exit does not kill another run."""
    sup = Supervisor(policy(wall_time="10s"))
    results: list[Any] = []
    threads = [
        threading.Thread(
            target=lambda i=i: results.append(sup.run(["sh", "-c", f"sleep 0.{i}; exit {i}"]))
        )
        for i in range(1, 6)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(GLOBAL_TIMEOUT)
    assert sorted(r.exit_code for r in results) == [1, 2, 3, 4, 5]


def test_run_async_and_cancel_stops_the_tree(no_leftovers: str) -> None:
    """run_async returns the RunResult; cancelling it stops the whole tree."""
    import asyncio

    sup = Supervisor(policy(wall_time="20s"))

    async def main() -> Any:
        done = await sup.run_async(["sh", "-c", "exit 4"])
        task = asyncio.ensure_future(sup.run_async(["sh", "-c", "sleep 100 & sleep 100"]))
        deadline = time.monotonic() + GLOBAL_TIMEOUT
        while sleeps(no_leftovers) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)  # until the tree runs: then cancel it
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return done

    result = asyncio.run(main())
    assert result.exit_code == 4
    assert wait_until(lambda: not tagged_pids(no_leftovers), timeout=5)


def test_public_api_all_is_complete_and_sorted() -> None:
    """supervisor.__all__ is sorted and every name in it resolves."""
    import supervisor

    assert supervisor.__all__ == sorted(supervisor.__all__)
    for name in supervisor.__all__:
        assert getattr(supervisor, name) is not None
