"""Stopping the tree: SIGTERM, grace, SIGKILL; who ignored SIGTERM; a reaper that is lost.

The reaper signals the whole tree on request (``Child.signal_tree``) and answers with the
pids it signalled (``spawn.Signalled``), so the message of a violation can say how many
processes were killed and which of them ignored SIGTERM (trio's ``_posix_deliver_cancel``
does the same dance for one process: TERM, wait, KILL, and a warning naming it).

``Stopper`` holds the state and the deadlines; the run loop asks it for the next deadline
(``deadline()``) and calls ``tick()`` when one is due.  ``drain()`` and ``reaper_lost()``
are the ends of a run that went wrong.
"""

from __future__ import annotations

import os
import select
import signal
import time

from .errors import SupervisorError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from typing import Any

    from .gateway import Gateway
    from .spawn import Child, Signalled

# How long the reaper may take to empty the tree after SIGKILL before it is presumed stuck.
REAPER_DEADLINE = 2.0


class Stopper:
    """TERM → grace → KILL for one run's tree, and what the reaper said it signalled."""

    __slots__ = (
        "_before_term",
        "_child",
        "_give_up_at",
        "_kill_at",
        "_kill_pids",
        "_term_pids",
        "forwarded",
        "grace",
        "sent",
        "stopping",
    )

    def __init__(self, grace: float, before_term: Callable[[bool], object]) -> None:
        self.grace = grace
        self._before_term = before_term  # (sweep) -> None: tell the tree it is stopping
        self._child: Child | None = None
        self.stopping = False  # we have signalled the tree (stop or sweep)
        self.sent: set[int] = set()  # every signal we sent the tree
        self.forwarded = 0  # the first signal forwarded to the tree (interrupt())
        self._term_pids: set[int] = set()
        self._kill_pids: set[int] = set()
        self._kill_at: float | None = None
        self._give_up_at: float | None = None

    def attach(self, child: Child) -> None:
        self._child = child

    def stop(self, *, sweep: bool) -> None:
        """SIGTERM the whole tree, SIGKILL after grace (at once when grace is 0).

        ``sweep``: the command is gone and this clears what it left (no violation).
        """
        child = self._child
        if child is None or self.stopping:
            return
        self.stopping = True
        if self.grace <= 0:
            self._send(signal.SIGKILL)
            self._give_up_at = time.monotonic() + REAPER_DEADLINE
        else:
            self._before_term(sweep)
            self._send(signal.SIGTERM)
            self._kill_at = time.monotonic() + self.grace

    def kill_now(self) -> None:
        """SIGKILL the tree at once (fail closed)."""
        self._send(signal.SIGKILL)

    def forward(self, sig: int) -> None:
        """A signal for the tree (Ctrl-C, cancellation): sent, and SIGKILL after grace."""
        if self._child is None:
            return
        self.forwarded = self.forwarded or sig
        self._send(sig)
        if self._kill_at is None:
            self._kill_at = time.monotonic() + self.grace

    def _send(self, sig: int) -> None:
        if self._child is not None:
            self.sent.add(sig)
            self._child.signal_tree(sig)

    def signalled(self, event: Signalled) -> None:
        """The reaper's report of the pids it signalled."""
        (self._kill_pids if event.sig == signal.SIGKILL else self._term_pids).update(event.pids)

    def deadline(self) -> float | None:
        """When ``tick()`` has something to do next, if ever."""
        times = [t for t in (self._kill_at, self._give_up_at) if t is not None]
        return min(times) if times else None

    def tick(self, now: float) -> bool:
        """Act on a deadline that is due; True when one was."""
        child = self._child
        if self._kill_at is not None and now >= self._kill_at:
            self._kill_at = None
            self._send(signal.SIGKILL)
            self._give_up_at = now + REAPER_DEADLINE
            return True
        if self._give_up_at is not None and now >= self._give_up_at and child is not None:
            # The reaper did not empty the tree in time (stopped?): kill it; its end of the
            # socket closes and reaper_lost() kills what is left.
            self._give_up_at = None
            try:
                os.kill(child.reaper_pid, signal.SIGKILL)
            except OSError:
                pass
            return True
        return False

    def killed_after_grace(self) -> bool:
        return signal.SIGKILL in self.sent

    def killed(self) -> int:
        """How many processes of the tree we signalled to stop."""
        return len(self._term_pids | self._kill_pids)

    def ignored_term(self) -> list[int]:
        """The pids that got SIGTERM and then needed SIGKILL, sorted."""
        return sorted(self._kill_pids & self._term_pids)


class Wake:
    """A self-pipe that wakes the run loop: ``interrupt()`` writes it (async-signal-safe)."""

    __slots__ = ("r", "w")

    def __init__(self) -> None:
        self.r = self.w = -1  # made by open(), so an unrun Run holds no fds

    def open(self) -> None:
        self.r, self.w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)

    def poke(self) -> None:
        if self.w >= 0:
            try:
                os.write(self.w, b"!")
            except OSError:
                pass

    def clear(self) -> None:
        try:
            os.read(self.r, 512)
        except OSError:
            pass

    def close(self) -> None:
        for fd in (self.r, self.w):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.r = self.w = -1


def drain(child: Child) -> None:
    """Read the reaper's socket to its end (it exits when the tree is empty); a reaper
    that does not finish within REAPER_DEADLINE is killed, and what is left with it."""
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
                reaper_lost(child, ())
            except SupervisorError:
                pass
            return
        try:
            if not os.read(child.fd, 65536):
                return
        except OSError:
            return


def reaper_lost(child: Child, last: Iterable[int]) -> None:
    """The reaper died before the tree was empty (killed by the command?).

    Its orphans went to init: kill every process of the last sample, the command, what
    they started since, and every process still in the command's session (a scan of all
    processes, through psutil, on this rare path only); then fail the run (125): the tree
    can no longer be vouched for.
    """
    import psutil

    roots = {*last, child.pid} if child.pid > 0 else set(last)
    if child.pid > 0:
        for pid in psutil.pids():
            try:
                if os.getsid(pid) == child.pid:
                    roots.add(pid)
            except OSError:
                pass
    procs: dict[int, psutil.Process] = {}
    for pid in roots:
        try:
            proc = psutil.Process(pid)
            found = [proc, *proc.children(recursive=True)]
        except psutil.Error:
            continue
        procs.update((p.pid, p) for p in found)
    killed = 0
    for proc in procs.values():
        try:
            proc.kill()  # psutil checks the pid was not reused since it was found
            killed += 1
        except psutil.Error:
            pass
    raise SupervisorError(
        "the reaper helper died before the tree was empty (was it killed by the command?); "
        f"killed {killed} process{'es' if killed != 1 else ''} left of the tree"
    )


def reap_reaper(child: Child) -> float | None:
    """Wait for the reaper; its rusage's CPU (the whole tree's, and its own), or None."""
    if child.reaper_pid <= 0:
        return None
    try:
        _, _, ru = os.wait4(child.reaper_pid, 0)
    except ChildProcessError:
        return None
    finally:
        child.reaper_pid = 0
    return float(ru.ru_utime + ru.ru_stime)


def poll_unlocked(poller: select.poll, timeout: float, lock: Any) -> list[tuple[int, int]]:
    """``poller.poll(timeout)`` (seconds) with ``lock`` released while it waits: the run's
    thread holds it otherwise, and the gateway's thread takes it for its backend calls."""
    lock.release()
    try:
        return poller.poll(timeout * 1000 + 0.5)
    finally:
        lock.acquire()


def close_unlocked(gateway: Gateway | None, lock: Any) -> None:
    """Close the gateway (calls in flight finish and settle) with ``lock`` released: their
    last backend calls need it."""
    if gateway is None:
        return
    lock.release()
    try:
        gateway.close()
    finally:
        lock.acquire()
