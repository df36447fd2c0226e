"""Architecture adapters: where each model family keeps its FFN. Support is data.

One `Adapter` per family, keyed by `config.model_type`. Paths are dotted attribute paths:
`layers` names the ModuleList of transformer blocks (matched as a suffix of the module name,
so it works for the base model and every head class); the others are relative to one block.

- Gated families (Llama, Gemma): the whole MLP module (`ffn`) is replaced by the LTEFFN.
- Families whose up/act/down run inline in a parent's forward (GPT-2, BERT, OPT, GPT-NeoX):
  the up projection (`ffn`) is replaced by the LTEFFN, which computes the whole FFN, and the
  modules in `identity` (activation, down projection) by nn.Identity. Checked against the
  transformers 5.24 sources: GPT2MLP (c_fc → act → c_proj → dropout), BertIntermediate +
  BertOutput (dense → act | dense → dropout → LayerNorm(+residual)), OPTDecoderLayer
  (fc1 → activation_fn → fc2 → dropout), GPTNeoXMLP (dense_h_to_4h → act → dense_4h_to_h):
  every op after the down projection (dropout, residual, LayerNorm) stays where it is.

Adding a family: one `Adapter(...)` line in REGISTRY, and a config in tests/tiny_models.py.

A family the registry does not name gets an adapter derived from its module tree and config
(converter/derive.py), proven on the model before use and printed so it can be added here.
A derived adapter travels with the model as `config.lte_adapter` (a dict of these fields), so
the saved checkpoint's config.json carries it and loading needs no second derivation.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lte_convert.errors import UserError

# Hugging Face activation names (transformers.activations.ACT2FN) -> plugins.spec.ACTIVATIONS.
# gelu_new / gelu_fast / gelu_pytorch_tanh are the same tanh approximation written three ways.
HF_ACTIVATIONS = {
    "silu": "silu", "swish": "silu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
    "relu": "relu",
}


@dataclass(frozen=True)
class Adapter:
    family: str
    layers: str                  # ModuleList of blocks (module-name suffix)
    ffn: str                     # block-relative module replaced by the LTEFFN
    up: str                      # block-relative Linear/Conv1D modules holding the weights
    down: str
    gate: str | None = None      # gated FFNs only
    identity: tuple[str, ...] = ()   # block-relative modules replaced by nn.Identity
    act_field: str = "hidden_act"    # config field with the HF activation name
    size_field: str | None = "intermediate_size"  # config field with d_ff (set when padding)
    conv1d: bool = False         # GPT-2 Conv1D: weight stored [in, out]
    fused: str | None = None     # "gate_up" | "up_gate": `up` is one projection to 2·d_ff,
                                 # its output halves are (gate, up) or (up, gate)
    act: str | None = None       # fixed activation (plugins.spec name) when no config field has it

    @property
    def gated(self) -> bool:
        return self.gate is not None or self.fused is not None

    def activation(self, config) -> str:
        if self.act is not None:
            return self.act
        name = getattr(config, self.act_field)
        if name not in HF_ACTIVATIONS:
            raise UserError(
                f"{config.model_type} config has {self.act_field}={name!r}, an activation the "
                f"LTE sparse FFN does not implement (supported: {', '.join(HF_ACTIVATIONS)}). "
                "Use a model with one of these activations.")
        return HF_ACTIVATIONS[name]


_LLAMA = dict(layers="layers", ffn="mlp", gate="mlp.gate_proj", up="mlp.up_proj",
              down="mlp.down_proj")

REGISTRY: dict[str, Adapter] = {
    "llama": Adapter("llama", **_LLAMA),          # also SmolLM2
    "mistral": Adapter("mistral", **_LLAMA),
    "qwen2": Adapter("qwen2", **_LLAMA),
    "qwen3": Adapter("qwen3", **_LLAMA),
    "gemma": Adapter("gemma", **_LLAMA),          # hidden_act gelu_pytorch_tanh
    "gpt2": Adapter("gpt2", layers="h", ffn="mlp.c_fc", up="mlp.c_fc", down="mlp.c_proj",
                    identity=("mlp.act", "mlp.c_proj"), act_field="activation_function",
                    size_field="n_inner", conv1d=True),
    "bert": Adapter("bert", layers="encoder.layer", ffn="intermediate.dense",
                    up="intermediate.dense", down="output.dense",
                    identity=("intermediate.intermediate_act_fn", "output.dense")),
    "roberta": Adapter("roberta", layers="encoder.layer", ffn="intermediate.dense",
                       up="intermediate.dense", down="output.dense",
                       identity=("intermediate.intermediate_act_fn", "output.dense")),
    "opt": Adapter("opt", layers="decoder.layers", ffn="fc1", up="fc1", down="fc2",
                   identity=("activation_fn", "fc2"), act_field="activation_function",
                   size_field="ffn_dim"),
    "gpt_neox": Adapter("gpt_neox", layers="layers", ffn="mlp", up="mlp.dense_h_to_4h",
                        down="mlp.dense_4h_to_h"),
}


def get_adapter(config) -> Adapter:
    """The model's adapter: the derived one it carries (`config.lte_adapter`), else the
    registry's for `config.model_type`, else a UserError listing the supported ones."""
    carried = getattr(config, "lte_adapter", None)
    if carried:
        return Adapter(**{**carried, "identity": tuple(carried.get("identity", ()))})
    model_type = getattr(config, "model_type", None)
    if model_type not in REGISTRY:
        raise UserError(
            f"Model type {model_type!r} has no lte-convert adapter. Registered model types: "
            f"{', '.join(sorted(REGISTRY))}; other decoders get theirs derived when converted "
            "(converter.surgery.convert_model), or add an Adapter entry for yours in "
            "converter/adapters.py.")
    return REGISTRY[model_type]


def as_source(adapter: Adapter) -> str:
    """The adapter as a REGISTRY line, defaults left out (what a user pastes into this file)."""
    default = Adapter(adapter.family, adapter.layers, adapter.ffn, adapter.up, adapter.down)
    fields = [f"layers={adapter.layers!r}", f"ffn={adapter.ffn!r}", f"up={adapter.up!r}",
              f"down={adapter.down!r}"]
    for name in ("gate", "identity", "act_field", "size_field", "conv1d", "fused", "act"):
        value = getattr(adapter, name)
        if value != getattr(default, name):
            fields.append(f"{name}={value!r}")
    return f"{adapter.family!r}: Adapter({adapter.family!r}, {', '.join(fields)}),"


def blocks(model, adapter: Adapter) -> tuple[str, nn.ModuleList]:
    """(module name, ModuleList) of the model's transformer blocks."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and (name == adapter.layers
                                                  or name.endswith("." + adapter.layers)):
            return name, module
    raise UserError(f"Found no list of transformer blocks named `{adapter.layers}` in this "
                    f"{adapter.family} model ({type(model).__name__}). The model does not have "
                    "the module layout of the transformers release lte-convert supports.")


def _rows(module, conv1d: bool):
    """(weight [out, in], bias [out] | None) of an nn.Linear or a Conv1D (weight [in, out])."""
    return (module.weight.t() if conv1d else module.weight), module.bias


def read_ffn(block, adapter: Adapter) -> dict:
    """The block's FFN weights in kernel layout: w_gate/w_up/w_down_t [F, d], biases.
    A fused projection [2F, d] is split into its halves in the adapter's order."""
    w_up, b_up = _rows(block.get_submodule(adapter.up), adapter.conv1d)
    w_down, b_down = _rows(block.get_submodule(adapter.down), adapter.conv1d)
    w = dict(w_up=w_up, b_up=b_up, w_down_t=w_down.t(), b_down=b_down)
    if adapter.fused:
        halves = [(wh, bh) for wh, bh in zip(w_up.chunk(2), (None, None) if b_up is None
                                             else b_up.chunk(2))]
        (w["w_gate"], w["b_gate"]), (w["w_up"], w["b_up"]) = (
            halves if adapter.fused == "gate_up" else halves[::-1])
    elif adapter.gated:
        w["w_gate"], w["b_gate"] = _rows(block.get_submodule(adapter.gate), adapter.conv1d)
    return {k: (None if v is None else v.detach()) for k, v in w.items()}
