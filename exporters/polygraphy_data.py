"""A Polygraphy data loader for the files `lte-convert export` writes: valid decoder inputs.

Polygraphy's own inputs give every dynamic axis the length 1 and draw values from [0, 1], so
attention_mask (past + new tokens) does not match past_key_values and ONNX Runtime stops with
a GatherND index error. This loader reads the file's inputs and yields, per batch size:

    no KV cache   input_ids [B, S] (ids in [4, vocab)), attention_mask [B, S] of ones
    KV cache      prefill: input_ids [B, S], attention_mask [B, S], position_ids 0..S-1,
                           past_key_values.{i}.key/value [B, kv_heads, 0, head_dim] (empty)
                  decode:  input_ids [B, 1], attention_mask [B, S+1], position_ids [[S]],
                           past of length S (random, consistent with the mask)

with B = 1 and 2, S = 5 (inside `lte-convert build`'s default engine profile). Use it as

    polygraphy run model.onnx --onnxrt --data-loader-script "$(python -m lte_convert.exporters.polygraphy_data)"

Polygraphy's own random inputs also run once the shapes agree (past length 0 here):

    polygraphy run model.onnx --onnxrt $(python -m lte_convert.exporters.polygraphy_data --input-shapes model.onnx)

The file is the `.onnx` on Polygraphy's command line, or $LTE_ONNX when there is none (an
engine: `polygraphy run model.plan --model-type engine --trt ...` with LTE_ONNX=model.onnx).
Needs numpy and onnx only (an engine built by `lte-convert build` carries its plugin kernels
and needs no Python plugin code).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

SEQ = 5
BATCHES = (1, 2)
_FLOATS = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16,
           TensorProto.DOUBLE: np.float64}


def model_path() -> Path:
    """$LTE_ONNX, else the first existing `.onnx` argument of the running command."""
    env = os.environ.get("LTE_ONNX")
    if env:
        return Path(env)
    for arg in sys.argv[1:]:
        if arg.endswith(".onnx") and Path(arg).is_file():
            return Path(arg)
    raise SystemExit("lte_convert.exporters.polygraphy_data: no .onnx file on the command line; "
                     "set LTE_ONNX=path/to/model.onnx (the file the engine was built from).")


def feeds(path) -> list[dict[str, np.ndarray]]:
    """The feed dicts for the file at `path` (see the module doc), in order."""
    proto = onnx.load(str(path), load_external_data=False)
    meta = {p.key: p.value for p in proto.metadata_props}
    vocab = int(meta.get("lte.vocab_size", 5))
    inputs = {i.name: i.type.tensor_type for i in proto.graph.input}
    past = [(name, t) for name, t in inputs.items() if name.startswith("past_key_values.")]
    gen = np.random.default_rng(0)
    out = []
    for B in BATCHES:
        ids = gen.integers(min(4, vocab - 1), vocab, (B, SEQ), dtype=np.int64)
        if not past:
            out.append({"input_ids": ids, "attention_mask": np.ones((B, SEQ), np.int64)})
            continue
        for length, step in ((0, ids), (SEQ, ids[:, -1:])):
            S = step.shape[1]
            feed = {"input_ids": step,
                    "attention_mask": np.ones((B, length + S), np.int64),
                    "position_ids": np.tile(np.arange(length, length + S), (B, 1))}
            for name, t in past:
                heads, head_dim = (d.dim_value for d in (t.shape.dim[1], t.shape.dim[3]))
                x = 0.1 * gen.standard_normal((B, heads, length, head_dim))
                feed[name] = x.astype(_FLOATS.get(t.elem_type, np.float32))
            out.append(feed)
    return out


def load_data():
    """Polygraphy's entry point (--data-loader-script FILE, function name load_data)."""
    yield from feeds(model_path())


def input_shapes(path, batch: int = 1, seq: int = 4) -> list[str]:
    """Polygraphy's `--input-shapes NAME:[dims] ...` for one prefill with an empty past."""
    proto = onnx.load(str(path), load_external_data=False)
    args = []
    for i in proto.graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else
                {"batch": batch, "past_seq": 0}.get(d.dim_param, seq)
                for d in i.type.tensor_type.shape.dim]
        args.append(f"{i.name}:[{','.join(map(str, dims))}]")
    return ["--input-shapes", *args]


if __name__ == "__main__":
    if sys.argv[1:2] == ["--input-shapes"] and len(sys.argv) == 3:
        print(" ".join(input_shapes(sys.argv[2])))
    else:
        print(Path(__file__).resolve())
