"""Which policy file a run takes when ``--policy`` is absent, in the order operators expect.

1. ``$SUPERVISE_POLICY`` (a path; set but empty means the built-in default),
2. ``supervise.yaml`` in the working directory,
3. ``$XDG_CONFIG_HOME/supervise/policy.yaml`` (``~/.config`` when XDG_CONFIG_HOME is unset),
4. else the built-in default policy.

On every run's path: only ``os`` is imported.
"""

from __future__ import annotations

import os

DEFAULT = "the built-in default policy"


def find_policy(given: str | None) -> tuple[str | None, str]:
    """(path or None for the built-in default, where it came from) for ``--policy given``."""
    if given is not None:
        return given, "--policy"
    env = os.environ.get("SUPERVISE_POLICY")
    if env is not None:
        return (
            (env, "$SUPERVISE_POLICY") if env else (None, DEFAULT + " ($SUPERVISE_POLICY is empty)")
        )
    if os.path.isfile("supervise.yaml"):
        return "supervise.yaml", "the working directory"
    config = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    path = os.path.join(config, "supervise", "policy.yaml")
    if os.path.isfile(path):
        return path, "$XDG_CONFIG_HOME" if os.environ.get("XDG_CONFIG_HOME") else "~/.config"
    return None, DEFAULT
