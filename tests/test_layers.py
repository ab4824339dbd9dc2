"""The layer picture of docs/design.md holds: no package imports a package above it, bench is
imported by nothing but its command, and the CLI skin imports no model library."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "orstack"

# Lowest first; a module may import from its own layer or below (docs/design.md, Layout).
LAYERS = [
    {"__init__", "errors", "console", "runtime", "stats"},
    {"io"},
    {"tasks", "backends"},
    {"train", "layerwise", "architectures", "gates", "plan"},
    {"tiny", "vocab_trim", "cluster_failures", "teachers", "distill", "prune", "awq", "gguf", "zstd_pack", "rl",
     "merge", "route"},
    {"bench"},
    {"commands"},
    {"cli", "__main__"},
]
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}


def _top(module_path: Path) -> str:
    rel = module_path.relative_to(ROOT)
    return rel.parts[0].removesuffix(".py")


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every orstack import in a file, wherever it is (function bodies too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names if node.module == "orstack"]
            found.extend((node.lineno, n) for n in names)
        elif isinstance(node, ast.Import):
            found.extend((node.lineno, a.name) for a in node.names)
    return found


def _orstack_package(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "orstack" and len(parts) > 1 else None


MODULES = sorted(p for p in ROOT.rglob("*.py"))


def test_every_package_has_a_layer():
    unknown = {_top(p) for p in MODULES} - set(LAYER_OF)
    assert not unknown, f"packages missing from LAYERS (and docs/design.md): {sorted(unknown)}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_imports_a_layer_above_it(path):
    mine = LAYER_OF[_top(path)]
    upward = [f"line {line}: {module}" for line, module in _imports(path)
              if (pkg := _orstack_package(module)) in LAYER_OF and LAYER_OF[pkg] > mine]
    assert not upward, f"{path.relative_to(ROOT)} imports from a higher layer: {upward}"


def test_bench_is_imported_only_by_its_command():
    importers = sorted(str(p.relative_to(ROOT)) for p in MODULES if _top(p) != "bench"
                       and any(_orstack_package(m) == "bench" for _, m in _imports(p)))
    assert importers == ["commands/bench.py"]


def test_commands_import_no_model_library():
    heavy = ("torch", "transformers", "peft", "trl", "llama_cpp", "numpy")
    offenders = [f"{p.name}:{line} {m}" for p in (ROOT / "commands").glob("*.py") for line, m in _imports(p)
                 if m.split(".")[0] in heavy]
    assert not offenders, f"the CLI skin imports model libraries: {offenders}"


# Environment the library may touch, each for a reason a setting cannot serve.
ENVIRONMENT_ALLOWED = {
    "console.py": "the terminal's width (COLUMNS) for stderr tables",
    "teachers/http.py": "the API key, from the variable the user names: a secret must not travel in configs",
    "backends/openai.py": "the API key, from the variable the user names: a secret must not travel in configs",
    "tasks/sandbox.py": "the environment handed to sandboxed children",
    "tasks/confine.py": "the allow-list of variables a sandboxed program may see, picked from the environment and "
                        "set in the confined worker (everything else is scrubbed)",
    "cluster_failures/embed.py": "HF_HUB_OFFLINE for the sentence-transformers loader (set, not read)",
    "zstd_pack/load.py": "the unpack cache ($ORSTACK_CACHE): shared by every process that opens a .orz, as a cache "
                         "directory is (XDG_CACHE_HOME), not a setting of one run",
}


def test_only_the_cli_reads_the_environment():
    readers = []
    for path in MODULES:
        rel = str(path.relative_to(ROOT))
        if _top(path) in ("cli", "__main__") or rel in ENVIRONMENT_ALLOWED:
            continue
        text = path.read_text(encoding="utf-8")
        for needle in ("os.environ", "os.getenv", "sys.argv"):
            if needle in text:
                readers.append(f"{rel}: {needle}")
    assert not readers, f"library code reads the environment: {readers}"
