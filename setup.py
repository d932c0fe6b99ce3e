"""Build hook: compile the reaper helper (supervisor/_reaper.c) into the wheel.

Everything else is in pyproject.toml.  An editable install skips this; the package then
builds the helper once into ~/.cache/supervise on first use (see supervisor/spawn.py).
"""

import os
import shutil
import subprocess

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution


class BuildPyWithReaper(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            return  # the package builds it at first use, or says how to fix it
        target = os.path.join(self.build_lib, "supervisor", "_reaper")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        subprocess.run([cc, "-O2", "-o", target, os.path.join("supervisor", "_reaper.c")], check=True)


class BinaryDistribution(Distribution):
    def has_ext_modules(self) -> bool:
        return True  # the wheel holds a compiled helper: tag it for this platform


setup(cmdclass={"build_py": BuildPyWithReaper}, distclass=BinaryDistribution)
