"""Installs: the main job (``make demo``) needs the runtime dependencies only, never torch.

Cheap stand-ins for building a clean venv: what ``make demo`` would run, the runtime
dependency closure as installed here, and the main job's code with torch made unimportable.
"""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[(]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _closure(requirements: list[str]) -> set[str]:
    """Every distribution these requirements pull in (no extras), as installed here."""
    seen, todo = set(), [_name(r) for r in requirements]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        todo += [_name(r) for r in requires if "extra ==" not in r]
    return seen


def test_make_demo_installs_the_runtime_only_and_make_test_adds_the_extras():
    def commands(*target: str) -> str:
        result = subprocess.run(
            ["make", "-n", "-B", *target], cwd=REPO, capture_output=True, text=True, check=True
        )
        return result.stdout

    demo = commands("demo")
    assert "pip install --quiet -e '.'" in demo and "[test]" not in demo
    assert "-e '.[test]'" in commands("test")
    assert "-e '.[gpu]'" in commands("demo", "GPU=1")


def test_runtime_dependencies_reach_tensorboard_but_not_torch():
    runtime = PYPROJECT["project"]["dependencies"]
    closure = _closure(runtime)
    assert "tensorboard" in closure and "jax" in closure
    assert "torch" not in closure, "a runtime dependency pulls in torch"
    assert any(_name(r) == "torch" for r in PYPROJECT["project"]["optional-dependencies"]["test"])
    assert PYPROJECT["project"]["optional-dependencies"]["gpu"] == ["jax[cuda12]>=0.8,<0.11"]


NO_TORCH = """
import importlib.util, sys
real_find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, package=None: (
    None if name.split('.')[0] == 'torch' else real_find_spec(name, package))
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] == 'torch':
            raise ModuleNotFoundError(f'No module named {name!r}', name=name)
sys.meta_path.insert(0, NoTorch())
import research.cli, research.demo, research.eval.evaluate, research.eval.ablate
from research import assets
from research.data import tokenizers
from research.models import hf
tokenizers.gpt2_tokenizer(); tokenizers.encoder_tokenizer()
hf.load_pretrained(assets.minilm_folder())
print('ok', 'torch' in sys.modules)
"""


def test_main_job_code_runs_without_torch():
    result = subprocess.run(
        [sys.executable, "-c", NO_TORCH], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok False")
