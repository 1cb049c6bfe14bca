"""benchmarks/model_table.py's spread over calibration seeds: the figures the issue-20 bar is read from."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from model_table import spread  # noqa: E402
from quality import Row  # noqa: E402


def row(run: str, wiki: float, code: float) -> Row:
    return Row(run=run, ppl={"wiki": wiki, "code": code}, eval_tokens=100, size_mib=0, quant_seconds=0, peak_rss_mib=0)


def model_rows(awq: tuple[float, float], gptq: tuple[float, float]) -> list[Row]:
    # fp32 10 / 10, RTN 20 / 20: a perplexity of 20 - 10 g closes the share g of the gap
    return [row("fp32", 10, 10), row("rtn:w4g128", 20, 20), row("awq:w4g128", *awq), row("gptq:w4g128", *gptq)]


def cells(table: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:]]


def test_spread_means_ranges_and_the_best_method_per_seed():
    by_seed = {
        0: {"a": model_rows(awq=(15, 15), gptq=(14, 16)), "b": model_rows(awq=(18, 18), gptq=(19, 19))},
        3: {"a": model_rows(awq=(13, 13), gptq=(16, 16)), "b": model_rows(awq=(19, 19), gptq=(17, 17))},
    }
    rows = cells(spread(by_seed, ["awq", "gptq"]))
    assert rows[0] == ["a", "awq", "50.0%", "70.0%", "60.0%", "20.0%"]
    assert rows[1] == ["a", "gptq", "50.0%", "40.0%", "45.0%", "10.0%"]
    assert rows[3] == ["b", "gptq", "10.0%", "30.0%", "20.0%", "20.0%"]
    # best per model and seed: seed 0 a 50 (a tie), b 20 -> 35; seed 3 a 70, b 30 -> 50; mean 42.5, range 15
    assert rows[-1] == ["best method, mean over models", "", "35.0%", "50.0%", "42.5%", "15.0%"]


def test_spread_refuses_seeds_with_other_models_or_no_rtn_row():
    with pytest.raises(ValueError, match="same models"):
        spread({0: {"a": model_rows((15, 15), (15, 15))}, 1: {"b": model_rows((15, 15), (15, 15))}}, ["awq"])
    no_rtn = [r for r in model_rows((15, 15), (15, 15)) if not r.run.startswith("rtn")]
    with pytest.raises(ValueError, match="fp32 and RTN"):
        spread({0: {"a": no_rtn}}, ["awq"])
