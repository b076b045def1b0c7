"""Service packages stay apart: one service never imports another's code.

A service is one process kind (DESIGN.md): what two services must agree on (wire
types, the KV contract, choice ids) lives in shared/, so a service can change its
insides without another one breaking. The supervisor is the one exception: it
starts every service, so it reads their config structs (``services.<x>.config``)
to print and hand out settings.

Imports are read with ``ast`` from every .py file, so a lazy import inside a
function counts as much as one at the top.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ROOT / "services"

def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            # ``from services import api`` imports the package api itself.
            if node.module == "services":
                found.update(f"services.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level > 1:
            raise AssertionError(f"{path}: relative import above its package; import absolutely")
    return found


def _cross_service_imports() -> dict[tuple[str, str], list[str]]:
    """(importer, imported) -> the lines that prove it, e.g. 'tts/dev_api.py: services.api.x'."""
    crossings: dict[tuple[str, str], list[str]] = {}
    for path in sorted(SERVICES.rglob("*.py")):
        owner = path.relative_to(SERVICES).parts[0]
        if owner.endswith(".py"):
            continue  # services/__init__.py belongs to no service
        for module in _imported_modules(path):
            parts = module.split(".")
            if parts[0] != "services" or len(parts) < 2 or parts[1] == owner:
                continue
            imported = parts[1]
            if owner == "supervisor" and parts[2:] == ["config"]:
                continue
            where = f"{path.relative_to(SERVICES)}: {module}"
            crossings.setdefault((owner, imported), []).append(where)
    return crossings


def test_no_service_imports_another_service() -> None:
    crossings = _cross_service_imports()
    assert not crossings, (
        "a service imports another service's code; move what both need to shared/: "
        + "; ".join(line for lines in crossings.values() for line in lines)
    )


def test_the_scan_sees_a_crossing() -> None:
    """The scan itself: the supervisor's config reads are found and allowed, and
    every service folder was read (a scan that reads nothing passes everything)."""
    owners = {p.relative_to(SERVICES).parts[0] for p in SERVICES.rglob("*.py")}
    assert {"api", "kvcache", "scheduler", "supervisor", "tokenizer", "tts", "worker"} <= owners
    launcher = _imported_modules(SERVICES / "supervisor" / "mesh_plan.py")
    assert any(m.startswith("services.") and m.endswith(".config") for m in launcher)


def test_api_and_tokenizer_start_without_torch() -> None:
    """Only the worker needs torch; the api and the tokenizer used to import it for
    a constant, costing each process a second and hundreds of MB at start."""
    code = (
        "import sys\n"
        "import services.api.__main__, services.api.service\n"
        "import services.tokenizer.__main__, services.tokenizer.service\n"
        "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not loaded, loaded[:5]\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
