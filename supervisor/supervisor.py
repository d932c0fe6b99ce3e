"""``Supervisor`` and the orchestration of one run: spawn → watch → stop → ``RunResult``.

One thread per run, no sleep-polling: the loop blocks in ``poll()`` on the reaper's socket
(the command's exit, kernel-limit deaths, the tree emptying), a wake pipe (signals, the
gateway's calls), the quota watch and the budget RPC, until the next deadline (wall clock,
grace, a sample, a step).  The stations have modules of their own, in the order data flows:
``limits`` (the plan in the reaper's words), ``spawn`` (the reaper and its events), ``watch``
(samples, checks), ``_stop`` (TERM → grace → KILL), ``result``, ``_run_log`` (audit).
"""

from __future__ import annotations

import _thread
import os
import select
import signal
import sys
import time

from . import _gateway_run, _stop, spawn, watch
from ._confine import Confinement
from ._hooks import HookRunner, call_quietly
from ._plan import RunPlan
from ._run_log import RunLog, open_audit
from .errors import SupervisorError
from .limits import helper_words, nproc_evidence
from .result import RunResult, conclude, fail, iso_time

# typing costs ~5 ms to import; mypy honours any constant named TYPE_CHECKING.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import IO, Any

    from ._backend import RunBackend
    from .gateway import Gateway
    from .policy import Policy
    from .result import Usage, Violation
    from .rpc import RpcServer
    from .spawn import Child, Event

    Std = int | IO[Any] | None  # an fd, or a file object with fileno(); None: inherited


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
        self.on_warning, self.on_violation, self.on_end = on_warning, on_violation, on_end
        self.on_usage = on_usage
        self.audit_path = os.fspath(audit) if audit is not None else None

    def start(self, argv: Sequence[str], *, agent: str | None = None, session: str | None = None,
              env: dict[str, str] | None = None, cwd: str | None = None, stdin: Std = None,
              stdout: Std = None, stderr: Std = None) -> Run:  # fmt: skip
        """A run, not yet started: call ``.execute()`` (blocks) from the thread of your choice.

        ``argv`` is a list of words (a string is refused: nothing splits it for you).
        """
        return Run(self, spawn.argv_words(argv), agent, session, env, cwd, (stdin, stdout, stderr))

    def run(self, argv: Sequence[str], *, agent: str | None = None, session: str | None = None,
            env: dict[str, str] | None = None, cwd: str | None = None, stdin: Std = None,
            stdout: Std = None, stderr: Std = None) -> RunResult:  # fmt: skip
        """Run ``argv`` to the end under the policy and return its RunResult."""
        return self.start(argv, agent=agent, session=session, env=env, cwd=cwd, stdin=stdin,
                          stdout=stdout, stderr=stderr).execute()  # fmt: skip

    async def run_async(self, argv: Sequence[str], *, agent: str | None = None,
                        session: str | None = None, env: dict[str, str] | None = None,
                        cwd: str | None = None, stdin: Std = None, stdout: Std = None,
                        stderr: Std = None) -> RunResult:  # fmt: skip
        """``run`` for asyncio: the run goes on in a thread; cancelling stops the tree."""
        import asyncio

        run = self.start(argv, agent=agent, session=session, env=env, cwd=cwd, stdin=stdin,
                         stdout=stdout, stderr=stderr)  # fmt: skip
        future = asyncio.get_running_loop().run_in_executor(None, run.execute)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            run.interrupt(signal.SIGTERM)
            await future
            raise


class Run:
    """One run's state.  ``interrupt()`` may be called from any thread or a signal handler."""

    def __init__(self, sup: Supervisor, argv: list[str], agent: str | None,
                 session: str | None, env: dict[str, str] | None, cwd: str | None,
                 std: tuple[Std, Std, Std]) -> None:  # fmt: skip
        self.sup, self.plan, self.argv, self.env, self.cwd, self.std = (
            sup, sup.plan, argv, env, cwd, std,
        )  # fmt: skip
        self.result = RunResult(os.urandom(8).hex(), agent or self.plan.agent, session, argv)
        self.child: Child | None = None
        self.wake = _stop.Wake()
        self._pending_signal = 0
        self._logged_start = False
        self.stopper = _stop.Stopper(self.plan.grace, self._before_term)
        self._wstatus: int | None = None
        self._reaper_cpu = 0.0
        self.verdicts = watch.Verdicts(self.plan, self.result, self._violated, self._warned)
        # Called after each tree sample with (usage, current values): --live uses it.
        self.on_sample: Callable[[Usage, dict[str, float]], object] | None = None
        self.error: SupervisorError | None = None
        self._fail: SupervisorError | None = None  # failed closed mid-run: the run ends 125
        self.confine: Confinement | None = None
        self.rpc: RpcServer | None = None
        self.backend: RunBackend | None = None
        self.gateway: Gateway | None = None
        self.opening = _gateway_run.Opening()  # the gateway until it serves: see _gateway_run
        self.lock = _thread.allocate_lock()  # held but in poll(): see _gateway_run
        self.log = RunLog(None, self.result, self._fail_closed)
        self.hooks = HookRunner(self.log.hook_failed)

    def interrupt(self, sig: int) -> None:
        """Forward ``sig`` to the tree and stop it after ``grace`` (async-signal-safe)."""
        self._pending_signal = sig
        self.wake.poke()

    # -- the lifecycle -----------------------------------------------------------

    def execute(self) -> RunResult:
        """Run to the end (blocking) and return the RunResult."""
        spawn.prebuild_reaper()  # a first run may build the helper: not on the child's clock
        t0 = time.monotonic()
        self.result.started_at = iso_time(time.time())
        self.wake.open()
        if self._pending_signal:  # interrupted before it started
            self.wake.poke()
        try:
            with self.lock:
                return self._execute(t0)
        finally:
            self._close()

    def _execute(self, t0: float) -> RunResult:
        try:
            self.log.audit = open_audit(self.plan, self.sup.audit_path)
            child, rlimits, confine = self._spawn()
        except SupervisorError as e:
            return self._failed(e, t0)
        confine.after_spawn(child.pid)
        if self.rpc is not None:
            self.rpc.close_child_end()
        self.gateway = self.opening.serve(confine.network, confine.warnings)
        try:
            evidence = nproc_evidence(self.plan, child.pid)
            self.log.start(self.plan, self.argv, child, confine, rlimits, evidence, self.opening)
            self._logged_start = True
            for message in confine.warnings:
                self.log.log("warning", action="fallback", detail=message)
            self._loop(t0, child)
            cpu = _stop.reap_reaper(child)
            if cpu is not None:  # the reaper's rusage: the whole tree's CPU, and its own
                u = self.result.usage
                u.cpu_time = max(u.cpu_time, cpu - self._reaper_cpu)
        except SupervisorError as e:  # e.g. the audit log failed: fail closed
            self.stopper.kill_now()
            _stop.drain(child)
            _stop.close_unlocked(self.gateway, self.lock)
            return self._failed(e, t0)
        _stop.close_unlocked(self.gateway, self.lock)  # calls in flight settle before holds
        return self._finish(t0)

    def _spawn(self) -> tuple[Child, list[str], Confinement]:
        plan, res = self.plan, self.result
        ids = {"SUPERVISE_RUN_ID": res.run_id} | (
            {"SUPERVISE_AGENT": res.agent} if res.agent else {}
        )
        env = spawn.build_env(plan.env_inherit, plan.env_set, self.env, ids)
        self.confine = confine = Confinement(plan, self.argv, env)
        for message in confine.warnings:
            print(f"supervise: warning: {message}", file=sys.stderr)
        rlimits, words = helper_words(plan, confine.fsize_words(), confine.words)
        pass_fds = self._open_rpc(env)
        argv, ws = self.argv, confine.workspace
        if ws is not None and "/" in argv[0] and not os.path.isabs(argv[0]):
            # ./tool means the tool here, not in the workspace the command starts in.
            argv = [os.path.abspath(argv[0]), *argv[1:]]
        stdin, stdout, stderr = self.std
        cwd = self.cwd if self.cwd is not None or ws is None else ws.path
        self.child = spawn.spawn(argv, rlimits=[*words, *self.opening.words], env=env, cwd=cwd,
                                 pass_fds=pass_fds, helper_fds=self.opening.fds, stdin=stdin,
                                 stdout=stdout, stderr=stderr)  # fmt: skip
        self.stopper.attach(self.child)
        return self.child, rlimits, confine

    def _open_rpc(self, env: dict[str, str]) -> tuple[int, ...]:
        providers = _gateway_run.wanted(self.plan)
        if not self.plan.needs_rpc(providers is not None):
            return ()  # nothing to ask: the backend (typing, the ledger) is never imported
        from ._backend import open_rpc

        hook, hooks, confine = self.sup.on_usage, self.hooks, self.confine
        on_usage = None if hook is None else lambda event: hooks.call("on_usage", hook, event)
        assert confine is not None
        opened = open_rpc(self.plan, self.result, confine.workspace, self.log, self.verdicts,
                          on_usage, lambda e: self._fail_closed(e, at_once=False),
                          gateway=providers is not None)  # fmt: skip
        if opened is None:
            return ()
        self.backend, self.rpc, events = opened
        env.update(self.rpc.child_env())
        if providers:
            self.opening.open(providers, self.plan, self.backend, events, self.lock, self.wake, env)
        return (self.rpc.child_fd,)

    def _fail_closed(self, error: SupervisorError, at_once: bool = True) -> None:
        """supervise cannot go on safely (the audit log refused a line, spend was lost):
        stop the tree (at once: SIGKILL); the run ends 125."""
        if self._fail is None:
            self._fail = error
            self.stopper.kill_now() if at_once else self.stopper.stop(sweep=False)

    # -- the loop ------------------------------------------------------------------

    def _loop(self, t0: float, child: Child) -> None:
        lim, stopper, confine, backend = self.plan.max, self.stopper, self.confine, self.backend
        assert confine is not None
        wall_at = t0 + lim.wall_time if lim.wall_time is not None else None
        sampler, prev = watch.TreeSampler(child.reaper_pid, confine.cgroups), None
        sample_at = t0 + 0.01  # the first sample waits: a command over in 10 ms costs nothing
        poller = select.poll()
        storage_fd, rpc_fd = confine.fileno(), self.rpc.fileno() if self.rpc else -1
        for fd in (child.fd, self.wake.r, storage_fd, rpc_fd):
            if fd >= 0:
                poller.register(fd, select.POLLIN)
        while True:
            now = time.monotonic()
            if wall_at is not None and now >= wall_at:
                wall_at = None
                self.verdicts.breach("wall_time", now - t0, lim.wall_time, "wall clock")
                continue
            if stopper.tick(now):
                continue
            if now >= sample_at:
                cur = sampler.sample(now)
                checks = watch.sample_checks(lim, cur, now - t0)
                watch.fold_sample(self.result.usage, cur)
                self.verdicts.judge(checks)
                if storage_fd >= 0:
                    self.verdicts.judge(confine.periodic(cur.pids, now))
                if self.on_sample is not None:
                    gauges = watch.current(cur, checks, now - t0)
                    if confine.watches_storage:
                        gauges["storage"], gauges["files"] = confine.storage_used()
                    call_quietly(self.on_sample, self.result.usage, gauges)
                watched = [(name, used, limit) for name, used, limit, _ in checks]
                sample_at, prev = now + watch.next_interval(prev, cur, watched), cur
                continue
            step = backend.step_deadline() if backend is not None else None
            over = watch.step_check(lim.step_time, step, now)
            if over is not None and backend is not None and step is not None:
                backend.expire_step(step[1])
                self.verdicts.breach(*over)
                continue
            due = (wall_at, stopper.deadline(), sample_at, step and step[0])
            timeout = max(0.0, min(d for d in due if d is not None) - now)
            for fd, _ in _stop.poll_unlocked(poller, timeout, self.lock):
                if fd == self.wake.r:
                    self._on_wake()
                elif fd == storage_fd:
                    self.verdicts.judge(confine.poll(prev.pids if prev is not None else []))
                elif fd == rpc_fd and self.rpc is not None:
                    self.rpc.on_readable()
                elif fd == child.fd:
                    events = child.read_events()
                    if events is None:  # the reaper is gone without saying the tree is empty
                        _stop.reaper_lost(child, prev.pids if prev is not None else ())
                    if any(self._on_event(child, event) for event in events or ()):
                        return

    def _on_wake(self) -> None:
        self.wake.clear()
        sig, self._pending_signal = self._pending_signal, 0
        if sig:
            self.stopper.forward(sig)

    def _kernel_kill(self, pid: int, wstatus: int, cpu: float, shown: float = -1) -> None:
        sigxfsz = self.confine.sigxfsz_limit if self.confine is not None else None
        ours = signal.SIGKILL in self.stopper.sent
        self.verdicts.kernel_kill(pid, wstatus, cpu, shown, ours, sigxfsz)

    def _on_event(self, child: Child, event: Event) -> bool:
        """Handle one reaper event; True when the tree is empty."""
        if isinstance(event, spawn.Done) and self._wstatus is not None:
            self._reaper_cpu = event.own_cpu
            return True
        u = self.result.usage
        if isinstance(event, spawn.Exited) and self._wstatus is None and event.pid == child.pid:
            self._wstatus = event.wstatus
            u.cpu_time = max(u.cpu_time, event.cpu)
            u.peak_memory = max(u.peak_memory, event.maxrss)
            if os.WIFSIGNALED(event.wstatus):
                self._kernel_kill(child.pid, event.wstatus, event.own_cpu, event.cpu)
            if not self.stopper.stopping:  # nothing outlives the run: sweep what is left
                self.stopper.stop(sweep=True)
        elif isinstance(event, spawn.KernelKill):
            self._kernel_kill(event.pid, event.wstatus, event.cpu)
        elif isinstance(event, spawn.Signalled):
            self.stopper.signalled(event)
        return False

    def _violated(self, violation: Violation, kill: bool) -> None:
        """A limit was broken: stop (or warn), log it, tell the hook."""
        if kill:
            self.stopper.stop(sweep=False)  # first: an fsync'd audit line may take 100 ms
        self.log.violation(violation, kill)
        # After the stop has begun: the hook runs on the hook thread and cannot delay it.
        self.hooks.call("on_violation", self.sup.on_violation, violation)

    def _warned(self, warning: dict[str, Any], note: dict[str, Any]) -> None:
        """An alert fraction of a limit: the child (over the RPC), the result, the log, the hook."""
        if self.rpc is not None:
            self.rpc.notify("warning", note)
        self.result.warnings.append(warning)
        self.log.warning(warning)
        self.hooks.call("on_warning", self.sup.on_warning, warning)

    def _before_term(self, sweep: bool) -> None:
        """Tell the tree over the RPC why it is being stopped, before the SIGTERM lands."""
        if self.rpc is not None:
            v = self.result.violation
            limit = None if v is None or sweep else v.limit
            self.rpc.notify("stopping", {"limit": limit, "grace": self.plan.grace})
            self.rpc.on_readable()  # flush it before the signal lands

    # -- the end -------------------------------------------------------------------

    def _close(self) -> None:
        for part in (self.gateway, self.opening, self.confine, self.rpc, self.backend, self.child):
            if part is not None:
                part.close()  # the child's: the reaper kills what is left, and is reaped
        self.wake.close()

    def _finish(self, t0: float) -> RunResult:
        res, stopper = self.result, self.stopper
        self._stamp_end(t0)
        if self.backend is not None:  # holds still open are charged at their input estimate
            self.log.settled(self.backend)
        self._check_after_exit()
        conclude(res, self._wstatus, kills=self.plan.kills, killed=stopper.killed(),
                 ignored=stopper.ignored_term(), forwarded=stopper.forwarded,
                 killed_after_grace=stopper.killed_after_grace())  # fmt: skip
        if self._fail is not None:  # supervise could not go on safely: it stopped the tree
            fail(res, self._fail)
            self.error = self._fail
        self._end(res)
        return res

    def _check_after_exit(self) -> None:
        """The tree's exact CPU total (the reaper's rusage, the cgroup's clock) against
        cpu_time, an OOM kill, and the workspace's last events."""
        confine, u = self.confine, self.result.usage
        if confine is not None:  # the workspace's last events, an OOM kill, the cgroup's CPU
            self.verdicts.judge(confine.final_checks(u))
        self.verdicts.tree_cpu(u.cpu_time)

    def _failed(self, error: SupervisorError, t0: float) -> RunResult:
        res = self.result
        fail(res, error)
        self._stamp_end(t0)
        self.error = error
        if not self._logged_start:
            self.log.failed_start(self.argv, error)
        self._end(res)
        return res

    def _stamp_end(self, t0: float) -> None:
        self.result.usage.wall_time = time.monotonic() - t0
        self.result.ended_at = iso_time(time.time())

    def _end(self, res: RunResult) -> None:
        """Every hook has run (``on_end`` last), then the ``run_end`` line closes the run."""
        self.hooks.drain()
        self.hooks.call_now("on_end", self.sup.on_end, res)
        if self.rpc is not None:
            self.rpc.flush_errors()  # while the audit log is open: close() is too late
        self.log.flush_denied()
        self.log.end(res, budget=self.backend is not None and self.backend.has_ledger)
