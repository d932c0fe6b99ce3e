"""Property tests (hypothesis): the policy loader and the budget RPC under random input.

Whatever a policy file holds, loading it gives a usable Policy or a PolicyError whose every
line names the file, the line and the key path: never another exception. Whatever bytes a
child sends the RPC, it gets a JSON-RPC error reply (or a result), the server goes on, and
the ledger changes only for a valid reserve, commit, record or release.

Each ``@example`` is a bug these properties found, kept as a regression test. For a longer
hunt, scale every example count: ``SUPERVISE_FUZZ_SCALE=50 .venv/bin/pytest tests/test_fuzz.py``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _helpers import GLOBAL_TIMEOUT, margin
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from supervisor._backend import RunBackend
from supervisor._plan import RunPlan, load_plan
from supervisor.budget._policy import BudgetPolicy, ModelPricing
from supervisor.budget.ledger import Ledger
from supervisor.budget.sqlite import SQLiteStore
from supervisor.cli import run_cli
from supervisor.errors import PolicyError
from supervisor.policy import _SECTIONS, Policy
from supervisor.result import Usage
from supervisor.rpc import RpcServer

# A failing example can be megabytes ("[" * 100_000): say so in full, not as a warning.
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")

# No example database in the repository; deadlines off (a shared 2-core machine is slow).
# Under CI hypothesis loads its "ci" profile: derandomized, so a run is reproducible.
SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example]


SCALE = float(os.environ.get("SUPERVISE_FUZZ_SCALE", "1"))


def fuzz(examples: int) -> Callable[[Any], Any]:
    """Settings for one property: ``examples`` runs (times SCALE), no database, no deadline."""
    return settings(
        max_examples=max(1, int(examples * SCALE)),
        database=None,
        deadline=None,
        suppress_health_check=SLOW_OK,
    )


# -- the policy loader ---------------------------------------------------------------------

SECTIONS = _SECTIONS  # the schema's own sections: the audit section is fuzzed like the rest
NAMED = {("env", "set"): None, ("budget", "pricing"): ModelPricing}  # keys are names
KEY_PATHS = sorted(
    ".".join(str(part) for part in (*section, key))
    for section, model in SECTIONS.items()
    for key in model.model_fields
)

# Scalars as written in YAML: units, YAML 1.1 surprises, tags, escapes, and the values
# each found bug was about.
RAW_SCALARS = [
    "null", "~", "true", "no", "yes", "on", "0", "-1", "1.5", "-0.0", "1e400", ".inf", "-.inf",
    ".nan", "0x1F", "0o17", "017", "1_000", "0b101", "1:30", "2024-01-01", "2024-13-01",
    "0000-01-01", "2001-12-14t21:59:43.10-05:00", "10s", "250ms", "1h30m", "-5s", "2GiB",
    "2 gigs", "512M", "9000PiB", "$5", '"$5"', "'$1e30'", "1e30", "'1e9999999'", "1e9999999",
    "'1e9999999m'", "'1e999'", "'12345678901.234567'", "0.000001", "0.0000001", "1e-400",
    "'1e-400'", "9" * 30, "9" * 5000, "'" + "9" * 5000 + "'", "-" + "9" * 25, '"\\0"', '"\\x07"',
    '"\\ud800"', '"\\ud83d\\ude00"', '"\\U0001F600"', "'✓ 🐍 ǅ'", "!!binary aGVsbG8=",
    "!!binary /w==", "!!str 5", "!!int '5'", "!!int x", "!!float x", "!!bool x",
    "!!timestamp foo", "!!python/name:os.system", "!!set {a, b}", "!!omap [a: 1]", "[]", "{}",
    "[1, 2]", "{a: 1}", "*undefined", "auto", "required", "off", "deny", "allow", "kill",
    "warn", "free", "sqlite:///x.db", "'sqlite:///a\\0b'", '"sqlite:///a\\0b"', "redis://",
    "redis://h:99999999/0", "UTC", "Europe/Paris", "0.8", "1.0000001", "'   '", '""',
    '"a\\0b"', "/tmp/x", "[PATH, HOME]", "[PATH, '']", "[\"A=B\"]", "{A: 1, A: 2}",
    "{input: 1, output: 2}", "{input: 1, output: 2, foo: 3}", "{calls: 1, usd: 0.5}",
]  # fmt: skip
numbers = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.decimals(allow_nan=False, allow_infinity=False, places=8).map(str),
)
units = st.sampled_from(["", "s", "ms", "m", "h", "d", "KiB", "MiB", "GiB", "GB", "B", "x"])
quoted_text = st.text(max_size=30).map(lambda t: json.dumps(t, ensure_ascii=False))
scalars = st.one_of(
    st.sampled_from(RAW_SCALARS),
    numbers,
    st.tuples(numbers, st.sampled_from(["", " "]), units).map("".join),
    quoted_text,
    st.text(alphabet="abcXYZ019 -_.:/$#&*!%@`|>'\"", max_size=12),
)
odd_keys = st.one_of(
    st.sampled_from(["<<", "null", "1", "true", "? [a]", "memroy", "budget.run", "'x y'"]),
    st.text(alphabet="abcxyz_", min_size=1, max_size=8),
    quoted_text,
)


@st.composite
def trees(draw: st.DrawFn, section: tuple[str, ...] = (), depth: int = 0) -> Any:
    """A YAML-ish tree over the real schema: ("map"|"seq"|"scalar"|"alias", ...)."""
    model = SECTIONS.get(section)
    named = section[:2] in NAMED and len(section) == 2
    roll = draw(st.integers(0, 9))
    if (model is not None or named) and depth < 4 and roll < 8:
        if named:
            keys = st.one_of(st.sampled_from(["m", "gpt-4o-mini", "A", "B.C"]), odd_keys)
        else:
            assert model is not None
            keys = st.one_of(st.sampled_from(sorted(model.model_fields)), odd_keys)
            keys = keys if roll else st.sampled_from(sorted(model.model_fields))
        names = draw(st.lists(keys, max_size=6))
        items = [(key, draw(trees((*section, key), depth + 1))) for key in names]
        return ("map", items, draw(st.booleans()), draw(st.booleans()))
    if depth < 5 and roll == 9:
        items = draw(st.lists(trees((*section, "[]"), depth + 1), max_size=4))
        return ("seq", items, draw(st.booleans()), draw(st.booleans()))
    if roll == 8 and draw(st.booleans()):
        return ("alias", draw(st.integers(0, 5)))
    return ("scalar", draw(scalars), draw(st.booleans()))


class Renderer:
    """Writes a tree as YAML text: block or flow style, anchors, aliases, tabs or spaces."""

    def __init__(self, indent: str) -> None:
        self.indent = indent
        self.anchors = 0

    def anchor(self, wanted: bool) -> str:
        if not wanted:
            return ""
        self.anchors += 1
        return f"&a{self.anchors} "

    def alias(self, index: int) -> str:
        return f"*a{self.anchors - index}" if index < self.anchors else "*nowhere"

    def flow(self, node: Any) -> str:
        kind = node[0]
        if kind == "scalar":
            text: str = node[1]
            return self.anchor(node[2]) + text
        if kind == "alias":
            return self.alias(node[1])
        anchor = self.anchor(node[3])
        if kind == "seq":
            return anchor + "[" + ", ".join(self.flow(item) for item in node[1]) + "]"
        return anchor + "{" + ", ".join(f"{k}: {self.flow(v)}" for k, v in node[1]) + "}"

    def block(self, node: Any, level: int) -> list[str]:
        """The lines of a mapping or sequence at ``level`` (a scalar has none)."""
        pad = self.indent * level
        lines = []
        pairs = node[1] if node[0] == "map" else [("-", item) for item in node[1]]
        for key, value in pairs:
            lead = f"{pad}- " if node[0] == "seq" else f"{pad}{key}: "
            if value[0] in ("map", "seq") and value[1] and not value[2]:
                lines.append(lead.rstrip() + " " + self.anchor(value[3]).rstrip())
                lines += self.block(value, level + 1)
            else:
                lines.append(lead + self.flow(value))
        return lines

    def document(self, tree: Any) -> str:
        if tree[0] == "map" and not tree[2]:
            return "\n".join(self.block(tree, 0)) + "\n"
        return self.flow(tree) + "\n"


@st.composite
def policy_texts(draw: st.DrawFn) -> str:
    """A structured policy document, mostly on the real keys, with random values."""
    tree = draw(trees())
    indent = draw(st.sampled_from(["  ", "    ", " ", "\t", "  \t"]))
    text = Renderer(indent).document(tree)
    if draw(st.booleans()):
        text = "version: 1\n" + text
    return text


def billion_laughs(levels: int, width: int, where: str) -> str:
    """The YAML alias bomb: each level lists the one before ``width`` times."""
    lines = ["a0: &a0 [lol, lol]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    last = f"*a{levels - 1}"
    return "\n".join(lines) + "\n" + where.replace("BOMB", last) + "\n"


def deep(depth: int, style: str) -> str:
    """A document nested ``depth`` levels: flow lists, flow maps, block maps, or a chain of
    ``depth`` merge keys (each mapping merges the one before)."""
    if style == "merge-chain":
        chain = [f"  a{i}: &a{i} {{<<: *a{i - 1}, k{i}: 1}}" for i in range(1, depth)]
        return "\n".join(["x:", "  a0: &a0 {k0: 1}", *chain, f"y: {{<<: *a{depth - 1}}}"])
    if style == "flow-list":
        return "limits: " + "[" * depth + "]" * depth + "\n"
    if style == "flow-map":
        return "limits: " + "{a: " * depth + "1" + "}" * depth + "\n"
    return "".join(" " * i + f"k{i}:\n" for i in range(depth)) + " " * depth + "x\n"


LOCATED = re.compile(r"(?P<where>:\d+)?(?P<path> [^\n]*?)?: (?P<message>.+)")
# What a message for people never shows: Python's internals.
INTERNALS = (
    "Traceback",
    "set_int_max_str_digits",
    "object has no attribute",
    "NoneType",
    "<class",
    "known keys: )",
)


def assert_clear(
    error: PolicyError, source: str, items: list[str] | None = None, text: str | None = None
) -> None:
    """Each problem is one line: ``source:LINE key.path: what is wrong (the fix)`` (LINE in
    ``text``), or for ``--set`` items, ``--set ITEM: what is wrong``."""
    assert error.problems and str(error) == "\n".join(error.problems)
    for problem in error.problems:
        assert problem.startswith(source), problem
        assert problem.isprintable(), problem  # one line, even for a key "a\nb" or "\u2028"
        if items is None:
            match = LOCATED.fullmatch(problem[len(source) :])
            assert match is not None and match["message"].strip(), problem
            if text is not None and match["where"]:
                assert 1 <= int(match["where"][1:]) <= len(text.splitlines()) + 1, problem
        else:
            assert any(problem.startswith(f"--set {printable(item)}: ") for item in items), problem
        for internal in INTERNALS:
            assert internal not in problem, problem


def printable(item: str) -> str:
    """How a --set item shows in a problem: control characters escaped (\\n), one line."""
    return "".join(c if c.isprintable() else json.dumps(c)[1:-1] for c in item)


def _fs_ok(text: str | None) -> bool:
    if text is None:
        return True
    try:
        os.fsencode(text)
    except UnicodeEncodeError:
        return False
    return "\0" not in text


def assert_usable(policy: Policy) -> None:
    """A valid policy can be run: it survives JSON, YAML and --set, and its paths encode."""
    data = policy.to_dict()
    canonical = json.dumps(data, allow_nan=False)  # no inf/nan: the plan cache is JSON
    assert policy.sha256() == Policy.from_dict(json.loads(canonical)).sha256()
    assert Policy.from_yaml(policy.to_yaml()) == policy
    plan = RunPlan.from_policy(policy)
    plan.rlimit_words()
    if policy.budget is not None:
        # The run builds its ledger from the plan's JSON: money must come back exact.
        assert BudgetPolicy.model_validate(json.loads(json.dumps(plan.budget))) == policy.budget
        assert policy.with_overrides(["name=x"]).budget == policy.budget
        assert _fs_ok(policy.budget.store)
    assert policy.audit is None or _fs_ok(policy.audit.path)
    workspace = policy.workspace
    if workspace is not None:
        assert _fs_ok(workspace.path)
        assert all(_fs_ok(p) for p in [*workspace.writable, *(workspace.readable or [])])
    for name, value in policy.env.set.items():
        assert _fs_ok(name) and _fs_ok(value) and "=" not in name


def load_text(text: str, source: str = "policy.yaml") -> Policy | None:
    """from_yaml: a usable Policy, or None after checking the PolicyError is clear."""
    try:
        policy = Policy.from_yaml(text, source=source)
    except PolicyError as error:
        assert_clear(error, source, text=text)
        return None
    assert_usable(policy)
    return policy


@fuzz(500)
@given(st.text(max_size=300))
@example("name: a\x00b")  # a control character: the reader's error escaped as a traceback
@example("name: \x07\n")
@example("version: 1\n---\nname: x\n")  # "but found another document": now says what was expected
@example('"\\u001e": null\n')  # a key with a line break (for splitlines) broke the problem line
@example('name: "a\\u2028b"\nlimits: {memory: "a\\u2028b"}\n')  # a line separator in a value
def test_any_text_loads_or_is_a_clear_policy_error(text: str) -> None:
    """Random text gives a usable Policy or a PolicyError naming the file and line."""
    load_text(text)


@pytest.mark.slow
@fuzz(1000)
@given(policy_texts())
@example("limits:\n  open_files: " + "9" * 5000)  # int() refused 4300 digits: ValueError
@example("limits:\n  processes: '" + "9" * 5000 + "'")  # the same, in pydantic's words
@example("limits:\n  memory: 1e9999999")  # decimal.Overflow scaling a size
@example("limits:\n  wall_time: '1e9999999m'")  # decimal.Overflow scaling a duration
@example("limits:\n  wall_time: '1e999'")  # an infinite duration: valid, not writable back
@example("budget:\n  run: {usd: '$1e30'}")  # decimal.InvalidOperation checking micro-dollars
@example("budget:\n  pricing: {m: {input: '1e400', output: 1}}")  # a price past int64 micro
@example("budget:\n  run: {usd: '12345678901.234567'}")  # changed by the plan's JSON float
@example("budget:\n  pricing: {m: {input: 1e-400, output: 1}}")  # became 0 through a float
@example("name: 2024-13-01")  # the timestamp constructor's ValueError escaped
@example("name: 2001-12-14 21:59:43.10 -25:00")
@example("name: !!bool x")  # KeyError from the bool constructor
@example("name: !!timestamp foo")  # AttributeError from the timestamp constructor
@example('env:\n  set: {A: "\\ud800"}')  # a lone surrogate: valid, then the spawn crashed
@example('workspace: {path: "/tmp/\\ud800"}')
@example('audit: "a\\0b"')  # a NUL in the audit path: valid, then open() crashed
@example('audit: ""')
@example('budget: {store: "sqlite:///a\\0b"}')  # a NUL in the store path: sqlite3 crashed
@example("budget: {pricing: {m: {input: 1, output: 1, foo: 2}}}")  # "known keys: " empty
@example("name: 2024-01-01")  # a date where text goes: "got datetime.date(2024, 1, 1)"
def test_structured_policies_load_or_are_clear_policy_errors(text: str) -> None:
    """Documents on the real keys with odd values load (and survive JSON) or fail clearly."""
    load_text(text)


@pytest.mark.slow
@fuzz(25)
@given(st.integers(1, 3000), st.sampled_from(["flow-list", "flow-map", "block", "merge-chain"]))
@example(5000, "flow-list")  # RecursionError in PyYAML's composer
@example(2000, "block")
@example(3000, "merge-chain")  # RecursionError flattening merge keys (depth is not nesting)
def test_deep_nesting_is_refused_not_a_recursion_error(depth: int, style: str) -> None:
    """Any depth of nesting loads or gives a clear error; past 32 levels it says so."""
    policy = load_text(deep(depth, style))
    if depth > 32 and style != "merge-chain":
        with pytest.raises(PolicyError, match="nested more than 32 levels deep"):
            Policy.from_yaml(deep(depth, style))
    assert policy is None


@fuzz(20)
@given(
    st.integers(2, 12),
    st.integers(2, 12),
    st.sampled_from(
        [
            "name: BOMB",
            "budget: {alerts: BOMB}",
            "env: {set: {X: BOMB}, inherit: BOMB}",
            "workspace: {writable: BOMB}",
            "limits: {memory: BOMB}",
            "budget: {pricing: {m: BOMB}}",
            "version: 1",
        ]
    ),
)
def test_a_billion_laughs_alias_bomb_is_refused_quickly(
    levels: int, width: int, where: str
) -> None:
    """An alias bomb (width ** levels leaves) is refused in well under a second."""
    started = time.perf_counter()
    assert load_text(billion_laughs(levels, width, where)) is None
    assert time.perf_counter() - started < margin(2.0)


def test_merge_keys_override_without_a_duplicate_key_error() -> None:
    """``<<: *base`` then the same key is YAML's override, not a duplicate (it was refused)."""
    policy = Policy.from_yaml(
        "budget:\n  pricing:\n    a: &p {input: 1, output: 2}\n    b: {<<: *p, output: 3}\n"
    )
    assert policy.budget is not None
    assert policy.budget.pricing["b"].output == 3 and policy.budget.pricing["b"].input == 1


BASE = Policy.from_yaml(
    "version: 1\nlimits: {memory: 1GiB, wall_time: 10m}\nworkspace: {}\n"
    "budget:\n  run: {usd: '123456789.123456', calls: 10}\n"
    "  pricing: {m: {input: 0.15, output: 0.6}}\nenv: {set: {A: '1'}}\n",
    source="base.yaml",
)
set_keys = st.one_of(
    st.sampled_from(KEY_PATHS),
    st.sampled_from(["env.set.FOO", "env.set.", "budget.pricing.m", "budget.pricing.x.input"]),
    st.lists(st.sampled_from([*KEY_PATHS, "", "x", "0", "memroy"]), min_size=1, max_size=4).map(
        ".".join
    ),
    st.text(max_size=20),
)
set_items = st.one_of(
    st.tuples(set_keys, st.sampled_from(["=", "", "=="]), st.one_of(scalars, st.text())).map(
        "".join
    ),
    st.text(max_size=40),
)


@fuzz(500)
@given(st.lists(set_items, min_size=1, max_size=4))
@example(["limits.memory=" + "[" * 3000])  # RecursionError in PyYAML's composer
@example(["limits.wall_time=1e9999999m"])  # decimal.Overflow
@example(["budget.run.usd=1e30"])  # decimal.InvalidOperation
@example(["name=\udcff"])  # an invalid UTF-8 argv byte: "syntax error" said nothing
@example(['name="\\ud800"'])  # a lone surrogate through --set
@example(["limits={memory: 1GiB, memory: 2GiB}"])  # a duplicate key went unnoticed
@example(["budget.pricing.m={input: 1, output: 1, foo: 2}"])  # "known keys: " empty
def test_set_overrides_apply_or_are_clear_policy_errors(items: list[str]) -> None:
    """--set with random keys and values gives a usable policy or one clear line per item."""
    try:
        policy = BASE.with_overrides(items)
    except PolicyError as error:
        assert_clear(error, "--set ", items)
        return
    assert_usable(policy)
    if not any(item.partition("=")[0].strip().startswith("budget") for item in items):
        assert policy.budget == BASE.budget  # exact: 123456789.123456 survives --set


def test_policy_load_reads_any_bytes(tmp_path: Path) -> None:
    """Policy.load on random bytes (invalid UTF-8 included) gives a Policy or a PolicyError."""
    path = tmp_path / "policy.yaml"
    source = str(path)

    @fuzz(100)
    @given(st.one_of(st.binary(max_size=200), policy_texts().map(str.encode)))
    @example(b"name: \xff\xfe")
    @example(b"\xef\xbb\xbfversion: 1\n")  # a byte order mark
    def load(data: bytes) -> None:
        path.write_bytes(data)
        try:
            policy = Policy.load(path)
        except PolicyError as error:
            assert_clear(error, source)
        else:
            assert_usable(policy)

    load()


def check_in_process(path: Path) -> tuple[int, str, str]:
    """``supervise check PATH`` through run_cli: (status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = run_cli(["check", str(path)])
    return status, out.getvalue(), err.getvalue()


def assert_check_output(status: int, stdout: str, stderr: str, path: Path) -> None:
    assert status in (0, 125), (status, stderr)
    assert "Traceback" not in stderr + stdout
    if status == 0:
        assert stdout.startswith(f"# {path}: ok (sha256 ") and not stderr
    else:
        lines = stderr.splitlines()
        assert lines and all(line.startswith(f"supervise: {path}") for line in lines), stderr


def test_supervise_check_exits_0_or_125_with_a_message(tmp_path: Path) -> None:
    """supervise check on random files: 0 and the policy, or 125 and supervise: lines."""
    path = tmp_path / "policy.yaml"

    @fuzz(60)
    @given(st.one_of(policy_texts(), st.text(max_size=100)))
    def check(text: str) -> None:
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        assert_check_output(*check_in_process(path), path)

    check()


@pytest.mark.parametrize(
    "text",
    [
        "limits: " + "[" * 5000 + "]" * 5000 + "\n",
        'env:\n  set: {A: "\\ud800"}\n',
        "version: 1\nlimits: {memory: 2GiB, wall_time: 10m}\n",
    ],
    ids=["deep", "surrogate", "valid"],
)
def test_supervise_check_in_a_subprocess_never_prints_a_traceback(
    tmp_path: Path, text: str
) -> None:
    """The real command line on a crash input and a valid file: 0 or 125, no traceback."""
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    done = subprocess.run(
        [sys.executable, "-m", "supervisor", "check", str(path)],
        capture_output=True,
        text=True,
        timeout=GLOBAL_TIMEOUT,
        check=False,
    )
    assert_check_output(done.returncode, done.stdout, done.stderr, path)


# -- the budget RPC ------------------------------------------------------------------------

ERROR_CODES = {-32700, -32600, -32601, -32602, 1, 2}
MUTATING = {"reserve", "commit", "record", "release"}
BUDGET = BudgetPolicy.model_validate(
    {
        "run": {"calls": 40, "tokens": 100_000, "usd": 5},
        "daily": {"usd": 50},
        "rate": {"calls_per_minute": 1000},
        "pricing": {"m": {"input": 1, "output": 2}},
    }
)


class RunEvents:
    """What the run would audit: kept to check that garbage never counts as a denial."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def budget_denied(self, error: Any) -> None:
        self.seen.append(("denied", str(error)))

    def budget_breached(self, error: Any) -> None:
        self.seen.append(("breached", str(error)))

    def budget_alert(self, alert: Any) -> None:
        self.seen.append(("alert", str(alert)))

    def usage_changed(self, call: Any) -> None:
        pass

    def spend_lost(self, error: Any, call: Any) -> None:
        self.seen.append(("lost", str(error)))


class Rig:
    """A real RpcServer over a real SQLite ledger, pumped from this thread as the run loop
    pumps it. Each ``fresh()`` is a new run (a new agent) on the same database file."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "budget.db"
        self.store = SQLiteStore(f"sqlite:///{self.path}", str(self.path))
        self.reader = sqlite3.connect(self.path)
        self.runs = 0
        self.server: RpcServer | None = None
        self.sock: socket.socket | None = None

    @contextlib.contextmanager
    def fresh(self, max_line: int = 1 << 20) -> Iterator[Rig]:
        """A new run: its ledger holds one open reservation and one recorded call."""
        self.runs += 1
        self.agent = f"bot{self.runs}"
        self.events = RunEvents()
        self.totals = Usage()
        ledger = Ledger(BUDGET, self.store, run_id=f"run{self.runs}", agent=self.agent, session="s")
        self.backend = RunBackend(self.events, self.totals, ledger, None, None)
        held = self.backend.reserve(
            model="m", provider=None, input_tokens=100, max_output_tokens=50, usd=None,
            label="a", key="k1",
        )  # fmt: skip
        self.hold = held["reservation"]
        self.backend.record(
            model="m", provider=None, label=None, key=None, input_tokens=10, output_tokens=5,
            cached_input_tokens=0, cache_write_tokens=0, reasoning_tokens=0, usd=None,
        )  # fmt: skip
        self.errors: list[tuple[int, str, str]] = []
        # Every report kept (no rate limit), to check each bad request gets its rpc_error.
        self.server = RpcServer(
            self.backend,
            max_line=max_line,
            on_error=self._on_error,
            errors_per_second=1e9,
            error_burst=10**9,
        )
        self.sock = socket.socket(fileno=os.dup(self.server.child_fd))
        self.sock.setblocking(False)
        self.sent = 0
        try:
            yield self
        finally:
            self.sock.close()
            self.server.close()

    def _on_error(self, code: int, message: str, excerpt: str) -> None:
        self.errors.append((code, message, excerpt))

    def state(self) -> tuple[Any, ...]:
        """Everything of this run's agent a request could change: scopes, holds, history,
        and the run's own totals and budget events."""
        db, agent = self.reader, self.agent
        rows = [
            db.execute(f"SELECT * FROM {table} WHERE agent = ? ORDER BY 1, 2", (agent,)).fetchall()
            for table in ("scopes", "reservations", "events")
        ]
        t = self.totals
        totals = (t.api_calls, t.input_tokens, t.output_tokens, t.usd, repr(t.by_model))
        return (*rows, totals, list(self.events.seen))

    def exchange(self, data: bytes) -> list[dict[str, Any]]:
        """Send ``data`` then a sentinel ``usage`` call; every reply up to the sentinel's."""
        assert self.server is not None and self.sock is not None
        self.sent += 1
        sentinel = f"sentinel-{self.sent}"
        tail = json.dumps({"jsonrpc": "2.0", "id": sentinel, "method": "usage"}).encode()
        payload = memoryview(data + b"\n" + tail + b"\n")
        received = bytearray()
        marker = b'"id":"%s"' % sentinel.encode()  # as the server writes it (compact)
        done = 0
        deadline = time.monotonic() + 20
        while True:
            assert time.monotonic() < deadline, "the server stopped answering"
            if done < len(payload):
                with contextlib.suppress(BlockingIOError):
                    done += self.sock.send(payload[done : done + 65536])
            self.server.on_readable()
            with contextlib.suppress(BlockingIOError):
                while chunk := self.sock.recv(1 << 20):
                    received += chunk
            at = received.rfind(marker)
            if at >= 0 and received.find(b"\n", at) >= 0:
                break
        replies = [json.loads(line) for line in bytes(received).split(b"\n") if line]
        assert replies[-1].get("id") == sentinel and "result" in replies[-1], replies[-1]
        assert self.server.buffered() == 0
        return replies[:-1]

    def close(self) -> None:
        self.reader.close()
        self.store.close()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    """The RPC rig of one test (its database under tmp_path)."""
    made = Rig(tmp_path)
    try:
        yield made
    finally:
        made.close()


def assert_reply(reply: dict[str, Any]) -> None:
    """A JSON-RPC 2.0 reply: an id, and a result or an error with a code SPEC names."""
    assert reply.get("jsonrpc") == "2.0" and "id" in reply, reply
    assert ("result" in reply) != ("error" in reply), reply
    if "error" in reply:
        error = reply["error"]
        assert error["code"] in ERROR_CODES, reply
        assert isinstance(error["message"], str) and error["message"], reply
        assert "internal error" not in error["message"], reply


class Raw:
    """A JSON number written as is (1e999999999, a 5000-digit int, NaN)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"Raw({self.text!r})"


HOLD = Raw("HOLD")  # the open reservation of the run, whatever its id


def encode(value: Any, hold: str = "1") -> str:
    """JSON as a hostile child writes it: NaN, Infinity, lone surrogates and Raw numbers."""
    if value is HOLD:
        return json.dumps(hold)
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        items = (f"{json.dumps(k)}:{encode(v, hold)}" for k, v in value.items())
        return "{" + ",".join(items) + "}"
    if isinstance(value, list):
        return "[" + ",".join(encode(v, hold) for v in value) + "]"
    return json.dumps(value)


PARAMS = sorted(
    {"model", "provider", "label", "key", "input_tokens", "output_tokens", "max_output_tokens",
     "cached_input_tokens", "cache_write_tokens", "reasoning_tokens", "usd", "reservation",
     "path", "size", "name", "limit"}
)  # fmt: skip
# 1e1000000000000000000: Decimal's InvalidOperation escaped the parser and killed the server.
RAW_NUMBERS = ["1e1000000000000000000", "1e999999999", "-1e999999999", "1E-999999", "NaN",
               "Infinity", "-Infinity", "-0", "0.0000001", "1.0", "1e2", "9" * 4301, "9" * 4300,
               "1" + "0" * 16, "999999999.999999", "1000000000.000001"]  # fmt: skip
NASTY_STRINGS = ["", "\0", "\ud800", "\udfff\ud800", "x" * 257, "x" * 4097, "m", "M",
                 "gpt-4o-mini", "\u0661", "\u00b2", "01", "0", "1", "2", "+1", " 1",
                 "999999999999999999", "9" * 19, "../../etc/passwd", "a\nb"]  # fmt: skip
leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**64), 2**64),
    st.sampled_from([0, 1, -1, 10**15, 10**15 + 1, 2**63, -(2**63)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(RAW_NUMBERS).map(Raw),
    st.text(max_size=20),
    st.sampled_from(NASTY_STRINGS),
)


def containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Lists and objects of ``inner`` (a named function: hypothesis reads its source)."""
    keys = st.sampled_from(PARAMS) | st.text(max_size=5)
    return st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3)


json_values = st.recursive(
    leaves,
    containers,
    max_leaves=8,
)
# Mostly valid, so that requests get past validation to the ledger.
counts = st.one_of(st.integers(0, 300), st.integers(0, 300), st.integers(0, 300), json_values)


@st.composite
def params_for(draw: st.DrawFn, method: str) -> Any:
    """Params that are often valid for ``method``, then broken in one or more ways."""
    reservation = st.one_of(st.just(HOLD), st.sampled_from(NASTY_STRINGS), json_values)
    model = st.one_of(st.sampled_from(["m", "M", "gpt-4o-mini", "nope"]), json_values)
    valid: dict[str, st.SearchStrategy[Any]] = {
        "reserve": st.fixed_dictionaries(
            {"model": model},
            optional={
                "input_tokens": counts,
                "max_output_tokens": counts,
                "usd": json_values,
                "label": json_values,
                "key": json_values,
                "provider": json_values,
            },
        ),
        "commit": st.fixed_dictionaries(
            {"reservation": reservation, "input_tokens": counts, "output_tokens": counts},
            optional={
                "cached_input_tokens": counts,
                "reasoning_tokens": counts,
                "cache_write_tokens": counts,
                "usd": json_values,
            },
        ),
        "record": st.fixed_dictionaries(
            {"model": model, "input_tokens": counts, "output_tokens": counts},
            optional={"usd": json_values, "label": json_values, "key": json_values},
        ),
        "release": st.fixed_dictionaries({"reservation": reservation}),
        "usage": st.just({}),
        "check_write": st.fixed_dictionaries({"path": json_values, "size": counts}),
        "step_begin": st.fixed_dictionaries({"name": json_values}),
        "step_end": st.fixed_dictionaries({"name": json_values}),
    }
    params = draw(valid.get(method, json_values))
    if isinstance(params, dict) and draw(st.booleans()):
        extra = draw(st.dictionaries(st.sampled_from(PARAMS), json_values, max_size=2))
        params = {**params, **extra}
    if draw(st.integers(0, 9)) == 0:
        params = draw(json_values)  # not an object at all
    return params


@st.composite
def envelopes(draw: st.DrawFn) -> dict[str, Any]:
    """A JSON-RPC request: mostly well formed, with random method, id and params."""
    method = draw(
        st.one_of(
            st.sampled_from(["reserve", "commit", "record", "release", "usage", "check_write",
                             "step_begin", "step_end", "attach", "raise_limit", "Reserve"]),
            json_values,
        )
    )  # fmt: skip
    message: dict[str, Any] = {}
    if draw(st.integers(0, 9)):
        message["jsonrpc"] = "2.0"
    else:
        message["jsonrpc"] = draw(json_values)
    if draw(st.integers(0, 9)):
        message["id"] = draw(
            st.one_of(st.integers(-(2**64), 2**64), st.text(max_size=300), json_values)
        )
    message["method"] = method
    if draw(st.integers(0, 5)):
        message["params"] = draw(params_for(method if isinstance(method, str) else ""))
    if draw(st.integers(0, 19)) == 0:
        message[draw(st.sampled_from(["extra", "result", "error"]))] = draw(json_values)
    return message


def answered(message: Any) -> bool:
    """Whether the server replies to this request (all but an attach notification do)."""
    try:
        json.loads(encode(message), parse_constant=lambda name: 1 / 0)
    except (ValueError, ZeroDivisionError, RecursionError):
        return True
    return not (
        isinstance(message, dict)
        and message.get("jsonrpc") == "2.0"
        and message.get("method") == "attach"
        and "id" not in message
        and set(message) <= {"jsonrpc", "method", "params", "id"}
    )


def mutated(message: dict[str, Any], reply: dict[str, Any]) -> bool:
    """Whether this request may have changed the ledger: a valid charge, release or denial."""
    method = message.get("method")
    if not isinstance(method, str) or method not in MUTATING:
        return False
    return "result" in reply or reply["error"]["code"] in (1, 2)


def huge_exponent_request(field: str) -> bytes:
    """A reserve or commit with 1e999999999 in ``field`` (its JSON form is a billion digits)."""
    params: dict[str, Any] = {"model": "m", field: Raw("1e999999999")}
    return encode({"jsonrpc": "2.0", "id": 1, "method": "reserve", "params": params}).encode()


@pytest.mark.slow
def test_any_request_gets_one_valid_reply_and_only_a_valid_one_touches_the_ledger(
    rig: Rig,
) -> None:
    """Random requests get one valid reply each; only a valid charge changes the ledger."""

    @fuzz(500)
    @given(st.lists(envelopes(), min_size=1, max_size=4))
    # A commit of an unknown reservation was logged as a budget denial (audit "denied").
    @example(
        [
            {
                "jsonrpc": "2.0",
                "id": 0,
                "method": "commit",
                "params": {"reservation": "m", "input_tokens": 0, "output_tokens": 0},
            }
        ]
    )
    @example([{"jsonrpc": "2.0", "id": Raw("10000000000000000"), "method": "usage"}])
    @example(
        [
            {
                "jsonrpc": "2.0",
                "id": 0,
                "method": "record",
                "params": {"model": "nope", "input_tokens": 0, "output_tokens": 0},
            }
        ]
    )
    @example(
        [
            {"jsonrpc": "2.0", "id": 0, "method": "release", "params": {"reservation": HOLD}},
            {"jsonrpc": "2.0", "id": 1, "method": "release", "params": {"reservation": HOLD}},
        ]
    )
    def one(messages: list[dict[str, Any]]) -> None:
        with rig.fresh():
            for message in messages:
                before = rig.state()
                reported = len(rig.errors)
                replies = rig.exchange(encode(message, rig.hold).encode())
                # Each bad request is reported once (the audit's rpc_error), a denial never.
                bad = [r for r in replies if r.get("error", {}).get("code", 0) < 0]
                assert len(rig.errors) - reported == len(bad), (message, rig.errors[reported:])
                assert len(replies) == (1 if answered(message) else 0), (message, replies)
                for reply in replies:
                    assert_reply(reply)
                    if reply["id"] is not None:  # the id sent, as JSON reads it
                        assert reply["id"] == json.loads(encode(message["id"]))
                    if not mutated(message, reply):
                        after = rig.state()
                        if "no price for the model" in str(reply.get("error")):
                            # unknown_model: deny is a budget decision the run logs as
                            # "denied"; the ledger itself is untouched.
                            after, before = after[:-1], before[:-1]
                        assert after == before, (message, reply)

    one()


@pytest.mark.parametrize(
    "line",
    [
        huge_exponent_request("input_tokens"),  # formatted as a billion digits in the error
        huge_exponent_request("model"),
        huge_exponent_request("label"),
        b'{"jsonrpc":"2.0","id":1,"method":"check_write","params":{"path":1E-999999999,"size":1}}',
    ],
)
def test_a_number_with_a_huge_exponent_is_refused_at_once(rig: Rig, line: bytes) -> None:
    """1e999999999 where a count or a string goes is -32602 at once, with a short message."""
    # It took 4.5 s and a gigabyte to write the number into the error message.
    with rig.fresh():
        before = rig.state()
        started = time.perf_counter()
        (reply,) = rig.exchange(line)
        assert time.perf_counter() - started < margin(0.5)
        assert reply["error"]["code"] == -32602 and len(reply["error"]["message"]) < 200
        assert rig.state() == before


@pytest.mark.parametrize("reservation", ["01", "+1", " 1", "\u0661", "\u00b2", "1.0"])
def test_a_reservation_id_is_only_the_exact_text_reserve_returned(
    rig: Rig, reservation: str
) -> None:
    """ "01" or an Arabic-Indic one is not hold 1: -32602 "no reservation", the hold stays."""
    # SQLite's lookup took them (isdigit, int); "²" made int() fail with Python's message.
    with rig.fresh():
        assert rig.hold == "1"  # the first row of a new database
        before = rig.state()
        for method in ("release", "commit"):
            params: dict[str, Any] = {"reservation": reservation}
            if method == "commit":
                params.update(input_tokens=1, output_tokens=1)
            line = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params})
            (reply,) = rig.exchange(line.encode())
            assert reply["error"]["code"] == -32602, reply
            assert "no reservation" in reply["error"]["message"], reply
        assert rig.state() == before


@pytest.mark.parametrize("field", ["model", "label", "key", "provider"])
def test_a_lone_surrogate_in_a_string_is_invalid_params(rig: Rig, field: str) -> None:
    """A lone surrogate in a name is -32602 that says so, and the ledger stays."""
    # SQLite's UTF-8 encoder refused it before, as a codec error in the reply.
    with rig.fresh():
        before = rig.state()
        params = {"model": "m", "input_tokens": 1, "output_tokens": 1, field: "\ud800"}
        line = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "record", "params": params})
        (reply,) = rig.exchange(line.encode())
        assert reply["error"]["code"] == -32602
        assert "lone surrogate" in reply["error"]["message"], reply
        assert rig.state() == before


garbage_lines = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=100).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.sampled_from(
        [
            b"\xff\xfe",
            b"\0",
            b"{",
            b"[" * 100_000,
            b"{" * 100_000,
            b'"\\ud800"',
            b"\r",
            b" ",
            b'{"jsonrpc":"2.0","id":1,"method":"usage"}\r',
            b'{"jsonrpc":"2.0","method":"attach"}',
            b'{"jsonrpc":"2.0","id":1,"method":"reserve","params":{"model":"m","usd":NaN}}',
            b'{"jsonrpc":"2.0","id":1,"method":"commit","params":{"reservation":"1",'
            b'"input_tokens":1e999999999,"output_tokens":1}}',
        ]
    ),
    st.binary(max_size=50).map(lambda b: b'{"jsonrpc":"2.0","id":1,"method":"usage"' + b),
)


def flip(line: bytes, where: int, byte: int) -> bytes:
    """``line`` with one byte replaced (a request damaged in transit)."""
    if not line:
        return bytes([byte])
    where %= len(line)
    return line[:where] + bytes([byte]) + line[where + 1 :]


def test_random_bytes_get_error_replies_and_never_change_the_ledger(rig: Rig) -> None:
    """Random bytes, bad UTF-8, NUL, damaged requests: valid error replies, ledger unchanged."""

    @fuzz(300)
    @given(
        st.lists(
            st.one_of(
                garbage_lines,
                st.builds(
                    flip,
                    st.builds(lambda m: encode(m).encode(), envelopes()),
                    st.integers(0, 1000),
                    st.integers(0, 255),
                ),
            ),
            min_size=1,
            max_size=20,
        )
    )
    @example([b"\xff\xfe\n\x00garbage"])
    # An exponent past 10**18: decimal.InvalidOperation out of on_readable(), a dead server.
    @example([b'{"jsonrpc":"2.0","id":1,"method":"usage","params":{"x":9E9999999999999999999}}'])
    @example([huge_exponent_request("input_tokens")])
    def garbage(lines: list[bytes]) -> None:
        with rig.fresh():
            before = rig.state()
            replies = rig.exchange(b"\n".join(lines))
            assert len(replies) <= sum(line.count(b"\n") + 1 for line in lines)
            for reply in replies:
                assert_reply(reply)
            if all(reply.get("error", {}).get("code", 0) < 0 for reply in replies):
                assert rig.state() == before, replies

    garbage()


def test_lines_at_and_over_the_1mib_cap(rig: Rig) -> None:
    """A request padded to exactly 1 MiB is served; one byte more is -32600 "longer than"."""

    @fuzz(8)
    @given(st.integers(-2, 2), st.sampled_from([b" ", b"x"]))
    @example(0, b" ")
    @example(1, b" ")
    def long_line(delta: int, pad: bytes) -> None:
        with rig.fresh():
            cap = 1 << 20
            request = b'{"jsonrpc":"2.0","id":5,"method":"usage"}'
            line = pad * (cap + delta - len(request)) + request
            assert len(line) == cap + delta
            before = rig.state()
            (reply,) = rig.exchange(line)
            assert_reply(reply)
            if delta > 0:
                assert (
                    reply["error"]["code"] == -32600 and "longer than" in reply["error"]["message"]
                )
            elif pad == b" ":
                assert reply["id"] == 5 and "result" in reply
            else:
                assert reply["error"]["code"] == -32700
            assert rig.state() == before

    long_line()


def test_many_requests_at_once_are_answered_in_order(rig: Rig) -> None:
    """Up to 300 requests in one write: one reply each in order, the server never stalls."""

    @fuzz(15)
    @given(st.data(), st.integers(1, 300))
    def burst(data: st.DataObject, n: int) -> None:
        with rig.fresh():
            kinds = data.draw(st.lists(st.sampled_from(["usage", "bad", "garbage"]), min_size=n,
                                       max_size=n))  # fmt: skip
            lines = []
            for i, kind in enumerate(kinds):
                if kind == "usage":
                    lines.append(json.dumps({"jsonrpc": "2.0", "id": i, "method": "usage"}))
                elif kind == "bad":
                    params = {"model": "m", "input_tokens": -i - 1}
                    lines.append(json.dumps({"jsonrpc": "2.0", "id": i, "method": "reserve",
                                             "params": params}))  # fmt: skip
                else:
                    lines.append(f"garbage {i}")
            before = rig.state()
            replies = rig.exchange("\n".join(lines).encode())
            assert len(replies) == n
            for i, (kind, reply) in enumerate(zip(kinds, replies, strict=True)):
                assert_reply(reply)
                if kind == "usage":
                    assert reply["id"] == i and "result" in reply
                else:
                    assert reply["error"]["code"] == (-32602 if kind == "bad" else -32700)
            assert rig.state() == before

    burst()


def test_the_run_reads_a_policy_exactly_as_check_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run's cached plan agrees with Policy.load and --set: the same policy or error."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = tmp_path / "policy.yaml"

    @fuzz(100)
    @given(
        st.one_of(policy_texts().map(str.encode), st.binary(max_size=100)),
        st.lists(set_items, max_size=2),
    )
    @example(b"name: caf\xe9\n", [])  # the run read it with U+FFFD; check said "not UTF-8"
    def agree(data: bytes, items: list[str]) -> None:
        path.write_bytes(data)
        try:
            expected = Policy.load(path).with_overrides(items)
        except PolicyError as error:
            with pytest.raises(PolicyError) as caught:
                load_plan(str(path), items)
            assert caught.value.problems == error.problems
            return
        for _ in range(2):  # built, then read back from the cache
            plan = load_plan(str(path), items)
            assert plan.policy == expected.to_dict() and plan.sha256 == expected.sha256()

    agree()
