"""The package's shape: public names, the error tree, reprs, the import graph, module sizes."""

from __future__ import annotations

import ast
import copy
import inspect
import pickle
import re
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from rpc_helpers import Ledger, serving

import supervisor
from supervisor import client, errors

PACKAGE = Path(supervisor.__file__).parent
README = PACKAGE.parent / "README.md"

# The documented API besides the errors: what README's "Python API" imports (Supervisor,
# Policy), the classes a run hands to users (RunResult; Violation, to on_violation and in
# RunResult.violation; Usage, as RunResult.usage) and Workspace (Workspace.check_write).
DOCUMENTED = {"Policy", "RunResult", "Supervisor", "Usage", "Violation", "Workspace"}

# What a child can meet: raised by supervisor.client (the ledger's UnknownModel and
# UnknownReservation reach the child as an RpcError: invalid params).
CHILD_ERRORS = {
    "BudgetError",
    "BudgetExceeded",
    "NotSupervised",
    "RateLimited",
    "RpcError",
    "SupervisorError",
    "UsageMissing",
}

MAX_LINES = 500
MAX_LINES_SUPERVISOR = 400
EXEMPT_FROM_SIZE = {"_reaper.c"}


def error_classes() -> dict[str, type[errors.SupervisorError]]:
    """Every exception class supervisor.errors defines (walked, not listed); all in one tree."""
    found = {}
    for name, value in vars(errors).items():
        mine = isinstance(value, type) and value.__module__ == errors.__name__
        if mine and issubclass(value, BaseException):
            assert issubclass(value, errors.SupervisorError), f"{name} is outside the tree"
            found[name] = value
    return found


# -- public names ----------------------------------------------------------------------


def test_all_is_sorted_and_complete() -> None:
    """supervisor.__all__ is sorted and is exactly the errors plus the documented API."""
    assert supervisor.__all__ == sorted(supervisor.__all__)
    expected = set(error_classes()) | DOCUMENTED | {"__version__"}
    assert set(supervisor.__all__) == expected
    readme = README.read_text()
    assert re.search(r"^from supervisor import Supervisor, Policy$", readme, re.MULTILINE)
    for name in DOCUMENTED - {"Usage"}:
        assert re.search(rf"`[^`]*\b{name}\b[^`]*`", readme), f"README never names {name}"
    assert type(supervisor.RunResult("r", None, None, []).usage) is supervisor.Usage


def test_every_public_name_resolves_to_its_own_object() -> None:
    """Each name of __all__ loads lazily from its module and is the object defined there."""
    for name in supervisor.__all__:
        value = getattr(supervisor, name)
        if name.startswith("__"):
            continue
        assert value.__name__ == name
        assert value.__module__.startswith("supervisor.")
    assert dir(supervisor) == sorted(supervisor.__all__)
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        _ = supervisor.Nope


def test_client_all_is_sorted_complete_and_has_the_child_errors() -> None:
    """client.__all__ is sorted, names every public thing in it (httpx style), and every
    error the child can meet, each the very class supervisor.errors defines."""
    assert client.__all__ == sorted(client.__all__)
    public = {
        name
        for name, value in vars(client).items()
        if not name.startswith("_")
        and not inspect.ismodule(value)
        and name not in {"TYPE_CHECKING", "annotations"}
    }
    assert set(client.__all__) == public
    assert set(client.__all__) >= CHILD_ERRORS
    for name in CHILD_ERRORS:
        assert getattr(client, name) is getattr(errors, name)


# -- the error tree --------------------------------------------------------------------


def drawn_tree() -> dict[str, tuple[str | None, int]]:
    """errors.py's docstring tree: each class's drawn parent and exit status (inherited
    from the parent when its line names none)."""
    assert errors.__doc__ is not None
    drawn: dict[str, tuple[str | None, int]] = {}
    stack: list[tuple[int, str, int]] = []  # (column, name, exit) of the open branches
    for line in errors.__doc__.splitlines():
        found = re.search(r"([A-Z][A-Za-z]+)\s", line + " ")
        if found is None or not (line.startswith("    ") and found.group(1) in error_classes()):
            continue
        column, name = found.start(1), found.group(1)
        while stack and stack[-1][0] >= column:
            stack.pop()
        parent = stack[-1] if stack else None
        status = re.search(r"\bexit (\d+)", line)
        if status is not None:
            code = int(status.group(1))
        else:
            assert parent is not None, f"the root {name} must say its exit status"
            code = parent[2]
        drawn[name] = (parent[1] if parent else None, code)
        stack.append((column, name, code))
    return drawn


def test_the_drawn_tree_is_true() -> None:
    """Every error is drawn in errors.py's docstring under its real base class."""
    drawn = drawn_tree()
    assert set(drawn) == set(error_classes())
    for name, cls in error_classes().items():
        base = None if cls is errors.SupervisorError else cls.__bases__[0].__name__
        assert drawn[name][0] == base, name


def test_each_exit_status_matches_its_docstrings() -> None:
    """exit_code is what the tree draws, and what the class docstring says where it says one."""
    drawn = drawn_tree()
    for name, cls in error_classes().items():
        assert cls.exit_code == drawn[name][1], name
        said = re.search(r"\bexit (\d+)", cls.__doc__ or "")
        if said is not None:
            assert cls.exit_code == int(said.group(1)), name
    assert errors.BudgetError.exit_code == 124  # a refusal is not supervise failing (125)
    assert errors.StoreUnavailable.exit_code == 125  # SPEC: "store unreachable"


def sample_errors() -> Iterator[errors.SupervisorError]:
    """One instance of every error class, with every field set to something not default."""
    yield errors.SupervisorError("boom", hint="do less")
    yield errors.PolicyError(["p.yaml:3 limits.memory: bad"], source="p.yaml")
    yield errors.SpawnError("cannot start", step="landlock", errno=1)
    yield errors.CommandNotFound("no such command: nope", step="exec", errno=2)
    yield errors.CommandNotExecutable("not executable: ./x", step="exec", errno=13)
    yield errors.AuditError("the audit log is full", hint="free space")
    yield errors.WorkspaceError("no Landlock")
    yield errors.HelperError("no C compiler", hint="install cc")
    yield errors.StoreUnavailable("redis://h:1/0", "connection refused")
    yield errors.BudgetError("refused")
    yield errors.BudgetExceeded("daily", "usd", Decimal("4.5"), Decimal(1), Decimal(5), key="k")
    yield errors.RateLimited("calls_per_minute", 61, 60, 0.25)
    yield errors.UnknownModel("gpt-9", "openai")
    yield errors.UnknownReservation("h-42")
    yield errors.NotSupervised("SUPERVISE_RPC_FD is not set", hint="run this under supervise")
    yield errors.RpcError("budget RPC error -32602", code=-32602, data={"why": "bad"})
    yield errors.UsageMissing("no usage in the response")


def same_error(a: BaseException, b: BaseException) -> None:
    """``a`` is ``b`` again: same class, arguments, message and fields."""
    assert type(a) is type(b)
    assert (a.args, str(a), vars(a)) == (b.args, str(b), vars(b))


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_every_error_survives_pickle_with_its_fields(protocol: int) -> None:
    """Each error class pickles (every protocol) and copies back with its fields and message."""
    samples = list(sample_errors())
    assert {type(e).__name__ for e in samples} == set(error_classes())  # none left out
    for error in samples:
        same_error(pickle.loads(pickle.dumps(error, protocol)), error)
        same_error(copy.copy(error), error)
        same_error(copy.deepcopy(error), error)


def test_a_real_budget_exceeded_pickles_with_its_charge(tmp_path: Path) -> None:
    """BudgetExceeded from a real ledger (spend written past a limit) pickles with the charge."""
    from supervisor.budget._policy import BudgetPolicy
    from supervisor.budget.ledger import Ledger as RealLedger

    policy = BudgetPolicy.model_validate(
        {"pricing": {"m": {"input": 1, "output": 2}}, "run": {"tokens": 10}}
    )
    ledger = RealLedger.open(
        policy, store=f"sqlite:///{tmp_path}/b.db", run_id="r1", agent="bot", session="s1"
    )
    try:
        with pytest.raises(errors.BudgetExceeded) as info:
            ledger.record(model="m", input_tokens=8, output_tokens=8)
    finally:
        ledger.close()
    error = info.value
    assert error.charge is not None
    back = pickle.loads(pickle.dumps(error))
    same_error(back, error)
    assert back.charge == error.charge and back.charge.tokens == 16


def test_an_error_from_the_rpc_pickles() -> None:
    """The BudgetExceeded a child gets over the RPC pickles back equal (e.g. to a pool's parent)."""
    with (
        serving(Ledger(tokens=10)) as s,
        client.Budget(s.server.child_fd) as b,
        pytest.raises(client.BudgetExceeded) as info,
    ):
        b.reserve("m", input_tokens=5, max_output_tokens=50)
    same_error(pickle.loads(pickle.dumps(info.value)), info.value)
    assert info.value.limit_value == 10


# -- reprs -----------------------------------------------------------------------------


def test_budget_and_reservation_have_readable_reprs(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Budget shows its run, agent, fd and state; a Reservation its id, hold and fate."""
    monkeypatch.setenv("SUPERVISE_RUN_ID", "run-1")
    monkeypatch.setenv("SUPERVISE_AGENT", "bot")
    with serving(Ledger()) as s:
        b = client.Budget(s.server.child_fd)
        fd = s.server.child_fd
        assert repr(b) == f"<Budget run_id='run-1' agent='bot' fd={fd} attached>"
        r = b.reserve("m", input_tokens=10, max_output_tokens=20)
        assert repr(r) == "<Reservation 'r1' usd_held=0.000030 tokens_held=30 held>"
        r.commit(input_tokens=10, output_tokens=5)
        assert repr(r) == "<Reservation 'r1' usd_held=0.000030 tokens_held=30 committed>"
        with b.reserve("m", max_output_tokens=1) as r2:
            pass
        assert repr(r2).endswith(" released>")
        assert repr(b.step("search")) == "<Step 'search'>"
        b.close()
        assert repr(b) == f"<Budget run_id='run-1' agent='bot' fd={fd} not attached>"


# -- the import graph ------------------------------------------------------------------


def module_names(root: Path, package: str) -> dict[str, Path]:
    """Every module of the package under ``root``: dotted name -> file."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join([package, *parts])] = path
    return names


def top_level_nodes(tree: ast.Module) -> Iterator[ast.AST]:
    """The statements that run on import: all but function bodies (class bodies, if/try/
    with blocks, ``if TYPE_CHECKING:`` included, since a type checker follows those)."""
    todo: list[ast.AST] = list(tree.body)
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            continue
        todo.extend(ast.iter_child_nodes(node))


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module -> the package's modules it imports when imported (lazy imports left out)."""
    modules = module_names(root, package)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        here = name if is_package else name.rpartition(".")[0]  # the package it is in
        for node in top_level_nodes(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = here.split(".")
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = []
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else base)  # a submodule, or a name
            else:
                continue
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected group of modules (Tarjan), as a path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    found = []
    for group in groups:
        start = min(group)
        paths = {start: [start]}  # breadth-first, inside the group, back to start
        todo = [start]
        while todo:
            v = todo.pop(0)
            for w in sorted(graph[v] & group):
                if w == start:
                    found.append([*paths[v], start])
                    todo = []
                    break
                if w not in paths:
                    paths[w] = [*paths[v], w]
                    todo.append(w)
    return sorted(found)


def test_the_package_has_no_import_cycle() -> None:
    """No module of supervisor/ imports itself back through others when imported.

    Counted: every import that runs on import, at module level, in class bodies and under
    ``if TYPE_CHECKING:``. Left out: imports inside functions, which run later, when the
    modules are loaded; that is how a module reaches one that imports it, or a heavy one.
    """
    found = cycles(import_graph(PACKAGE, "supervisor"))
    assert not found, "import cycles: " + "; ".join(" -> ".join(c) for c in found)


def test_the_import_walker_finds_cycles_and_skips_lazy_imports(tmp_path: Path) -> None:
    """The walker resolves relative and absolute imports, finds a cycle through a package and
    TYPE_CHECKING, and ignores an import inside a function."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text(
        "TYPE_CHECKING = False\nif TYPE_CHECKING:\n    from ..c import X\n"
    )
    (pkg / "c.py").write_text("import pkg.a\n\ndef f():\n    from . import d\n")
    (pkg / "d.py").write_text("from pkg import c\n")
    graph = import_graph(pkg, "pkg")
    assert graph["pkg.a"] == {"pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.c"}
    assert graph["pkg.c"] == {"pkg.a"} and graph["pkg.d"] == {"pkg.c"}
    assert cycles(graph) == [["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]]


def test_client_instrument_and_metered_do_not_import_each_other() -> None:
    """client, instrument and _metered share _rpc_client: no circle even through lazy imports."""
    lazy: dict[str, set[str]] = {}
    for name in ("client", "instrument", "_metered", "_rpc_client"):
        tree = ast.parse((PACKAGE / f"{name}.py").read_text())
        lazy[name] = set()
        for node in ast.walk(tree):  # every import, in functions too
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                names = [node.module] if node.module else [a.name for a in node.names]
                lazy[name].update(names)
    assert "instrument" not in lazy["_metered"] | lazy["_rpc_client"]
    assert "client" not in lazy["instrument"] | lazy["_metered"] | lazy["_rpc_client"]
    assert lazy["_rpc_client"] <= {"_jsonrpc", "errors"}


# -- sizes -----------------------------------------------------------------------------


def line_counts() -> dict[str, int]:
    """Lines of each source module under supervisor/ (Python, Lua, C), by relative path."""
    counts = {}
    for path in sorted(PACKAGE.rglob("*")):
        if path.suffix in {".py", ".lua", ".c"} and path.name not in EXEMPT_FROM_SIZE:
            counts[str(path.relative_to(PACKAGE))] = len(path.read_text().splitlines())
    return counts


def test_no_module_is_over_500_lines() -> None:
    """Every module of supervisor/ (the C helper aside) has at most 500 lines."""
    over = {name: n for name, n in line_counts().items() if n > MAX_LINES}
    assert not over, f"over {MAX_LINES} lines: {over}"


def test_supervisor_py_is_orchestration_only() -> None:
    """supervisor/supervisor.py, the run's orchestration, has at most 400 lines."""
    assert line_counts()["supervisor.py"] <= MAX_LINES_SUPERVISOR
