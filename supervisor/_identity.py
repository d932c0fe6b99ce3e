"""Who the tree runs as, and what of the host it can change (SPEC "Identity", ``user:``).

The reaper's identity words (``_reaper.c``, "identity"), decided here before the spawn:

- a root supervise that confines the tree (a jailed workspace, ``network: deny``) runs it
  with no capability at all (bounding and ambient sets, securebits locked), or as the
  ``user:`` of the policy; ``user:`` is root's alone (125 otherwise);
- the tree gets a mount namespace of its own (every non-root run, where user namespaces
  allow it; every confined root run) in which supervise's cache and state directories, and
  a policy file holding a store password, are masked: nothing the tree writes can change a
  later run's plan, helper, audit log or ledger, and it cannot read those secrets;
- under a workspace jail the host's mounts are read-only there (EROFS stops chmod, chown,
  utime, xattrs and mknod, for root and users alike) but for the workspace and the
  ``writable`` paths, which are writable and ``nodev``;
- a temporary workspace is removed by the reaper if supervise is killed before it can.

An unconfined root run (no jail, network allowed, no ``user:``) gets none of this: its
tree is root, and ``supervise -- true`` costs nothing more.  What the kernel applied is
read back from ``/proc/PID`` after the spawn (``evidence``), never assumed.
"""

from __future__ import annotations

import os

from .errors import WorkspaceError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from ._plan import RunPlan
    from .workspace import Workspace


def resolve_user(spec: str | int) -> tuple[int, int, list[int]] | None:
    """``user:`` as (uid, gid, groups); None for ``auto`` or supervise's own user.

    Raises WorkspaceError (exit 125) for an unknown user, or another user without root.
    """
    if spec == "auto":
        return None
    import pwd

    try:
        entry = pwd.getpwuid(spec) if isinstance(spec, int) else pwd.getpwnam(spec)
        uid, gid, name = entry.pw_uid, entry.pw_gid, entry.pw_name
        groups = os.getgrouplist(name, gid)
    except KeyError:
        if not isinstance(spec, int):
            raise WorkspaceError(f"user: no user named {spec!r} on this machine") from None
        uid, gid, groups = spec, spec, [spec]
    if uid == os.geteuid():
        return None
    if os.geteuid() != 0:
        raise WorkspaceError(
            f"user: {spec} needs a root supervise (this one runs as uid {os.geteuid()}; "
            "remove user: or run supervise as root)"
        )
    return uid, gid, groups


def _has_secret(plan: RunPlan) -> bool:
    """Whether the policy holds a password (a store URL with credentials)."""
    store = (plan.budget or {}).get("store")
    return isinstance(store, str) and "@" in store.split("://", 1)[-1].split("/", 1)[0]


def _beneath(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _masks(plan: RunPlan, kept: list[str]) -> list[str]:
    """supervise's own directories (made now, so the tree cannot make them first) and a
    policy file holding a secret; never one that holds a path the tree must reach."""
    from .audit import default_audit_file
    from .spawn import cache_dir

    masks = []
    for d in (cache_dir(), os.path.dirname(default_audit_file())):
        try:
            os.makedirs(d, mode=0o700, exist_ok=True)
        except OSError:
            continue
        masks.append(os.path.realpath(d))
    if plan.source is not None and _has_secret(plan):
        masks.append(os.path.realpath(plan.source))
    return [m for m in masks if not any(_beneath(k, m) for k in kept)]


def identity_words(plan: RunPlan, ws: Workspace | None, jailed: bool) -> list[str]:
    """The reaper's identity words for this run (see the module docstring)."""
    words = [f"rmtmp={ws.path}"] if ws is not None and ws.temporary and ws.path else []
    root = os.geteuid() == 0
    user = resolve_user(plan.user)
    confined = jailed or plan.network == "deny"
    if root and not confined and user is None:
        return words  # an unconfined root tree is root: nothing here would hold
    rw = [ws.path, *(p for p in ws.writable if os.path.exists(p))] if jailed and ws else []
    rw = [os.path.realpath(p) for p in rw]
    kept = [*rw, os.getcwd()] if ws is None else [*rw, ws.path]
    words.append("mnt=2")  # where the kernel refuses one, run_start says so (no mounts)
    if jailed:
        words.append("ro=1")
        words += [f"rw={p}" for p in rw]
    words += [f"mask={m}" for m in _masks(plan, kept)]
    if user is not None:
        uid, gid, groups = user
        if ws is not None and ws.temporary:
            os.chown(ws.path, uid, gid)  # the workspace is the tree's to write
        words.append(f"user={uid}:{gid}:" + ",".join(str(g) for g in groups))
    elif root:
        words.append("nocaps=1")
    return words


def evidence(pid: int, words: list[str]) -> dict[str, Any] | None:
    """run_start's ``identity``: the tree's uid, capabilities and mounts, read back."""
    if not any(w.startswith(("mnt=", "user=", "nocaps=")) for w in words):
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            status = dict(line.split(":", 1) for line in f if ":" in line)
        own_mnt = os.readlink("/proc/self/ns/mnt") != os.readlink(f"/proc/{pid}/ns/mnt")
        with open(f"/proc/{pid}/mountinfo") as f:
            roots = [line.split() for line in f if line.split()[4:5] == ["/"]]
    except (OSError, ValueError):
        return None  # gone already: no evidence either way
    caps = int(status.get("CapEff", "0").strip() or "0", 16)
    bounding = int(status.get("CapBnd", "0").strip() or "0", 16)
    read_only = bool(roots) and "ro" in roots[-1][5].split(",")
    masked = sum(1 for w in words if w.startswith("mask="))
    return {
        "uid": int(status.get("Uid", "-1").split()[1]),
        "capabilities": "none" if caps == 0 and bounding == 0 else f"{caps:#x}",
        "mounts": None
        if not own_mnt
        else "own namespace" + (", host read-only" if read_only else "") + f", {masked} masked",
    }


_XDG = {
    "XDG_CACHE_HOME": ".cache",
    "XDG_CONFIG_HOME": ".config",
    "XDG_DATA_HOME": ".local/share",
    "XDG_STATE_HOME": ".local/state",
}


def jail_home(env: dict[str, str], ws: Workspace, env_set: dict[str, str]) -> None:
    """HOME in a jail: the workspace, unless the real one is writable there (beneath the
    workspace or a ``writable`` path) or the policy sets it; the XDG directories the
    environment names follow it.  Tools that write to ``~`` (npm, pip, git) then work, and
    what they write counts against the quota and goes with a temporary workspace."""
    home = env.get("HOME")
    if "HOME" in env_set:
        return
    if home and any(_beneath(os.path.realpath(home), p) for p in (ws.path, *ws.writable)):
        return
    env["HOME"] = ws.path
    for name, sub in _XDG.items():
        if name in env and name not in env_set:
            env[name] = os.path.join(ws.path, sub)
