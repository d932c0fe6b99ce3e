"""Starting the command: the reaper helper, argv, environment, fds, and setup errors.

The command is not forked from Python.  ``posix_spawn`` (vfork-cheap whatever the size
of the parent) starts ``_reaper``, a small C program compiled from ``_reaper.c``, which
forks the command, applies the rlimits in it before exec, and stays as its parent: a
subreaper that reaps the whole tree and kills it if the supervisor dies.  The protocol
between the two is a line per event on a socket (see ``_reaper.c``), parsed here, once,
into the typed events below (``Child.read_events``).
"""

from __future__ import annotations

import errno as _errno
import os
import sys

from .errors import (
    CommandNotExecutable,
    CommandNotFound,
    HelperError,
    SpawnError,
    SupervisorError,
)

_HERE = os.path.dirname(os.path.abspath(__file__))
_SOURCE = os.path.join(_HERE, "_reaper.c")
_PACKAGED = os.path.join(_HERE, "_reaper")
_reaper_cache: str | None = None

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import TypeAlias

# The rlimit each setup step applies, for messages a user can act on.
_STEP_LIMIT = {
    "rlimit_cpu": ("cpu_time", "RLIMIT_CPU"),
    "rlimit_as": ("address_space", "RLIMIT_AS"),
    "rlimit_fsize": ("file_size", "RLIMIT_FSIZE"),
    "rlimit_nofile": ("open_files", "RLIMIT_NOFILE"),
}


def cache_dir() -> str:
    """supervise's cache: $XDG_CACHE_HOME/supervise, else ~/.cache/supervise."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "supervise")


def build_reaper(source: str, target: str) -> None:
    """Compile the reaper from C source into ``target`` atomically."""
    import shutil
    import subprocess

    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise HelperError(
            "supervise needs its reaper helper and found no C compiler to build it",
            hint="install a wheel of agent-supervise, or a C compiler (apt-get install gcc)",
        )
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = f"{target}.{os.getpid()}.tmp"
    proc = subprocess.run(
        [cc, "-O2", "-o", tmp, source], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise HelperError(
            f"building the reaper helper with {cc} failed: {proc.stderr.strip()[:500]}",
            hint="install a wheel of agent-supervise, or a working C compiler",
        )
    os.replace(tmp, target)


def _fresh(binary: str, source: str) -> bool:
    """Whether ``binary`` was built from ``source`` as it is now: not older than it (a 2 s
    slack for installers that write both at once).  An editable install whose _reaper.c
    was edited after the build falls back to the cache, built from the current source."""
    try:
        return os.stat(binary).st_mtime >= os.stat(source).st_mtime - 2
    except OSError:
        return True


def reaper_path() -> str:
    """The reaper executable: shipped in the package, else built once into the cache."""
    global _reaper_cache
    if _reaper_cache is not None:
        return _reaper_cache
    if os.access(_PACKAGED, os.X_OK) and _fresh(_PACKAGED, _SOURCE):
        _reaper_cache = _PACKAGED
        return _reaper_cache
    from ._hash import sha256

    with open(_SOURCE, "rb") as f:
        digest = sha256(f.read()).hexdigest()[:16]
    target = os.path.join(cache_dir(), f"reaper-{digest}-{os.uname().machine}")
    if not os.access(target, os.X_OK):
        build_reaper(_SOURCE, target)
    _reaper_cache = target
    return _reaper_cache


# -- the reaper's events ------------------------------------------------------------------


class Started:
    """``P pid pidfd scoped``: the command was exec'ed."""

    __slots__ = ("pid", "pidfd", "scoped")

    def __init__(self, pid: int, pidfd: bool, scoped: bool) -> None:
        self.pid, self.pidfd, self.scoped = pid, pidfd, scoped


class SetupFailed:
    """``E step errno``: setting up the command failed at ``step``."""

    __slots__ = ("errno", "step")

    def __init__(self, step: str, errno: int) -> None:
        self.step, self.errno = step, errno


class Exited:
    """``X pid wstatus utime_us stime_us maxrss_kb own_cpu_us``: a direct child was reaped.

    ``cpu`` is its CPU with its reaped descendants' (seconds), ``own_cpu`` its own only
    (what RLIMIT_CPU counts), ``maxrss`` bytes.
    """

    __slots__ = ("cpu", "maxrss", "own_cpu", "pid", "wstatus")

    def __init__(self, pid: int, wstatus: int, cpu: float, maxrss: int, own_cpu: float) -> None:
        self.pid, self.wstatus, self.cpu, self.maxrss, self.own_cpu = (
            pid, wstatus, cpu, maxrss, own_cpu,
        )  # fmt: skip


class KernelKill:
    """``R pid wstatus cpu_us``: a descendant died of SIGXCPU/SIGXFSZ (or a SIGKILL)."""

    __slots__ = ("cpu", "pid", "wstatus")

    def __init__(self, pid: int, wstatus: int, cpu: float) -> None:
        self.pid, self.wstatus, self.cpu = pid, wstatus, cpu


class Signalled:
    """``s SIG pid...``: the reaper sent SIG to these pids of the tree."""

    __slots__ = ("pids", "sig")

    def __init__(self, sig: int, pids: set[int]) -> None:
        self.sig, self.pids = sig, pids


class Done:
    """``D own_cpu_us``: the tree is empty; the reaper's own CPU, to take out of its rusage."""

    __slots__ = ("own_cpu",)

    def __init__(self, own_cpu: float) -> None:
        self.own_cpu = own_cpu


if TYPE_CHECKING:
    Event: TypeAlias = Started | SetupFailed | Exited | KernelKill | Signalled | Done


def parse_event(line: bytes) -> Event | None:
    """One line of the reaper's protocol; None for an empty or unknown line.

    Raises ValueError for a line of a known kind that does not parse.
    """
    parts = line.split()
    if not parts:
        return None
    kind, args = parts[0], parts[1:]
    try:
        if kind == b"X":
            pid, wstatus, utime, stime, maxrss, own = map(int, args[:6])
            return Exited(pid, wstatus, (utime + stime) / 1e6, maxrss * 1024, own / 1e6)
        if kind == b"R":
            return KernelKill(int(args[0]), int(args[1]), int(args[2]) / 1e6)
        if kind == b"s":
            return Signalled(int(args[0]), {int(p) for p in args[1:]})
        if kind == b"D":
            return Done(int(args[0]) / 1e6)
        if kind == b"P" and len(args) == 3:
            return Started(int(args[0]), args[1] == b"1", args[2] == b"1")
        if kind == b"E" and len(args) == 2:
            return SetupFailed(args[0].decode("ascii", "replace"), int(args[1]))
    except IndexError:
        raise ValueError(f"short reaper line {line[:80]!r}") from None
    return None


def prebuild_reaper() -> None:
    """Build the reaper now if it must be (errors: ``spawn()`` reports them)."""
    try:
        reaper_path()
    except SupervisorError:
        pass


class Child:
    """A started command: its reaper's pid, the command's pid, and the reaper's socket.

    ``pidfd`` and ``scoped`` say what the reaper could enforce: it watches the supervisor
    through a pidfd; the tree cannot signal or ptrace outside itself (Landlock scope).
    """

    __slots__ = ("_buf", "fd", "pid", "pidfd", "reaper_pid", "scoped")

    def __init__(self, reaper_pid: int, fd: int) -> None:
        self.reaper_pid = reaper_pid
        self.fd = fd  # one socket both ways: status lines in, "s SIG" requests out
        self.pid = 0
        self.pidfd = False
        self.scoped = False
        self._buf = b""

    def read_events(self) -> list[Event] | None:
        """The events of one read of the socket (poll it first); None at its end (the
        reaper is gone).  A line that does not parse is reported and skipped: it must not
        end supervision."""
        chunk = os.read(self.fd, 65536)
        if not chunk:
            return None
        *lines, self._buf = (self._buf + chunk).split(b"\n")
        events = []
        for line in lines:
            try:
                event = parse_event(line)
            except ValueError:
                event = None
            if event is None and line.strip():
                print(f"supervise: unexpected line from the reaper: {line[:80]!r}", file=sys.stderr)
            elif event is not None:
                events.append(event)
        return events

    def signal_tree(self, sig: int) -> None:
        """Ask the reaper to send ``sig`` to every process of the tree."""
        try:
            os.write(self.fd, b"s %d\n" % sig)
        except OSError:  # the reaper is gone: the tree is already empty
            pass

    def close_socket(self) -> None:
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
        self.fd = -1

    def close(self) -> None:
        """Close the socket (the reaper kills what is left and exits) and reap the reaper."""
        self.close_socket()
        if self.reaper_pid > 0:
            _reap(self.reaper_pid)
            self.reaper_pid = 0


def argv_words(argv: Sequence[str]) -> list[str]:
    """``argv`` as a list; a string is refused: nothing splits it for the caller."""
    if isinstance(argv, (str, bytes)):
        raise TypeError(
            f"argv must be a list of words, not a string: {argv!r} would not be split "
            f'(pass ["sh", "-c", {argv!r}] to run it with a shell, or shlex.split({argv!r}))'
        )
    return list(argv)


def build_env(
    inherit: bool | list[str],
    set_: dict[str, str],
    base: dict[str, str] | None = None,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """The child's environment: inherited (all, none or some names), ``set``, ``extra``."""
    src = os.environ if base is None else base
    if inherit is True:
        env = dict(src)
    elif inherit is False:
        env = {}
    else:
        env = {k: src[k] for k in inherit if k in src}
    env.update(set_)
    env.update(extra or {})
    return env


def _std_action(target: int, value: object) -> tuple[int, int, int] | None:
    if value is None:
        return None
    # A file object (anything with fileno()): typed as object where the caller passes it.
    fd = value if isinstance(value, int) else value.fileno()  # type: ignore[attr-defined]  # ^
    return (os.POSIX_SPAWN_DUP2, fd, target)


def spawn(
    argv: list[str],
    *,
    rlimits: list[str],
    env: dict[str, str],
    cwd: str | None = None,
    pass_fds: tuple[int, ...] = (),
    helper_fds: tuple[int, ...] = (),
    stdin: object = None,
    stdout: object = None,
    stderr: object = None,
) -> Child:
    """Start ``argv`` under the reaper; return once it was exec'ed, or raise SpawnError.

    ``rlimits`` are the reaper's ``key=value`` words (``cpu=S:H``, ``as=N``, ...).
    ``pass_fds`` reach the command; ``helper_fds`` only the reaper (a word names each).
    """
    if not argv:
        raise SpawnError("no command given", step="argv")
    import _socket  # the C module: socket.py costs milliseconds to import

    reaper = reaper_path()
    # A socket, not pipes: a pipe can be reopened through /proc/PID/fd by any process of
    # the same uid, so the tree could forge "the tree is empty"; a socket cannot be.
    ours, theirs = (s.detach() for s in _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_STREAM))
    os.set_inheritable(ours, False)
    os.set_inheritable(theirs, False)
    args = [reaper, f"fd={theirs}", f"ppid={os.getpid()}", *rlimits]
    if cwd is not None:
        args.append(f"cwd={cwd}")
    args += [f"pass={fd}" for fd in pass_fds]
    args.append("--")
    args += argv
    # dup2(fd, fd) clears close-on-exec for just this child (glibc >= 2.29), so
    # another thread's spawn cannot inherit these pipes.
    actions: list[tuple[int, int, int]] = [(os.POSIX_SPAWN_DUP2, theirs, theirs)]
    actions += [(os.POSIX_SPAWN_DUP2, fd, fd) for fd in (*pass_fds, *helper_fds)]
    for target, value in ((0, stdin), (1, stdout), (2, stderr)):
        action = _std_action(target, value)
        if action is not None:
            actions.append(action)
    try:
        reaper_pid = os.posix_spawn(reaper, args, env, file_actions=actions)
    except OSError as e:
        os.close(ours)
        os.close(theirs)
        if e.errno == _errno.E2BIG:  # the helper carries the command's argv and environment
            raise _too_big(argv, env) from None
        raise HelperError(f"cannot start the reaper helper {reaper}: {e.strerror}") from e
    os.close(theirs)
    child = Child(reaper_pid, ours)
    try:
        first = _read_line(ours)
        try:
            event = parse_event(first)
        except ValueError:
            event = None
        if isinstance(event, Started):
            child.pid, child.pidfd, child.scoped = event.pid, event.pidfd, event.scoped
            return child
        # Setup failed: drain the reaper, reap it, and say what happened.
        while _read_line(ours):
            pass
    except BaseException:
        # Interrupted before the run took over the child: nothing may run unsupervised.
        child.signal_tree(9)
        child.close_socket()
        _reap(reaper_pid)
        raise
    _reap(reaper_pid)
    child.close_socket()
    raise _setup_error(first, event, argv, rlimits)


def _read_line(fd: int) -> bytes:
    """One line from the status pipe (byte by byte: the first line must not over-read)."""
    out = bytearray()
    while True:
        b = os.read(fd, 1)
        if not b or b == b"\n":
            return bytes(out)
        out += b


def _reap(pid: int) -> int:
    try:
        return os.waitpid(pid, 0)[1]
    except ChildProcessError:  # SIGCHLD is ignored by the embedding program
        return 0


def _setup_error(
    line: bytes, event: Event | None, argv: list[str], rlimits: list[str]
) -> SpawnError:
    if not isinstance(event, SetupFailed):
        return SpawnError(f"the reaper helper stopped unexpectedly ({line!r})", step="reaper")
    step, err = event.step, event.errno
    reason = os.strerror(err)
    if step == "exec":
        if err in (_errno.ENOENT, _errno.ENOTDIR):
            return CommandNotFound(f"{argv[0]}: command not found", step=step, errno=err)
        if err == _errno.E2BIG:
            return _too_big(argv, None)
        return CommandNotExecutable(f"{argv[0]}: cannot execute: {reason}", step=step, errno=err)
    if step in _STEP_LIMIT:
        limit, name = _STEP_LIMIT[step]
        value = next((w.split("=", 1)[1] for w in rlimits if w.startswith(name[7:].lower())), "?")
        hard = _hard_limit(name)
        return SpawnError(
            f"cannot apply limits.{limit}={value}: setrlimit({name}) failed: {reason} "
            f"(this session's hard limit is {hard}; lower limits.{limit})",
            step=step,
            errno=err,
        )
    if step == "chdir":
        return SpawnError(f"cannot enter the working directory: {reason}", step=step, errno=err)
    return SpawnError(f"setting up the child failed at {step}: {reason}", step=step, errno=err)


def _too_big(argv: list[str], env: dict[str, str] | None) -> CommandNotExecutable:
    """E2BIG, said so that the user knows which of their inputs to shrink."""
    args = sum(len(os.fsencode(a)) + 1 for a in argv)
    where = f"{args} bytes of arguments"
    if env is not None:
        where += f" and {sum(len(k) + len(v) + 2 for k, v in env.items())} of environment"
    per_string = 32 * os.sysconf("SC_PAGE_SIZE")  # MAX_ARG_STRLEN
    name = argv[0] if len(argv[0]) <= 64 else argv[0][:61] + "..."
    return CommandNotExecutable(
        f"{name}: cannot execute: argument list too long (E2BIG: {where}; this system "
        f"allows {os.sysconf('SC_ARG_MAX')} bytes in all and {per_string} per string)",
        step="exec",
        errno=_errno.E2BIG,
    )


def _hard_limit(name: str) -> str:
    import resource

    hard = resource.getrlimit(getattr(resource, name))[1]
    return "unlimited" if hard == resource.RLIM_INFINITY else str(hard)


if __name__ == "__main__":  # pragma: no cover - a developer's helper: build the reaper
    print(reaper_path(), file=sys.stderr)
