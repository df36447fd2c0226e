"""The user install (`pip install -e .`) is lean: no Triton, test, GPU or TensorRT packages,
and everything a CPU user runs works without them; `.[dev]` is the contributors' install."""
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NOT_FOR_USERS = {"triton", "pytest", "hypothesis", "polygraphy", "tensorrt", "onnxruntime-gpu",
                 "datasets"}


def _names(requirements):
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in requirements}


def test_base_dependencies_leave_out_triton_test_and_gpu_packages():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not _names(project["dependencies"]) & NOT_FOR_USERS
    extras = {k: _names(v) for k, v in project["optional-dependencies"].items()}
    assert {"pytest", "hypothesis", "triton", "polygraphy"} <= extras["dev"]
    assert "triton" in extras["gpu"]


def test_readme_offers_the_lean_install_first():
    readme = (ROOT / "README.md").read_text()
    setup = readme[readme.index("## Set-up"):readme.index("## Run")]
    block = setup.split("```bash")[1].split("```")[0]
    assert "pip install -e .  " in block and ".[dev]" not in block
    assert '-e ".[dev]"' in setup and '-e ".[gpu]"' in setup


def test_a_cpu_user_runs_without_those_packages():
    """With triton, pytest, hypothesis, polygraphy, tensorrt and datasets made unimportable:
    the CLI's help, the CPU op, and the converter/exporter modules a user drives."""
    code = "\n".join([
        "import sys",
        *[f"sys.modules[{m!r}] = None" for m in ("triton", "pytest", "hypothesis", "polygraphy",
                                                "tensorrt", "datasets")],
        "import torch, lte_convert.plugins",
        "from lte_convert.cli import main",
        "import lte_convert.converter.checkpoint, lte_convert.exporters.onnx_export",
        "import lte_convert.exporters.validate, lte_convert.exporters.generate",
        "x, mask, w = torch.randn(2, 8), torch.ones(2, 2, dtype=torch.bool), torch.randn(8, 8)",
        "y = torch.ops.lte.sparse_ffn(x, mask, w, w, w, None, None, None, 4, 'silu')",
        "assert y.shape == (2, 8)",
        "main(['--help'])",
    ])
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Main job" in r.stdout
