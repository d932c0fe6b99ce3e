"""The lifecycle of one run: spawn → watch → stop → ``RunResult``, with hooks and audit.

One thread per run, no sleep-polling: the loop blocks in ``poll()`` on the reaper's status
pipe (the command's exit, kernel-limit deaths, the tree emptying) and a wake pipe (signals
to forward, cancellation), with a timeout that is the next deadline (wall clock, end of
grace).  The reaper (see ``spawn.py``) does the reaping and the killing; this module
decides when, and why.
"""

from __future__ import annotations

import math
import os
import select
import signal
import sys
import time

from ._confine import Confinement
from ._hooks import HookRunner
from ._plan import RunPlan
from .errors import SupervisorError
from .result import UNITS, RunResult, Usage, Violation, format_limit, iso_time
from .spawn import Child, build_env, reaper_path, spawn
from .watch import Sample, TreeSampler, next_interval

# typing costs ~5 ms to import; mypy honours any constant named TYPE_CHECKING.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Any

    from ._backend import RunBackend
    from .audit import AuditLog
    from .budget.ledger import Alert
    from .errors import BudgetError, BudgetExceeded, StoreUnavailable
    from .policy import Policy
    from .rpc import RpcServer

# How long the reaper may take to empty the tree after SIGKILL before it is presumed stuck.
REAPER_DEADLINE = 2.0

# Fractions of a limit that raise a warning, once each per run (budget.alerts will set them).
ALERTS = (0.8, 0.9)

_SIGNAL_LIMIT: dict[int, str] = {signal.SIGXCPU: "cpu_time", signal.SIGXFSZ: "file_size"}


def _oom_score_adj() -> int:
    """The child's oom_score_adj: 500 above ours, so the OOM killer picks it first."""
    try:
        with open("/proc/self/oom_score_adj", "rb") as f:
            own = int(f.read())
    except (OSError, ValueError):
        own = 0
    return min(1000, own + 500)


def _process_cap(processes: int | None) -> int | None:
    """The kernel backstop for ``processes``: RLIMIT_NPROC in a user namespace, or None.

    RLIMIT_NPROC counts threads, not processes, and (outside a user namespace) every
    process of the user on the host; root is exempt from it.  So it is no exact limit:
    the watcher counts processes exactly, and the kernel cap, generous enough for
    threaded programs, only keeps a fork bomb from getting far past it.
    """
    if processes is None or os.geteuid() == 0:
        return None
    from ._linux import userns_available

    return max(16 * processes, 256) if userns_available() else None


def _call_hook(hook: Callable[..., object] | None, *args: object) -> None:
    """Run a user hook; one that raises is reported and never breaks enforcement."""
    if hook is None:
        return
    try:
        hook(*args)
    except Exception as e:
        print(f"supervise: a hook raised {type(e).__name__}: {e}", file=sys.stderr)


class Supervisor:
    """Runs commands under one policy.  Thread-safe: each ``run`` is independent.

    ``Supervisor(policy).run(["python", "agent.py"], agent="bot", session="s1")``
    """

    def __init__(
        self,
        policy: Policy | RunPlan | None = None,
        *,
        on_warning: Callable[[dict[str, Any]], object] | None = None,
        on_violation: Callable[[Violation], object] | None = None,
        on_end: Callable[[RunResult], object] | None = None,
        on_usage: Callable[[dict[str, Any]], object] | None = None,
        audit: str | os.PathLike[str] | None = None,
    ) -> None:
        if policy is None:
            from .policy import Policy

            policy = Policy.default()
        self.plan = policy if isinstance(policy, RunPlan) else RunPlan.from_policy(policy)
        self.on_warning = on_warning
        self.on_violation = on_violation
        self.on_end = on_end
        self.on_usage = on_usage
        self.audit_path = os.fspath(audit) if audit is not None else None

    def start(
        self,
        argv: Sequence[str],
        *,
        agent: str | None = None,
        session: str | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        stdin: object = None,
        stdout: object = None,
        stderr: object = None,
    ) -> Run:
        """A run, not yet started: call ``.execute()`` (blocks) from the thread of your choice."""
        return Run(self, list(argv), agent, session, env, cwd, (stdin, stdout, stderr))

    def run(self, argv: Sequence[str], **kwargs: Any) -> RunResult:
        """Run ``argv`` to the end under the policy and return its RunResult."""
        return self.start(argv, **kwargs).execute()

    async def run_async(self, argv: Sequence[str], **kwargs: Any) -> RunResult:
        """``run`` for asyncio: the run goes on in a thread; cancelling stops the tree."""
        import asyncio

        run = self.start(argv, **kwargs)
        future = asyncio.get_running_loop().run_in_executor(None, run.execute)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            run.interrupt(signal.SIGTERM)
            await future
            raise


class Run:
    """One run's state.  ``interrupt()`` may be called from any thread or a signal handler."""

    def __init__(
        self,
        sup: Supervisor,
        argv: list[str],
        agent: str | None,
        session: str | None,
        env: dict[str, str] | None,
        cwd: str | None,
        std: tuple[object, object, object],
    ) -> None:
        self.sup = sup
        self.plan = sup.plan
        self.argv = argv
        self.env = env
        self.cwd = cwd
        self.std = std
        self.result = RunResult(os.urandom(8).hex(), agent or self.plan.agent, session, argv)
        self.child: Child | None = None
        self.audit: AuditLog | None = None
        self._wake_r = self._wake_w = -1  # made by execute(), so an unrun Run holds no fds
        self._pending_signal = 0
        self._logged_start = False
        self._stopping = False  # we have signalled the tree (stop or sweep)
        self._sent_by_us: set[int] = set()
        self._term_pids: set[int] = set()
        self._kill_pids: set[int] = set()
        self._kill_at: float | None = None
        self._give_up_at: float | None = None
        self._forwarded = 0
        self._wstatus: int | None = None
        self._cmd_cpu = 0.0
        self._cmd_own_cpu = 0.0
        self._reaper_cpu = 0.0
        self._warned_limits: set[str] = set()
        self._alerted: set[tuple[str, float]] = set()
        self._deny_tokens, self._deny_stamp, self._denied_quietly = 20.0, time.monotonic(), 0
        # Called after each tree sample with (usage, current values): --live uses it.
        self.on_sample: Callable[[Usage, dict[str, float]], object] | None = None
        self.error: SupervisorError | None = None
        self._fail: SupervisorError | None = None  # failed closed mid-run: the run ends 125
        self.confine: Confinement | None = None
        self.rpc: RpcServer | None = None
        self.backend: RunBackend | None = None
        self._rlimits: list[str] = []
        self.hooks = HookRunner(self._hook_failed)

    # -- the public controls -------------------------------------------------------

    def interrupt(self, sig: int) -> None:
        """Forward ``sig`` to the tree and stop it after ``grace`` (async-signal-safe)."""
        self._pending_signal = sig
        if self._wake_w >= 0:
            try:
                os.write(self._wake_w, b"!")
            except OSError:
                pass

    # -- the lifecycle -----------------------------------------------------------

    def execute(self) -> RunResult:
        """Run to the end (blocking) and return the RunResult."""
        try:
            reaper_path()  # a first run may build the helper: not on the child's clock
        except SupervisorError:
            pass  # spawn() reports it
        t0 = time.monotonic()
        self.result.started_at = iso_time(time.time())
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        if self._pending_signal:  # interrupted before it started
            os.write(self._wake_w, b"!")
        try:
            return self._execute(t0)
        finally:
            self._close()

    def _execute(self, t0: float) -> RunResult:
        res = self.result
        plan = self.plan
        try:
            self.audit = self._open_audit()
            env = build_env(plan.env_inherit, plan.env_set, self.env)
            env["SUPERVISE_RUN_ID"] = res.run_id
            if res.agent:
                env["SUPERVISE_AGENT"] = res.agent
            stdin, stdout, stderr = self.std
            self.confine = Confinement(plan, self.argv, env)
            for message in self.confine.warnings:
                print(f"supervise: warning: {message}", file=sys.stderr)
            self._rlimits = [*plan.rlimit_words(), *self.confine.fsize_words()]
            words = [*self._rlimits, f"oom={_oom_score_adj()}", "scope=1", *self.confine.words]
            cap = _process_cap(plan.limit("processes"))
            if cap is not None:
                words.append(f"nproc={cap}")
            ws = self.confine.workspace
            pass_fds = self._open_rpc(env)
            argv = self.argv
            if ws is not None and "/" in argv[0] and not os.path.isabs(argv[0]):
                # ./tool means the tool here, not in the workspace the command starts in.
                argv = [os.path.abspath(argv[0]), *argv[1:]]
            self.child = spawn(
                argv,
                rlimits=words,
                env=env,
                pass_fds=pass_fds,
                cwd=self.cwd if self.cwd is not None or ws is None else ws.path,
                stdin=stdin,
                stdout=stdout,
                stderr=stderr,
            )
        except SupervisorError as e:
            return self._failed(e, t0)
        confine = self.confine
        confine.after_spawn(self.child.pid)
        if self.rpc is not None:
            self.rpc.close_child_end()
        try:
            self._log("run_start", detail=self._start_detail())
            self._logged_start = True
            for message in confine.warnings:
                self._log("warning", action="fallback", detail=message)
            self._loop(t0)
            self._reap_reaper()
        except SupervisorError as e:  # e.g. the audit log failed: fail closed
            self._stop_now()
            self._drain()
            return self._failed(e, t0)
        return self._finish(t0)

    def _open_rpc(self, env: dict[str, str]) -> tuple[int, ...]:
        """The budget RPC, when the policy has something to ask it for (a budget, a
        workspace's check_write, steps); the ledger opens here, so an unreachable store
        fails the run (125) before the command starts."""
        plan = self.plan
        step_time = plan.limit("step_time")
        if plan.budget is None and plan.workspace is None and step_time is None:
            return ()
        from ._backend import RunBackend
        from .rpc import RpcServer

        ledger = None
        if plan.budget is not None:
            from .budget._policy import BudgetPolicy
            from .budget.ledger import Ledger

            res = self.result
            ledger = Ledger.open(
                BudgetPolicy.model_validate(plan.budget),
                run_id=res.run_id,
                agent=res.agent or "default",
                session=res.session,
            )
            try:
                recovered = ledger.claim()
            except BaseException:
                ledger.close()
                raise
            for dead_run, s in recovered:  # holds of a run whose supervisor died (SIGKILL...)
                assert self.audit is not None
                self.audit.append(
                    "unsettled",
                    run_id=dead_run,
                    agent=ledger.agent,
                    limit="usd",
                    action="charged",
                    detail={
                        "reservation": s.hold_id, "usd": float(s.usd), "tokens": s.tokens,
                        "model": s.model, "label": s.label,
                        "why": f"its supervisor died; settled by run {res.run_id}",
                    },
                )  # fmt: skip
        assert self.confine is not None
        usage = self.result.usage
        self.backend = RunBackend(self, usage, ledger, self.confine.workspace, step_time)
        self.rpc = RpcServer(
            self.backend,
            run_id=self.result.run_id,
            agent=self.result.agent or "",
            on_error=self._rpc_error,
        )
        env.update(self.rpc.child_env())
        return (self.rpc.child_fd,)

    def _rpc_error(self, code: int, message: str, excerpt: str) -> None:
        self._log(
            "rpc_error",
            action="reply",
            detail={"code": code, "message": message, "excerpt": excerpt[:200]},
        )

    # -- what the budget backend tells the run (_backend.RunEvents) --------------------

    def budget_denied(self, error: BudgetError | StoreUnavailable) -> None:
        # A child may ask again and again: a burst of 20 lines, then 5 a second, and the
        # next line logged counts those that were not (the audit log is outside the quota).
        now = time.monotonic()
        self._deny_tokens = min(20.0, self._deny_tokens + (now - self._deny_stamp) * 5.0)
        self._deny_stamp = now
        if self._deny_tokens < 1.0:
            self._denied_quietly += 1
            return
        self._deny_tokens -= 1.0
        detail = str(error)
        if self._denied_quietly:
            detail += f" ({self._denied_quietly} more denials not logged one by one)"
            self._denied_quietly = 0
        used = getattr(error, "used", None)
        observed = used if isinstance(used, int) else None if used is None else float(used)
        value = getattr(error, "limit_value", None)
        self._log(
            "denied",
            limit=getattr(error, "limit", None),
            observed=observed,
            limit_value=value if isinstance(value, int) or value is None else float(value),
            action="deny",
            detail=detail,
        )

    def budget_breached(self, error: BudgetExceeded) -> None:
        used = error.used if isinstance(error.used, int) else float(error.used)
        value = (
            error.limit_value if isinstance(error.limit_value, int) else float(error.limit_value)
        )
        self._breach(error.limit, used, value, f"{error.scope} {error.key}, spend recorded")

    def budget_alert(self, alert: Alert) -> None:
        used = alert.used if isinstance(alert.used, int) else float(alert.used)
        value = (
            alert.limit_value if isinstance(alert.limit_value, int) else float(alert.limit_value)
        )
        self._alert(alert.limit, used, value, fractions=(alert.threshold,), scope=alert.scope)

    def usage_changed(self, call: dict[str, Any]) -> None:
        """A call was settled: ``on_usage`` gets it with the run's running totals."""
        if self.sup.on_usage is None:
            return
        u = self.result.usage
        totals = {
            "api_calls": u.api_calls,
            "input_tokens": u.input_tokens,
            "output_tokens": u.output_tokens,
            "usd": u.usd,
        }
        event = {"run_id": self.result.run_id, "agent": self.result.agent, **call}
        self.hooks.call("on_usage", self.sup.on_usage, {**event, "totals": totals})

    def _hook_failed(self, name: str, error: BaseException) -> None:
        """A hook raised: say so on stderr and in the audit log; enforcement goes on."""
        message = f"the {name} hook raised {type(error).__name__}: {error}"
        print(f"supervise: {message}", file=sys.stderr)
        if self.audit is not None:
            self._log("warning", action="hook_failed", detail=message)

    def _open_audit(self) -> AuditLog:
        from .audit import AuditLog, default_audit_file

        plan = self.plan
        path = self.sup.audit_path or plan.audit
        path = os.path.expanduser(path) if path else default_audit_file()
        return AuditLog(path, max_size=plan.audit_max_size, keep=plan.audit_keep)

    def _start_detail(self) -> dict[str, Any]:
        plan = self.plan
        assert self.child is not None and self.confine is not None
        return {
            "command": self.argv,
            "pid": self.child.pid,
            "policy": plan.name,
            "policy_sha256": plan.sha256,
            "on_violation": plan.on_violation,
            "enforced": {
                "rlimits": self._rlimits,
                "reaper": "subreaper+pidfd" if self.child.pidfd else "subreaper+pipe EOF",
                "signal_scope": "landlock" if self.child.scoped else None,
                "wall_time": plan.limit("wall_time"),
                "watched": ["memory", "cpu_time", "processes", "open_files"],
                "processes_kernel_cap": self._kernel_cap(),
                **self.confine.enforced(),
            },
        }

    def _kernel_cap(self) -> str | None:
        """What caps processes in the kernel, from evidence: the child's user namespace."""
        cap = _process_cap(self.plan.limit("processes"))
        if cap is None or self.child is None:
            return None
        try:
            ours = os.readlink("/proc/self/ns/user")
            theirs = os.readlink(f"/proc/{self.child.pid}/ns/user")
        except OSError:
            return None
        return f"RLIMIT_NPROC={cap} in a user namespace" if ours != theirs else None

    def _loop(self, t0: float) -> None:
        child = self.child
        assert child is not None
        wall = self.plan.limit("wall_time")
        wall_at = t0 + wall if wall is not None else None
        sampler = TreeSampler(child.reaper_pid)
        prev: Sample | None = None
        # The first sample waits a little: a command that is over in 10 ms costs nothing.
        sample_at = t0 + 0.01
        poller = select.poll()
        poller.register(child.status_fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        confine = self.confine
        assert confine is not None
        storage_fd = confine.fileno()
        if storage_fd >= 0:
            poller.register(storage_fd, select.POLLIN)
        rpc_fd = self.rpc.fileno() if self.rpc is not None else -1
        if rpc_fd >= 0:
            poller.register(rpc_fd, select.POLLIN)
        backend = self.backend
        buf = b""
        while True:
            now = time.monotonic()
            if wall_at is not None and now >= wall_at:
                wall_at = None
                self._breach("wall_time", now - t0, wall, "wall clock")
                continue
            if self._kill_at is not None and now >= self._kill_at:
                self._kill_at = None
                child.signal_tree(signal.SIGKILL)
                self._sent_by_us.add(signal.SIGKILL)
                self._give_up_at = now + REAPER_DEADLINE
                continue
            if self._give_up_at is not None and now >= self._give_up_at:
                # The reaper did not empty the tree in time (stopped?): kill it; its end
                # of the socket closes and _reaper_lost kills what is left.
                self._give_up_at = None
                try:
                    os.kill(child.reaper_pid, signal.SIGKILL)
                except OSError:
                    pass
                continue
            if now >= sample_at:
                cur = sampler.sample(now)
                watched = self._on_sample(cur, now - t0)
                if storage_fd >= 0:
                    self._on_storage(confine.periodic(cur.pids, now))
                if self.on_sample is not None:
                    current = {name: used for name, used, _ in watched}
                    current.update(
                        memory=cur.rss,
                        processes=cur.processes,
                        cpu_time=cur.cpu,
                        open_files=cur.max_fds,
                        wall_time=now - t0,
                    )
                    if confine.tracker is not None:
                        current["storage"], current["files"] = confine.tracker.totals()
                    _call_hook(self.on_sample, self.result.usage, current)
                sample_at = now + next_interval(prev, cur, watched)
                prev = cur
                continue
            step = backend.step_deadline() if backend is not None else None
            if step is not None and backend is not None and now >= step[0]:
                step_time = self.plan.limit("step_time")
                backend.steps.pop(step[1], None)
                self._breach("step_time", now - step[0] + step_time, step_time, f"step {step[1]!r}")
                continue
            deadlines = [
                d
                for d in (wall_at, self._kill_at, self._give_up_at, sample_at, step and step[0])
                if d is not None
            ]
            timeout = max(0.0, min(deadlines) - now)
            for fd, _ in poller.poll(timeout * 1000 + 0.5):
                if fd == self._wake_r:
                    self._on_wake()
                    continue
                if fd == storage_fd:
                    self._on_storage(confine.poll(prev.pids if prev is not None else []))
                    continue
                if fd == rpc_fd:
                    assert self.rpc is not None
                    self.rpc.on_readable()
                    continue
                chunk = os.read(child.status_fd, 65536)
                if not chunk:  # the reaper is gone without saying the tree is empty
                    self._reaper_lost(prev)
                    return
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if self._on_line(line):
                        return

    def _reaper_lost(self, last: Sample | None) -> None:
        """The reaper died before the tree was empty (killed by the command?).

        Its orphans went to init: kill every process of the last sample, what they started
        since, and (a scan of /proc, on this rare path only) every process still in the
        command's session; then fail the run (125): the tree can no longer be vouched for.
        """
        from .watch import _children, _session_members

        todo = list(last.pids) if last is not None else []
        if self.child is not None:
            todo.append(self.child.pid)
            todo.extend(_session_members(self.child.pid))
        killed = 0
        seen: set[int] = set()
        while todo:
            pid = todo.pop()
            if pid in seen:
                continue
            seen.add(pid)
            todo.extend(_children(pid))
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except OSError:
                pass
        raise SupervisorError(
            "the reaper helper died before the tree was empty (was it killed by the command?); "
            f"killed {killed} process{'es' if killed != 1 else ''} left of the tree"
        )

    def _on_sample(self, cur: Sample, elapsed: float) -> list[tuple[str, float, float]]:
        """Fold one tree sample into the usage peaks, alerts and breaches."""
        u = self.result.usage
        u.peak_memory = max(u.peak_memory, cur.rss)
        u.peak_processes = max(u.peak_processes, cur.processes)
        u.peak_open_files = max(u.peak_open_files, cur.max_fds)
        u.cpu_time = max(u.cpu_time, cur.cpu)
        lim = self.plan.limits
        watched: list[tuple[str, float, float]] = []
        for name, used, how in (
            ("memory", cur.rss, "tree RSS"),
            ("processes", cur.processes, "live processes in the tree"),
            ("cpu_time", cur.cpu, "tree CPU"),
            ("wall_time", elapsed, "wall clock"),
        ):
            limit = lim.get(name)
            if limit is None:
                continue
            watched.append((name, used, limit))
            if used > limit:
                self._breach(name, used, limit, how)
            else:
                self._alert(name, used, limit)
        return watched

    def _on_storage(self, found: list[tuple[str, int, int, str]]) -> None:
        """The workspace's limits after an inotify batch: breach, alert, or nothing."""
        for name, used, limit, how in found:
            if used > limit:
                self._breach(name, used, limit, how)
            else:
                self._alert(name, used, limit)

    def _alert(
        self,
        limit: str,
        used: float,
        value: float,
        fractions: tuple[float, ...] = ALERTS,
        scope: str | None = None,
    ) -> None:
        """At each alert fraction of a limit, once per run: the hook, the log, the result,
        and a ``warning`` notification to the child over the budget RPC."""
        for frac in fractions:
            key = (f"{scope}.{limit}" if scope else limit, frac)
            if used < frac * value or key in self._alerted:
                continue
            self._alerted.add(key)
            shown = f"{format_limit(limit, used)} of {format_limit(limit, value)}"
            where = f"{scope} " if scope else ""
            message = f"{where}{limit} at {frac:.0%} of its limit: {shown}"
            warning = {
                "limit": limit,
                "fraction": frac,
                "observed": used,
                "limit_value": value,
                "message": message,
            }
            if scope:
                warning["scope"] = scope
            if self.rpc is not None:
                note = {"limit": limit, "used": used, "limit_value": value, "fraction": frac}
                self.rpc.notify("warning", {**note, **({"scope": scope} if scope else {})})
            self.result.warnings.append(warning)
            self._log(
                "warning",
                limit=limit,
                observed=used,
                limit_value=value,
                unit=UNITS.get(limit),
                action="alert",
                detail=message,
            )
            self.hooks.call("on_warning", self.sup.on_warning, warning)

    def _on_wake(self) -> None:
        try:
            os.read(self._wake_r, 512)
        except OSError:
            pass
        sig, self._pending_signal = self._pending_signal, 0
        if not sig or self.child is None:
            return
        self._forwarded = self._forwarded or sig
        self._sent_by_us.add(sig)
        self.child.signal_tree(sig)
        if self._kill_at is None:
            self._kill_at = time.monotonic() + self.plan.grace

    def _on_line(self, line: bytes) -> bool:
        """Handle one reaper line; True when the tree is empty."""
        try:
            return self._parse_line(line.split())
        except (ValueError, IndexError):  # a line we cannot read must not end supervision
            print(f"supervise: unexpected line from the reaper: {line[:80]!r}", file=sys.stderr)
            return False

    def _parse_line(self, parts: list[bytes]) -> bool:
        if not parts:
            return False
        kind = parts[0]
        assert self.child is not None
        if kind == b"D" and self._wstatus is not None:
            self._reaper_cpu = int(parts[1]) / 1e6
            return True
        if kind == b"X" and self._wstatus is None and int(parts[1]) == self.child.pid:
            self._wstatus = int(parts[2])
            self._cmd_cpu = (int(parts[3]) + int(parts[4])) / 1e6
            self._cmd_own_cpu = int(parts[6]) / 1e6
            self.result.usage.cpu_time = max(self.result.usage.cpu_time, self._cmd_cpu)
            self.result.usage.peak_memory = max(self.result.usage.peak_memory, int(parts[5]) * 1024)
            self._on_command_exit(self._wstatus)
        elif kind == b"R":
            self._on_kernel_kill(int(parts[1]), int(parts[2]), int(parts[3]) / 1e6)
        elif kind == b"s":
            pids = {int(p) for p in parts[2:]}
            (self._kill_pids if int(parts[1]) == signal.SIGKILL else self._term_pids).update(pids)
        return False

    def _on_command_exit(self, wstatus: int) -> None:
        if os.WIFSIGNALED(wstatus):
            assert self.child is not None
            self._on_kernel_kill(self.child.pid, wstatus, self._cmd_own_cpu, self._cmd_cpu)
        # Nothing outlives the run: sweep what the command left behind.
        if not self._stopping:
            self._stop(sweep=True)

    def _on_kernel_kill(self, pid: int, wstatus: int, cpu: float, shown: float = -1) -> None:
        """A process of the tree died of SIGXCPU/SIGXFSZ, or of SIGKILL at the CPU hard limit.

        ``cpu`` is the process's own CPU (what RLIMIT_CPU counts), ``shown`` a more precise
        figure for the message when there is one.
        """
        if not os.WIFSIGNALED(wstatus):
            return
        sig = os.WTERMSIG(wstatus)
        limit = _SIGNAL_LIMIT.get(sig)
        cpu_limit = self.plan.limit("cpu_time")
        if (
            limit is None
            and sig == signal.SIGKILL
            and signal.SIGKILL not in self._sent_by_us
            and cpu_limit is not None
            and cpu >= max(1, math.ceil(cpu_limit))
        ):
            limit = "cpu_time"  # killed by the kernel at the RLIMIT_CPU hard limit
        if limit is None:
            return
        name = signal.Signals(sig).name
        if limit == "cpu_time":
            # The kernel's clock is exact, rusage is sampled: it may read a little under
            # the soft limit the kernel just enforced.
            soft = max(1, math.ceil(cpu_limit)) if cpu_limit is not None else 0
            observed = max(cpu, shown, soft)
            self._breach(limit, observed, cpu_limit, f"{name}, pid {pid}", kernel=True)
        else:
            limit, value = (
                self.confine.sigxfsz_limit()
                if self.confine is not None
                else (limit, self.plan.limit("file_size"))
            )
            self._breach(limit, None, value, f"a write past it, {name}, pid {pid}", kernel=True)

    def _breach(
        self, limit: str, observed: float | int | None, value: Any, how: str, kernel: bool = False
    ) -> None:
        """A limit was broken: record it, tell the hooks and the log, stop or warn."""
        res = self.result
        if res.violation is not None or limit in self._warned_limits:
            return
        kill = self.plan.on_violation == "kill"
        cap = format_limit(limit, value)
        if observed is None:
            message = f"{limit} limit exceeded: {cap} ({how})"
        else:
            shown = format_limit(limit, observed)
            if shown == cap:  # "3.00 s > 3.00 s" reads as no breach at all: be exact
                if UNITS.get(limit) == "seconds":
                    shown = f"{observed:.3f} s"
                elif UNITS.get(limit) == "bytes":
                    shown, cap = f"{int(observed)} bytes", f"{int(value)} bytes"
            message = f"{limit} limit exceeded: {shown} > {cap} ({how})"
        violation = Violation(limit, observed, value, message)
        if kill:
            res.violation = violation
            self._stop(sweep=False)  # first: an fsync'd audit line may take 100 ms or more
        else:
            self._warned_limits.add(limit)
            if res.violation is None:
                res.violation = violation
        self._log(
            "violation",
            limit=limit,
            observed=observed,
            limit_value=value,
            unit=violation.unit,
            action="kill" if kill else "warn",
            detail=message,
        )
        # After the stop has begun: the hook runs on the hook thread and cannot delay it.
        self.hooks.call("on_violation", self.sup.on_violation, violation)

    def _stop(self, *, sweep: bool) -> None:
        """SIGTERM the whole tree, SIGKILL after grace (at once when grace is 0)."""
        child = self.child
        if child is None or self._stopping:
            return
        self._stopping = True
        if self.plan.grace <= 0:
            self._sent_by_us.add(signal.SIGKILL)
            child.signal_tree(signal.SIGKILL)
            self._give_up_at = time.monotonic() + REAPER_DEADLINE
        else:
            if self.rpc is not None:
                v = self.result.violation
                limit = None if v is None or sweep else v.limit
                self.rpc.notify("stopping", {"limit": limit, "grace": self.plan.grace})
                self.rpc.on_readable()  # flush it before the signal lands
            self._sent_by_us.add(signal.SIGTERM)
            child.signal_tree(signal.SIGTERM)
            self._kill_at = time.monotonic() + self.plan.grace

    def _stop_now(self) -> None:
        if self.child is not None:
            self._sent_by_us.add(signal.SIGKILL)
            self.child.signal_tree(signal.SIGKILL)

    def _drain(self) -> None:
        """Read the reaper's socket to its end (it exits when the tree is empty); a reaper
        that does not finish within REAPER_DEADLINE is killed, and what is left with it."""
        child = self.child
        if child is None:
            return
        poller = select.poll()
        poller.register(child.fd, select.POLLIN)
        end = time.monotonic() + REAPER_DEADLINE
        while True:
            left = end - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                try:
                    os.kill(child.reaper_pid, signal.SIGKILL)
                except OSError:
                    pass
                try:
                    self._reaper_lost(None)
                except SupervisorError:
                    pass
                return
            try:
                if not os.read(child.fd, 65536):
                    return
            except OSError:
                return

    def _reap_reaper(self) -> None:
        """Wait for the reaper; its rusage holds the CPU of every process of the tree."""
        child = self.child
        if child is None or child.reaper_pid <= 0:
            return
        try:
            _, _, ru = os.wait4(child.reaper_pid, 0)
        except ChildProcessError:
            return
        finally:
            child.reaper_pid = 0
        u = self.result.usage
        # The reaper's rusage holds the whole tree's CPU, and its own: take its own out.
        u.cpu_time = max(u.cpu_time, ru.ru_utime + ru.ru_stime - self._reaper_cpu)

    def _close(self) -> None:
        if self.confine is not None:
            self.confine.close()
        if self.rpc is not None:
            self.rpc.close()
        if self.backend is not None and self.backend.ledger is not None:
            self.backend.ledger.close()
        child = self.child
        if child is not None:
            child.close()
            if child.reaper_pid > 0:
                try:
                    os.waitpid(child.reaper_pid, 0)
                except ChildProcessError:
                    pass
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._wake_r = self._wake_w = -1

    # -- the result ----------------------------------------------------------------

    def _finish(self, t0: float) -> RunResult:
        res = self.result
        res.usage.wall_time = time.monotonic() - t0
        res.ended_at = iso_time(time.time())
        wstatus = self._wstatus if self._wstatus is not None else 0
        if os.WIFEXITED(wstatus):
            res.returncode = os.WEXITSTATUS(wstatus)
        elif os.WIFSIGNALED(wstatus):
            res.returncode = -os.WTERMSIG(wstatus)
        self._settle()
        self._check_after_exit()
        v = res.violation
        if v is not None and self.plan.on_violation == "kill":
            res.status, res.exit_code = "violation", 124
            killed = len(self._term_pids | self._kill_pids)
            if killed:
                v.message += f"; killed {killed} process{'es' if killed != 1 else ''}"
            ignored = sorted(self._kill_pids & self._term_pids)
            if ignored:
                shown = ", ".join(map(str, ignored[:10]))
                if len(ignored) > 10:
                    shown += f" and {len(ignored) - 10} more"
                v.message += f" ({shown} ignored SIGTERM)"
        elif res.returncode is not None and res.returncode < 0:
            res.status = "violation" if v is not None else "signaled"
            res.exit_code = 128 - res.returncode
        else:
            res.status = "violation" if v is not None else "ok"
            res.exit_code = res.returncode or 0
        if self._forwarded and v is None and signal.SIGKILL in self._sent_by_us:
            # A forwarded signal the tree did not obey: it was killed after grace.
            res.status = "signaled"
            res.exit_code = 128 + self._forwarded
        if self._fail is not None:  # supervise could not go on safely: it stopped the tree
            res.status, res.exit_code = "failed", self._fail.exit_code
            res.error = str(self._fail)
            self.error = self._fail
        self._end(res)
        return res

    def _settle(self) -> None:
        """The tree is gone: holds still open are charged at their input estimate."""
        if self.backend is None:
            return
        try:
            settled = self.backend.settle()
        except SupervisorError as e:  # the store is gone: the next run (or expiry) settles them
            self._log("unsettled", action="failed", detail=str(e))
            return
        for s in settled:
            detail = {k: float(v) if k == "usd" else v for k, v in s.items()}
            self._log("unsettled", action="charged", limit="usd", detail=detail)
        try:
            if self.backend.ledger is not None:
                self.backend.ledger.unclaim()
        except SupervisorError:
            pass  # a live-run note left behind: the next run finds this pid gone, settles nothing

    def _check_after_exit(self) -> None:
        """The tree's exact CPU total (from the reaper's rusage) against cpu_time, and the
        workspace's last events (a command may write and exit within one poll)."""
        confine = self.confine
        if confine is not None and confine.tracker is not None:
            self._on_storage(confine.poll([], final=True))
            self.result.usage.storage_bytes = confine.peak_bytes
            self.result.usage.files = confine.peak_files
        cpu = self.plan.limit("cpu_time")
        used = self.result.usage.cpu_time
        if cpu is not None and used > cpu and self.result.violation is None:
            self._breach("cpu_time", used, cpu, "tree CPU")

    def _failed(self, error: SupervisorError, t0: float) -> RunResult:
        res = self.result
        res.status = "failed"
        res.exit_code = error.exit_code
        res.usage.wall_time = time.monotonic() - t0
        res.ended_at = iso_time(time.time())
        res.error = str(error)
        self.error = error
        if self.audit is not None and not self._logged_start:
            try:
                self._log("run_start", detail={"command": self.argv, "error": str(error)})
            except SupervisorError:
                pass
        self._end(res)
        return res

    def _end(self, res: RunResult) -> None:
        """Every hook has run (``on_end`` last), then the ``run_end`` line closes the run."""
        self.hooks.drain()
        self.hooks.call_now("on_end", self.sup.on_end, res)
        if self.rpc is not None:
            self.rpc.flush_errors()  # while the audit log is open: close() is too late
        if self._denied_quietly and self.audit is not None:
            try:  # the count of denials not logged one by one, so the log's total is exact
                self._log(
                    "denied",
                    action="suppressed",  # a count, not a denial of its own
                    detail=f"({self._denied_quietly} more denials not logged one by one)",
                )
            except SupervisorError:
                pass
        if self.audit is not None:
            detail: dict[str, Any] = {
                "exit_code": res.exit_code,
                "returncode": res.returncode,
                "wall_time": round(res.usage.wall_time, 6),
                "cpu_time": res.usage.cpu_time,
                "violation": None if res.violation is None else res.violation.limit,
            }
            if self.backend is not None and self.backend.ledger is not None:
                u = res.usage
                detail["usage"] = {
                    "api_calls": u.api_calls,
                    "input_tokens": u.input_tokens,
                    "output_tokens": u.output_tokens,
                    "usd": f"{u.usd:f}",  # exact, as text: JSON numbers are floats to most readers
                }
            try:
                self._log("run_end", action=res.status, detail=detail)
            except SupervisorError as e:
                res.error = res.error or str(e)
            self.audit.close()

    def _log(self, event: str, **fields: Any) -> None:
        if self.audit is None:
            return
        res = self.result
        try:
            self.audit.append(
                event, run_id=res.run_id, agent=res.agent, session=res.session, **fields
            )
        except SupervisorError as e:
            # Nothing may happen that the log cannot record: kill the tree now (fail closed),
            # wherever the line came from (the loop, the RPC, a hook's thread).
            if self._fail is None:
                self._fail = e
                self._stop_now()
            raise

    def spend_lost(self, error: SupervisorError, call: dict[str, Any]) -> None:
        """Spend that happened could not be written to the ledger (the store failed): the
        call goes to the audit log so it is not lost, and the tree is stopped (fail closed)."""
        from decimal import Decimal

        detail = {k: float(v) if isinstance(v, Decimal) else v for k, v in call.items()}
        self._log("unsettled", action="failed", limit="usd", detail={**detail, "error": str(error)})
        if self._fail is None:
            self._fail = SupervisorError(
                f"spend that happened could not be written to the budget ledger ({error}); "
                "the command was stopped (fail closed)"
            )
            self._stop(sweep=False)
