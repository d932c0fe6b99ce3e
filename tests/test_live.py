"""``--live`` in a real terminal: tmux runs supervise, ``capture-pane`` reads the screen back.

The gauges are a footer pinned to the bottom rows; the child's lines scroll above it, and
after the run the screen (with its scrollback) holds every line the child printed, the
final gauges once, then the summary.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from _helpers import GLOBAL_TIMEOUT, wait_until

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")

ROWS, COLS = 24, 100
GAUGE_NAMES = ("wall_time", "cpu_time", "memory", "processes", "open_files", "file_size")

# Prints 40 lines (more than the screen holds), a file of 3 MiB, then says it is ready and
# waits for the test to look at the screen (a handshake through files, no sleeps).
CHILD = """
import os, sys, time
for i in range(1, 41):
    print(f"line {i}", flush=True)
big = open("big.bin", "wb")
big.write(b"x" * (3 << 20))
big.flush()
open("ready", "w").close()
while not os.path.exists("go"):
    time.sleep(0.02)
big.close()
print("done", flush=True)
"""


class Tmux:
    """A private tmux server (its own socket) with one window of ROWS x COLS."""

    def __init__(self, socket: Path) -> None:
        self.base = ["tmux", "-S", str(socket)]

    def __call__(self, *args: str) -> str:
        done = subprocess.run(
            [*self.base, *args], capture_output=True, text=True, timeout=GLOBAL_TIMEOUT, check=True
        )
        return done.stdout

    def screen(self) -> list[str]:
        """The visible rows, as the terminal shows them now."""
        return self("capture-pane", "-p").splitlines()

    def everything(self) -> list[str]:
        """The scrollback and the screen, blank trailing rows dropped."""
        return self("capture-pane", "-p", "-S", "-").rstrip("\n").splitlines()


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[Tmux]:
    t = Tmux(tmp_path / "tmux.sock")
    yield t
    subprocess.run([*t.base, "kill-server"], capture_output=True, timeout=GLOBAL_TIMEOUT)


def _start(tmux: Tmux, cwd: Path, *supervise_args: str) -> None:
    argv = [sys.executable, "-m", "supervisor", *supervise_args]
    # The pane's shell says when supervise ended (and stays, so the screen can be read).
    shell = f'cd {shlex.quote(str(cwd))} && {shlex.join(argv)}; echo "[exit $?]"; exec cat'
    env = [f"-e{k}={v}" for k, v in os.environ.items() if k.startswith("SUPERVISE_TEST")]
    tmux("new-session", "-d", "-x", str(COLS), "-y", str(ROWS), *env, "sh", "-c", shell)


def test_live_keeps_the_childs_output_above_a_pinned_footer(tmux: Tmux, tmp_path: Path) -> None:
    """While it runs the gauges hold the bottom rows and the child's lines scroll above them;
    afterwards every line the child printed is there, the gauges once, then the summary."""
    _start(tmux, tmp_path, "--live", "--set", "limits.wall_time=50s", "--", sys.executable,
           "-c", CHILD)  # fmt: skip
    assert wait_until(lambda: (tmp_path / "ready").exists())
    # The footer is drawn at most 4 times a second: wait until it shows the big file.
    assert wait_until(lambda: "file_size" in "".join(tmux.screen()[-6:]) and
                      "3.0 MiB" in tmux.screen()[-1])  # fmt: skip
    screen = tmux.screen()
    footer, above = screen[-len(GAUGE_NAMES) :], screen[: -len(GAUGE_NAMES)]
    for name, row in zip(GAUGE_NAMES, footer, strict=True):
        assert row.strip().startswith(name), screen
    assert "/ 50s" in footer[0] and "3.0 MiB / 1.0 GiB" in footer[-1]
    lines = [row for row in above if row.strip()]
    assert lines[-1] == "line 40", screen  # the newest line sits right above the footer
    assert all(row.startswith("line ") for row in lines), screen
    assert not any(name in row for row in above for name in GAUGE_NAMES)

    (tmp_path / "go").touch()
    assert wait_until(lambda: any(row.startswith("[exit ") for row in tmux.everything()))
    rows = tmux.everything()
    assert rows[-1] == "[exit 0]", rows
    printed = [row for row in rows if row.startswith("line ") or row == "done"]
    assert printed == [f"line {i}" for i in range(1, 41)] + ["done"], rows
    for name in GAUGE_NAMES:  # the final gauges once, not a trail of redraws
        assert sum(row.strip().startswith(name) for row in rows) == 1, rows
    summary = "\n".join(rows[rows.index("done") :])
    assert summary.index("wall_time") < summary.index("supervise: run ")
    assert "file_size 3.0 MiB/1.0 GiB" in summary.replace("\n", "")


def test_live_on_a_short_terminal_keeps_one_footer_line(tmux: Tmux, tmp_path: Path) -> None:
    """A terminal too short for a gauge per row gets one footer row; the output survives."""
    argv = [sys.executable, "-m", "supervisor", "--live", "--", "sh", "-c",
            "for i in 1 2 3 4 5 6 7 8; do echo line $i; done"]  # fmt: skip
    shell = f'cd {shlex.quote(str(tmp_path))} && {shlex.join(argv)}; echo "[exit $?]"; exec cat'
    tmux("new-session", "-d", "-x", "80", "-y", "6", "sh", "-c", shell)
    assert wait_until(lambda: any(row.startswith("[exit ") for row in tmux.everything()))
    rows = tmux.everything()
    assert [row for row in rows if row.startswith("line ")] == [f"line {i}" for i in range(1, 9)]
    assert sum(row.startswith("wall_time ") for row in rows) == 1, rows
    assert rows[-1] == "[exit 0]"
