"""The module import graph of the library: every import (module-level or inside a function) goes down the floors,
never up or sideways into another room of the same floor (so the graph of rooms has no cycle); Hydra stays in the
launcher; no library file is over 500 lines."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Rooms from the ground floor up. A room is a subpackage or module of ``mmembed`` (``datamodules/`` and
#: ``callbacks/`` install as ``mmembed.datamodules`` / ``mmembed.callbacks``). The ``report`` modules that read no store
#: (statistics, tables, plots: room ``report-core``) sit on the ground floor because the tracking package's sweep
#: summary uses them; the rest of ``report`` reads MLflow through ``tracking``.
REPORT_CORE = {"report.stats", "report.plots", "report.markdown", "report.sweeps"}
#: The files an exported folder carries for other libraries (``integrations.export``) import nothing of the kit and
#: are written by ``Embedder.save_pretrained``; the adapters that wrap an Embedder (sentence-transformers, mteb) sit
#: above it.
INTEGRATIONS_CORE = {"integrations.export"}
FLOORS: list[set[str]] = [
    {"prompts", "types", "errors", "memory", "pipeline", "rankparts", "report-core", "integrations-core", "logs",
     "matryoshka", "_offline"},
    {"data"},
    {"backbone"},
    {"losses", "embedder"},
    {"reranker", "cli_args", "index", "tracking", "datamodules"},
    {"modules", "mining", "serve"},
    {"judge"},
    {"eval"},
    {"callbacks", "report", "integrations"},
    {"launch"},
]
ROOT_NAMES = {"Embedder": "embedder", "Reranker": "reranker", "Item": "types"}  # mmembed/__init__.py's lazy names


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] != "mmembed":
        parts = ["mmembed", *parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _room(module: str) -> str | None:
    """The room of ``mmembed.a.b...``: ``report.stats``-style rooms first, then the first part."""
    parts = module.split(".")[1:]
    if not parts:
        return None
    if ".".join(parts[:2]) in REPORT_CORE:
        return "report-core"
    return "integrations-core" if ".".join(parts[:2]) in INTEGRATIONS_CORE else parts[0]


def _floor(room: str) -> int:
    for i, rooms in enumerate(FLOORS):
        if room in rooms:
            return i
    raise AssertionError(f"room {room!r} is on no floor: add it to FLOORS in tests/test_layers.py")


def _imports(path: Path) -> list[tuple[str, int]]:
    """``(imported mmembed module, line)`` of every import in a file, however deep in a function."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.startswith("mmembed")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "mmembed":
                out += [(f"mmembed.{ROOT_NAMES.get(a.name, a.name)}", node.lineno) for a in node.names]
            elif node.module.startswith("mmembed."):
                out.append((node.module, node.lineno))
    return out


def _files() -> list[Path]:
    return sorted(p for d in ("mmembed", "datamodules", "callbacks") for p in (ROOT / d).rglob("*.py"))


def test_no_import_runs_up_or_sideways():
    bad = []
    for path in _files():
        src = _room(_module(path))
        if src is None:  # mmembed/__init__.py: its lazy names point at the floors below everything
            continue
        for target, line in _imports(path):
            dst = _room(target)
            if dst is None or dst == src:
                continue
            if _floor(dst) >= _floor(src):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target} ({src} floor {_floor(src)} -> "
                           f"{dst} floor {_floor(dst)})")
    assert not bad, "\n".join(bad)


def test_floors_catch_an_upward_import(tmp_path):
    """The check itself: a data module importing the judge would be reported."""
    fake = ROOT / "mmembed" / "data" / "x.py"
    assert _floor(_room(_module(fake))) < _floor(_room("mmembed.judge.curate"))
    assert _room("mmembed.report.stats") == "report-core" and _room("mmembed.report.tables") == "report"


def test_hydra_is_imported_only_by_the_launcher():
    users = []
    for path in _files():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
        if any(n == "hydra" or n.startswith("hydra.") for n in names):
            users.append(_module(path))
    assert users and all(u.startswith("mmembed.launch") for u in users), users


def test_no_library_file_is_over_500_lines():
    long = {str(p.relative_to(ROOT)): n for p in _files() if (n := len(p.read_text().splitlines())) > 500}
    assert not long, long
