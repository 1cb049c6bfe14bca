"""Does a GPTQ solve fitted on one kind of text hold on another? Per-linear output error, GPTQ against RTN.

    python benchmarks/hessian_shrinkage.py                                  # SmolLM2, blocks 0,6,12,20,25,29
    python benchmarks/hessian_shrinkage.py --model DIR --group-size 128 --blocks 0,10,20

For each linear of some blocks, the Hessian ``H = XᵀX / n`` of its inputs (full-precision
model) is measured on three texts: the calibration text (Wikipedia, ``calib/corpus/wiki.txt``),
other Wikipedia articles (``wiki_eval.txt``) and Python code (``code_eval.txt``), the evaluation
texts of ``quality.py``. GPTQ solves on the
calibration Hessian, shrunk toward its diagonal by β and damped by λ; each solution's error
``tr(ΔW H ΔWᵀ)`` is then measured under the held-out and the code Hessian, divided by RTN's.
Below 1: better than RTN on that text. Prints each linear's ratios and the geometric means.

This is the per-linear proxy, a screen for choosing β; the perplexities that decide are in
``benchmarks/RESULTS.md`` (``quality.py --runs gptq+shrinkN:...``).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

CANDIDATES = ((0.0, 0.01), (0.0, 0.1), (0.0, 0.3), (0.3, 0.01), (0.3, 0.1), (0.5, 0.01), (0.5, 0.1))  # (β, λ)
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def hessians(model, tok, names, text: str, n_windows: int, seqlen: int) -> dict[str, torch.Tensor]:
    ids = tok(text, return_tensors="pt").input_ids[0]
    if ids.numel() < n_windows * seqlen:
        raise SystemExit(f"the text has {ids.numel()} tokens; {n_windows} windows of {seqlen} need more")
    acc = dict.fromkeys(names, 0.0)

    def hook(name):
        def fn(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            acc[name] = acc[name] + x.t() @ x
        return fn

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    with torch.no_grad():
        for i in range(n_windows):
            model(ids[i * seqlen:(i + 1) * seqlen][None])
    for h in handles:
        h.remove()
    return {n: (acc[n] / (n_windows * seqlen)).float() for n in names}


def main() -> None:
    from example_data import cache_dir, ensure_eval_texts, eval_text_path
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quant import qmath
    from quant.config import GPTQOptions, QuantConfig
    from quant.gptq import gptq_quantize, hessian_error

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(cache_dir() / "models" / "SmolLM2-135M"))
    p.add_argument("--blocks", default="0,6,12,20,25,29")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--windows", type=int, default=48, help="512-token windows of calibration text (16 of the others)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ensure_eval_texts(cache_dir())
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    names = [f"model.layers.{b}.{n}" for b in args.blocks.split(",") for n in LINEARS]
    H_fit = hessians(model, tok, names, (ROOT / "calib/corpus/wiki.txt").read_text(), args.windows, 512)
    H_wiki = hessians(model, tok, names, eval_text_path("wiki").read_text(), 16, 512)
    H_code = hessians(model, tok, names, eval_text_path("code").read_text(), 16, 512)

    logs = {c: ([], []) for c in CANDIDATES}
    print("linear | " + " | ".join(f"β {b} λ {d}: wiki, code" for b, d in CANDIDATES))
    for n in names:
        W = model.get_submodule(n).weight.detach().float()
        cfg = QuantConfig(method="gptq", bits=4, group_size=args.group_size)
        W_rtn = qmath.fake_quantize(W, 4, args.group_size)
        cells = []
        for beta, damp in CANDIDATES:
            Wq = gptq_quantize(W, H_fit[n], cfg.with_(gptq=GPTQOptions(shrink=beta, damp=damp))).packed.dequantize()
            ratios = [hessian_error(W, Wq, H[n]) / hessian_error(W, W_rtn, H[n]) for H in (H_wiki, H_code)]
            for log, r in zip(logs[(beta, damp)], ratios):
                log.append(math.log(r))
            cells.append(f"{ratios[0]:.3f}, {ratios[1]:.3f}")
        print(f"{n.replace('model.layers.', 'L')} | " + " | ".join(cells), flush=True)
    print("\nβ (shrink) | λ (damp) | error / RTN's, held-out wiki (geo. mean) | code (geo. mean) | code (worst linear)")
    for (beta, damp), (w, c) in logs.items():
        print(f"{beta} | {damp} | {math.exp(sum(w) / len(w)):.3f} | {math.exp(sum(c) / len(c)):.3f} | {math.exp(max(c)):.3f}")


if __name__ == "__main__":
    main()
