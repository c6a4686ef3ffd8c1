"""The shape of the code: arrows between packages point one way, and each room imports only what it needs.

    cluster (the application: CLI, config, launching runs, predict)
      -> tune_search -> workers, serve_llm -> orchestration (coordinator, advice protocol, config checks)

Read from the source (AST of every module, function-level imports included), so a lazy import
cannot hide a cycle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cluster", "orchestration", "workers", "serve_llm", "tune_search")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(path: Path, *, module_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {package: set() for package in PACKAGES}
    for module, path in _modules().items():
        source = module.split(".")[0]
        for name in _imports(path):
            target = name.split(".")[0]
            if target in PACKAGES and target != source:
                graph[source].add(target)
    return graph


def test_no_cycle_between_top_level_packages() -> None:
    graph = package_graph()
    visiting: list[str] = []
    done: set[str] = set()

    def visit(package: str) -> None:
        if package in done:
            return
        assert package not in visiting, f"import cycle: {' -> '.join(visiting[visiting.index(package):] + [package])}"
        visiting.append(package)
        for target in sorted(graph[package]):
            visit(target)
        visiting.pop()
        done.add(package)

    for package in PACKAGES:
        visit(package)


def test_the_layers_are_the_documented_ones() -> None:
    graph = package_graph()
    assert graph["orchestration"] == set(), "the coordinator imports no other hybridtrain package"
    assert graph["workers"] <= {"orchestration"} and graph["serve_llm"] <= {"orchestration"}
    assert "cluster" not in set().union(*(targets for package, targets in graph.items() if package != "cluster"))


def test_workers_import_ray_only_where_ray_train_runs() -> None:
    """Worker modules stay importable (and unit-testable) without starting anything: Ray is imported
    inside the functions that use Ray Train or an actor handle, never at module level."""
    offenders = [module for module, path in _modules().items() if module.startswith("workers")
                 and any(name == "ray" or name.startswith("ray.") for name in _imports(path, module_level_only=True))]
    assert offenders == []


def _imported_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    output = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return set(output.split())


def test_the_training_loop_does_not_import_the_application() -> None:
    loaded = _imported_after("import workers.train_loop")
    assert not {name for name in loaded if name.split(".")[0] in ("cluster", "tune_search")}
    assert "orchestration.coordinator" not in loaded and "orchestration.actor" not in loaded


@pytest.mark.parametrize("module", ["orchestration.protocol", "orchestration.coordinator", "orchestration.settings"])
def test_the_coordinator_and_the_protocol_need_no_ray(module: str) -> None:
    loaded = _imported_after(f"import {module}")
    assert "ray" not in loaded and "torch" not in loaded


def test_tests_never_skip_on_the_projects_own_modules() -> None:
    """`pytest.importorskip` on our own code would turn a broken import into a silent skip."""
    for path in (ROOT / "tests").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "importorskip" and node.args:
                target = getattr(node.args[0], "value", "")
                assert str(target).split(".")[0] not in PACKAGES, f"{path.name} importorskips {target}"


def test_package_data_named_in_pyproject_exists() -> None:
    import tomllib

    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    for package, patterns in package_data.items():
        for pattern in patterns:
            assert list((ROOT / package).glob(pattern)), f"pyproject.toml names {package}/{pattern}, which matches nothing"


MAX_FUNCTION_LINES = 80
LONG_FUNCTIONS: dict[str, str] = {}  # "module:function" -> why it may be longer (none today)


def test_no_function_is_longer_than_about_80_lines() -> None:
    """A function that does not fit on a screen does more than one job; split it (or list it above, with why)."""
    long = {}
    for module, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES and f"{module}:{node.name}" not in LONG_FUNCTIONS:
                    long[f"{module}:{node.name}"] = lines
    assert long == {}
