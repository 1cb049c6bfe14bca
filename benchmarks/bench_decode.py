"""Decode / prefill tokens/s of a Llama-7B- or Qwen2.5-1.5B-shaped model, fp16 vs int4 (``quant.bench``; also
``qtool bench``); ``--split-k-ablation`` adds int4 with the split-K GEMV off, in the same run.

    python benchmarks/bench_decode.py --batch 1 8 32 --out RESULTS_gpu.md
    python benchmarks/bench_decode.py --shape qwen2.5-1.5b --batch 1 16 --split-k-ablation
"""
from __future__ import annotations

import argparse

from _timing import emit

from quant.bench import SHAPES, decode_report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=SHAPES, default="llama-7b")
    ap.add_argument("--layers", type=int, default=None, help="default: the shape's own depth")
    ap.add_argument("--split-k-ablation", action="store_true", help="also time int4 with the split-K GEMV off")
    ap.add_argument("--batch", type=int, nargs="*", default=[1, 8, 32])
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--out", help="append the markdown table to this file")
    args = ap.parse_args()
    emit(decode_report(args.layers, args.batch, args.group_size, args.prompt, args.steps, shape=args.shape,
                       split_k_ablation=args.split_k_ablation), args.out)


if __name__ == "__main__":
    main()
