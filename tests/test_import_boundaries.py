"""Import boundaries: pages never import torch, and the model layer knows no web.

Every module of the package is found by walking it (pkgutil), so a new module
is checked without being listed here; only the modules allowed to import torch
are listed, by name.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import pkgutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The modules that may import torch: the model layer, the precompute job, live encoding's torch side and
# search by meaning's fast scan.
MODEL_LAYER = {
    "clipscope_explorer.precompute.model.checkpoints",
    "clipscope_explorer.precompute.model.encode",
    "clipscope_explorer.precompute.model.intervene",
    "clipscope_explorer.precompute.model.sae",
    "clipscope_explorer.precompute.model.text",
    "clipscope_explorer.precompute.model.vision",
}
JOB = {
    "clipscope_explorer.precompute.accumulate",
    "clipscope_explorer.precompute.demo.build",
    "clipscope_explorer.precompute.demo.fit",
    "clipscope_explorer.precompute.demo.scenes",
    "clipscope_explorer.precompute.demo.train_clip",
    "clipscope_explorer.precompute.distributed",
    "clipscope_explorer.precompute.evaluate.checkpoint_measures",
    "clipscope_explorer.precompute.evaluate.checkpoints",
    "clipscope_explorer.precompute.evaluate.faithfulness",
    "clipscope_explorer.precompute.evaluate.index_model",
    "clipscope_explorer.precompute.evaluate.occlusion",
    "clipscope_explorer.precompute.finalize",
    "clipscope_explorer.precompute.job",
    "clipscope_explorer.precompute.neighbours",
    "clipscope_explorer.precompute.prototypes",
    "clipscope_explorer.precompute.run_state",
    "clipscope_explorer.precompute.sources",
    "clipscope_explorer.precompute.tables",
    "clipscope_explorer.precompute.workdir",
}
LIVE_ENCODER = {"clipscope_explorer.app.live.encoder"}
MEANING_SCAN = {"clipscope_explorer.app.meaning.torch_scan"}  # imported once the text tower has loaded torch
TORCH_SIDE = MODEL_LAYER | JOB | LIVE_ENCODER | MEANING_SCAN

WEB = ("fastapi", "starlette", "uvicorn", "jinja2", "multipart", "clipscope_explorer.app")

# Imports each module named in argv in turn; prints the first one after which torch is loaded.
FIRST_TO_LOAD_TORCH = """
import importlib, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
    if "torch" in sys.modules:
        print(name)
        break
"""


def package_modules() -> list[str]:
    """Every module of the installed package: each folder pyproject.toml maps into it that holds code
    (templates and static files do not), walked recursively (`__main__` modules run a program when
    imported, so they are left out)."""
    roots = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    names = set()
    for root in filter(importlib.util.find_spec, roots):
        package = importlib.import_module(root)
        names.add(root)
        names.update(info.name for info in pkgutil.walk_packages(package.__path__, f"{root}.", onerror=_reraise))
    return sorted(name for name in names if not name.endswith(".__main__"))


def _reraise(name: str) -> None:
    raise  # a package that fails to import would otherwise be skipped, its modules unchecked


def first_to_load_torch(modules: list[str]) -> str:
    result = subprocess.run(
        [sys.executable, "-c", FIRST_TO_LOAD_TORCH, *modules], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_the_torch_side_is_listed_by_real_module_names():
    modules = set(package_modules())
    assert TORCH_SIDE <= modules, sorted(TORCH_SIDE - modules)
    assert {
        "clipscope_explorer.cli",
        "clipscope_explorer.app.main",
        "clipscope_explorer.app.pages.features",
        "clipscope_explorer.app.live.service",
        "clipscope_explorer.precompute.index.store",
    } <= modules


def test_no_module_outside_the_torch_side_imports_torch():
    """Pages, the server, the CLI and the index code import in a fresh interpreter without torch."""
    torch_free = [name for name in package_modules() if name not in TORCH_SIDE]
    culprit = first_to_load_torch(torch_free)
    assert culprit == "", f"importing {culprit} loads torch: move the import behind the live encoder"


def test_the_probe_sees_torch_arrive_with_the_live_encoder():
    """The check above can fail: the live encoder is the torch side, and importing it loads torch."""
    assert first_to_load_torch(["clipscope_explorer.app.live.service", "clipscope_explorer.app.live.encoder"]) == (
        "clipscope_explorer.app.live.encoder"
    )


def imported_names(path: Path, module: str) -> set[str]:
    """Every module an `import` statement in the file names, at any depth (inside functions too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = module.rsplit(".", node.level)[0] + "." if node.level else ""
            names.add(base + (node.module or ""))
    return names


def test_the_model_layer_knows_no_web():
    model = importlib.import_module("clipscope_explorer.precompute.model")
    modules = [info for info in pkgutil.iter_modules(model.__path__)]
    assert {f"{model.__name__}.{info.name}" for info in modules} >= MODEL_LAYER
    for info in modules:
        name = f"{model.__name__}.{info.name}"
        web = sorted(n for n in imported_names(Path(model.__path__[0]) / f"{info.name}.py", name) if n.startswith(WEB))
        assert web == [], f"{name} imports {web}"
    code = (
        "import importlib, pkgutil, sys\n"
        "import clipscope_explorer.precompute.model as model\n"
        "for info in pkgutil.iter_modules(model.__path__):\n"
        "    importlib.import_module(f'{model.__name__}.{info.name}')\n"
        f"print(sorted(m for m in sys.modules if m.startswith({WEB!r})))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"importing the model layer loads {result.stdout.strip()}"
