"""`polygraphy run --onnxrt` on exported files, with the shipped data loader and without."""
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest

from lte_convert.exporters import polygraphy_data

POLYGRAPHY = [sys.executable, "-c", "import sys; from polygraphy.tools import main; "
              "sys.exit(main())"]


@pytest.fixture(scope="module")
def files(derived_chain):
    """Falcon (multi-query: 1 KV head) with and without KV cache, from the chain test."""
    chain = derived_chain("falcon")
    return {True: chain["result"]["export"]["path"], False: chain["plain"]["path"]}


def _polygraphy(*args):
    r = subprocess.run([*POLYGRAPHY, "run", *map(str, args)], capture_output=True, text=True,
                       timeout=300)
    return r.returncode, r.stdout + r.stderr


@pytest.mark.parametrize("kv", [True, False])
def test_polygraphy_runs_the_file_with_the_data_loader(files, kv):
    code, out = _polygraphy(files[kv], "--onnxrt", "--data-loader-script",
                            polygraphy_data.__file__)
    assert code == 0 and "PASSED" in out, out
    assert ("past_key_values.0.key" in out) == kv


def test_polygraphy_own_inputs_run_with_consistent_shapes(files):
    shapes = polygraphy_data.input_shapes(files[True])
    assert "past_key_values.0.key:[1,1,0,16]" in shapes
    code, out = _polygraphy(files[True], "--onnxrt", *shapes)
    assert code == 0 and "PASSED" in out, out
    code, out = _polygraphy(files[False], "--onnxrt")           # no cache: runs unchanged
    assert code == 0 and "PASSED" in out, out


def test_feeds_are_a_prefill_and_its_decode_step(files):
    """The decode feed continues the prefill: same mask/position bookkeeping as generate."""
    sess = ort.InferenceSession(files[True])
    feeds = polygraphy_data.feeds(files[True])
    assert len(feeds) == 4
    prefill, decode = feeds[2], feeds[3]                  # batch 2
    assert prefill["past_key_values.0.key"].shape == (2, 1, 0, 16)
    assert decode["past_key_values.0.key"].shape == (2, 1, 5, 16)
    assert decode["attention_mask"].shape == (2, 6)
    assert decode["position_ids"].tolist() == [[5], [5]]
    for feed in feeds:
        logits = sess.run(["logits"], feed)[0]
        assert logits.shape[:2] == feed["input_ids"].shape and np.isfinite(logits).all()


def test_script_prints_its_path_and_shapes(files):
    run = [sys.executable, "-m", "lte_convert.exporters.polygraphy_data"]
    path = subprocess.run(run, capture_output=True, text=True, check=True).stdout.strip()
    assert path == polygraphy_data.__file__
    shapes = subprocess.run([*run, "--input-shapes", files[False]], capture_output=True,
                            text=True, check=True).stdout.split()
    assert shapes == ["--input-shapes", "input_ids:[1,4]", "attention_mask:[1,4]"]
