"""The workspace: the directory a run works in, its Landlock jail, and ``check_write``.

A policy's ``workspace`` section gives the command a directory of its own (``path``, or a
fresh temporary one removed after the run unless ``keep``), its working directory.  The
jail is Landlock, set up by the reaper in the command just before exec, so the kernel
decides every path, whatever symlinks, ``..``, hard links or renames the tree tries:

- writes (create, write, truncate, remove, rename, link, mknod) only beneath the
  workspace, the policy's ``writable`` extras and a few devices (/dev/null, /dev/tty...);
- reads everywhere, or (``readable: [...]``) only beneath those paths, the workspace,
  and what the command needs to start (the system directories and the command's prefix);
- from ABI 6 the same domain scopes signals, so the tree cannot signal the supervisor.

The storage quota is watched by ``_quota.QuotaTracker``; ``check_write`` answers the
question an agent asks before writing, with the reason when the answer is no.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from .errors import WorkspaceError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from ._quota import QuotaTracker

# Landlock access rights (include/uapi/linux/landlock.h) and the ABI that brought them.
EXECUTE = 1 << 0
WRITE_FILE = 1 << 1
READ_FILE = 1 << 2
READ_DIR = 1 << 3
REMOVE_DIR = 1 << 4
REMOVE_FILE = 1 << 5
MAKE_CHAR = 1 << 6
MAKE_DIR = 1 << 7
MAKE_REG = 1 << 8
MAKE_SOCK = 1 << 9
MAKE_FIFO = 1 << 10
MAKE_BLOCK = 1 << 11
MAKE_SYM = 1 << 12
REFER = 1 << 13  # ABI 2
TRUNCATE = 1 << 14  # ABI 3
NET_BIND_TCP = 1 << 0  # ABI 4
NET_CONNECT_TCP = 1 << 1

READ = EXECUTE | READ_FILE | READ_DIR
# Rights that apply to a file (a rule on a file may only grant these).
FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE

# Read (and exec) beneath these when ``readable`` is a list: what a command needs to start.
SYSTEM_READ = (
    "/usr",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/bin",
    "/sbin",
    "/etc",
    "/proc",
    "/dev",
    "/sys/devices/system/cpu",
)
# Always writable: the bit buckets, terminals, and randomness.
DEVICES = (
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
    "/dev/tty",
    "/dev/ptmx",
    "/dev/pts",
)


def write_rights(abi: int) -> int:
    """Every right that changes the filesystem, as far as this ABI can name them."""
    rights = (
        WRITE_FILE
        | REMOVE_DIR
        | REMOVE_FILE
        | MAKE_CHAR
        | MAKE_DIR
        | MAKE_REG
        | MAKE_SOCK
        | MAKE_FIFO
        | MAKE_BLOCK
        | MAKE_SYM
    )
    if abi >= 2:
        rights |= REFER
    if abi >= 3:
        rights |= TRUNCATE
    return rights


class Workspace:
    """One run's workspace: made by ``prepare``, jailed by ``jail_words``, removed by
    ``cleanup`` (a temporary one, unless ``keep``)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.path = ""
        self.temporary = False
        self.quota: int | None = spec.get("quota")
        self.max_files: int | None = spec.get("max_files")
        self.max_file_size: int | None = spec.get("max_file_size")
        self.writable = [os.path.abspath(os.path.expanduser(p)) for p in spec.get("writable") or []]
        readable = spec.get("readable")
        self.readable = (
            None if readable is None else [os.path.abspath(os.path.expanduser(p)) for p in readable]
        )
        self.tracker: QuotaTracker | None = None

    def prepare(self, override: str | None = None) -> str:
        """Create (or adopt) the directory; its real path is the command's cwd."""
        path = override or self.spec.get("path")
        try:
            if path:
                path = os.path.abspath(os.path.expanduser(path))
                os.makedirs(path, exist_ok=True)
            else:
                path = tempfile.mkdtemp(prefix="supervise-")
                self.temporary = True
        except OSError as e:
            where = path or tempfile.gettempdir()
            raise WorkspaceError(
                f"cannot make the workspace {where}: {e.strerror} "
                "(check the path and its permissions, or set workspace.path)"
            ) from None
        if not os.path.isdir(path):
            raise WorkspaceError(f"the workspace {path} is not a directory (give a directory)")
        self.path = os.path.realpath(path)
        return self.path

    def cleanup(self) -> None:
        """Remove a temporary workspace unless the policy keeps it."""
        if self.tracker is not None:
            self.tracker.close()
        if self.temporary and not self.spec.get("keep") and self.path:
            shutil.rmtree(self.path, ignore_errors=True)

    # -- the jail --------------------------------------------------------------------

    def jail_words(self, argv0: str, env_path: str | None, abi: int | None) -> list[str]:
        """The reaper's Landlock words (``lfs=``, ``rule=``) for this workspace.

        ``abi`` None (no Landlock): ``[]`` under ``jail: auto``; WorkspaceError under
        ``required``.  Every extra path must exist: a typo would silently jail nothing.
        """
        mode = self.spec.get("jail", "auto")
        if mode == "off":
            return []
        if abi is None:
            if mode == "required":
                raise WorkspaceError(
                    "workspace.jail is required but this kernel has no Landlock (see "
                    "`supervise doctor`; use jail: auto to run with the quota only)"
                )
            return []
        for key, paths in (("writable", self.writable), ("readable", self.readable or [])):
            for p in paths:
                if not os.path.exists(p):
                    raise WorkspaceError(
                        f"workspace.{key}: {p} does not exist (create it or remove it)"
                    )
        write = write_rights(abi)
        handled = write if self.readable is None else write | READ
        grants: dict[str, int] = {}

        def grant(path: str, rights: int) -> None:
            if not os.path.exists(path):
                return
            real = os.path.realpath(path)
            if not os.path.isdir(real):
                rights &= FILE_RIGHTS
            grants[real] = grants.get(real, 0) | (rights & handled)

        grant(self.path, handled)
        for p in self.writable:
            grant(p, write | READ)
        for p in DEVICES:
            grant(p, WRITE_FILE | READ_FILE | (TRUNCATE if abi >= 3 else 0))
        if self.readable is not None:
            for p in (*SYSTEM_READ, *self.readable, *_command_prefixes(argv0, env_path)):
                grant(p, READ)
        words = [f"lfs={handled:#x}"]
        words += [f"rule={rights:#x}:{path}" for path, rights in grants.items() if rights]
        return words

    # -- check_write -------------------------------------------------------------------

    def check_write(self, path: str, size: int) -> tuple[bool, str]:
        """May the command write a file at ``path`` that ends up ``size`` bytes long?

        ``(True, "ok")`` or ``(False, reason)`` naming the rule: outside the workspace,
        over the file size, over the quota, over the file count.  Relative paths are
        taken from the workspace (the command's cwd).
        """
        if size < 0:
            return False, f"size {size} is negative (give the file's size in bytes)"
        full = os.path.realpath(os.path.join(self.path, path))
        inside = _beneath(full, self.path)
        if not inside and not any(_beneath(full, p) for p in self.writable):
            return False, f"outside the workspace: {full} is not under {self.path}"
        if not inside:
            return True, "ok (a writable path outside the workspace: no quota)"
        if self.max_file_size is not None and size > self.max_file_size:
            return False, f"over the file size: {size} bytes > max_file_size {self.max_file_size}"
        try:
            st = os.lstat(full)
            existing, new = st.st_blocks * 512, False
        except OSError:
            existing, new = 0, True
        used, files = (0, 0) if self.tracker is None else self.tracker.totals()
        if self.quota is not None and used - existing + _allocated(size) > self.quota:
            return False, (f"over the quota: {used} bytes used + {size} > quota {self.quota} bytes")
        if new and self.max_files is not None and files + 1 > self.max_files:
            return False, f"over the file count: {files} files + 1 > max_files {self.max_files}"
        return True, "ok"


def _beneath(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _allocated(size: int) -> int:
    """The disk a file of ``size`` bytes takes in whole 4 KiB blocks."""
    return -(-size // 4096) * 4096


def _command_prefixes(argv0: str, env_path: str | None) -> list[str]:
    """What the command needs to start beyond the system: the prefix it lives in (a venv,
    /opt/tool), as found on PATH and after symlinks."""
    found = shutil.which(argv0, path=env_path) if "/" not in argv0 else argv0
    if not found:
        return []
    found = os.path.abspath(found)
    prefixes = []
    for p in (found, os.path.realpath(found)):
        prefix = os.path.dirname(os.path.dirname(p))
        if prefix not in ("", "/"):  # /bin/sh: the system paths have it; "/" would be all
            prefixes.append(prefix)
    return prefixes
