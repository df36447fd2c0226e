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
"""
from __future__ import annotations

from dataclasses import dataclass

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
    size_field: str = "intermediate_size"   # config field with d_ff (updated when padding)
    conv1d: bool = False         # GPT-2 Conv1D: weight stored [in, out]

    @property
    def gated(self) -> bool:
        return self.gate is not None

    def activation(self, config) -> str:
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
    """The adapter for `config.model_type`, or a UserError listing the supported ones."""
    model_type = getattr(config, "model_type", None)
    if model_type not in REGISTRY:
        raise UserError(
            f"Model type {model_type!r} is not supported by lte-convert. Supported model types: "
            f"{', '.join(sorted(REGISTRY))}. Use a model of one of these architectures, or add "
            "an Adapter entry for yours in converter/adapters.py.")
    return REGISTRY[model_type]


def intermediate_size(adapter: Adapter, config) -> int:
    """d_ff from the config (GPT-2's n_inner may be None, meaning 4·n_embd)."""
    size = getattr(config, adapter.size_field)
    return 4 * config.hidden_size if size is None else int(size)
