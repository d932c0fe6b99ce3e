"""Build hook: compile the reaper helper (supervisor/_reaper.c) at install time.

Everything else is in pyproject.toml.

- A wheel holds the compiled helper as ``supervisor/_reaper`` and is tagged
  ``py3-none-linux_<arch>``: any Python 3, no CPython ABI (the helper is a standalone
  executable, not an extension module), one platform.  Building a wheel without a C
  compiler fails: a platform wheel without its helper would be a broken one.
- An editable install (``pip install -e .``) compiles it into the source tree's
  ``supervisor/_reaper`` (gitignored), where the package finds it.  Without a compiler it
  warns and goes on: the package then builds the helper once into ~/.cache/supervise on
  first use (see supervisor/spawn.py).  Re-run ``pip install -e .`` after editing
  ``_reaper.c`` (scripts/test and scripts/bench do, through scripts/_venv.sh).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

try:  # setuptools >= 70.1 ships bdist_wheel itself; before that it is the wheel package's
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:
    from wheel.bdist_wheel import bdist_wheel

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "supervisor", "_reaper.c")


def compiler() -> str | None:
    """The C compiler spawn.build_reaper would use: $CC, else cc, else gcc."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def compile_reaper(cc: str, target: str) -> None:
    """Compile the helper into ``target`` atomically (a running helper is never overwritten)."""
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = f"{target}.{os.getpid()}.tmp"
    try:
        subprocess.run([cc, "-O2", "-o", tmp, SOURCE], check=True)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class BuildPyWithReaper(build_py):
    def run(self) -> None:
        super().run()
        cc = compiler()
        if getattr(self, "editable_mode", False):
            if cc is None:
                print(
                    "warning: no C compiler (cc, gcc or $CC): supervise will build its reaper "
                    "helper on first use, or install gcc and re-run pip install -e .",
                    file=sys.stderr,
                )
                return
            compile_reaper(cc, os.path.join(HERE, "supervisor", "_reaper"))
            return
        if cc is None:
            sys.exit(
                "error: building a wheel of agent-supervise needs a C compiler for its reaper "
                "helper (supervisor/_reaper.c): apt-get install gcc, or set CC"
            )
        compile_reaper(cc, os.path.join(self.build_lib, "supervisor", "_reaper"))


class PlatformWheel(bdist_wheel):
    """Tag the wheel py3-none-<platform>: it holds an executable, not a CPython extension."""

    def finalize_options(self) -> None:
        super().finalize_options()
        self.root_is_pure = False

    def get_tag(self) -> tuple[str, str, str]:
        _, _, plat = super().get_tag()
        return "py3", "none", plat


class PlatformDistribution(Distribution):
    def has_ext_modules(self) -> bool:
        # Not for a cp311 tag (PlatformWheel.get_tag sets the tag): without it `install`
        # puts the package under the wheel's .data/purelib/ instead of its root (platlib).
        return True


setup(
    cmdclass={"build_py": BuildPyWithReaper, "bdist_wheel": PlatformWheel},
    distclass=PlatformDistribution,
)
