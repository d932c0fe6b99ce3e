"""Policy tests: unit parsing, the shipped policies, bad policies and their messages, --set."""

from __future__ import annotations

import hashlib
import json
import textwrap
from decimal import Decimal
from pathlib import Path

import pydantic
import pytest

from supervisor._units import (
    MAX_SIZE,
    compact_duration,
    compact_size,
    format_duration,
    format_money,
    format_size,
    parse_duration,
    parse_money,
    parse_size,
    show_value,
)
from supervisor.errors import PolicyError, SupervisorError
from supervisor.policy import AuditPolicy, EnvPolicy, Limits, Policy

ROOT = Path(__file__).resolve().parent.parent
POLICIES = sorted((ROOT / "policies").glob("*.yaml"))
KiB, MiB, GiB, TiB = 1024, 1024**2, 1024**3, 1024**4


def problems_of(text: str) -> list[str]:
    """The problem lines PolicyError reports for ``text`` read as ``policy.yaml``."""
    with pytest.raises(PolicyError) as info:
        Policy.from_yaml(textwrap.dedent(text), source="policy.yaml")
    return info.value.problems


def set_problems(*items: str) -> list[str]:
    """The problem lines PolicyError reports for ``--set`` items on the default policy."""
    with pytest.raises(PolicyError) as info:
        Policy.default().with_overrides(list(items))
    return info.value.problems


# --- units ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, 0),
        (1, 1),
        (512, 512),
        ("512", 512),
        ("10B", 10),
        ("1023B", 1023),
        ("1kB", 1000),
        ("1KB", 1000),
        ("1KiB", KiB),
        ("512KiB", 512 * KiB),
        ("1MB", 1000**2),
        ("512MiB", 512 * MiB),
        ("1GB", 1000**3),
        ("2GiB", 2 * GiB),
        ("1TiB", TiB),
        ("1.5GiB", 3 * GiB // 2),
        ("2 GiB", 2 * GiB),
        (" 5 mib ", 5 * MiB),
        ("1.1KiB", 1126),
        ("2G", 2 * GiB),  # one letter is binary, as coreutils, prlimit and docker read it
        ("2g", 2 * GiB),
        ("2Gi", 2 * GiB),
        ("2gib", 2 * GiB),
        ("512M", 512 * MiB),
        ("512m", 512 * MiB),
        ("4k", 4 * KiB),
        ("2gb", 2 * 1000**3),  # with a B it is decimal, as SPEC's 1GB
        ("512mb", 512 * 1000**2),
        (1.9, 1),
        (MAX_SIZE, MAX_SIZE),
    ],
)
def test_parse_size(value: object, expected: int) -> None:
    """Sizes are bytes; decimal units are powers of 1000, binary ones of 1024, fractions floor."""
    assert parse_size(value) == expected
    assert isinstance(parse_size(value), int)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("2 gigs", '"2 gigs" is not a size (try 2GiB)'),
        ("512 megs", '"512 megs" is not a size (try 512MiB)'),
        ("2GIBS", '"2GIBS" is not a size (try 2GiB)'),
        ("abc", '"abc" is not a size (try 512MiB or 2GiB)'),
        ("", '"" is not a size'),
        ("1 XB", '"1 XB" is not a size'),
        (-1, "-1 is negative (sizes cannot be)"),
        ("-1GiB", '"-1GiB" is negative (sizes cannot be)'),
        (True, "true is not a size (try 2GiB)"),
        (None, "null is not a size"),
        (float("inf"), "inf is not a size"),
        ([1], "[1] is not a size"),
        (MAX_SIZE + 1, "is too large (the most is 8.0 EiB)"),
        ("9000PiB", '"9000PiB" is too large'),
    ],
)
def test_parse_size_rejects(value: object, message: str) -> None:
    """A value that is not a size says so and suggests a spelling that works."""
    with pytest.raises(ValueError) as info:
        parse_size(value)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, 0.0),
        (30, 30.0),
        (0.5, 0.5),
        ("30", 30.0),
        ("1ms", 0.001),
        ("250ms", 0.25),
        ("30s", 30.0),
        ("30 s", 30.0),
        ("5m", 300.0),
        ("2min", 120.0),
        ("2h", 7200.0),
        ("1.5h", 5400.0),
        ("1d", 86400.0),
        ("1h30m", 5400.0),
        ("1h 30m 15s", 5415.0),
    ],
)
def test_parse_duration(value: object, expected: float) -> None:
    """Durations are seconds; a bare number is seconds; units and compounds add up exactly."""
    assert parse_duration(value) == expected
    assert isinstance(parse_duration(value), float)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("soon", '"soon" is not a duration (try 30s, 5m)'),
        ("5x", '"5x" is not a duration'),
        ("1m30", '"1m30" is not a duration'),
        ("5 minutes", '"5 minutes" is not a duration'),
        ("ms", '"ms" is not a duration'),
        ("", '"" is not a duration'),
        ("-5s", '"-5s" is negative (durations cannot be)'),
        (-1, "-1 is negative (durations cannot be)"),
        (True, "true is not a duration (try 30s, 5m)"),
        (float("nan"), "nan is not a duration"),
    ],
)
def test_parse_duration_rejects(value: object, message: str) -> None:
    """A value that is not a duration says so and suggests a spelling that works."""
    with pytest.raises(ValueError) as info:
        parse_duration(value)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (5, Decimal("5")),
        (0, Decimal("0")),
        ("$5", Decimal("5")),
        ("$ 5", Decimal("5")),
        ("5.25", Decimal("5.25")),
        ("$0.10", Decimal("0.10")),
        (0.1, Decimal("0.1")),
        (Decimal("1.5"), Decimal("1.5")),
    ],
)
def test_parse_money(value: object, expected: Decimal) -> None:
    """Money is an exact Decimal; a float goes through its shortest text, never its binary value."""
    assert parse_money(value) == expected
    assert isinstance(parse_money(value), Decimal)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("five", '"five" is not an amount of money (try 5 or "$5")'),
        ("5$", '"5$" is not an amount of money'),
        ("-$5", '"-$5" is negative (amounts of money cannot be)'),
        ("$-5", '"$-5" is negative'),
        (-1, "-1 is negative"),
        (True, "true is not an amount of money"),
        (None, "null is not an amount of money"),
        (float("inf"), "inf is not an amount of money"),
    ],
)
def test_parse_money_rejects(value: object, message: str) -> None:
    """A value that is not an amount of money says so and suggests a spelling that works."""
    with pytest.raises(ValueError) as info:
        parse_money(value)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0 B"),
        (812, "812 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (512 * MiB, "512.0 MiB"),
        (3 * GiB // 2, "1.5 GiB"),
        (MAX_SIZE, "8.0 EiB"),
    ],
)
def test_format_size(size: int, text: str) -> None:
    """Sizes are shown in binary units with one decimal, plain bytes below 1 KiB."""
    assert format_size(size) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0ms"),
        (0.0005, "0.5ms"),
        (0.25, "250ms"),
        (0.9996, "1s"),
        (1, "1s"),
        (3.1, "3.1s"),
        (59.99, "59.99s"),
        (300, "5m"),
        (330, "5m30s"),
        (5400, "1h30m"),
        (7200, "2h"),
        (90000, "1d1h"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    """Durations are shown in the policy's own notation (one style), which reads back."""
    assert format_duration(seconds) == text
    assert parse_duration(text) == pytest.approx(seconds, abs=0.005)


@pytest.mark.parametrize(
    ("amount", "text"),
    [
        ("5", "$5.00"),
        ("0.1", "$0.10"),
        ("1.234567", "$1.234567"),
        ("1.2345675", "$1.234568"),
        ("-2", "-$2.00"),
    ],
)
def test_format_money(amount: str, text: str) -> None:
    """Money is shown with at least cents and at most micro-USD."""
    assert format_money(Decimal(amount)) == text


@pytest.mark.parametrize(
    ("unit", "value", "text"),
    [
        ("usd", Decimal("0.00045"), "$0.00045"),
        ("usd", 5, "$5.00"),
        ("usd", 0.5, "$0.50"),
        ("usd", "1e999", "1e999"),
        ("seconds", 1.5, "1.5s"),
        ("s", 1 / 3, "333ms"),
        ("bytes", 2048, "2048 bytes"),
        ("tokens", 500, "500"),
        ("calls", 3, "3"),
        (None, 7, "7"),
        ("bytes", None, ""),
    ],
)
def test_show_value(unit: str | None, value: object, text: str) -> None:
    """One value formatter: money as format_money, floats to 6 digits, the unit after."""
    assert show_value(unit, value) == text


@pytest.mark.parametrize(
    "size", [1, 1000, 1024, 1234, 2 * GiB, 10**9, 1024000, GiB + 1, 16 * MiB, MAX_SIZE]
)
def test_compact_size_round_trips(size: int) -> None:
    """The compact spelling of a size reads back as exactly the same number of bytes."""
    assert parse_size(compact_size(size)) == size


@pytest.mark.parametrize(
    "seconds", [0.001, 0.25, 1.0, 1.5, 2.0, 30.0, 60.5, 600.0, 5400.0, 86400.0, 90061.0, 1 / 3]
)
def test_compact_duration_round_trips(seconds: float) -> None:
    """The compact spelling of a duration reads back as exactly the same float."""
    assert parse_duration(compact_duration(seconds)) == seconds


def test_compact_spellings() -> None:
    """Compact spellings use the unit a person would write."""
    assert [compact_size(n) for n in (2 * GiB, 10**9, 1234)] == ["2GiB", "1GB", 1234]
    assert [compact_duration(s) for s in (600.0, 5400.0, 0.25, 2.0)] == [
        "10m",
        "1h30m",
        "250ms",
        "2s",
    ]


# --- the shipped policies ----------------------------------------------------------------


def test_policies_directory_is_not_empty() -> None:
    """policies/ ships the default, strict and research-agent policies."""
    assert {path.name for path in POLICIES} >= {
        "default.yaml",
        "strict.yaml",
        "research-agent.yaml",
    }


@pytest.mark.parametrize("path", POLICIES, ids=lambda path: path.name)
def test_shipped_policy_loads_and_validates(path: Path) -> None:
    """Every file in policies/ loads, validates and survives a to_yaml round trip."""
    policy = Policy.load(path)
    assert policy.source == str(path)
    assert policy.source_text == path.read_text(encoding="utf-8")
    assert Policy.from_yaml(policy.to_yaml()) == policy
    assert policy.name == path.stem


def test_default_policy_file_is_the_package_default() -> None:
    """policies/default.yaml is byte-identical to supervisor/default.yaml and equals default()."""
    shipped = (ROOT / "policies" / "default.yaml").read_bytes()
    assert shipped == (ROOT / "supervisor" / "default.yaml").read_bytes()
    assert Policy.load(ROOT / "policies" / "default.yaml") == Policy.default()


def test_default_policy_values() -> None:
    """The built-in default has the documented limits and is parsed only once."""
    policy = Policy.default()
    assert policy is Policy.default()
    assert policy.source == "<default>"
    assert policy.limits == Limits(
        wall_time=600, cpu_time=300, memory=2 * GiB, file_size=GiB, open_files=1024, processes=64
    )
    assert policy.limits.address_space is None
    assert (policy.on_violation, policy.grace, policy.env, policy.audit) == (
        "kill",
        2.0,
        EnvPolicy(),
        None,
    )


def test_strict_and_research_agent_values() -> None:
    """strict.yaml passes only a few variables through; research-agent.yaml names its agent."""
    strict = Policy.load(ROOT / "policies" / "strict.yaml")
    assert strict.env.inherit == ["PATH", "LANG", "LC_ALL", "HOME", "TMPDIR"]
    assert (strict.limits.wall_time, strict.limits.memory, strict.grace) == (30.0, 512 * MiB, 1.0)
    research = Policy.load(ROOT / "policies" / "research-agent.yaml")
    assert (research.agent, research.limits.wall_time, research.limits.memory) == (
        "research-bot",
        7200.0,
        4 * GiB,
    )


def test_empty_mapping_means_no_limits() -> None:
    """Absent keys take their defaults; absent limits are None, i.e. not limited."""
    policy = Policy.from_dict({})
    assert policy.limits == Limits()
    assert all(value is None for value in policy.limits.model_dump().values())
    assert (policy.version, policy.name, policy.grace, policy.env.inherit) == (
        1,
        "unnamed",
        2.0,
        True,
    )


def test_policy_is_frozen() -> None:
    """A policy cannot be changed after validation; --set makes a new one."""
    policy = Policy.default()
    with pytest.raises(pydantic.ValidationError):
        policy.name = "changed"


def test_units_are_normalised() -> None:
    """Sizes become bytes and durations seconds, whatever unit the file used."""
    policy = Policy.from_yaml("limits: {memory: 1.5GiB, wall_time: 1h30m, file_size: 1MB}\n")
    assert (policy.limits.memory, policy.limits.wall_time) == (3 * GiB // 2, 5400.0)
    assert policy.limits.file_size == 1_000_000


def test_env_values_are_text_as_written() -> None:
    """env.set keeps what the file says: 0755 stays 0755 and yes stays yes, not 493 and true."""
    policy = Policy.from_yaml("env:\n  set: {MODE: 0755, FLAG: yes, N: 3, V: 1.10, S: text}\n")
    assert policy.env.set == {"MODE": "0755", "FLAG": "yes", "N": "3", "V": "1.10", "S": "text"}
    assert Policy.from_dict({"env": {"set": {"N": 3, "B": True}}}).env.set == {
        "N": "3",
        "B": "true",
    }


# --- bad policies ------------------------------------------------------------------------

BAD = [
    (
        "limits:\n  memory: 2 gigs\n",
        'policy.yaml:3 limits.memory: "2 gigs" is not a size (try 2GiB)',
    ),
    (
        "limits:\n  wall_time: soon\n",
        'policy.yaml:3 limits.wall_time: "soon" is not a duration (try 30s, 5m)',
    ),
    (
        "limits:\n  file_size: -1\n",
        "policy.yaml:3 limits.file_size: -1 is negative (sizes cannot be)",
    ),
    (
        "limits:\n  cpu_time: -5s\n",
        'policy.yaml:3 limits.cpu_time: "-5s" is negative (durations cannot be)',
    ),
    (
        "limits:\n  memory: 0\n",
        "policy.yaml:3 limits.memory: 0 is too small (a limit must be more than 0; null means no",
    ),
    ("limits:\n  wall_time: 0s\n", 'policy.yaml:3 limits.wall_time: "0s" is too small'),
    (
        "limits:\n  open_files: 0\n",
        "policy.yaml:3 limits.open_files: 0 is too small (stdin, stdout and stderr need 3 open",
    ),
    ("limits:\n  open_files: 2\n", "policy.yaml:3 limits.open_files: 2 is too small"),
    (
        "limits:\n  processes: 0\n",
        "policy.yaml:3 limits.processes: 0 is too small (the command itself is 1 process",
    ),
    (
        "limits:\n  processes: lots\n",
        'policy.yaml:3 limits.processes: "lots" is not a whole number (try 1024)',
    ),
    (
        "limits:\n  open_files: 12.5\n",
        "policy.yaml:3 limits.open_files: 12.5 is not a whole number",
    ),
    ("limits:\n  open_files: yes\n", "policy.yaml:3 limits.open_files: true is not a whole number"),
    ("limits:\n  memory: true\n", "policy.yaml:3 limits.memory: true is not a size (try 2GiB)"),
    ("limits:\n  memory: 9000PiB\n", 'policy.yaml:3 limits.memory: "9000PiB" is too large'),
    (
        "limits:\n  step_time: soon\n",
        'policy.yaml:3 limits.step_time: "soon" is not a duration',
    ),
    (
        "limits:\n  memroy: 1GiB\n",
        "policy.yaml:3 limits.memroy: unknown key (did you mean memory?)",
    ),
    (
        "limits:\n  zzz: 1\n",
        "policy.yaml:3 limits.zzz: unknown key (known keys: wall_time, cpu_time, memory",
    ),
    ("limits: 3\n", "policy.yaml:2 limits: expected a mapping (indented KEY: VALUE lines), got 3"),
    ("limit:\n  memory: 1GiB\n", "policy.yaml:2 limit: unknown key (did you mean limits?)"),
    ("3: x\n", "policy.yaml:2 3: unknown key"),
    ("network: none\n", 'policy.yaml:2 network: "none" is not one of: allow, deny'),
    ("workspace: 3\n", "policy.yaml:2 workspace: expected a mapping"),
    ("workspace:\n  quota: lots\n", 'policy.yaml:3 workspace.quota: "lots" is not a size'),
    ("workspace:\n  max_files: 0\n", "policy.yaml:3 workspace.max_files: 0 is too small"),
    ("workspace:\n  jail: on\n", "policy.yaml:3 workspace.jail: true is not one of: auto"),
    ("workspace:\n  path: ''\n", 'policy.yaml:3 workspace.path: "" is not a path'),
    ("workspace:\n  writable: /tmp\n", "policy.yaml:3 workspace.writable: expected a list"),
    ("workspace:\n  readable: [1]\n", "policy.yaml:3 workspace.readable: 1 is not a path"),
    ("workspace:\n  quotas: 1GiB\n", "policy.yaml:3 workspace.quotas: unknown key (did you"),
    (
        "budget:\n  daily:\n    usd: lots\n",
        'policy.yaml:4 budget.daily.usd: "lots" is not an amount of money (try 5 or "$5")',
    ),
    (
        "budget:\n  run:\n    usd: 0.0000001\n",
        "policy.yaml:4 budget.run.usd: 1e-07 is finer than a micro-dollar (use at most 6 decimals)",
    ),
    ("budget:\n  run:\n    calls: -1\n", "policy.yaml:4 budget.run.calls: -1 is negative"),
    (
        "budget:\n  rate:\n    calls_per_minute: many\n",
        'policy.yaml:4 budget.rate.calls_per_minute: "many" is not a whole number (try 100)',
    ),
    (
        "budget:\n  store: mysql://db\n",
        'policy.yaml:3 budget.store: "mysql://db" is not a store URL (try sqlite:////',
    ),
    ("budget:\n  store: 'sqlite:///'\n", 'policy.yaml:3 budget.store: "sqlite:///" names no'),
    (
        "budget:\n  timezone: Mars/Base\n",
        'policy.yaml:3 budget.timezone: "Mars/Base" is not a time zone (try UTC or Europe/Paris)',
    ),
    ("budget:\n  alerts: [0.5, 2]\n", "policy.yaml:3 budget.alerts[1]: 2 is not a fraction"),
    (
        "budget:\n  pricing:\n    my-model: {input: 1}\n",
        "policy.yaml:4 budget.pricing.my-model.output: is required",
    ),
    (
        "budget:\n  pricing:\n    my-model: {input: cheap, output: 1}\n",
        'policy.yaml:4 budget.pricing.my-model.input: "cheap" is not an amount of money',
    ),
    (
        "budget:\n  unknown_model: allow\n",
        'policy.yaml:3 budget.unknown_model: "allow" is not one of: deny, free',
    ),
    (
        "budget:\n  dialy: {usd: 1}\n",
        "policy.yaml:3 budget.dialy: unknown key (did you mean daily?)",
    ),
    ("budget: 5\n", "policy.yaml:2 budget: expected a mapping (indented KEY: VALUE lines), got 5"),
    ("on_violation: kil\n", 'policy.yaml:2 on_violation: "kil" is not one of: kill, warn'),
    ("on_violation: yes\n", "policy.yaml:2 on_violation: true is not one of: kill, warn"),
    ("grace: -1s\n", 'policy.yaml:2 grace: "-1s" is negative (durations cannot be)'),
    ("grace: null\n", "policy.yaml:2 grace: null is not a duration (try 30s, 5m)"),
    ("name: [a]\n", "policy.yaml:2 name: expected text, got ['a']"),
    (
        "audit: [x]\n",
        "policy.yaml:2 audit: expected a mapping (indented KEY: VALUE lines), got ['x']",
    ),
    (
        "audit: {max_size: 0}\n",
        "policy.yaml:2 audit.max_size: 0 is too small (a limit must be more than 0;"
        " null means no limit)",
    ),
    (
        "audit: {keep: 0}\n",
        "policy.yaml:2 audit.keep: 0 is too small (keep at least 1 rotated file;"
        " null means no limit)",
    ),
    ("audit: ''\n", 'policy.yaml:2 audit: "" is not a path (null: the default audit log)'),
    (
        "env:\n  inherit: PATH\n",
        "policy.yaml:3 env.inherit: expected true, false or a list of variable names, got"
        ' "PATH" (try [PATH, HOME])',
    ),
    (
        "env:\n  inherit: [PATH, 3]\n",
        "policy.yaml:3 env.inherit: 3 is not an environment variable name (item 2 of the list)",
    ),
    (
        "env:\n  set: [A]\n",
        "policy.yaml:3 env.set: expected a mapping (indented KEY: VALUE lines), got ['A']",
    ),
    ("env:\n  set:\n    A: [1]\n", "policy.yaml:4 env.set.A: expected text, got [1]"),
    (
        "env:\n  set:\n    A=B: x\n",
        'policy.yaml:3 env.set: "A=B" is not an environment variable name',
    ),
    ("env:\n  inhert: false\n", "policy.yaml:3 env.inhert: unknown key (did you mean inherit?)"),
    (
        "limits:\n  memory: 1GiB\n  memory: 2GiB\n",
        "policy.yaml:4 limits.memory: duplicate key (also on line 3; keep one)",
    ),
    ("limits:\n  memory: [1GiB\n", "policy.yaml:4: not valid YAML: expected ',' or ']'"),
    (
        "name: a: b\n",
        "policy.yaml:2: not valid YAML: mapping values are not allowed here (check indentation",
    ),
    (
        "limits:\n\tmemory: 1GiB\n",
        "policy.yaml:3: not valid YAML: found character '\\t' that cannot start any token"
        " (indent with spaces, not tabs)",
    ),
    (
        "x: !!python/object:os.system y\n",
        "policy.yaml:2: not valid YAML: could not determine a constructor",
    ),
    (
        "env:\n  set: &s\n    A: *s\n",
        "policy.yaml:4 env.set.A: refers to itself (remove the alias)",
    ),
]


@pytest.mark.parametrize(("body", "expected"), BAD, ids=[expected for _, expected in BAD])
def test_bad_policy_message(body: str, expected: str) -> None:
    """Each bad policy gets one line naming file, line, key path, the problem and the fix."""
    problems = problems_of("version: 1\n" + body)
    assert len(problems) == 1, problems
    assert expected in problems[0]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", 'policy.yaml:1: the policy is empty (start with "version: 1")'),
        ("# nothing but a comment\n", "policy.yaml:1: the policy is empty"),
        ("- version: 1\n", "policy.yaml:1: the policy must be a mapping of keys, got a list"),
        ("hello\n", 'policy.yaml:1: the policy must be a mapping of keys, got "hello"'),
        (
            "version: 2\n",
            "policy.yaml:1 version: 2 is not supported (this supervise reads version 1)",
        ),
        ("version: true\n", "policy.yaml:1 version: true is not supported"),
        (
            "version: 1\n---\nname: x\n",
            "policy.yaml:2: not valid YAML: expected a single document in the stream, "
            "but found another document (a policy is one document: remove the second ---)",
        ),
    ],
)
def test_bad_policy_whole_file(text: str, expected: str) -> None:
    """A file that is empty, not a mapping, not version 1 or not one document is refused."""
    problems = problems_of(text)
    assert len(problems) == 1, problems
    assert expected in problems[0]


def test_messages_never_leak_pydantic() -> None:
    """No message is a raw pydantic dump: no "Input should", no URL, no traceback."""
    for body, _ in BAD:
        for problem in problems_of("version: 1\n" + body):
            assert "Input should" not in problem and "errors.pydantic.dev" not in problem
            assert "Traceback" not in problem and "\n" not in problem


def test_every_problem_is_reported_in_file_order() -> None:
    """Several problems in one file are all reported, one line each, in the order of the file."""
    problems = problems_of(
        """\
        version: 2
        limits:
          memory: 2 gigs
          memroy: 1GiB
          open_files: 2
        workspace:
          path: ''
        on_violation: kil
        env:
          inherit: PATH
        """
    )
    assert [problem.split(" ", 1)[0] for problem in problems] == [
        "policy.yaml:1",
        "policy.yaml:3",
        "policy.yaml:4",
        "policy.yaml:5",
        "policy.yaml:7",
        "policy.yaml:8",
        "policy.yaml:10",
    ]
    assert problems[1] == 'policy.yaml:3 limits.memory: "2 gigs" is not a size (try 2GiB)'


def test_policy_error_fields() -> None:
    """PolicyError carries the problems and the source and maps to exit status 125."""
    with pytest.raises(PolicyError) as info:
        Policy.from_yaml("grace: soon\non_violation: no\n", source="p.yaml")
    error = info.value
    assert isinstance(error, SupervisorError) and error.exit_code == 125
    assert error.source == "p.yaml"
    assert str(error) == "\n".join(error.problems) and len(error.problems) == 2


def test_load_names_the_file(tmp_path: Path) -> None:
    """Problems in a loaded file start with the path as given."""
    path = tmp_path / "policy.yaml"
    path.write_text("version: 1\nlimits:\n  memory: 2 gigs\n", encoding="utf-8")
    with pytest.raises(PolicyError) as info:
        Policy.load(path)
    assert info.value.problems == [f'{path}:3 limits.memory: "2 gigs" is not a size (try 2GiB)']


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("missing", "cannot read the policy: No such file or directory (check the path)"),
        ("directory", "cannot read the policy: Is a directory (give a file)"),
        ("latin-1", "cannot read the policy: it is not UTF-8 text (save it as UTF-8)"),
    ],
)
def test_unreadable_file(tmp_path: Path, kind: str, expected: str) -> None:
    """A file that cannot be read gives one line with the path, the reason and the fix."""
    path = {"missing": tmp_path / "missing.yaml", "directory": tmp_path}.get(kind)
    if path is None:
        path = tmp_path / "latin1.yaml"
        path.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(PolicyError) as info:
        Policy.load(path)
    assert info.value.problems == [f"{path}: {expected}"]
    assert info.value.source == str(path)


def test_from_dict() -> None:
    """from_dict validates the same way, naming <dict> since there are no lines."""
    policy = Policy.from_dict({"limits": {"memory": "1GiB"}, "on_violation": "warn"})
    assert (policy.limits.memory, policy.on_violation, policy.source) == (GiB, "warn", "<dict>")
    assert policy.source_text is None
    with pytest.raises(PolicyError) as info:
        Policy.from_dict({"limits": {"memory": "x"}, "network": "none"})
    assert info.value.problems == [
        '<dict> limits.memory: "x" is not a size (try 512MiB or 2GiB)',
        '<dict> network: "none" is not one of: allow, deny',
    ]


# --- --set overrides ---------------------------------------------------------------------


def test_overrides_change_the_effective_policy() -> None:
    """--set items change dotted keys; VALUE is YAML; the original policy is unchanged."""
    base = Policy.load(ROOT / "policies" / "strict.yaml")
    policy = base.with_overrides(
        [
            "limits.wall_time=10s",
            "limits.memory=1GiB",
            "on_violation=warn",
            "env.inherit=[A, B]",
            "env.set.FOO=0755",
            "env.set.X.Y=1",
            "limits.open_files=3",
            "agent=bot",
        ]
    )
    assert (policy.limits.wall_time, policy.limits.memory, policy.on_violation) == (
        10.0,
        GiB,
        "warn",
    )
    assert policy.env.inherit == ["A", "B"]
    assert policy.env.set == {"FOO": "0755", "X.Y": "1"}
    assert (policy.limits.open_files, policy.agent) == (3, "bot")
    assert (policy.source, policy.source_text) == (base.source, base.source_text)
    assert base.limits.wall_time == 30.0 and base.on_violation == "kill"


def test_override_null_turns_a_limit_off() -> None:
    """--set limits.memory=null removes the memory limit."""
    policy = Policy.default().with_overrides(["limits.memory=null"])
    assert policy.limits.memory is None
    assert policy.limits.wall_time == Policy.default().limits.wall_time


def test_no_overrides_is_the_same_policy() -> None:
    """An empty --set list changes nothing."""
    assert Policy.default().with_overrides([]) == Policy.default()


def test_overrides_as_a_mapping() -> None:
    """with_overrides takes {dotted key: value}: values as they are (None = off), no YAML."""
    base = Policy.default()
    policy = base.with_overrides(
        {"limits.wall_time": "10s", "limits.memory": None, "env.set.A.B": "0755", "name": "null"}
    )
    assert (policy.limits.wall_time, policy.limits.memory) == (10.0, None)
    assert (policy.env.set["A.B"], policy.name) == ("0755", "null")
    assert policy == base.with_overrides(
        ["limits.wall_time=10s", "limits.memory=null", "env.set.A.B=0755", 'name="null"']
    )
    assert base.with_overrides({}) is base
    with pytest.raises(PolicyError) as info:
        base.with_overrides({"limits.wall_time": "ten", "limits.memroy": 1})
    assert info.value.problems == [
        'override limits.wall_time="ten": "ten" is not a duration (try 30s, 5m)',
        "override limits.memroy=1: unknown key limits.memroy (did you mean limits.memory?)",
    ]


def test_overrides_refuse_one_string() -> None:
    """A single "KEY=VALUE" string is refused (it would be read as one item per character)."""
    with pytest.raises(TypeError, match=r"not one string: try \['limits.memory=1GiB'\]"):
        Policy.default().with_overrides("limits.memory=1GiB")


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        (
            "limits.wall_time=abc",
            '--set limits.wall_time=abc: "abc" is not a duration (try 30s, 5m)',
        ),
        (
            "limits.wall_time",
            "--set limits.wall_time: expected KEY=VALUE (e.g. --set limits.wall_time=10s)",
        ),
        ("=3", "--set =3: expected KEY=VALUE"),
        (
            "limits.memroy=1GiB",
            "--set limits.memroy=1GiB: unknown key limits.memroy (did you mean limits.memory?)",
        ),
        ("bogus=1", "--set bogus=1: unknown key bogus (known keys: version, name"),
        ("workspace.quota=lots", '--set workspace.quota=lots: "lots" is not a size'),
        ("workspace.jail=maybe", '--set workspace.jail=maybe: "maybe" is not one of: auto'),
        ("budget.run=1", "--set budget.run=1: expected a mapping (indented KEY: VALUE lines)"),
        ("name.x=1", "--set name.x=1: name is not a section (try --set name=VALUE)"),
        ("env.set.=1", "--set env.set.=1: env.set. needs a name (e.g. --set env.set.FOO=bar)"),
        ("on_violation=kil", '--set on_violation=kil: "kil" is not one of: kill, warn'),
        ("limits.open_files=2", "--set limits.open_files=2: 2 is too small"),
        ("limits.step_time=0", "--set limits.step_time=0: 0 is too small"),
        ("version=2", "--set version=2: 2 is not supported (this supervise reads version 1)"),
        ("grace=null", "--set grace=null: null is not a duration"),
        ("env.inherit=[A,", "--set env.inherit=[A,: not valid YAML: "),
        ("limits={memory: abc}", '--set limits={memory: abc}: limits.memory: "abc" is not a size'),
    ],
)
def test_bad_override_message(item: str, expected: str) -> None:
    """A bad --set item is reported as --set ITEM: problem (fix)."""
    problems = set_problems(item)
    assert len(problems) == 1, problems
    assert problems[0].startswith(expected)


def test_every_bad_override_is_reported() -> None:
    """Several bad --set items are all reported, in the order given."""
    problems = set_problems("limits.memory=2 gigs", "limits.wall_time=10s", "grace=-1", "nope")
    assert problems == [
        '--set limits.memory=2 gigs: "2 gigs" is not a size (try 2GiB)',
        "--set grace=-1: -1 is negative (durations cannot be)",
        "--set nope: expected KEY=VALUE (e.g. --set limits.wall_time=10s)",
    ]


def test_override_after_replacing_a_section() -> None:
    """A --set into a section an earlier --set replaced with a scalar says what happened."""
    problems = set_problems("limits=3", "limits.memory=1GiB")
    assert problems == [
        "--set limits=3: expected a mapping (indented KEY: VALUE lines), got 3",
        "--set limits.memory=1GiB: limits is not a mapping here (an earlier --set replaced it)",
    ]


# --- serialisation and hashing -----------------------------------------------------------


def test_to_dict_is_plain_numbers() -> None:
    """to_dict is JSON-friendly with bytes and seconds as plain numbers."""
    data = Policy.default().to_dict()
    assert data["limits"]["memory"] == 2 * GiB and data["limits"]["wall_time"] == 600.0
    assert json.loads(json.dumps(data)) == data


def test_to_yaml_uses_units_and_round_trips() -> None:
    """to_yaml writes sizes and durations with units and reads back as an equal policy."""
    text = Policy.default().to_yaml()
    assert "memory: 2GiB" in text and "wall_time: 10m" in text and "grace: 2s" in text
    odd = Policy.from_dict(
        {
            "name": "odd: name # with yaml characters",
            "agent": "é",
            "limits": {"memory": 1234, "file_size": "1GB", "wall_time": 1 / 3, "cpu_time": 61.5},
            "grace": 0,
            "env": {"inherit": False, "set": {"A": "yes", "B": "0755", "C": "", "D": "null"}},
            "audit": "~/audit.jsonl",
        }
    )
    assert odd.audit == AuditPolicy(path="~/audit.jsonl")
    again = Policy.from_yaml(odd.to_yaml())
    assert again == odd
    assert again.env.set == {"A": "yes", "B": "0755", "C": "", "D": "null"}


def test_sha256_is_canonical_json() -> None:
    """sha256 is the SHA-256 of the sorted, compact JSON of the effective policy."""
    policy = Policy.default()
    canonical = json.dumps(policy.to_dict(), sort_keys=True, separators=(",", ":"))
    assert policy.sha256() == hashlib.sha256(canonical.encode()).hexdigest()


def test_sha256_is_stable_and_follows_the_effective_policy() -> None:
    """sha256 ignores comments and spelling of units, and changes with a --set."""
    first = Policy.from_yaml("limits:\n  memory: 2GiB  # a comment\n")
    second = Policy.from_yaml(f"limits: {{memory: {2 * GiB}}}\n", source="other.yaml")
    assert first.sha256() == second.sha256() and first == second and hash(first) == hash(second)
    changed = first.with_overrides(["limits.memory=1GiB"])
    assert changed.sha256() != first.sha256()
    assert changed.with_overrides(["limits.memory=2GiB"]).sha256() == first.sha256()


def test_equality_ignores_the_source() -> None:
    """Policies are equal when they enforce the same thing, wherever they were read from."""
    assert Policy.default() == Policy.from_yaml(Policy.default().to_yaml(), source="x.yaml")
    assert Policy.default() != Policy.default().with_overrides(["name=other"])


# --- the budget section ------------------------------------------------------------------


def test_budget_section_is_exact() -> None:
    """Budget limits are whole counts and Decimal USD; prices are Decimal USD per million."""
    policy = Policy.from_yaml(
        textwrap.dedent(
            """\
            budget:
              run: {calls: 100, tokens: 1000000, usd: 5.10}
              daily: {usd: "$0.000001"}
              rate: {calls_per_minute: 60}
              pricing:
                my-local-model: {input: 0.10, output: 0.20, cached_input: 0.01}
              unknown_model: free
              timezone: Europe/Paris
            """
        )
    )
    budget = policy.budget
    assert budget is not None
    assert (budget.run.calls, budget.run.tokens, budget.run.usd) == (100, 10**6, Decimal("5.10"))
    assert budget.daily.usd == Decimal("0.000001") and budget.monthly.usd is None
    assert budget.pricing["my-local-model"].cached_input == Decimal("0.01")
    assert (budget.unknown_model, budget.alerts, budget.timezone) == (
        "free", [0.8, 0.9], "Europe/Paris"
    )  # fmt: skip
    assert Policy.from_yaml(policy.to_yaml()) == policy


def test_no_budget_section_means_no_budget() -> None:
    """A policy without budget has budget None (the default policy included)."""
    assert Policy.default().budget is None
    assert Policy.from_yaml("budget: null\n").budget is None


def test_budget_overrides_with_set() -> None:
    """--set reaches budget keys even when the policy has no budget; model names keep dots."""
    policy = Policy.default().with_overrides(
        ["budget.daily.usd=3", "budget.pricing.gpt-4.1={input: 2, output: 8}"]
    )
    assert policy.budget is not None and policy.budget.daily.usd == Decimal(3)
    assert policy.budget.pricing["gpt-4.1"].output == Decimal(8)
    assert set_problems("budget.daily.usd=lots") == [
        '--set budget.daily.usd=lots: "lots" is not an amount of money (try 5 or "$5")'
    ]


def test_store_urls() -> None:
    """SQLAlchemy-style sqlite URLs and redis/rediss URLs are accepted; others are not."""
    from supervisor.budget._policy import parse_store_url

    assert parse_store_url("sqlite:///rel/b.db") == ("sqlite", "rel/b.db")
    assert parse_store_url("sqlite:////abs/b.db") == ("sqlite", "/abs/b.db")
    assert parse_store_url("rediss://h:6380/1") == ("redis", "rediss://h:6380/1")
    for bad in ("postgres://x", "redis:///0", "sqlite://x"):
        with pytest.raises(ValueError):
            parse_store_url(bad)


def test_research_agent_policy_has_a_budget() -> None:
    """The shipped research-agent policy limits its spend per run, day and month."""
    budget = Policy.load(ROOT / "policies" / "research-agent.yaml").budget
    assert budget is not None and budget.run.usd == Decimal(5) and budget.daily.usd == Decimal(20)
