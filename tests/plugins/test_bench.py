"""plugins/bench.py (`lte-convert bench`): the ideal (a dense FFN at the active width) is
timed in the same run, the bars of issue 14 are judged per row, and every JSON names the
host and the plan numbers used. Speeds are not asserted: this only checks what is reported."""
import json

import pytest
from click.testing import CliRunner

from lte_convert.errors import UserError
from lte_convert.plugins import bench, cpu_tuning
from lte_convert.commands.bench import bench as bench_command


def test_json_has_ideal_bars_host_and_plan_numbers(tmp_path):
    """(Calibration is off in the tests: the plan numbers are the fallback constants;
    `--calibrate` is cpu_tuning.calibrate, tested in test_cpu_tuning.py.)"""
    out = tmp_path / "b.json"
    result = CliRunner().invoke(bench_command, [
        "--shapes", "smollm2", "--tokens", "1,2", "--sparsity", "0,0.5", "--layers", "2",
        "--reps", "1", "--device", "cpu", "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    host = data["host"]
    assert host["cpu"] and host["torch"] and host["threads"] >= 1 and "mkl" in host
    assert data["plan_numbers"]["smollm2"]["source"] == cpu_tuning.FALLBACK.source
    rows = {(r["tokens"], r["sparsity"]): r for r in data["rows"]}
    for r in rows.values():
        assert r["ideal_ms"] > 0
        assert r["fraction_of_ideal"] == pytest.approx(r["ideal_ms"] / r["sparse_ms"])
    full, half = rows[(1, 0.0)], rows[(1, 0.5)]
    assert full["ideal_width"] == 1536 and full["ideal_ms"] == full["dense_ms"]
    assert half["ideal_width"] == round(half["union_density"] * 48) * 32 < 1536
    assert full["bar"].startswith("speed-up") and half["bar"].startswith("of ideal")
    assert "bar" not in rows[(2, 0.5)]
    assert "Bars (issue 14):" in result.output and host["cpu"] in result.output


@pytest.mark.parametrize("row,expected", [
    (dict(sparsity=0.0, tokens=4, dtype="float32", speedup=0.98), "PASS"),
    (dict(sparsity=0.0, tokens=4, dtype="bfloat16", speedup=0.5), None),
    (dict(sparsity=0.0, tokens=1, dtype="float32", speedup=0.96), "FAIL"),
    (dict(sparsity=0.5, tokens=1, dtype="float32", fraction_of_ideal=0.86), "PASS"),
    (dict(sparsity=0.5, tokens=1, dtype="float32", fraction_of_ideal=0.84), "FAIL"),
    (dict(sparsity=0.5, tokens=4, dtype="float32", fraction_of_ideal=0.5), None),
    (dict(sparsity=0.5, tokens=1, dtype="bfloat16", fraction_of_ideal=0.5), None),
])
def test_bars(row, expected):
    got = bench.bar({"device": "cpu", "masks": "random", **row})
    assert (got[1] if got else None) == expected
    assert bench.bar({"device": "cuda", "masks": "random", **row}) is None
    assert bench.bar({"device": "cpu", "masks": "recorded", **row}) is None


def test_host_line_names_cpu_isa_threads_and_versions():
    line = bench.host_line(cpu_tuning.host())
    for part in ("threads", "torch", "MKL", "oneDNN"):
        assert part in line


def test_expert_size_sets_the_mask_width_and_the_ideal(tmp_path):
    out = tmp_path / "b.json"
    result = CliRunner().invoke(bench_command, [
        "--shapes", "smollm2", "--tokens", "1", "--sparsity", "0.5", "--layers", "2",
        "--reps", "1", "--device", "cpu", "--expert-size", "16", "--json", str(out)])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(out.read_text())["rows"]
    assert row["expert_size"] == 16
    assert row["ideal_width"] == round(row["union_density"] * 96) * 16 < 1536


def test_expert_size_that_does_not_divide_the_width_is_refused():
    result = CliRunner().invoke(bench_command, ["--shapes", "smollm2", "--expert-size", "40",
                                                "--device", "cpu"])
    assert isinstance(result.exception, UserError)
    assert "--expert-size 40 does not divide the smollm2 FFN width 1536" in str(result.exception)
