"""Loading a Hugging Face model folder to train: the folder checks, the remote-code gate and
the (model, tokenizer, task) triple. Below the rooms: imports no lte_convert room."""
from __future__ import annotations

import json
import struct
from pathlib import Path

from lte_convert.errors import UserError

# files any transformers tokenizer is saved as (fast, sentencepiece, BPE, WordPiece)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model", "tokenizer_config.json")


def check_model_dir(model_dir) -> Path:
    path = Path(model_dir)
    if not path.exists():
        raise UserError(f"The model path {path} does not exist. Pass a Hugging Face model "
                        "folder (with config.json and safetensors weights), or omit it to use "
                        "the embedded default (SmolLM2-135M).")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise UserError(f"{path} is not a Hugging Face model folder: it has no config.json. "
                        "Pass the folder that `save_pretrained` wrote (config.json, "
                        "model.safetensors, tokenizer files).")
    return path


def check_model_files(path: Path) -> None:
    """The tokenizer files are there and the safetensors files are whole (headers only)."""
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(f"{path} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}); "
                        "lte-convert needs the model's tokenizer to read the text. Save it "
                        "beside the weights: AutoTokenizer.from_pretrained(<the model's "
                        f"name>).save_pretrained('{path}').")
    check_safetensors(path)


def check_safetensors(folder) -> None:
    """UserError when a *.safetensors file in `folder` is truncated or not safetensors: its
    header is read (not the weights) and the tensors must end inside the file."""
    for f in sorted(Path(folder).glob("*.safetensors")):
        size = f.stat().st_size
        try:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                if n > min(size - 8, 100 << 20):
                    raise ValueError(f"a header of {n} bytes")
                header = json.loads(fh.read(n))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"),
                      default=0)
        except (struct.error, ValueError, KeyError, TypeError, IndexError) as e:
            raise UserError(f"{f} is not a readable safetensors file ({e}); it is damaged or "
                            "was not written completely. Copy or save it again.") from None
        if 8 + n + end > size:
            raise UserError(f"{f} is truncated: {size} bytes, but its tensors end at byte "
                            f"{8 + n + end}. It was not copied or saved completely; copy or save "
                            "it again.")


def check_remote_code(folder, trust_remote_code: bool) -> dict:
    """config.json of a model folder as a dict; a UserError when it asks for the authors' own
    code (auto_map) and --trust-remote-code was not given, even for a built-in model type
    (transformers would then quietly use its built-in class instead of the authors' code)."""
    file = Path(folder) / "config.json"
    try:
        config = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"Could not read {file}: {e}") from None
    if config.get("auto_map") and not trust_remote_code:
        names = ", ".join(f"{k}: {v}" for k, v in config["auto_map"].items())
        raise UserError(
            f"{file} has an auto_map ({names}): the model's authors ship their own Python code "
            "for it. lte-convert runs that code only when you pass --trust-remote-code (read it "
            "first). Without it, transformers would quietly use its built-in "
            f"{config.get('lte_model_type', config.get('model_type'))!r} classes instead, which "
            "may not be the model the authors made.")
    return config


def load_lm(model_dir, trust_remote_code: bool = False, dtype=None):
    """(model, tokenizer, task) with task "clm" or "mlm"; UserError for what cannot train.
    dtype: the weights' (default float32)."""
    import torch
    from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM,
                              AutoTokenizer)
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    path = check_model_dir(model_dir)
    check_remote_code(path, trust_remote_code)      # auto_map without the flag fails here
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ValueError, OSError) as e:
        raise UserError(f"Could not read the model config in {path}: {e}") from None
    archs = config.architectures or []
    if any(a.endswith("ForMaskedLM") for a in archs):
        cls, task = AutoModelForMaskedLM, "mlm"
    elif (any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
          or (not archs and config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)):
        cls, task = AutoModelForCausalLM, "clm"
    else:
        kind = ("an encoder without a masked-LM head"
                if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES else "a model without an LM head")
        raise UserError(f"{path} holds {kind} (architectures={archs}); LTE training needs a "
                        "task loss: a causal-LM model (…ForCausalLM) or a masked-LM model "
                        "(…ForMaskedLM). Use a checkpoint with such a head.")
    check_model_files(path)
    try:
        model = cls.from_pretrained(path, dtype=dtype or torch.float32, use_safetensors=True,
                                    trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise UserError(f"Could not load the model or tokenizer from {path}: {e}. lte-convert "
                        "reads weights from safetensors only (never pickled .bin files) and "
                        "needs the tokenizer files beside them.") from None
    return model, tokenizer, task
