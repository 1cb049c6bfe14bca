"""Perplexity paired against RTN window by window, and at other softmax temperatures.

    python benchmarks/temperature.py --model ~/.cache/qtool/models/Qwen2.5-Coder-0.5B \\
        --runs rtn=/tmp/q/rtn,gptq=/tmp/q/gptq,awq=/tmp/q/awq --windows 40

Every run (the source model, always first as ``fp``, and each NAME=CHECKPOINT) is scored on the
first ``--windows`` consecutive windows of each evaluation text (``benchmarks/example_data.py``:
held-out Wikipedia and Python code; 512 tokens each, BOS first where the architecture needs it, as
``qtool ppl`` and ``model_table.py`` score them). Per run and text it prints:

- the perplexity (``exp`` of the mean next-token loss) and the share of the RTN-to-fp gap closed;
- the mean per-window loss difference against the run named ``rtn`` with its paired standard error
  (nats/token): whether "better than RTN" is a measurement or a draw;
- the loss with the logits divided by each temperature ``T`` of ``--temperatures``, the best of them,
  and the mean entropy of the next-token distribution (nats).

Why: on Qwen2.5-Coder-0.5B (dequantized from a 4-bit GGUF) the full-precision model's loss falls by
0.02 nats/token at ``T = 1.1`` on both texts: it is over-confident. Quantization noise flattens the
distribution (RTN's entropy is the highest), which lowers the loss of an over-confident model, so a
method that stays closer to the full-precision model can score worse than RTN while being closer in
every other sense (benchmarks/RESULTS.md). The temperatures show how much of a difference is that.
A diagnostic for small models on the CPU: one forward per window per run, logits of one window at a time.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import quant  # noqa: E402
from check_windows import eval_windows, named_checkpoints, paired  # noqa: E402
from quant import arch as arch_table  # noqa: E402
from quant import folder, model_io  # noqa: E402
from quant.modules import dense_weights  # noqa: E402


def window_scores(model, windows: torch.Tensor, temperatures: list[float]) -> list[list[float]]:
    """Per window: the mean next-token loss at each temperature (nats/token), then the mean entropy (nats)."""
    out = []
    with torch.no_grad():
        for w in windows:
            logits = model(w[None]).logits[0, :-1].float()
            labels = w[1:].to(logits.device)
            row = [float(F.cross_entropy(logits / t, labels)) for t in temperatures]
            logp = logits.log_softmax(-1)
            row.append(float(-(logp.exp() * logp).sum(-1).mean()))
            out.append(row)
            del logits, logp
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="The source (full-precision) model folder.")
    p.add_argument("--runs", required=True, help="Comma-separated NAME=CHECKPOINT; one must be named rtn.")
    p.add_argument("--texts", default="wiki,code")
    p.add_argument("--windows", type=int, default=40, help="Windows per text (40 x 512 = 20,480 tokens).")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--temperatures", default="0.9,1.0,1.05,1.1,1.2")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    temps = [float(t) for t in args.temperatures.split(",")]
    if 1.0 not in temps:
        temps.insert(0, 1.0)
    t0 = time.perf_counter()
    runs = named_checkpoints(p, args.runs, {"fp": args.model})
    if args.windows < 2:
        p.error(f"--windows {args.windows}: give at least 2 (a standard error needs two windows)")
    if "rtn" not in runs:
        p.error("--runs needs one checkpoint named rtn (the baseline the differences are taken against)")
    tok = model_io.load_tokenizer(args.model)
    model_type = folder.read_config(args.model).get("model_type")
    needs_bos = getattr(arch_table.ARCHITECTURES.get(model_type), "needs_bos", False)
    bos = tok.bos_token_id if needs_bos else None
    texts = {t: eval_windows(tok, t, args.seqlen, bos, args.windows) for t in args.texts.split(",")}
    scores = {}
    for name, path in runs.items():
        model, _ = quant.load_any(str(Path(path).expanduser()), dtype="float32", device="cpu")
        with dense_weights(model):  # each weight dequantized once, not on every forward
            scores[name] = {t: window_scores(model, w, temps) for t, w in texts.items()}
        print(f"{name}: scored ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
        del model
    one = temps.index(1.0)
    rows = []
    for text in texts:
        mean = {name: [sum(r[k] for r in s[text]) / args.windows for k in range(len(temps) + 1)]
                for name, s in scores.items()}
        fp, rtn = mean["fp"][one], mean["rtn"][one]
        for name, m in mean.items():
            diff, se = paired([a[one] - b[one] for a, b in zip(scores[name][text], scores["rtn"][text])])
            best = min(range(len(temps)), key=lambda k: m[k])
            gap = (rtn - m[one]) / (rtn - fp) if name not in ("fp", "rtn") and rtn != fp else None
            rows.append([text, name, f"{math.exp(m[one]):.3f}", f"{m[one]:.4f}", "" if gap is None else f"{gap:.0%}",
                         "" if name == "rtn" else f"{diff:+.4f} ± {se:.4f}",
                         *(f"{m[k]:.4f}" for k in range(len(temps)) if k != one), temps[best], f"{m[-1]:.3f}"])
    print(f"\n{Path(args.model).name}: {args.windows} windows x {args.seqlen} tokens per text; "
          f"{time.perf_counter() - t0:.0f} s\n")
    print(tabulate(rows, headers=["text", "run", "PPL", "loss", "gap closed", "- RTN (± paired SE)",
                                  *(f"loss T={t}" for t in temps if t != 1.0), "best T", "entropy"],
                   tablefmt="github"))


if __name__ == "__main__":
    main()
