"""The library's import structure: no cycles between its modules, and no Ray, Hydra or peft on import."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "skipengine"


def imported_modules(path: Path) -> set[str]:
    """skipengine modules that `path` imports anywhere (TYPE_CHECKING blocks and functions included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "skipengine":
            found |= {f"skipengine.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("skipengine."):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("skipengine.")}
    return found


def test_library_modules_import_each_other_without_cycles():
    graph = {
        f"skipengine.{f.stem}": imported_modules(f) for f in PACKAGE.glob("*.py") if f.stem != "__init__"
    }
    assert "skipengine.engine" in graph["skipengine.search"]  # the walk sees imports at all
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, f"import cycle: {' -> '.join((*path, module))}"
        if module in done:
            return
        for dep in graph.get(module, ()):
            visit(dep, (*path, module))
        done.add(module)

    for module in graph:
        visit(module, ())


def test_importing_the_library_loads_no_ray_hydra_or_peft():
    loaded = "sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'hydra', 'peft'})"
    code = f"import sys, skipengine; print({loaded})"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
