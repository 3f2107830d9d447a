"""The package's layers: which sub-package may import which, no import cycles, a torch-free artifact layer.

The rules are docs/architecture.md's diagram written as data. Imports are read from the source
(every `import` / `from ... import`, module level and inside functions), so a lazy import counts too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "tome_deploy"

# Modules directly under tome_deploy/ that everything may use.
BASE = {
    "tome_deploy",
    "tome_deploy.errors",
    "tome_deploy.input_files",
    "tome_deploy.output_files",
    "tome_deploy.preprocess",
}

# layer -> the layers it may import (besides itself and BASE). Lower layers never import higher ones.
ALLOWED = {
    "artifact": set(),
    "core": {"artifact"},
    "token_merge": {"artifact", "core"},  # artifact/onnx_file.py's loader, core.merge's Match and one-hot adder
    "models": {"artifact", "core"},
    "runtime": {"artifact", "token_merge"},
    "onnx_export": {"artifact", "core", "models"},
    "tensorrt": {"artifact", "runtime", "token_merge"},
    "validation": {"artifact", "runtime"},
    "quality": {"artifact", "core", "runtime"},
    "viz": {"artifact", "core", "models"},
    "serving": {"artifact", "runtime", "tensorrt"},
    "jobs": {
        "artifact",
        "core",
        "models",
        "onnx_export",
        "quality",
        "runtime",
        "tensorrt",
        "token_merge",
        "validation",
        "viz",
    },
    "cli": {
        "artifact",
        "core",
        "jobs",
        "models",
        "onnx_export",
        "quality",
        "runtime",
        "serving",
        "tensorrt",
        "token_merge",
        "validation",
        "viz",
    },
}


def module_name(path: Path, root: Path = PACKAGE_ROOT) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, root: Path = PACKAGE_ROOT) -> set[str]:
    """Every tome_deploy module `path` imports (a `from X import name` of a submodule counts as X.name)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            found.add(source)
            found.update(f"{source}.{alias.name}" for alias in node.names)
    modules = {module_name(p, root) for p in root.rglob("*.py")}
    return {m for m in found if m in modules and m != name}


def layer_of(module: str) -> str:
    return "base" if module in BASE else module.split(".")[1]


@pytest.fixture(scope="module")
def import_graph() -> dict[str, set[str]]:
    return {module_name(p): imported_modules(p) for p in PACKAGE_ROOT.rglob("*.py")}


def test_every_module_sits_in_a_known_layer(import_graph):
    unknown = sorted(m for m in import_graph if layer_of(m) not in ALLOWED and layer_of(m) != "base")
    assert not unknown, f"modules outside the layers of ALLOWED: {unknown}; add it to the rules and the docs"


def test_lower_layers_never_import_higher_ones(import_graph):
    violations = []
    for module, imports in import_graph.items():
        layer = layer_of(module)
        for target in imports:
            target_layer = layer_of(target)
            if target_layer in ("base", layer):
                continue
            if layer == "base" or target_layer not in ALLOWED[layer]:
                violations.append(f"{module} -> {target}")
    assert not violations, "imports against the layer rules:\n" + "\n".join(sorted(violations))


def test_no_import_cycles(import_graph):
    # Tarjan's strongly connected components: any component with more than one module is a cycle.
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in import_graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(import_graph):
        if module not in index:
            visit(module)
    assert not cycles, f"import cycles: {cycles}"


def test_the_checker_sees_a_violation(tmp_path):
    """The rules above can fail: a core module that imports the CLI and serving is reported."""
    root = tmp_path / "tome_deploy"
    for name in (
        "__init__.py",
        "core/__init__.py",
        "cli/__init__.py",
        "cli/common.py",
        "serving/__init__.py",
        "serving/app.py",
    ):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).touch()
    offender = root / "core" / "bad.py"
    offender.write_text("from tome_deploy.cli.common import say\n\ndef f():\n    from ..serving import app\n")
    imports = imported_modules(offender, root)
    assert imports == {"tome_deploy.cli.common", "tome_deploy.serving", "tome_deploy.serving.app"}
    assert all(layer_of(target) not in ALLOWED["core"] for target in imports)


@pytest.mark.parametrize(
    "module",
    [
        "tome_deploy.artifact",
        "tome_deploy.artifact.metadata",
        "tome_deploy.artifact.spec",
        "tome_deploy.artifact.sidecar",
        "tome_deploy.artifact.onnx_file",
    ],
)
def test_artifact_layer_imports_neither_torch_nor_timm(module):
    code = (
        f"import sys, {module}\n"
        "heavy = sorted(m for m in ('torch', 'timm', 'torchvision') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_listing_every_merge_formulation_imports_no_torch():
    """artifact/formulations.py imports the built-in formulation modules (core/formulations.py,
    token_merge/formulation.py) by module path, which the import scan above cannot see: listing them, as
    `tome-export --help` and metadata readers do, must pull in neither torch nor any layer's torch code."""
    code = (
        "import sys\n"
        "from tome_deploy.artifact.formulations import all_formulations\n"
        "assert [f.name for f in all_formulations()] == ['scatter', 'matmul', 'plugin']\n"
        "heavy = sorted(m for m in ('torch', 'timm', 'onnx', 'tome_deploy.core.merge') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
