"""The run's own costs: start, stop, watch, sample; against subprocess and psutil."""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

from supervisor import Policy, Supervisor

from ._common import CONFIG, REPO, median_ms, rows


def whole_process() -> None:
    py = sys.executable
    script = os.path.join(os.path.dirname(py), "supervise")
    cmd = [script] if os.access(script, os.X_OK) else [py, "-m", "supervisor"]
    base = median_ms(lambda: subprocess.run([py, "-c", "pass"], check=True))
    # stderr: the summary is printed, as by default
    sup = median_ms(
        lambda: subprocess.run([*cmd, "--", "true"], check=True, stderr=subprocess.DEVNULL)
    )
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
    env = {**os.environ, "PYTHONPATH": REPO}
    base = median_ms(lambda: subprocess.run([py, "-S", "-c", "pass"], check=True))
    sup = median_ms(
        lambda: subprocess.run(
            [py, "-S", "-m", "supervisor", "--", "true"],
            env=env,
            check=True,
            stderr=subprocess.DEVNULL,
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
    for _ in range(CONFIG.n // 2):
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

        def waiter() -> None:
            wait()
            done.append(time.perf_counter())

        th = threading.Thread(target=waiter)
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

    o = statistics.median(measure(ours) for _ in range(CONFIG.n // 2))
    b = statistics.median(measure(bare) for _ in range(CONFIG.n // 2))
    os.close(devnull)
    rows.append(
        (
            "child exit -> run() returns",
            f"`subprocess.run` {b:.2f} ms",
            f"{o:.2f} ms",
            f"p50, +{o - b:.2f} ms (target <= 2 ms)",
        )
    )


def watching_cost(audit: str) -> None:
    """Supervisor CPU (all its threads) while a child sleeps."""
    secs = 3 if CONFIG.quick else 10
    sup = Supervisor(Policy.default(), audit=audit)
    before = time.process_time()
    t = time.monotonic()
    sup.run(["sleep", str(secs)])
    used = time.process_time() - before
    share = used / (time.monotonic() - t) * 100
    rows.append(
        (
            f"supervisor CPU watching a sleeping child for {secs} s",
            "-",
            f"{used * 1000:.0f} ms of CPU",
            f"{share:.3f}% of one core (target <= 0.5%)",
        )
    )


HOG = """
import os, sys, time
rate = 100 << 20
page = os.sysconf("SC_PAGE_SIZE")
chunks, start = [], time.monotonic()
while True:
    chunks.append(b"x" * (1 << 20))
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * page
    print(time.monotonic(), rss, flush=True)
    time.sleep(max(0.0, start + len(chunks) * (1 << 20) / rate - time.monotonic()))
"""


def memory_overshoot(audit: str) -> None:
    """A child allocating 100 MB/s against a 256 MiB limit: overshoot and detection
    latency, with a memory cgroup (where one can be made) and by the watcher alone."""
    from supervisor._linux import cgroup_parent

    routes = ["cgroup"] if cgroup_parent("memory") is not None else []
    for route in [*routes, "watcher"]:
        with watcher_route(route == "watcher"):
            _memory_overshoot(audit, route)


@contextlib.contextmanager
def watcher_route(on: bool) -> Iterator[None]:
    """SUPERVISE_CGROUPS=off (the watcher's route) for the runs of this process within."""
    if on:
        os.environ["SUPERVISE_CGROUPS"] = "off"
    try:
        yield
    finally:
        os.environ.pop("SUPERVISE_CGROUPS", None)


def _memory_overshoot(audit: str, route: str) -> None:
    limit = 256 << 20
    caught: list[float] = []
    policy = Policy.from_dict({"limits": {"memory": limit}, "grace": 0})
    sup = Supervisor(policy, audit=audit, on_violation=lambda v: caught.append(time.monotonic()))
    over, late = [], []
    for _ in range(3 if CONFIG.quick else 7):
        caught.clear()
        r, w = os.pipe()
        result = sup.run([sys.executable, "-c", HOG, str(limit)], stdout=w)
        os.close(w)
        with os.fdopen(r) as f:
            log = [(float(t), int(rss)) for t, rss in (line.split() for line in f)]
        # When the child crossed the limit: its first report over it, or (killed before it
        # could report) its last report plus the time to grow the rest at 100 MB/s.
        over_at = [t for t, rss in log if rss > limit]
        last_t, last_rss = log[-1]
        crossed = over_at[0] if over_at else last_t + (limit - last_rss) / (100 << 20)
        assert result.violation is not None and result.violation.limit == "memory"
        over.append(max(0, result.usage.peak_memory - limit) / limit * 100)
        late.append((caught[0] - crossed) * 1000)
    # With the cgroup the kernel's charge never passes the limit; the figure is the peak
    # RSS, which also holds file pages (the interpreter's) charged to no group of the tree.
    how = "peak RSS (file pages included)" if route == "cgroup" else "peak tree RSS seen"
    rows.append(
        (
            f"memory overshoot past 256 MiB, child allocating 100 MB/s ({route})",
            "-",
            f"{statistics.median(over):.1f}% (worst {max(over):.1f}%)",
            f"{how} over the limit (target: 0 with a cgroup, <= 10% watched)",
        )
    )
    rows.append(
        (
            f"detection latency for that breach ({route})",
            "-",
            f"{statistics.median(late):.1f} ms (worst {max(late):.1f} ms)",
            "from the child crossing to the violation (target <= 100 ms)",
        )
    )


FORK_POOL = """
import os, time
buf = bytearray(200 << 20)
for i in range(0, len(buf), 4096): buf[i] = 1
kids = []
for _ in range(8):
    pid = os.fork()
    if pid == 0:
        sum(buf[i] for i in range(0, len(buf), 4096))
        time.sleep(1.0)
        os._exit(0)
    kids.append(pid)
for k in kids: os.waitpid(k, 0)
"""


def fork_pool(audit: str) -> None:
    """A fork pool of 8 sharing a 200 MiB buffer under memory 350 MiB: must pass (its RSS
    summed is 1.8 GiB; the kernel charges a page once, PSS divides it among sharers)."""
    from supervisor._linux import cgroup_parent

    policy = Policy.from_dict({"limits": {"memory": "350MiB"}, "grace": 0})
    routes = ["cgroup"] if cgroup_parent("memory") is not None else []
    for route in [*routes, "watcher"]:
        with watcher_route(route == "watcher"):
            result = Supervisor(policy, audit=audit).run([sys.executable, "-c", FORK_POOL])
        v = result.violation
        rows.append(
            (
                f"fork pool of 8 sharing 200 MiB under memory: 350MiB ({route})",
                "killed (RSS summed)",
                "passes" if v is None else f"killed: {v.message}",
                f"peak {result.usage.peak_memory / (1 << 20):.0f} MiB (target: passes)",
            )
        )


def sampling_cost() -> None:
    """One tree sample, per process, against a bare psutil loop over the same tree."""
    import psutil

    from supervisor.watch import TreeSampler

    for n in (1, 10, 100):
        script = " ".join(["sleep 30 &"] * n) + " wait"
        with subprocess.Popen(["sh", "-c", script]) as root:
            sampler = TreeSampler(root.pid)
            while len(sampler.pids()) < n:
                time.sleep(0.01)

            def sample(s: TreeSampler = sampler) -> None:
                s.sample(0.0)

            ours = median_ms(sample, n=50) * 1000 / n

            def bare(pid: int = root.pid) -> None:
                for p in psutil.Process(pid).children(recursive=True):
                    with p.oneshot():
                        p.memory_info()
                        p.cpu_times()
                        p.num_fds()

            base = median_ms(bare, n=50) * 1000 / n
            for p in sampler.pids():
                os.kill(p, 9)
            root.kill()
        rows.append(
            (
                f"sampling cost, tree of {n}",
                f"psutil loop {base:.1f} us/process",
                f"{ours:.1f} us/process",
                f"{ours / base:.2f}x",
            )
        )


def bench(tmp: str) -> None:
    """The area's rows, in the table's order."""
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
    watching_cost(audit)
    memory_overshoot(audit)
    fork_pool(audit)
    sampling_cost()
