"""A toy agent for the demo: plans, calls a tool (a subprocess), writes notes, finishes.

With ``--stuck`` it loops forever after planning, the way a real agent does when a tool
keeps failing; supervise's wall clock stops it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time


def main() -> int:
    stuck = "--stuck" in sys.argv
    run = os.environ.get("SUPERVISE_RUN_ID", "unsupervised")
    print(f"agent: run {run}, pid {os.getpid()}")
    print("agent: planning")
    total = sum(i * i for i in range(200_000))
    print("agent: calling a tool (a child process)")
    out = subprocess.run(["uname", "-sr"], capture_output=True, text=True, check=True)
    print(f"agent: the tool said {out.stdout.strip()!r}")
    with tempfile.NamedTemporaryFile("w", prefix="agent-notes-", delete=True) as notes:
        notes.write(f"checksum {total}\n")
        notes.flush()
        print(f"agent: wrote notes to {notes.name}")
    attempt = 0
    while stuck:
        attempt += 1
        print(f"agent: retrying the tool (attempt {attempt})", flush=True)
        time.sleep(0.5)
    print("agent: done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
