"""The package's folders are stages (importance -> selection -> engines -> integrations -> CLI); a stage may
import from its own or a lower stage, never from a higher one, and no two modules import each other."""

import ast
from pathlib import Path

import sparsepeft

ROOT = Path(sparsepeft.__file__).parent
# Deliberate upward calls, each with its reason.
ALLOWED = {("sparsepeft.selection.probe", "sparsepeft.engines"): "IRD's probe criterion scores a candidate mask by "
           "training it a few steps with the reference engine"}
STAGE = {"utils": 0, "data": 0, "models": 1, "adapters": 1, "importance": 2, "selection": 3, "engines": 4,
         "integrations": 5, "experiments": 6, "cli": 7}


def _imports(path: Path) -> set[str]:
    """Dotted sparsepeft modules ``path`` imports (relative imports resolved), wherever in the file."""
    package = path.relative_to(ROOT.parent).with_suffix("").parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1]
            target = ".".join(base + tuple(filter(None, [node.module])))
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sparsepeft"):
            found.add(node.module)
    return found


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(ROOT.parent).with_suffix("").parts): p for p in ROOT.rglob("*.py")}


def test_no_stage_imports_a_higher_stage():
    violations = []
    for name, path in _modules().items():
        parts = name.split(".")
        if len(parts) < 3 or parts[1] not in STAGE:
            continue
        for target in _imports(path):
            stage = target.split(".")[1] if target.count(".") else None
            allowed = any(name == a and target.startswith(b) for a, b in ALLOWED)
            if stage in STAGE and STAGE[stage] > STAGE[parts[1]] and not allowed:
                violations.append(f"{name} imports {target}")
    assert not violations, "\n".join(sorted(violations))


def test_no_two_modules_import_each_other():
    modules = _modules()
    edges = {name: {t for t in _imports(path) if t in modules and t != name} for name, path in modules.items()}
    mutual = sorted({tuple(sorted((a, b))) for a, targets in edges.items() for b in targets
                     if a in edges.get(b, ()) and not a.endswith("__init__") and not b.endswith("__init__")})
    assert not mutual, mutual
