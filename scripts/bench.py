"""supervise's benchmark: medians and ratios against a baseline run in the same process.

Run it as ``scripts/bench`` (installs into .venv first); ``--quick`` for fewer rounds.
Prints a Markdown table that README quotes.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable

from supervisor import Policy, Supervisor

QUICK = "--quick" in sys.argv
N = 10 if QUICK else 30
rows: list[tuple[str, str, str, str]] = []


def median_ms(fn: Callable[[], object], n: int = N) -> float:
    fn()  # warm-up: caches, the reaper helper, page cache
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def whole_process() -> None:
    py = sys.executable
    script = os.path.join(os.path.dirname(py), "supervise")
    cmd = [script] if os.access(script, os.X_OK) else [py, "-m", "supervisor"]
    quiet = {"stderr": subprocess.DEVNULL}  # the summary is printed, as by default
    base = median_ms(lambda: subprocess.run([py, "-c", "pass"], check=True))
    sup = median_ms(lambda: subprocess.run([*cmd, "--", "true"], check=True, **quiet))
    rows.append(
        (
            "whole process `supervise -- true` (this venv)",
            f"`python -c pass` {base:.1f} ms",
            f"{sup:.1f} ms",
            f"{sup / base:.2f}x (target <= 4x)",
        )
    )
    # Every interpreter start here pays for site-packages hooks (the editable install's
    # finder, other .pth files), which flatters the ratio above.  Without site (-S) both
    # sides show the cost of supervise alone; the validated policy is cached, so the run
    # path needs nothing from site-packages.
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    base = median_ms(lambda: subprocess.run([py, "-S", "-c", "pass"], check=True))
    sup = median_ms(
        lambda: subprocess.run(
            [py, "-S", "-m", "supervisor", "--", "true"], env=env, check=True, **quiet
        )
    )
    rows.append(
        (
            "whole process `python -S -m supervisor -- true` (no site-packages hooks)",
            f"`python -S -c pass` {base:.1f} ms",
            f"{sup:.1f} ms",
            f"{sup / base:.2f}x (target <= 4x)",
        )
    )


def embedded(label: str, audit: str) -> None:
    sup = Supervisor(Policy.default(), audit=audit)
    base = median_ms(lambda: subprocess.run(["true"], check=True))
    pre = median_ms(lambda: subprocess.run(["true"], preexec_fn=os.setsid, check=True))
    ours = median_ms(lambda: sup.run(["true"]))
    rows.append(
        (
            f"embedded `Supervisor.run(['true'])`, parent at {label}",
            f"`subprocess.run(['true'])` {base:.2f} ms; with a preexec_fn {pre:.2f} ms",
            f"{ours:.2f} ms",
            f"{ours / base:.2f}x plain, {ours / pre:.2f}x preexec (target <= 3 ms)",
        )
    )


def deadline(audit: str) -> None:
    """From the wall-clock deadline to run() returning with the whole tree reaped."""
    wall = 0.2
    policy = Policy.from_dict({"limits": {"wall_time": wall}, "grace": 0})
    sup = Supervisor(policy, audit=audit)
    tree = ["sh", "-c", "sleep 100 & sleep 100 & setsid sleep 100 & wait"]
    ours, base = [], []
    for _ in range(N // 2):
        t = time.monotonic()
        r = sup.run(tree)
        assert r.exit_code == 124, r
        ours.append((time.monotonic() - t - wall) * 1000)
        t = time.monotonic()
        subprocess.run(["timeout", "-s", "KILL", str(wall), *tree], check=False)
        base.append((time.monotonic() - t - wall) * 1000)
    o, b = statistics.median(ours), statistics.median(base)
    rows.append(
        (
            "deadline -> whole tree reaped (grace 0), 3 processes",
            f"`timeout -s KILL` (kills only its child) {b:.2f} ms",
            f"{o:.2f} ms",
            "p50, includes spawn (target <= 5 ms)",
        )
    )


def exit_latency(audit: str) -> None:
    """From the child's exit to run() returning: the child exits when we write a byte."""
    sup = Supervisor(Policy.default(), audit=audit)
    devnull = os.open(os.devnull, os.O_WRONLY)

    def measure(start: Callable[[int], Callable[[], object]]) -> float:
        r, w = os.pipe()
        done: list[float] = []
        wait = start(r)
        th = threading.Thread(target=lambda: (wait(), done.append(time.perf_counter())))
        th.start()
        time.sleep(0.05)  # let the child reach its read()
        t = time.perf_counter()
        os.write(w, b"x")
        th.join()
        os.close(r)
        os.close(w)
        return (done[0] - t) * 1000

    def ours(r: int) -> Callable[[], object]:
        return lambda: sup.run(["head", "-c", "1"], stdin=r, stdout=devnull)

    def bare(r: int) -> Callable[[], object]:
        return lambda: subprocess.run(["head", "-c", "1"], stdin=r, stdout=devnull)

    o = statistics.median(measure(ours) for _ in range(N // 2))
    b = statistics.median(measure(bare) for _ in range(N // 2))
    os.close(devnull)
    rows.append(
        (
            "child exit -> run() returns",
            f"`subprocess.run` {b:.2f} ms",
            f"{o:.2f} ms",
            f"p50, +{o - b:.2f} ms (target <= 2 ms)",
        )
    )


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        audit = os.path.join(tmp, "audit.jsonl")
        whole_process()
        embedded("~20 MB", audit)
        ballast = bytearray(1 << 30)
        for i in range(0, len(ballast), 4096):
            ballast[i] = 1  # touch every page: 1 GiB resident
        embedded("1 GiB", audit)
        del ballast
        deadline(audit)
        exit_latency(audit)
    print(f"supervise benchmark: {os.cpu_count()} cores, Python {sys.version.split()[0]}, n={N}")
    print()
    print("| figure | baseline (same run) | supervise | ratio / note |")
    print("| --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
