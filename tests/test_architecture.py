"""Dependencies flow one way and every module imports on its own: no import cycle, hidden or not."""

from __future__ import annotations

import ast
import os
import re
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


# ------------------------------------------------------------------------------- no model patched at run time
#: methods of a model that surgvqa changes only by subclassing (backbones/<family>/modeling.py), never by assigning
#: to an instance (patched bound methods break under torch.compile, FSDP wrapping and PEFT's own wrappers)
#: (nor by re-classing an instance: ``obj.__class__ = Subclass`` is a patch of every method at once)
_MODEL_METHODS = re.compile(r"^(forward|generate|get_rope_index|get_\w+_features|__class__)$")
#: forward hooks outside surgvqa/backbones/common/, each with its reason (none needed today)
ALLOWED_HOOKS: dict[str, str] = {}


def runtime_patches(source: str, path: str) -> list[str]:
    """``path:line`` of every assignment (or ``setattr``) to an instance's forward / generate / get_*_features /
    get_rope_index / __class__ and, outside backbones/common/, every forward (pre-)hook registration in ``source``."""
    found = []
    in_common = path.replace(os.sep, "/").startswith("surgvqa/backbones/common/")
    for node in ast.walk(ast.parse(source, filename=path)):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
            targets = [node.target]
        for target in targets:
            for part in ast.walk(target):
                if isinstance(part, ast.Attribute) and _MODEL_METHODS.match(part.attr):
                    found.append(f"{path}:{node.lineno}: assigns .{part.attr}")
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if (isinstance(func, ast.Name) and func.id == "setattr" and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant) and _MODEL_METHODS.match(str(node.args[1].value))):
            found.append(f"{path}:{node.lineno}: setattr {node.args[1].value}")
        if (isinstance(func, ast.Attribute) and func.attr in ("register_forward_pre_hook", "register_forward_hook")
                and not in_common and path not in ALLOWED_HOOKS):
            found.append(f"{path}:{node.lineno}: {func.attr}")
    return found


def test_the_finder_sees_every_kind_of_patch():
    source = ("model.forward = f\nm.thinker.generate, x = g, 1\nsetattr(m, 'get_video_features', h)\n"
              "owner.get_rope_index = r\nhead.register_forward_pre_hook(k)\nself.forward_count = 1\n"
              "def forward(self): pass\nthinker.__class__ = Sub\n")
    assert sorted(runtime_patches(source, "surgvqa/x.py")) == [
        "surgvqa/x.py:1: assigns .forward", "surgvqa/x.py:2: assigns .generate",
        "surgvqa/x.py:3: setattr get_video_features", "surgvqa/x.py:4: assigns .get_rope_index",
        "surgvqa/x.py:5: register_forward_pre_hook", "surgvqa/x.py:8: assigns .__class__"]
    assert runtime_patches("head.register_forward_pre_hook(k)\n", "surgvqa/backbones/common/x.py") == []


def test_no_model_method_is_patched_at_run_time():
    found = []
    for file in sorted((REPO / "surgvqa").rglob("*.py")):
        path = str(file.relative_to(REPO))
        found += runtime_patches(file.read_text(), path)
    assert found == [], "\n".join(found)


def _model_types() -> set[str]:
    from surgvqa.backbones import BACKBONES
    from surgvqa.backbones.qwen_vl_whisper.constants import VL_CLASSES

    return {*BACKBONES, *(f"{name}_thinker" for name in BACKBONES), *VL_CLASSES}


def named_model_types(source: str, path: str, model_types: set[str]) -> list[str]:
    """String constants equal to a family's model_type: a dispatch on the family outside ``backbones/``."""
    return [f"{path}:{node.lineno}: {node.value!r}" for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in model_types]


def test_the_model_type_finder_sees_a_dispatch():
    source = 'if config["model_type"] in ("qwen2_5_omni", "qwen2_vl"):\n    """qwen2_5_omni: docs may name it"""\n'
    assert named_model_types(source, "x.py", _model_types()) == ["x.py:1: 'qwen2_5_omni'", "x.py:1: 'qwen2_vl'"]


def test_family_knowledge_stays_in_backbones():
    """Only ``surgvqa/backbones/`` compares against (or maps) a family's model_type; stages ask a ``Backbone``."""
    model_types = _model_types()
    found = []
    for file in sorted((REPO / "surgvqa").rglob("*.py")):
        if "backbones" not in file.relative_to(REPO / "surgvqa").parts:
            found += named_model_types(file.read_text(), str(file.relative_to(REPO)), model_types)
    assert found == [], "\n".join(found)
