"""The `lte.SparseFFN` op: the one source of its names, inputs, attributes and layout.

`plugins/` (PyTorch custom op, CPU and Triton kernels), `exporters/` (ONNX nodes and their
function bodies) and `trt_plugins/` (TensorRT plugins) all import from here.

Semantics, for x [..., d], boolean mask m [..., E], expert size s, F = E·s:

    gated:     h = act(x·W_gateᵀ + b_gate) ⊙ (x·W_upᵀ + b_up)      # [..., F]
    non-gated: h = act(x·W_upᵀ + b_up)
               h = h ⊙ repeat_interleave(m, s)                       # skipped experts give 0
               y = h·W_downᵀ + b_down = h·W_down_t + b_down          # [..., d]

Weight layout (what the kernels want): expert e owns rows e·s … e·s+s−1 of W_gate [F, d],
W_up [F, d] and W_down_t [F, d] (W_down stored transposed), so a skipped expert is one
skipped contiguous block in all three. All tensors are contiguous, row-major. W_gate and W_up
may lie in one [2, F, d] storage (`gate_up_pair`; a folded LTEFFN keeps them so): kernels
that can then compute both with one GEMM do, the others see two ordinary tensors.

The full op is one call in PyTorch (`torch.ops.lte.sparse_ffn`). In ONNX and TensorRT it is
a pair of nodes, because a TensorRT AOT plugin may launch one kernel only and gets no
workspace: `SparseFFNUp` computes the masked h (in the model dtype) and `SparseFFNDown`
computes y from it. Both read the same mask.

`SparseFFNUp` has one fixed input list for gated and non-gated FFNs (TensorRT plugins take
a fixed number of inputs): a non-gated FFN passes W_up and b_up again in the W_gate and
b_gate slots and sets `gated=0`; the kernel then never reads them. Biases are always
inputs: an FFN without biases gets zero vectors (F or d elements, negligible next to the
weights).

Numerics, one rule for every implementation (reference, CPU, Triton at every token count,
ONNX function bodies, TensorRT plugins): gate, up and the down product accumulate in fp32
and are never rounded to the model dtype; biases are added in fp32; h is rounded to the model
dtype once, between up and down (as a dense Hugging Face MLP stores it), and y once, at the
end. Two implementations then differ only by fp32 summation order: in fp16/bf16, h within one
rounding of the reference (tests/plugins).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

NAMESPACE = "lte"
OP = "SparseFFN"                  # the whole FFN (PyTorch: torch.ops.lte.sparse_ffn)
OP_UP = "SparseFFNUp"             # ONNX / TensorRT: x, mask -> masked h
OP_DOWN = "SparseFFNDown"         # ONNX / TensorRT: h, mask -> y
OP_VERSION = 1
KERNEL_OPS = {OP_UP: "up", OP_DOWN: "down"}   # ONNX / TensorRT op -> its kernel (launch_config)

# Activations, by the names used in attributes, and the int code the kernels (Triton's
# ACTIVATION constexpr) and TensorRT plugins receive. Each maps to the torch function the
# reference applies; `gelu` is the exact erf form, `gelu_tanh` the tanh approximation.
ACTIVATION_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3}
ACTIVATIONS = tuple(ACTIVATION_CODES)

# Model dtypes by their short name (--dtype, Triton pointer types, TensorRT plugin fields).
DTYPE_BY_NAME = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPES = tuple(DTYPE_BY_NAME.values())
SHORT_NAMES = {dtype: name for name, dtype in DTYPE_BY_NAME.items()}       # -> "fp16"
# Long names: ONNX metadata, and the attribute names of torch, numpy and tensorrt dtypes.
LONG_NAMES = {dtype: str(dtype).removeprefix("torch.") for dtype in DTYPES}  # -> "float16"
DTYPE_BY_LONG_NAME = {name: dtype for dtype, name in LONG_NAMES.items()}
# ONNX element types (onnx.TensorProto.FLOAT, FLOAT16, BFLOAT16), without importing onnx.
ONNX_ELEM_TYPES = {torch.float32: 1, torch.float16: 10, torch.bfloat16: 16}
MASK_DTYPE = torch.bool

# Input names, in order. Every node/plugin/kernel uses exactly this order.
UP_INPUTS = ("x", "mask", "w_gate", "w_up", "b_gate", "b_up")
UP_OUTPUTS = ("h",)
DOWN_INPUTS = ("h", "mask", "w_down_t", "b_down")
DOWN_OUTPUTS = ("y",)

# Attributes: name -> python type. ONNX INT attributes reach TensorRT plugins as int32.
UP_ATTRS = {"expert_size": int, "activation": str, "gated": int}
DOWN_ATTRS = {"expert_size": int}

# TensorRT's ONNX parser maps a node to a plugin when op_type == plugin name and the node
# has this string attribute equal to the plugin namespace.
PLUGIN_NAMESPACE_ATTR = "plugin_namespace"


def qualified(op: str) -> str:
    """'SparseFFNUp' -> 'lte::SparseFFNUp' (torch.library and tensorrt.plugin spelling)."""
    return f"{NAMESPACE}::{op}"


@dataclass(frozen=True)
class FFNShape:
    """Static description of one sparse FFN: what an exporter or plugin needs to know."""

    d: int                 # model (hidden) size
    d_ff: int              # F = n_experts * expert_size (padded if the original was not)
    expert_size: int
    activation: str
    gated: bool

    def __post_init__(self):
        assert self.activation in ACTIVATIONS, self.activation
        assert self.d_ff % self.expert_size == 0, (self.d_ff, self.expert_size)

    @property
    def n_experts(self) -> int:
        return self.d_ff // self.expert_size

    def up_attrs(self) -> dict:
        return {"expert_size": self.expert_size, "activation": self.activation,
                "gated": int(self.gated)}

    def down_attrs(self) -> dict:
        return {"expert_size": self.expert_size}


def check_inputs(x, mask, w_gate, w_up, w_down_t, b_gate, b_up, b_down, expert_size):
    """Validate the full op's inputs; raise ValueError naming expected and actual values.

    Shared by every implementation so the same bad input gets the same message.
    w_gate/b_gate may be None (non-gated); biases may be None.
    """
    def fail(what):
        raise ValueError(f"lte.SparseFFN: {what}")

    if x.dtype not in DTYPES:
        fail(f"x has dtype {x.dtype}; expected one of {', '.join(map(str, DTYPES))}.")
    if mask.dtype != MASK_DTYPE:
        fail(f"mask has dtype {mask.dtype}; expected torch.bool (compute it as router_logits > 0).")
    if not isinstance(expert_size, int) or expert_size <= 0:
        fail(f"expert_size must be a positive int, got {expert_size!r}.")
    d = x.shape[-1]
    if w_up.dim() != 2:
        fail(f"w_up must be 2-D [F, d], got shape {tuple(w_up.shape)}.")
    F = w_up.shape[0]
    if F % expert_size:
        fail(f"w_up has {F} rows, not a multiple of expert_size={expert_size}.")
    E = F // expert_size
    if mask.shape[:-1] != x.shape[:-1] or mask.shape[-1] != E:
        fail(f"mask has shape {tuple(mask.shape)}; expected {tuple(x.shape[:-1]) + (E,)} "
             f"(x's leading dims, then F/expert_size = {F}/{expert_size} experts).")
    expected = {"w_up": (F, d), "w_gate": (F, d), "w_down_t": (F, d),
                "b_up": (F,), "b_gate": (F,), "b_down": (d,)}
    tensors = {"w_up": w_up, "w_gate": w_gate, "w_down_t": w_down_t,
               "b_up": b_up, "b_gate": b_gate, "b_down": b_down}
    check_weights(tensors, expected, mask, x, "x", fail)


def check_weights(tensors: dict, expected: dict, mask, ref, ref_name: str, fail):
    """Weights (name -> tensor or None) against expected shapes and the activation `ref`:
    same dtype and device, contiguous; the mask on ref's device. Calls fail(message)."""
    for name, t in tensors.items():
        if t is None:
            continue
        if tuple(t.shape) != expected[name]:
            hint = " (W_down must be stored transposed, [F, d])" if name == "w_down_t" else ""
            fail(f"{name} has shape {tuple(t.shape)}; expected {expected[name]}{hint}.")
        if t.dtype != ref.dtype:
            fail(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; "
                 f"all weights must match {ref_name}.")
        if t.device != ref.device:
            fail(f"{name} is on {t.device} but {ref_name} is on {ref.device}.")
        if not t.is_contiguous():
            fail(f"{name} is not contiguous; call .contiguous() once when loading weights.")
    if mask.device != ref.device:
        fail(f"mask is on {mask.device} but {ref_name} is on {ref.device}.")


def gate_up_pair(w_gate, w_up):
    """W_gate and W_up as one [2, F, d] view when they lie in one storage at a fixed distance,
    W_up after W_gate with the same strides, else None."""
    if w_gate is None or w_gate.untyped_storage().data_ptr() != w_up.untyped_storage().data_ptr():
        return None
    delta = w_up.storage_offset() - w_gate.storage_offset()
    if delta < w_gate.numel() or w_gate.stride() != w_up.stride():
        return None
    return w_gate.as_strided((2, *w_gate.shape), (delta, *w_gate.stride()))
