"""Tiny random models of every supported family, for converter, exporter and TensorRT tests.

`tiny_model(family, **config_overrides) -> (model, None)`: a seeded, randomly initialised
Hugging Face model in eval mode, fp32, dropout 0, small enough to run in milliseconds. The
second item is the tokenizer (None: no tokenizer files ship offline; feed random ids below
`VOCAB`). Decoder families come with an LM head, BERT/RoBERTa with an MLM head.

UNREGISTERED: families the adapter registry does not name (their adapter is derived,
converter/derive.py), chosen for the layouts they add: a fused gate/up projection (phi3),
parallel attention and MLP (falcon, gptj, phi, codegen, cohere), multi-query attention (falcon,
gpt_bigcode), rotary on part of the head (gptj, stablelm, phi, persimmon, codegen), the
activation only as a module (bloom), biases everywhere (falcon with bias=True, starcoder2).
"""
from __future__ import annotations

import torch
import transformers

VOCAB = 128
HIDDEN = 64
FFN = 160          # 5 experts of 32; pass e.g. intermediate_size=150 to exercise padding
LAYERS = 2
HEADS = 4

_LLAMA_LIKE = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN,
                   num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=2,
                   max_position_embeddings=128, head_dim=HIDDEN // HEADS)
_BERT_LIKE = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN,
                  num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                  max_position_embeddings=130, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0)

# family -> (config class, model class, config kwargs)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", _LLAMA_LIKE),
    "mistral": ("MistralConfig", "MistralForCausalLM", _LLAMA_LIKE),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _LLAMA_LIKE),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", _LLAMA_LIKE),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", _LLAMA_LIKE),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             dict(vocab_size=VOCAB, n_embd=HIDDEN, n_inner=FFN, n_layer=LAYERS, n_head=HEADS,
                  n_positions=128, bos_token_id=1, eos_token_id=2, resid_pdrop=0.0,
                  embd_pdrop=0.0, attn_pdrop=0.0)),
    "bert": ("BertConfig", "BertForMaskedLM", _BERT_LIKE),
    "roberta": ("RobertaConfig", "RobertaForMaskedLM", dict(_BERT_LIKE, pad_token_id=1)),
    "opt": ("OPTConfig", "OPTForCausalLM",
            dict(vocab_size=VOCAB, hidden_size=HIDDEN, ffn_dim=FFN, num_hidden_layers=LAYERS,
                 num_attention_heads=HEADS, word_embed_proj_dim=HIDDEN,
                 max_position_embeddings=128, dropout=0.0, attention_dropout=0.0)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
                 dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN,
                      num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                      max_position_embeddings=128)),
}


_DECODER = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN,
                num_hidden_layers=LAYERS, num_attention_heads=HEADS, max_position_embeddings=128,
                pad_token_id=0, bos_token_id=1, eos_token_id=2)
_GPTJ_LIKE = dict(vocab_size=VOCAB, n_embd=HIDDEN, n_inner=FFN, n_layer=LAYERS, n_head=HEADS,
                  rotary_dim=8, n_positions=128, bos_token_id=1, eos_token_id=2,
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)

UNREGISTERED = {
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(_DECODER, num_key_value_heads=2)),
    "falcon": ("FalconConfig", "FalconForCausalLM",
               dict(_DECODER, ffn_hidden_size=FFN, bias=True, hidden_dropout=0.0,
                    attention_dropout=0.0)),
    "gptj": ("GPTJConfig", "GPTJForCausalLM", _GPTJ_LIKE),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", dict(_DECODER, num_key_value_heads=4)),
    "phi": ("PhiConfig", "PhiForCausalLM", _DECODER),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM",
                   dict(_DECODER, num_key_value_heads=2, residual_dropout=0.0)),
    "olmo": ("OlmoConfig", "OlmoForCausalLM", _DECODER),
    "cohere": ("CohereConfig", "CohereForCausalLM", _DECODER),
    "persimmon": ("PersimmonConfig", "PersimmonForCausalLM", dict(_DECODER, hidden_act="relu")),
    "codegen": ("CodeGenConfig", "CodeGenForCausalLM", _GPTJ_LIKE),
    "gpt_bigcode": ("GPTBigCodeConfig", "GPTBigCodeForCausalLM",
                    {k: v for k, v in _GPTJ_LIKE.items() if k != "rotary_dim"}),
    "bloom": ("BloomConfig", "BloomForCausalLM",
              dict(vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS)),
}


def tiny_model(family: str, seed: int = 0, **config_overrides):
    """(model, None): a random `family` model, eval mode, fp32. Overrides go to the config."""
    config_cls, model_cls, kwargs = {**FAMILIES, **UNREGISTERED}[family]
    config = getattr(transformers, config_cls)(**{**kwargs, **config_overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config)
    _randomize_biases(model, seed)
    return model.eval(), None


def _randomize_biases(model, seed):
    """HF initialises biases to 0; random ones make the permutation tests able to fail."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def random_ids(batch: int = 2, seq: int = 12, seed: int = 0):
    """input_ids [batch, seq] below VOCAB (above RoBERTa's special ids)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(4, VOCAB, (batch, seq), generator=gen)
