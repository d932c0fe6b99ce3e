"""Identity and secrets (issue 14): each attack of the round run against main, repeated.

Every test performs the attack and passes only when it is refused: as root (the usual case
in containers) and, where it applies, as an unprivileged user, made here when the suite
runs as root (``useradd supervise-test``; skipped with the reason where that cannot be).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from _helpers import GLOBAL_TIMEOUT, HAS_LANDLOCK, python, supervise, wait_until

ROOT = os.geteuid() == 0
USER = "supervise-test"
SRC = str(Path(__file__).resolve().parent.parent)

needs_root = pytest.mark.skipif(not ROOT, reason="the attack needs a root supervise")
needs_landlock = pytest.mark.skipif(not HAS_LANDLOCK, reason="this kernel has no Landlock")


class Unprivileged:
    """Runs ``supervise`` as the test user: its own home, state and cache, a system
    Python reaching this checkout (root's interpreter lives under a 0700 /root)."""

    def __init__(self, home: Path, uid: int, gid: int) -> None:
        self.home, self.uid, self.gid = home, uid, gid
        site = next(Path(SRC, ".venv", "lib").glob("python3*/site-packages"))
        self.env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": str(home),
            "PYTHONPATH": f"{SRC}:{site}",
            "XDG_STATE_HOME": str(home / "state"),
            "XDG_CACHE_HOME": str(home / "cache"),
        }
        tag = os.environ.get("SUPERVISE_TEST_TAG")
        if tag:
            self.env["SUPERVISE_TEST_TAG"] = tag

    def dir(self, name: str) -> Path:
        path = self.home / name
        path.mkdir(exist_ok=True)
        os.chown(path, self.uid, self.gid)
        return path

    def file(self, name: str, text: str) -> Path:
        path = self.home / name
        path.write_text(text)
        os.chown(path, self.uid, self.gid)
        return path

    def supervise(self, *args: str, stdin: int | None = None) -> subprocess.CompletedProcess[str]:
        if ROOT:  # the children too: root's interpreter is out of the user's reach
            args = tuple(_system_python() if a == sys.executable else a for a in args)
        return subprocess.run(
            ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--init-groups",
             sys.executable if not ROOT else _system_python(), "-m", "supervisor", *args],
            capture_output=True, text=True, timeout=GLOBAL_TIMEOUT, check=False,
            env=self.env, cwd=self.home, stdin=stdin,
        )  # fmt: skip


def _system_python() -> str:
    found = shutil.which(
        f"python{sys.version_info.major}.{sys.version_info.minor}", path="/usr/bin"
    )
    if found is None:
        pytest.skip("no system Python of this version for the unprivileged user")
    return found


def _test_user() -> tuple[int, int]:
    import pwd

    try:
        entry = pwd.getpwnam(USER)
    except KeyError:
        if shutil.which("useradd") is None:
            pytest.skip("useradd is not installed: cannot make an unprivileged user")
        subprocess.run(["useradd", "-M", "-s", "/bin/sh", USER], check=True, capture_output=True)
        entry = pwd.getpwnam(USER)
    return entry.pw_uid, entry.pw_gid


@pytest.fixture
def user() -> Iterator[Unprivileged]:
    """An unprivileged user with a home of its own under /tmp (tmp_path is root's, 0700)."""
    if not ROOT:
        home = Path(tempfile.mkdtemp(prefix="supervise-test-home-"))
        unpriv = Unprivileged(home, os.getuid(), os.getgid())
        unpriv.env["PYTHONPATH"] = SRC
        yield unpriv
        shutil.rmtree(home, ignore_errors=True)
        return
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv is not installed: cannot run supervise as another user")
    uid, gid = _test_user()
    _system_python()
    home = Path(tempfile.mkdtemp(prefix="supervise-test-home-"))
    os.chown(home, uid, gid)
    yield Unprivileged(home, uid, gid)
    shutil.rmtree(home, ignore_errors=True)


def _policy(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# -- 1-4: a root tree that is confined keeps no host privilege -------------------------

MKNOD = """
import os, stat
st = os.stat("/")
try:
    os.mknod("disk", stat.S_IFBLK | 0o600, st.st_dev)
    fd = os.open("disk", os.O_WRONLY)
    print("wrote through", os.write(fd, b"x"))
except OSError as e:
    print("refused", e.errno)
"""


@needs_root
@needs_landlock
def test_root_tree_cannot_make_a_disk_node_and_write_through_it(tmp_path: Path) -> None:
    """Attack 1: mknod of a host block device in the workspace, then a write to it."""
    proc = supervise("-q", "-w", str(tmp_path / "ws"), "--", *python(MKNOD))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("refused"), proc.stdout


HOST_FILE = """
import os, sys
path = sys.argv[1]
for name, call in [
    ("chmod", lambda: os.chmod(path, 0o4777)),
    ("chown", lambda: os.chown(path, 1234, 1234)),
    ("utime", lambda: os.utime(path, (0, 0))),
    ("setxattr", lambda: os.setxattr(path, "security.capability", b"\\x01\\0\\0\\x02" + bytes(16))),
    ("user_xattr", lambda: os.setxattr(path, "user.x", b"1")),
]:
    try:
        call()
        print("done", name)
    except OSError as e:
        print("refused", name, e.errno)
"""


def _host_file_attack(victim: Path, proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, proc.stderr
    assert "done" not in proc.stdout, proc.stdout
    assert proc.stdout.count("refused") == 5, proc.stdout


@needs_root
@needs_landlock
def test_root_tree_cannot_chmod_chown_utime_or_set_xattrs_of_host_files(tmp_path: Path) -> None:
    """Attack 2: chmod 4777, chown, utime, security.capability on a file outside the jail."""
    victim = tmp_path / "victim"
    victim.write_text("x")
    before = victim.stat()
    proc = supervise("-q", "-w", str(tmp_path / "ws"), "--", *python(HOST_FILE), str(victim))
    _host_file_attack(victim, proc)
    after = victim.stat()
    assert (after.st_mode, after.st_uid, after.st_mtime) == (
        before.st_mode, before.st_uid, before.st_mtime,
    )  # fmt: skip


@needs_landlock
def test_users_tree_cannot_chmod_its_users_files_outside_the_workspace(
    user: Unprivileged,
) -> None:
    """Attack 5: an unprivileged jailed tree sets chmod 4777 (and utime, xattrs) on
    ~/victim, which Landlock does not govern."""
    victim = user.file("victim", "x")
    ws = user.dir("ws")
    proc = user.supervise("-q", "-w", str(ws), "--", *python(HOST_FILE), str(victim))
    _host_file_attack(victim, proc)
    assert victim.stat().st_mode & 0o7777 == 0o644


TIOCSTI = """
import fcntl, os, sys, termios
try:
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_NOCTTY)
    for c in b"id\\n":
        fcntl.ioctl(fd, termios.TIOCSTI, bytes([c]))
    print("typed")
except OSError as e:
    print("refused", e.errno)
"""

HOLDER = """
import os, sys
os.setsid()
fd = os.open(sys.argv[1], os.O_RDWR)  # becomes this session's controlling terminal
print("ready", flush=True)
sys.stdin.read()
"""


@needs_root
@needs_landlock
def test_root_tree_cannot_type_into_a_terminal_outside_the_jail(tmp_path: Path) -> None:
    """Attack 3: TIOCSTI on another session's /dev/pts/N types a command into its shell."""
    master, slave = os.openpty()
    name = os.ttyname(slave)
    holder = subprocess.Popen(
        [*python(HOLDER), name], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "ready\n"
        proc = supervise("-q", "-w", str(tmp_path / "ws"), "--", *python(TIOCSTI), name)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("refused"), proc.stdout
    finally:
        holder.communicate("")
        os.close(slave)
        os.close(master)


NETNS = """
import os
try:
    fd = os.open("/proc/1/ns/net", os.O_RDONLY)
    os.setns(fd, os.CLONE_NEWNET)
    print("joined the host's network namespace")
except OSError as e:
    print("refused", e.errno)
"""


@needs_root
def test_root_tree_under_network_deny_cannot_reach_the_hosts_network_namespace() -> None:
    """Attack 4 (its way in): a network: deny tree keeps no CAP_NET_ADMIN/CAP_SYS_ADMIN
    over the host, so it can neither join the host's namespace nor make links there."""
    code = NETNS + "print(open('/proc/self/status').read().split('CapEff:')[1].split()[0])"
    proc = supervise("-q", "--set", "network=deny", "--", *python(code))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split()
    assert lines[0] == "refused" and lines[-1] == "0000000000000000", proc.stdout


# -- 6, 7, 9: nothing the tree writes changes a later run -------------------------------

POISON = """
import os, sys
cache = sys.argv[1]
done = []
for root, dirs, files in os.walk(cache):
    for f in files:
        p = os.path.join(root, f)
        try:
            with open(p, "w") as fh:
                fh.write('{"policy": {}, "sha256": "x"}')
            done.append(p)
        except OSError:
            pass
try:
    open(os.path.join(cache, "reaper-planted"), "w").write("#!/bin/sh\\n")
    done.append("reaper")
except OSError:
    pass
try:
    os.chmod(sys.argv[2], 0)
    done.append("state")
except OSError:
    pass
print("poisoned" if done else "refused", done)
"""

STRICT = "limits:\n  open_files: 7\n"
NOFILE = "import resource; print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])"


def _poison_then_strict(run: object, home: Path, cache: Path, state: Path, ws: list[str]) -> None:
    call = run  # supervise, or Unprivileged.supervise
    strict = _policy(home / "strict.yaml", STRICT)
    first = call("-q", "-p", str(strict), "--", *python(NOFILE))  # type: ignore[operator]
    assert first.stdout.strip() == "7", first.stderr
    attack = call("-q", *ws, "--", *python(POISON), str(cache), str(state))  # type: ignore[operator]
    assert attack.returncode == 0, attack.stderr
    assert attack.stdout.startswith("refused"), attack.stdout
    again = call("-q", "-p", str(strict), "--", *python(NOFILE))  # type: ignore[operator]
    assert again.returncode == 0 and again.stdout.strip() == "7", again.stderr


@needs_root
@needs_landlock
def test_confined_root_tree_cannot_poison_the_plan_cache_helper_or_state(
    tmp_path: Path, isolated_state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attacks 6, 7, 9 as root: a jailed tree rewrites cached plans, plants a helper and
    chmods the state dir; the next strict run is still strict and still logged."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    ws = ["-w", str(tmp_path / "ws")]
    _poison_then_strict(supervise, tmp_path, cache / "supervise", isolated_state / "supervise", ws)
    verify = supervise("audit", "--verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_users_tree_cannot_poison_the_plan_cache_helper_or_state(user: Unprivileged) -> None:
    """Attacks 6, 7, 9 as a user, without a workspace: ~/.cache/supervise/policies, the
    cached helper and ~/.local/state/supervise are out of the tree's reach."""
    cache = Path(user.env["XDG_CACHE_HOME"]) / "supervise"
    state = Path(user.env["XDG_STATE_HOME"]) / "supervise"
    _poison_then_strict(user.supervise, user.home, cache, state, [])
    log = state / "audit.jsonl"
    assert log.exists() and os.stat(state).st_mode & 0o700 == 0o700


# -- 8: secrets stay with supervise -------------------------------------------------------

READ_SECRET = """
import os
ppid = os.getppid()
found = []
for pid in os.listdir("/proc"):
    if not pid.isdigit():
        continue
    try:
        argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\\0")
    except OSError:
        continue
    for word in argv:
        if word.endswith(b".yaml"):
            try:
                found.append(open(word, "rb").read())
            except OSError:
                pass
print("leaked" if any(b"s3cret" in t for t in found) else "refused")
"""


@needs_landlock
def test_jailed_tree_cannot_read_a_store_password_from_the_policy_file(tmp_path: Path) -> None:
    """Attack 8: the policy path from /proc/<supervise>/cmdline, then its password."""
    from _helpers import RedisServer

    server = RedisServer()
    try:
        url = server.url.replace("redis://", "redis://:s3cret@")
        pol = _policy(tmp_path / "secret.yaml", f"budget:\n  store: {url}\n  run: {{usd: 1}}\n")
        # redis-server without requirepass accepts AUTH with a warning-free error only on
        # old versions: this server is passwordless, so give it the password it is told.
        subprocess.run(
            ["redis-cli", "-p", str(server.port), "config", "set", "requirepass", "s3cret"],
            capture_output=True, check=False, timeout=GLOBAL_TIMEOUT,
        )  # fmt: skip
        proc = supervise("-q", "-p", str(pol), "-w", str(tmp_path / "ws"), "--",
                         *python(READ_SECRET))  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == "refused", proc.stdout
    finally:
        server.stop()


# -- 10-12: stdin, the --json line, a SIGKILLed supervise -------------------------------


@needs_landlock
def test_jailed_tree_cannot_rewrite_the_file_on_its_stdin(tmp_path: Path) -> None:
    """Attack 10: ``supervise ... < input.txt`` and the tree reopens fd 0 for writing."""
    data = tmp_path / "input.txt"
    data.write_text("precious\n")
    code = "open('/proc/self/fd/0', 'w').write('gone')"
    with open(data) as stdin:
        proc = supervise("-q", "-w", str(tmp_path / "ws"), "--", *python(code), stdin=stdin)
    assert proc.returncode != 0
    assert data.read_text() == "precious\n"


NONBLOCK = """
import fcntl, os, sys
fcntl.fcntl(1, fcntl.F_SETFL, fcntl.fcntl(1, fcntl.F_GETFL) | os.O_NONBLOCK)
try:
    while True:
        os.write(1, b"x" * 65536)
except BlockingIOError:
    pass
"""


def test_json_line_is_written_even_when_the_tree_left_stdout_nonblocking() -> None:
    """Attack 11: the tree sets O_NONBLOCK on the shared stdout and fills the pipe; the
    ``--json -`` line still arrives, once the reader gets to it."""
    cmd = [sys.executable, "-m", "supervisor", "--json", "-", "--", *python(NONBLOCK)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stderr is not None and proc.stdout is not None
    summary = proc.stderr.readline()  # written before the JSON line: the pipe is full now
    assert b"exit 0" in summary, summary

    def stuck_or_done() -> bool:  # blocked writing to the full pipe, or gone having failed
        try:
            wchan = Path(f"/proc/{proc.pid}/wchan").read_text()
            return proc.poll() is not None or "pipe_w" in wchan
        except OSError:
            return True

    assert wait_until(stuck_or_done, timeout=GLOBAL_TIMEOUT)
    out = proc.stdout.read()
    proc.wait(timeout=GLOBAL_TIMEOUT)
    proc.stderr.close()
    proc.stdout.close()
    assert proc.returncode == 0
    assert json.loads(out[out.index(b"{") :])["status"] == "ok"


WAIT = "import os; print(os.getcwd(), flush=True); import time; time.sleep(600)"


def test_temporary_workspace_is_removed_when_supervise_is_sigkilled(tmp_path: Path) -> None:
    """Attack 12 (the workspace): SIGKILL of supervise left ``supervise-*`` on disk."""
    pol = _policy(tmp_path / "tmp.yaml", "workspace:\n  jail: 'off'\n")
    cmd = [sys.executable, "-m", "supervisor", "-q", "-p", str(pol), "--", *python(WAIT)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    where = proc.stdout.readline().strip()
    assert os.path.basename(where).startswith("supervise-") and os.path.isdir(where)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=GLOBAL_TIMEOUT)
    proc.stdout.close()
    assert wait_until(lambda: not os.path.exists(where), timeout=GLOBAL_TIMEOUT), where


# -- user: ----------------------------------------------------------------------------


@needs_root
def test_user_key_runs_the_tree_as_that_user(tmp_path: Path) -> None:
    """``user: NAME`` as root: the tree's uid is that user's, with no capability."""
    uid, _ = _test_user()
    pol = _policy(tmp_path / "u.yaml", f"user: {USER}\nworkspace: {{}}\n")
    code = (
        "import os; status = open('/proc/self/status').read();"
        "print(os.getuid(), status.split('CapEff:')[1].split()[0]); open('f', 'w').write('x')"
    )
    proc = supervise("-q", "-p", str(pol), "--", _system_python(), "-c", code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(uid), "0000000000000000"]


def test_user_key_needs_a_root_supervise(user: Unprivileged) -> None:
    """``user: root`` from an unprivileged supervise: 125 with the reason."""
    pol = user.file("u.yaml", "user: root\n")
    proc = user.supervise("-p", str(pol), "--", "true")
    assert proc.returncode == 125
    assert "needs a root supervise" in proc.stderr


@needs_landlock
@pytest.mark.slow
def test_npm_install_works_in_a_jailed_workspace(tmp_path: Path) -> None:
    """HOME in a jail is the workspace: npm's ~/.npm cache lands there, not outside."""
    if shutil.which("npm") is None:
        pytest.skip("npm is not installed")
    ws = tmp_path / "ws"
    proc = supervise("-q", "-w", str(ws), "--", "npm", "install", "--no-audit", "--no-fund",
                     "is-number", timeout=GLOBAL_TIMEOUT * 3)  # fmt: skip
    if "ENOTFOUND" in proc.stderr or "EAI_AGAIN" in proc.stderr:
        pytest.skip("the npm registry is not reachable from here")
    assert proc.returncode == 0, proc.stderr
    assert (ws / "node_modules" / "is-number").is_dir()
