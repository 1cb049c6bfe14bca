"""Time the attention-weighted value Hessians of one block, accumulated both ways.

``Σ_q (P_q X)ᵀ(P_q X)`` (one Gram per query head) against ``Xᵀ (Σ_q P_qᵀ P_q) X`` (one
per key/value head), on one decoder block of the example model with random
calibration tokens, in one process, best of ``--repeats``. Prints the time of each, the
ratio, the multiply-adds each needs (so the achieved rate) and how far the two
Hessians differ. ``calib.value_hessian`` picks the cheaper order by the multiply-add
count; this checks that the count predicts the time.

    PYTHONPATH=. python benchmarks/bench_value_hessian.py --samples 16 --threads 1
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from tabulate import tabulate


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(Path.home() / ".cache/qtool/models/SmolLM2-135M"))
    p.add_argument("--samples", type=int, default=16, help="calibration sequences (default 16)")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--block", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    from calib import value_hessian
    from calib.collectors import record_block_calls
    from calib.runner import BlockInputs
    from quant.arch import blocks_of, lookup, value_heads

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(args.device)
    arch = lookup(model.config.model_type)
    blocks = blocks_of(model, arch)
    ids = torch.randint(0, model.config.vocab_size, (args.samples, args.seqlen),
                        generator=torch.Generator().manual_seed(0)).to(args.device)
    block, call = blocks[args.block], record_block_calls(model, blocks, ids)[args.block]
    where = value_heads(block, arch.v_proj, arch.v_fused)
    inputs = BlockInputs([call])
    width = block.get_submodule(arch.v_proj).in_features
    n_heads = model.config.num_attention_heads
    group, (b, t) = n_heads // where.n_kv_heads, ids.shape
    chosen = value_hessian._mix_first(group, t, t, width)
    per_head = value_hessian.accumulation_macs(group, t, t, width)
    macs = {mix_first: b * where.n_kv_heads * n for mix_first, n in zip((False, True), per_head)}

    real, seconds, hessians = value_hessian._mix_first, {}, {}
    try:
        for mix_first in (False, True):
            value_hessian._mix_first = lambda *shape, m=mix_first: m
            for _ in range(args.repeats):
                if args.device != "cpu":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                heads = value_hessian.collect_value_hessians(block, inputs, where.attention, arch.v_proj,
                                                             where.n_kv_heads)
                if args.device != "cpu":
                    torch.cuda.synchronize()
                seconds[mix_first] = min(seconds.get(mix_first, float("inf")), time.perf_counter() - t0)
            hessians[mix_first] = torch.stack([h.mean for h in heads])
    finally:
        value_hessian._mix_first = real
    diff = float((hessians[True] - hessians[False]).abs().max() / hessians[False].abs().max())
    rows = [[name + (" (chosen)" if m == chosen else ""), f"{seconds[m] * 1e3:.0f}", f"{macs[m] / 1e9:.2f}",
             f"{2 * macs[m] / seconds[m] / 1e9:.1f}", f"{seconds[False] / seconds[m]:.2f}x"]
            for m, name in ((False, "Σ_q (P_q X)ᵀ(P_q X)"), (True, "Xᵀ (Σ_q P_qᵀ P_q) X"))]
    print(f"{Path(args.model).name}, block {args.block}, {b} x {t} tokens, {n_heads} query / {where.n_kv_heads} "
          f"key/value heads, width {width}; {args.device}, {args.threads} thread(s), best of {args.repeats}")
    headers = ["order", "ms", "G multiply-adds (accumulation)", "GFLOP/s", "speed-up vs per query head"]
    print(tabulate(rows, headers=headers, tablefmt="github"))
    print(f"largest difference between the two Hessians, relative to the largest entry: {diff:.1e}")


if __name__ == "__main__":
    main()
