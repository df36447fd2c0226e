"""`lte-convert generate`: try a result in one command (exporters.generate.generate_text)."""
from __future__ import annotations

from pathlib import Path

import click

from lte_convert.commands.options import trust_option


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--prompt", "-p", required=True, help="The text to continue.")
@click.option("--max-new-tokens", "-n", type=click.IntRange(min=1), default=40,
              show_default=True, help="Tokens to generate at most (fewer at end of text).")
@click.option("--sample", is_flag=True,
              help="Sample (temperature, top-k, --seed) instead of picking the likeliest token.")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=0.8,
              show_default=True, help="With --sample: softmax temperature.")
@click.option("--top-k", type=click.IntRange(min=0), default=50, show_default=True,
              help="With --sample: draw from the k likeliest tokens (0: all).")
@click.option("--seed", type=int, default=0, show_default=True, help="With --sample.")
@click.option("--tokenizer", type=click.Path(path_type=Path),
              help="Folder with the tokenizer files [default: the checkpoint; for a .onnx file "
                   "the <stem>-lte folder beside it, as the one-shot writes].")
@trust_option
def generate(source, prompt, max_new_tokens, sample, temperature, top_k, seed, tokenizer,
             trust_remote_code):
    """Continue --prompt with an LTE checkpoint (PyTorch) or an exported .onnx file (ONNX
    Runtime): greedy by default, sampled with --sample.

    \b
    Examples:
      lte-convert generate model-lte --prompt "To be, or not to be"
      lte-convert generate model.onnx --prompt "To be, or not to be" --sample --seed 3
      lte-convert generate plain.onnx --tokenizer model-lte --prompt "Hello"
    """
    from lte_convert.exporters.generate import generate_text

    click.echo(generate_text(source, prompt, max_new_tokens=max_new_tokens, sample=sample,
                             temperature=temperature, top_k=top_k, seed=seed,
                             tokenizer=tokenizer, trust_remote_code=trust_remote_code))
