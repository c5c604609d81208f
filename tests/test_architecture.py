"""docs/ARCHITECTURE.md stays true: the modules it names exist, every module is named there, the
import rules it states hold (imports parsed with ast, lazy ones included), and its checklist for
a new reduction method names things that are defined where it says."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
PACKAGES = ("reducers", "spaces", "search")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: dict[str, Path] = {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}
MODULES["run_search"] = ROOT / "run_search.py"


def _imported(path: Path) -> set[str]:
    """Every dotted name `path` imports (`from a import b` gives a.b), at any depth of the file."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
    return names


def _internal(name: str) -> str | None:
    """The tokensched module a dotted import name refers to (its longest known prefix)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


# module -> the tokensched modules it imports; module -> the top-level packages it imports
GRAPH = {m: {i for n in _imported(p) if (i := _internal(n)) and i != m} for m, p in MODULES.items()}
EXTERNAL = {m: {n.split(".")[0] for n in _imported(p)} for m, p in MODULES.items()}


def _under(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def test_every_path_named_exists() -> None:
    named = set(re.findall(r"\b(?:run_search\.py|(?:reducers|spaces|search|tests|bench|docs)/[\w./]*\w/?)", DOC))
    assert len(named) > 40
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"docs/ARCHITECTURE.md names paths that do not exist: {missing}"


def test_every_module_is_named() -> None:
    unnamed = sorted(str(p.relative_to(ROOT)) for p in MODULES.values()
                     if p.name != "__init__.py" and f"`{p.relative_to(ROOT)}`" not in DOC)
    assert not unnamed, f"modules without a job in docs/ARCHITECTURE.md: {unnamed}"


def _breaking(rule) -> list[str]:  # type: ignore[no-untyped-def]
    return sorted(f"{m} imports {', '.join(sorted(bad))}" for m in MODULES if (bad := rule(m)))


RULES = {
    "1 reducers: no search, only the schedule data of spaces": lambda m: _under(m, "reducers") and {
        i for i in GRAPH[m] if _under(i, "search") or (_under(i, "spaces") and i not in ("spaces.schedule", "spaces.model_spec"))},
    "2 spaces: no reducers or search, no torch, timm or Ray": lambda m: _under(m, "spaces") and (
        {i for i in GRAPH[m] if _under(i, "reducers", "search")} | (EXTERNAL[m] & {"torch", "timm", "ray"})),
    "3 timm: only reducers/patch.py of reducers and spaces": lambda m: (
        _under(m, "reducers", "spaces") and m != "reducers.patch" and EXTERNAL[m] & {"timm"}),
    "4 evaluation, data, models, fine-tuning, report, config, outcome, embedded: no Optuna or Ray": lambda m: _under(
        m, "search.evaluate", "search.data", "search.models", "search.finetune", "search.report", "search.config",
        "search.outcome", "search.embedded",
    ) and EXTERNAL[m] & {"optuna", "ray"},
    "5 embedded: nothing else of tokensched": lambda m: _under(m, "search.embedded") and {
        i for i in GRAPH[m] if not _under(i, "search.embedded") and i != "search"},
    "6 cli: imported by run_search.py only": lambda m: not _under(m, "search.cli", "run_search") and {
        i for i in GRAPH[m] if _under(i, "search.cli")},
    "8 driver: imported by the command line only": lambda m: not _under(m, "search.cli", "search.driver") and (
        GRAPH[m] & {"search.driver"}),
}


@pytest.mark.parametrize("rule", list(RULES))
def test_import_rule_holds(rule: str) -> None:
    assert f"{rule.split()[0]}. " in DOC.split("## What may import what")[1]  # the rule is the doc's
    assert not _breaking(RULES[rule]), _breaking(RULES[rule])


def test_no_import_cycle() -> None:
    """Rule 7: no circle anywhere (spaces.schedule and spaces.presets once imported each other)."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []
    cycles: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for imported in sorted(GRAPH[module]):
            if state.get(imported) == 1:
                cycles.append(" -> ".join([*stack[stack.index(imported):], imported]))
            elif imported not in state:
                visit(imported)
        stack.pop()
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)
    assert not cycles, cycles


def _defined(path: Path) -> set[str]:
    """Names a file defines: functions, classes, assigned names, and methods (bare and Class.method)."""
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        for target in node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]:
            names |= {t.id for t in ast.walk(target) if isinstance(t, ast.Name)} if target is not None else set()
        if isinstance(node, ast.ClassDef):
            methods = {f.name for f in node.body if isinstance(f, ast.FunctionDef)}
            names |= methods | {f"{node.name}.{f}" for f in methods}
    return names


def test_checklist_names_what_is_defined_where_it_says() -> None:
    checklist = DOC.split("## Adding a reduction method")[1]
    items = re.split(r"\n(?=\d+\. )", checklist.strip())
    assert len(items) == 8
    for item in items:
        quoted = re.findall(r"`([^`]+)`", item)
        files = [ROOT / q for q in quoted if q.endswith(".py") and "<" not in q]
        defined = set().union(*(_defined(f) for f in files)) if files else set()
        names = [q for q in quoted if re.fullmatch(r"[A-Za-z_][\w.]*", q) and not q.endswith(".py")]
        missing = [n for n in names if n not in defined]
        assert not missing, f"{item.splitlines()[0]}: {missing} not defined in {[str(f.relative_to(ROOT)) for f in files]}"
