"""`lte-convert --help`, each command's help and every option or path error answer without
importing torch, transformers or onnx (seconds each): the options and paths are checked before
any model or text loads. Timings: results/cli.md."""
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from lte_convert.cli import COMMANDS
from lte_convert.commands.options import source_literals
from lte_convert.default import glassllm_model_dir

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "onnx")
PROBE = """
import json, sys
from lte_convert.cli import main
code = 0
try:
    main(sys.argv[1:])
except SystemExit as e:
    code = e.code
print(json.dumps({"code": code, "heavy": sorted(m for m in %r if m in sys.modules)}))
""" % (HEAVY,)


def _cli(*args):
    """(exit code, heavy modules imported, stdout + stderr) of `lte-convert ARGS`."""
    r = subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], cwd=ROOT, timeout=120,
                       capture_output=True, text=True)
    lines = r.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    return result["code"], result["heavy"], "\n".join(lines[:-1]) + r.stderr


@pytest.mark.parametrize("args", [["--help"], ["--version"], *[[c, "--help"] for c in COMMANDS]],
                         ids=lambda a: " ".join(a))
def test_help_imports_no_torch(args):
    code, heavy, out = _cli(*args)
    assert code == 0 and heavy == [], (heavy, out)
    assert "Usage" in out or "version" in out


def test_option_errors_import_no_torch(tmp_path):
    model = glassllm_model_dir()
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    (no_tokenizer / "config.json").write_bytes((model / "config.json").read_bytes())
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    for f in model.iterdir():
        (truncated / f.name).write_bytes(f.read_bytes())
    weights = truncated / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    cases = [
        (["train", "--bogus"], "No such option"),
        (["export", "ckpt", "--out", "m.onnx", "--dtype", "fp64"], "fp64"),
        (["train", model, "--lr", "-1e-4"], "--lr must not be negative"),
        (["train", model, "--router-lr", "-1"], "--router-lr must not be negative"),
        (["train", model, "--expert-size", "400"], "larger than the model's FFN width (341"),
        (["train", model, "--out", a_file], "is a file, not a folder"),
        (["train", model, "--out", "/proc/lte-out"], "Cannot write the checkpoint folder"),
        (["train", no_tokenizer], "has no tokenizer files"),
        (["train", truncated], "model.safetensors is truncated"),
        (["train", model, "--batch-size", "0"], "--batch-size"),
        ([model, "--out", tmp_path / "m.onnx", "--checkpoint", a_file], "is a file, not a folder"),
        (["eval", model, "--sweep", "0.3,x"], "'x' in '0.3,x' is not a number"),
        (["eval", model, "--sweep", "0.3,1.5"], "'1.5' in '0.3,1.5'"),
        (["generate", tmp_path / "nothing", "--prompt", "hi"], "does not exist"),
        (["generate", a_file, "--prompt", "hi"], "neither an LTE checkpoint folder nor a .onnx"),
    ]
    for args, needle in cases:
        code, heavy, out = _cli(*args)
        text = " ".join(out.split())
        assert code == 2 and needle in text and "Traceback" not in text, (args, text)
        assert heavy == [], (args, heavy)


def test_defaults_read_from_source_are_the_imported_ones():
    from lte_convert.commands.bench import bench as bench_command
    from lte_convert.converter.train import CHOICES, TrainConfig
    from lte_convert.exporters.onnx_export import EXTERNAL_DATA_THRESHOLD
    from lte_convert.plugins import bench as plugins_bench
    from lte_convert.trt_plugins import builder

    literals = source_literals("lte_convert.converter.train", "TrainConfig")
    assert literals == {k: v for k, v in asdict(TrainConfig()).items() if k in literals}
    assert {"expert_size", "lr", "router_lr", "stage2_steps", "precision"} <= set(literals)
    assert source_literals("lte_convert.trt_plugins.builder")["DEFAULT_DIMS"] == \
        builder.DEFAULT_DIMS
    assert EXTERNAL_DATA_THRESHOLD == 2 * 1024**3 - 64 * 1024**2   # the help text's default
    assert source_literals("lte_convert.converter.train")["CHOICES"] == CHOICES
    bench_size = next(p for p in bench_command.params if p.name == "expert_size")
    assert bench_size.default == plugins_bench.EXPERT_SIZE    # a literal: plugins imports torch
