"""lte_convert/bench_decode.py's CPU additions on a tiny folded LTE model: the plan numbers
of the model's FFN shape before timing, and the op's share of a generate() step. (The whole
benchmark on the embedded SmolLM2 is `lte-convert bench --decode`, recorded in
results/cpu_bench.md.)"""
import torch

from lte_convert import bench_decode
from lte_convert.converter.checkpoint import fold
from lte_convert.converter.surgery import convert_model
from lte_convert.plugins import cpu_tuning
from tests.tiny_models import FFN, HIDDEN, random_ids, tiny_model


def folded_tiny():
    model = convert_model(tiny_model("llama")[0])
    fold(model)
    return model


def test_plan_numbers_of_the_models_shape():
    numbers = bench_decode.plan_numbers(folded_tiny(), torch.float32, fresh=False)
    assert list(numbers) == [f"{HIDDEN}x{FFN}"]
    assert numbers[f"{HIDDEN}x{FFN}"]["source"] == cpu_tuning.FALLBACK.source   # tests: off


def test_op_share_of_the_step():
    model = folded_tiny()
    ids = {"input_ids": random_ids(1, 6), "attention_mask": torch.ones(1, 6, dtype=torch.long)}
    ms, share = bench_decode.op_share(model, ids, 4)
    assert ms > 0 and 0 < share < 1
