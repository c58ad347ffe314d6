"""The codebase's layout rules: a torch-only core that imports no backend, no import from the library into the
launcher, no ``sys.path`` edits outside the tests, and nothing installed outside the ``blockllm_scale`` name."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "blockllm_scale"
CORE = ("__init__", "config", "interface", "optim", "parallel", "scoring", "selection", "states")
BACKEND_PACKAGES = ("deepspeed", "transformers", "accelerate", "datasets", "tokenizers", "bitsandbytes", "torchao",
                    "galore_torch", "badam", "yaml", "matplotlib")


def test_the_core_needs_torch_alone():
    """With every backend package made unimportable, the core imports and BlockLLM trains a step."""
    script = f"""
import sys
for name in {BACKEND_PACKAGES!r}:
    sys.modules[name] = None  # import fails
import torch
from blockllm_scale import BlockLLM, BlockLLMConfig
from blockllm_scale import config, interface, optim, parallel, scoring, selection, states
model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
opt = BlockLLM(model.named_parameters(), lr=1e-2, sparsity=0.5, patience=1, granularity="parameter")
for _ in range(3):
    loss = model(torch.randn(8, 4)).pow(2).mean()
    loss.backward()
    opt.record_loss(loss)
    opt.step()
    opt.zero_grad()
print("ok", sorted(n for n in sys.modules if n.split(".")[0] in {BACKEND_PACKAGES!r} and sys.modules[n] is not None))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok []"


def _imports(path: Path) -> list[str]:
    """Every module a file imports, relative imports resolved against its package."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found += [module] + [f"{module}.{alias.name}" for alias in node.names]
    return found


def test_the_core_imports_no_integration_and_no_launcher():
    for name in CORE:
        imported = _imports(PACKAGE / f"{name}.py")
        wrong = [m for m in imported if m.startswith(("blockllm_scale.integrations", "blockllm_scale.launcher",
                                                      "blockllm_scale.baselines", "blockllm_scale.benchmarks"))]
        assert not wrong, f"blockllm_scale/{name}.py imports {wrong}"


def test_the_integrations_do_not_import_the_launcher():
    for path in sorted((PACKAGE / "integrations").rglob("*.py")):
        wrong = [m for m in _imports(path) if m.startswith("blockllm_scale.launcher")]
        assert not wrong, f"{path.relative_to(REPO)} imports {wrong}"


def test_no_sys_path_edits_outside_the_tests():
    offenders = []
    for path in sorted(REPO.rglob("*.py")):
        relative = path.relative_to(REPO)
        if relative.parts[0] in ("tests", ".git") or any(part.startswith(".") or part in ("build", "runs")
                                                          for part in relative.parts):
            continue
        if "sys.path" in path.read_text():
            offenders.append(str(relative))
    assert offenders == []


def test_everything_is_installed_under_blockllm_scale():
    """baselines/ and benchmarks/ are installed as blockllm_scale.baselines / .benchmarks: no top-level
    `baselines` (a PyPI package of that name exists) or `benchmarks` module in site-packages."""
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert all(p == "blockllm_scale" or p.startswith("blockllm_scale.") for p in setuptools["packages"])
    assert setuptools["package-dir"] == {"blockllm_scale.baselines": "baselines",
                                         "blockllm_scale.benchmarks": "benchmarks"}


def test_a_checkout_on_the_path_imports_the_namespaced_folders_without_installing():
    """The GPU scripts put the checkout on PYTHONPATH instead of installing it: blockllm_scale/baselines and
    blockllm_scale/benchmarks are links to the folders beside the package, so the same names resolve there."""
    for name in ("baselines", "benchmarks"):
        link = PACKAGE / name
        assert link.is_symlink() and link.resolve() == REPO / name
    script = """
import sys
sys.meta_path = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]  # no installed finder
import blockllm_scale.baselines, blockllm_scale.benchmarks.grid
print(blockllm_scale.baselines.BASELINES["adamw"].__name__)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "build_adamw"


def test_the_core_dependencies_are_torch_numpy_tqdm():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert sorted(d.split(">")[0].split("=")[0] for d in project["dependencies"]) == ["numpy", "torch", "tqdm"]
