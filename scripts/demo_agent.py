"""A toy agent for the demo: plans, calls a tool (a subprocess), writes notes, finishes.

With ``--stuck`` it loops forever after planning, the way a real agent does when a tool
keeps failing; supervise's wall clock stops it.  With ``--greedy`` it tries to write
outside its workspace, then writes files until its storage quota stops it.  With
``--spend`` it hands a task from step to step (plan, research, write, review), asking the
supervisor for LLM budget before each (simulated) call and reporting what it used, until
the run's budget says no.
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
    if "--greedy" in sys.argv:
        greedy()
    if "--spend" in sys.argv:
        spend()
    attempt = 0
    while stuck:
        attempt += 1
        print(f"agent: retrying the tool (attempt {attempt})", flush=True)
        time.sleep(0.5)
    print("agent: done")
    return 0


def greedy() -> None:
    print(f"agent: working in {os.getcwd()}")
    target = os.path.expanduser("~/agent-was-here")
    try:
        with open(target, "w") as f:
            f.write("escaped\n")
        print(f"agent: wrote {target} (no jail on this machine)")
    except OSError as e:
        print(f"agent: could not write {target}: {e.strerror}")
    for i in range(1000):
        with open(f"data-{i}.bin", "wb") as f:
            f.write(os.urandom(1 << 20))
        print(f"agent: wrote data-{i}.bin", flush=True)
        time.sleep(0.05)


# (step, input tokens, output tokens) of one hand-off round; the model is priced by the policy.
STEPS = [("plan", 1200, 400), ("research", 6000, 900), ("write", 3000, 2500), ("review", 3500, 300)]


def spend() -> None:
    from supervisor import client

    budget = client.connect()
    for round_ in range(1, 100):
        for step, tokens_in, tokens_out in STEPS:
            try:
                with budget.reserve(
                    "demo-model", input_tokens=tokens_in, max_output_tokens=tokens_out, label=step
                ) as call:
                    call.commit(input_tokens=tokens_in, output_tokens=tokens_out)
            except client.BudgetExceeded as e:
                print(f"agent: round {round_}, {step}: no budget left ({e})")
                return
        print(f"agent: round {round_} done", flush=True)


if __name__ == "__main__":
    sys.exit(main())
