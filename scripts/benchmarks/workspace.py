"""The workspace: the quota's overshoot and accounting, the Landlock jail's set-up."""

from __future__ import annotations

import itertools
import os
import statistics
import sys
import tempfile
import time

from supervisor import Policy, Supervisor

from ._common import CONFIG, median_ms, rows


def quota_overshoot(audit: str) -> None:
    """Writers against a 64 MiB quota: how far past it the workspace got before the stop."""
    quota = 64 << 20
    one = (
        "f = open('big', 'wb')\n"
        "try:\n    while True: f.write(b'x' * 65536)\n"
        "except OSError: pass\n"
        "import time; time.sleep(10)\n"
    )
    four = (
        "import os\n"
        "for w in range(4):\n"
        "    if os.fork() == 0:\n"
        "        i = 0\n"
        "        while True:\n"
        "            with open(f'w{w}-{i}', 'wb') as f: f.write(b'x' * 8192)\n"
        "            i += 1\n"
        "os.wait()\n"
    )
    spec = {"quota": quota, "max_files": None, "max_file_size": None}
    sup = Supervisor(Policy.from_dict({"workspace": spec, "grace": 0}), audit=audit)
    for label, code, target in (
        ("one process writing one file as fast as it can", one, "target <= 1 MiB"),
        ("4 processes writing 8 KiB files", four, "target <= 5% of the quota"),
    ):
        over: list[float] = []
        for _ in range(3 if CONFIG.quick else 7):
            r = sup.run([sys.executable, "-c", code])
            assert r.violation is not None and r.violation.limit == "storage", r
            assert r.violation.observed is not None, r
            over.append(r.violation.observed - quota)
        med, worst = statistics.median(over), max(over)
        rows.append(
            (
                f"overshoot past a 64 MiB quota, {label}",
                "-",
                f"{med / 1024:.0f} KiB = {med / quota:.2%} (worst {worst / 1024:.0f} KiB)",
                target,
            )
        )


def quota_accounting() -> None:
    """Per-poll cost of the inotify accounting in a 100k-file workspace, against a rescan."""
    from supervisor._quota import QuotaTracker

    with tempfile.TemporaryDirectory() as ws:
        for d in range(100):
            os.mkdir(f"{ws}/{d}")
            for i in range(1000):
                with open(f"{ws}/{d}/{i}", "wb") as f:
                    f.write(b"x")
        t = time.perf_counter()
        tracker = QuotaTracker(ws)
        scan = (time.perf_counter() - t) * 1000

        batches, writes = itertools.count(1), itertools.count(1)

        def one_batch() -> None:
            i = next(batches)
            for k in range(10):  # ten files written between two polls
                with open(f"{ws}/{k}/{i % 1000}", "ab") as f:
                    f.write(b"y" * 100)
            tracker.poll()

        def writes_only() -> None:
            i = next(writes)
            for k in range(10):
                with open(f"{ws}/{k}/{i % 1000}", "ab") as f:
                    f.write(b"y" * 100)

        both = median_ms(one_batch, n=200)
        bare = median_ms(writes_only, n=200)
        tracker.poll()
        tracker.close()
    poll = both - bare
    rows.append(
        (
            "quota accounting per poll, 100k-file workspace, 10 files written",
            f"a full rescan {scan:.0f} ms",
            f"{poll:.3f} ms",
            f"{scan / max(poll, 1e-6):.0f}x cheaper (target <= 5 ms)",
        )
    )


def jail_cost(audit: str) -> None:
    """What the Landlock jail adds to a spawn: the same workspace run with jail off."""
    with tempfile.TemporaryDirectory() as ws:
        spec = {"path": ws, "quota": None, "max_files": None, "max_file_size": None}
        plain = Supervisor(Policy.from_dict({}), audit=audit)
        off = Supervisor(Policy.from_dict({"workspace": {**spec, "jail": "off"}}), audit=audit)
        on = Supervisor(Policy.from_dict({"workspace": {**spec, "jail": "auto"}}), audit=audit)
        listed = {**spec, "jail": "auto", "readable": [ws]}
        narrow = Supervisor(Policy.from_dict({"workspace": listed}), audit=audit)
        b = median_ms(lambda: plain.run(["true"]))
        o = median_ms(lambda: off.run(["true"]))
        j = median_ms(lambda: on.run(["true"]))
        n = median_ms(lambda: narrow.run(["true"]))
    rows.append(
        (
            "Landlock jail set-up per spawn (`Supervisor.run(['true'])`)",
            f"same workspace, jail off {o:.2f} ms; no workspace {b:.2f} ms",
            f"{j:.2f} ms (writes jailed); {n:.2f} ms (reads listed too)",
            f"{j - o:+.2f} ms, {n - o:+.2f} ms (differences within noise read as 0)",
        )
    )


def bench(tmp: str) -> None:
    """The area's rows, in the table's order."""
    audit = os.path.join(tmp, "audit.jsonl")
    quota_overshoot(audit)
    quota_accounting()
    jail_cost(audit)
