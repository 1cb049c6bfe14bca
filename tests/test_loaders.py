"""The compatibility table checked against the loaders themselves (the optional ``loaders`` test extra).

For every row that runs on this machine's CPU (transformers 5.24 with optimum, GPTQModel 7.6), a tiny
checkpoint is written by qtool and loaded by that loader in its own environment
(``tests/loader_probe.py``, run by the Python given in ``QTOOL_LOADER_PYTHON``; these tests skip
without it). Where the table says the loader reads the checkpoint right, every quantized linear's
effective weight (what the loader's layer computes) is within half a quantization step of qtool's
dequantized weight (plus the 16-bit kernel's own rounding) and every layer kept in full precision is a plain linear holding the stored
weight; where the table says it does not, the loader refuses the checkpoint or computes a weight
more than half a step off. Set up the environment as in README ("Loader compatibility tests").
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import save_tiny_model

import quant
from quant.formats.compat import Written, problem, skip_pattern
from quant.modules import QuantLinear

PYTHON = os.environ.get("QTOOL_LOADER_PYTHON")
pytestmark = pytest.mark.skipif(not PYTHON, reason="QTOOL_LOADER_PYTHON (a Python with the loaders) is not set")
PROBE = Path(__file__).with_name("loader_probe.py")
KEPT = "model.layers.1.mlp.down_proj"

CASES = {  # name -> quantize() settings (all group 32: the tiny model is 64 wide)
    "awq-w4-kept": dict(bits=4, skip=(KEPT,)),
    "gptq-v1-sym-w4-kept": dict(bits=4, sym=True, skip=(KEPT,)),
    "gptq-v1-asym-w4": dict(bits=4, fmt="gptq"),
    "gptq-v2-asym-w4-kept": dict(bits=4, fmt="gptq_v2", skip=(KEPT,)),
    "gptq-v2-asym-w3": dict(bits=3),
    "gptq-v2-asym-w8": dict(bits=8),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("loaders")
    src = save_tiny_model("llama", root / "src")
    return {name: quant.quantize(src, root / name, method="rtn", group_size=32, progress=False, **kw)
            for name, kw in CASES.items()}


def _loader_available(loader: str) -> bool:
    module = {"transformers": "optimum.gptq, transformers, gptqmodel", "gptqmodel": "gptqmodel"}[loader]
    return subprocess.run([PYTHON, "-c", f"import {module}"], capture_output=True).returncode == 0


@pytest.mark.parametrize("loader", ["gptqmodel", "transformers"])
@pytest.mark.parametrize("case", list(CASES))
def test_loader_reads_what_the_table_says(checkpoints, loader, case, tmp_path):
    if not _loader_available(loader):
        pytest.skip(f"{loader} is not installed for {PYTHON}")
    report = checkpoints[case]
    out = Path(report.out)
    qtool = quant.load(out, dtype=torch.float32)
    linears = {n: m for n, m in qtool.named_modules() if isinstance(m, (QuantLinear, torch.nn.Linear))
               and n.startswith("model.layers.")}
    kept = sorted(n for n, m in linears.items() if not isinstance(m, QuantLinear))
    quantized = sorted(n for n, m in linears.items() if isinstance(m, QuantLinear))
    spec = json.loads((out / "config.json").read_text())["quantization_config"]
    sym = spec.get("sym", False) if spec["quant_method"] == "gptq" else False
    expected = problem(loader, Written(report.fmt, report.bits, sym, False, 32, skip_pattern(kept, quantized)))

    dump = tmp_path / "effective.safetensors"
    proc = subprocess.run([PYTHON, str(PROBE), loader, str(out), str(dump), *kept, *quantized],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode == 3:
        assert expected is not None, f"{loader} refused {case}, which the table says it reads: {proc.stdout}"
        return
    assert proc.returncode == 0, proc.stderr[-2000:]
    kinds = json.loads(proc.stdout.strip().splitlines()[-1])
    effective = load_file(str(dump))
    off = []
    for name in quantized:
        pw = linears[name].packed_weight()
        want = pw.dequantize(torch.float32)
        half_step = (pw.scale.float().repeat_interleave(pw.group_size, dim=1) / 2)[:, :want.shape[1]]
        # half a step, plus what a 16-bit kernel's rounding adds (bf16: 2^-8 of the value; at 8 bits a weight is
        # up to 128 steps, so this is up to another half step there); a v1/v2 zero-point mix-up moves every
        # weight by a whole step, which this catches at every weight below 128 steps
        if ((effective[name] - want).abs() > half_step + want.abs() / 256 + 1e-6).any():
            off.append(name)
    for name in kept:
        if kinds[name] != "Linear" or not torch.allclose(effective[name], linears[name].weight.float(),
                                                         rtol=2e-3, atol=2e-3):
            off.append(f"{name} (kept, loaded as {kinds[name]})")
    if expected is None:
        assert not off, f"{loader} misreads {case}: {off}"
    else:
        assert off, f"the table says {loader} does not read {case} right ({expected}), yet it did"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
