"""supervise's benchmark: medians and ratios against a baseline run in the same process.

Run it as ``scripts/bench`` (installs into .venv first), which runs
``python -m scripts.benchmarks`` from the repository:

    scripts/bench                   every area; prints the Markdown table README quotes
    scripts/bench --quick           fewer rounds, smaller data
    scripts/bench --only ledger     one area (repeat --only for more): run, workspace,
                                    ledger, rpc, audit, gateway
    scripts/bench --ledger          the same as --only ledger (and --audit: --only audit)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable

from . import audit, gateway, ledger, rpc, run, workspace
from ._common import CONFIG, rows

# In the table's order.
AREAS: dict[str, Callable[[str], None]] = {
    "run": run.bench,
    "workspace": workspace.bench,
    "ledger": ledger.bench,
    "rpc": rpc.bench,
    "audit": audit.bench,
    "gateway": gateway.bench,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, smaller data")
    parser.add_argument(
        "--only", action="append", choices=list(AREAS), metavar="AREA",
        help=f"run only this area (repeatable): {', '.join(AREAS)}",
    )  # fmt: skip
    parser.add_argument("--ledger", action="store_true", help="the same as --only ledger")
    parser.add_argument("--audit", action="store_true", help="the same as --only audit")
    args = parser.parse_args(argv)
    CONFIG.quick = args.quick
    only = set(args.only or ())
    if args.ledger:
        only.add("ledger")
    if args.audit:
        only.add("audit")
    with tempfile.TemporaryDirectory() as tmp:
        for name, bench in AREAS.items():
            if not only or name in only:
                bench(tmp)
    print_table()


def print_table() -> None:
    python = sys.version.split()[0]
    print(f"supervise benchmark: {os.cpu_count()} cores, Python {python}, n={CONFIG.n}")
    print()
    print("| figure | baseline (same run) | supervise | ratio / note |")
    print("| --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
