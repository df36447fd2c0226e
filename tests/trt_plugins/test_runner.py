"""trt_plugins/runner.py as `lte-convert validate --engine`'s backend, where TensorRT is missing
(the engine itself is exercised in test_engine.py on GPU machines)."""
import importlib.util

import pytest

from lte_convert.cli import main
from lte_convert.errors import UserError
from lte_convert.trt_plugins.runner import EngineRunner

pytestmark = pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None,
                                reason="TensorRT is installed: this checks the message without it")


def test_runner_without_tensorrt_says_how_to_install(tmp_path):
    with pytest.raises(UserError, match=r"TensorRT is not installed.*pip install 'tensorrt-cu12>=10\.9'"):
        EngineRunner(tmp_path / "model.plan")


def test_validate_engine_without_tensorrt_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["validate", str(tmp_path / "m.onnx"), "--reference", str(tmp_path),
              "--engine", str(tmp_path / "m.plan")])
    err = " ".join(capsys.readouterr().err.split())
    assert e.value.code == 2 and "TensorRT is not installed" in err and "ONNX Runtime" in err
