"""The house's layers: each package of ``lopt`` imports only from layers below it, and ``lopt_kernels``
never imports ``lopt`` (docs/architecture.md). Read from the source (every import statement, also those
inside functions), so a lazy import cannot climb unnoticed."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Lowest first; a module may import its own layer (another file of its folder) and any layer below.
LAYERS = [
    {"errors"},
    {"settings"},
    {"data"},
    {"models"},
    {"measures"},
    {"config"},
    {"engine", "zo"},
    {"parallel", "planning"},
    {"training"},
    {"eval_command", "cli", "__init__", "__main__"},
]
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}


def _unit(module: str) -> str | None:
    """``lopt.training.trainer`` -> ``training``; ``lopt`` -> ``__init__``; outside lopt -> None."""
    parts = module.split(".")
    if parts[0] != "lopt":
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path, package: str) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.append(module)
            names += [f"{module}.{alias.name}" for alias in node.names if module == "lopt"]
    return names


def _lopt_modules():
    for path in sorted((ROOT / "lopt").rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        package = ".".join(parts if parts[-1] == "__init__" else parts[:-1])
        yield path, ".".join(p for p in parts if p != "__init__"), package


def test_every_lopt_module_is_in_a_layer():
    units = {_unit(module) for _, module, _ in _lopt_modules()}
    assert units <= set(RANK), f"modules outside every layer: {sorted(units - set(RANK))}"


@pytest.mark.parametrize("path,module,package", list(_lopt_modules()), ids=lambda v: str(v).split("/work/")[-1])
def test_imports_only_go_down(path, module, package):
    unit = _unit(module)
    upward = []
    for name in _imports(path, package):
        target = _unit(name)
        if target is not None and target in RANK and target != "__init__" and RANK[target] > RANK[unit]:
            upward.append(name)
    assert not upward, f"{module} ({unit}) imports upward: {upward}"


def test_kernels_never_import_lopt():
    for path in sorted((ROOT / "lopt_kernels").rglob("*.py")):
        names = _imports(path, "lopt_kernels")
        assert not [n for n in names if n == "lopt" or n.startswith("lopt.")], path
