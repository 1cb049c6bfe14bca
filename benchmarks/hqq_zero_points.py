"""How far HQQ's optimiser moves each group's zero point, and what is left of it on an integer grid.

    /root/peers-venv/bin/python benchmarks/hqq_zero_points.py --model ~/.cache/qtool/models/Qwen2.5-Coder-0.5B \\
        --blocks 0,11,23 --group-size 128

HQQ (Badri & Shaji, 2023; the peer of ``benchmarks/peers.py``) starts every group from the
min/max grid (scale ``(max - min) / (2^b - 1)``, zero ``round(-min / scale)``) and then
refines the zero point alone with its half-quadratic solver (an l_0.7 norm of the weight
error). Its native format stores that zero as a float. The checkpoints qtool writes
(AutoAWQ "gemm", GPTQ; ``shared/notes/formats.md``) store whole-number zero points. This
script quantizes the decoder-block linears of ``--model`` with HQQ at transformers'
``HqqConfig(nbits, group_size)`` settings and prints, per linear, the mean and largest
``|z_hqq - z_minmax|`` (in quantization steps) and how many groups' zero points differ
from the min/max grid's once rounded to a whole number: on those groups alone could an
integer-zero checkpoint hold anything of HQQ's fit. Data-free; reads the weights from the
model's safetensors files. Runs in the peers' venv (it imports ``hqq``).
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from quant.checkpoint import tensor_index  # noqa: E402  (torch and safetensors only: runs in the peers' venv)
from quant.errors import QtoolError  # noqa: E402


def main() -> None:
    from hqq.core.quantize import Quantizer

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path, help="fp32 Hugging Face model folder (safetensors)")
    p.add_argument("--blocks", default="0", help="comma-separated decoder block indices")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    args = p.parse_args()
    torch.set_num_threads(1)
    try:
        files = tensor_index(args.model.expanduser())
    except QtoolError as e:
        raise SystemExit(str(e)) from None
    maxq = 2**args.bits - 1
    rows, all_dz, changed, total = [], [], 0, 0
    for b in (int(x) for x in args.blocks.split(",")):
        names = sorted(k for k in files if re.fullmatch(rf"model\.layers\.{b}\..+_proj\.weight", k))
        if not names:
            raise SystemExit(f"{args.model}: block {b} has no *_proj.weight tensors; --blocks takes decoder block indices")
        for name in names:
            with safe_open(files[name], "pt") as f:
                w = f.get_tensor(name).float()
            if w.shape[1] % args.group_size:
                continue
            g = w.reshape(-1, args.group_size)
            lo, hi = g.amin(1, keepdim=True), g.amax(1, keepdim=True)
            z_minmax = torch.round(-lo * (maxq / (hi - lo).clamp(min=1e-4)))  # HQQ's own starting point
            _, meta = Quantizer.quantize(w, nbits=args.bits, group_size=args.group_size, optimize=True, round_zero=True,
                                         axis=1, bitpack=False, compute_dtype=torch.float32, device="cpu")
            dz = (meta["zero"].reshape(-1, 1).float() - z_minmax).abs().flatten()
            moved = int((torch.round(meta["zero"].reshape(-1, 1).float()) != z_minmax).sum())
            rows.append([name.removeprefix("model.layers."), dz.numel(), f"{float(dz.mean()):.3f}", f"{float(dz.max()):.3f}",
                         f"{moved} ({moved / dz.numel():.2%})"])
            all_dz.append(dz)
            changed += moved
            total += dz.numel()
    dz = torch.cat(all_dz)
    headers = ["linear", "groups", "mean |dz| (steps)", "max |dz|", "rounded zero != min/max zero"]
    for r in [headers, ["---"] * len(headers), *rows]:  # a Markdown table (the peers' venv has no tabulate)
        print("| " + " | ".join(str(c) for c in r) + " |")
    q = [float(dz.quantile(x)) for x in (0.5, 0.9, 0.99)]
    print(f"\nall {total} groups: mean |dz| {float(dz.mean()):.3f} steps, median {q[0]:.3f}, 90th {q[1]:.3f}, "
          f"99th {q[2]:.3f}; rounded to whole numbers, {changed} ({changed / total:.2%}) differ from the min/max grid's")


if __name__ == "__main__":
    main()
