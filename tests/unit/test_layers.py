"""The layout is the architecture: a module imports from its own layer and the layers
below it (state <- node <- dataplane <- observe/runtimes/dns <- daemon/cli), never upwards.
Read from the source with ast, so a lazy import inside a function counts too."""
import ast
from pathlib import Path

import pytest

CTL = Path(__file__).resolve().parents[2] / "ctl"
# rank of each layer; errors/logs/output are shared utilities below everything
RANK = {"errors": 0, "logs": 0, "output": 0, "defaults": 0, "launch": 0, "state": 1, "node": 2, "dataplane": 3,
        "observe": 4, "runtimes": 4, "dns": 4, "daemon": 5, "cli": 5}


def layer_of(module: str) -> str:
    return module.split(".")[1]


def imported_modules(path: Path) -> set[str]:
    package = ["ctl", *path.relative_to(CTL).with_suffix("").parts[:-1]]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] if node.module or node.level == 0 else [f"{mod}.{a.name}" for a in node.names]
            out.update(t for t in targets if t.startswith("ctl."))
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("ctl."))
    return out


MODULES = sorted(p for p in CTL.rglob("*.py") if p.name != "__init__.py" or p.parent != CTL)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(CTL)))
def test_imports_only_from_own_layer_or_below(path):
    own = layer_of("ctl." + ".".join(path.relative_to(CTL).with_suffix("").parts))
    upward = [m for m in imported_modules(path) if RANK[layer_of(m)] > RANK[own]]
    assert not upward, f"{path.relative_to(CTL)} ({own}) imports from a layer above it: {upward}"


def test_every_top_level_entry_has_a_layer():
    entries = {p.stem for p in CTL.iterdir() if p.suffix == ".py" and p.stem != "__init__"}
    entries |= {p.name for p in CTL.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert entries <= set(RANK), f"unranked: {entries - set(RANK)}"
