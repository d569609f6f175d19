"""Dependencies flow one way and every module imports on its own: no import cycle, hidden or not."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Each module is imported first, in a fresh surgvqa state (every surgvqa module dropped from sys.modules before the
# next one), so a cycle that only works in one import order fails here. Third-party modules stay loaded: one
# interpreter for the whole package instead of one per module.
_FRESH_IMPORTS = r"""
import importlib, pkgutil, sys, traceback
import surgvqa

names = sorted(m.name for m in pkgutil.walk_packages(surgvqa.__path__, "surgvqa.") if not m.name.endswith("__main__"))
failed = []
for name in names:
    for loaded in [m for m in sys.modules if m == "surgvqa" or m.startswith("surgvqa.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception:
        failed.append(f"{name}:\n{traceback.format_exc()}")
print(f"imported {len(names)} modules: {' '.join(names)}")
if failed:
    print("\n".join(failed))
    sys.exit(1)
"""


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def test_every_module_imports_first_in_a_fresh_state():
    result = subprocess.run([sys.executable, "-c", _FRESH_IMPORTS], capture_output=True, text=True, cwd=REPO,
                            env=_env(), timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    imported = result.stdout.split(":", 1)[1].split()
    assert {"surgvqa.run_config", "surgvqa.backbones.qwen2_5_omni", "surgvqa.checkpoint", "surgvqa.train"} <= set(
        imported)


def test_import_contracts_of_pyproject_hold():
    """The layers and acyclic contracts in pyproject.toml (import-linter reads function-local imports too)."""
    code = ("from importlinter.cli import lint_imports; "
            "raise SystemExit(lint_imports(config_filename='pyproject.toml', no_cache=True, no_logo=True))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=_env(),
                            timeout=300)
    assert "No module named 'importlinter'" not in result.stderr, "install the dev extra: pip install -e '.[dev]'"
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout
