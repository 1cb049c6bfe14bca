"""The compatibility matrix as measured: qtool checkpoints of the example model loaded by other loaders.

    python benchmarks/loader_matrix.py --loader-python /root/peers-venv/bin/python [--windows 4]

For each case (RTN, one layout and setting each) the checkpoint is written once, then loaded by
qtool and by each loader (``tests/loader_probe.py`` in the loader's own environment, on the CPU).
Prints, per loader and case: the table's verdict (``quant.formats.compat``), whether the loader
loaded it, the largest and mean difference of its effective weights from qtool's dequantized ones
(in quantization steps, over every quantized linear of blocks 0 and the last), and the perplexity
on ``--windows`` windows of 512 tokens of held-out Wikipedia text beside qtool's own. Asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tabulate import tabulate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

CASES = {
    "AWQ gemm w4 g64": dict(bits=4, group_size=64),
    "AWQ gemm w4 g64, mlp.down_proj kept in block 3": dict(bits=4, group_size=64,
                                                           skip=("model.layers.3.mlp.down_proj",)),
    "GPTQ v1 sym w4 g64": dict(bits=4, group_size=64, sym=True),
    "GPTQ v1 asym w4 g64": dict(bits=4, group_size=64, fmt="gptq"),
    "GPTQ v2 asym w8 g64": dict(bits=8, group_size=64),
}
LOADERS = ("gptqmodel", "transformers")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--loader-python", required=True)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--tmp", default=None)
    args = p.parse_args()

    import quant
    from example_data import ensure_example, eval_text_path, example_model_dir
    from quant import model_io
    from quant.formats.compat import LOADERS as TITLES
    from quant.formats.compat import Written, problem, skip_pattern
    from quant.modules import QuantLinear

    ensure_example()
    src = example_model_dir()
    tmp = Path(args.tmp or tempfile.mkdtemp(prefix="loader-matrix-"))
    tmp.mkdir(parents=True, exist_ok=True)
    tok = model_io.load_tokenizer(src)
    ids = tok(eval_text_path("wiki").read_text(), return_tensors="pt").input_ids[0]
    ids = ids[: args.windows * 512].reshape(args.windows, 512)
    save_file({"ids": ids.contiguous()}, str(tmp / "ids.safetensors"))
    rows = []
    for case, kw in CASES.items():
        out = tmp / case.replace(" ", "_").replace(",", "")
        report = quant.quantize(src, out, method="rtn", overwrite=True, progress=False, **kw)
        model = quant.load(out, dtype=torch.float32)
        with torch.no_grad():
            own = sum(model(ids[i:i + 1], labels=ids[i:i + 1]).loss.item() for i in range(len(ids))) / len(ids)
        n_blocks = len(model.model.layers)
        linears = {n: m for n, m in model.named_modules() if isinstance(m, (QuantLinear, torch.nn.Linear))
                   and n.startswith("model.layers.")}
        kept = sorted(n for n, m in linears.items() if not isinstance(m, QuantLinear))
        quantized = sorted(n for n, m in linears.items() if isinstance(m, QuantLinear))
        probe = [n for n in quantized + kept if n.startswith(("model.layers.0.", f"model.layers.{n_blocks - 1}.",
                                                                "model.layers.3.mlp"))]
        sym = kw.get("sym", False)
        for loader in LOADERS:
            verdict = problem(loader, Written(report.fmt, report.bits, sym, False, report.group_size,
                                              skip_pattern(kept, quantized))) or "reads right"
            dump = tmp / "eff.safetensors"
            proc = subprocess.run([args.loader_python, str(ROOT / "tests" / "loader_probe.py"), loader, str(out),
                                   str(dump), *probe, "--nll", str(tmp / "ids.safetensors")],
                                  capture_output=True, text=True)
            if proc.returncode:
                why = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr.strip()[-200:]
                rows.append([TITLES[loader], case, verdict, f"refused: {why[:90]}", "", "", f"{math.exp(own):.3f}", ""])
                print(rows[-1], file=sys.stderr, flush=True)
                continue
            kinds = json.loads(proc.stdout.strip().splitlines()[-1])
            eff = load_file(str(dump))
            worst, means = 0.0, []
            for n in probe:
                if n in kept:
                    d = (eff[n] - linears[n].weight.float()).abs().max().item()
                    worst = max(worst, 0.0 if kinds[n] == "Linear" and d < 1e-2 else float("inf"))
                    continue
                pw = linears[n].packed_weight()
                steps = (eff[n] - pw.dequantize(torch.float32)) / pw.scale.float().repeat_interleave(
                    pw.group_size, dim=1)[:, :pw.q.shape[1]]
                worst = max(worst, steps.abs().max().item())
                means.append(steps.mean().item())
            rows.append([TITLES[loader], case, verdict, "loaded", f"{worst:.3f}", f"{sum(means) / len(means):+.4f}",
                         f"{math.exp(own):.3f}", f"{math.exp(kinds['nll']):.3f}"])
            print(rows[-1], file=sys.stderr, flush=True)
    print(tabulate(rows, headers=["loader", "checkpoint (example model, RTN)", "table says", "load",
                                  "max |Δw| steps", "mean Δw steps", "PPL qtool", "PPL loader"], tablefmt="github"))


if __name__ == "__main__":
    main()
