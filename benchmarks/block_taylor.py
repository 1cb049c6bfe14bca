"""Which blocks of a quantized checkpoint cost the model loss, block by block, against RTN.

    python benchmarks/block_taylor.py --source MODEL --method CKPT --rtn CKPT_RTN --text wiki

For every decoder block ``i``, on the same windows: the block of each checkpoint is run on the
full-precision model's block-``i`` inputs, and its output error ``e = block_q(x) - block_fp(x)``
``[windows, tokens, hidden]`` is measured two ways:

- ``mse``: the mean of ``e²``, what a block-output reconstruction objective sees;
- ``dL``: the first-order Taylor estimate of the change in the mean next-token loss (nats/token),
  ``Σ g · e`` with ``g = ∂L/∂h_i`` from one backward pass of the full-precision model on the windows.

The last row sums ``dL`` over the blocks beside the measured loss of each whole checkpoint on the
same windows (its loss minus the full-precision one), so that the estimate can be checked.

Why: on Qwen2.5-Coder-0.5B, AWQ's blocks are 10-30% closer to the full-precision blocks than RTN's
in ``mse`` on held-out windows, yet the whole model is worse than RTN (benchmarks/RESULTS.md,
"Why AWQ loses to RTN on Qwen2.5-Coder-0.5B"); there the summed ``dL`` matches the measured difference
to 0.004 nats/token, while on SmolLM2 and gemma the second-order part, which ``mse`` stands for, dominates.
A diagnostic, for CPU runs of small models: it holds three models and one backward pass in memory.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))


def _windows(tok, text: str, n: int, seqlen: int, bos: bool) -> torch.Tensor:
    """The last ``n`` windows of ``seqlen`` tokens of the first 300,000 characters of ``text``, each starting
    with BOS where the architecture needs it (Gemma)."""
    ids = tok(text[:300_000], return_tensors="pt", add_special_tokens=False).input_ids[0]
    width = seqlen - bos
    if len(ids) < n * width:
        raise SystemExit(f"--text has {len(ids)} tokens in its first 300,000 characters; need {n * width}")
    windows = ids[-n * width:].reshape(n, width)
    if bos:
        windows = torch.cat([torch.full((n, 1), tok.bos_token_id), windows], dim=1)
    return windows


def _inputs_and_grads(fp, ids: torch.Tensor, samples: int):
    """Each block's inputs (args, kwargs) and its output's gradient of the mean loss, with the fp loss."""
    ins, outs, hooks = {}, {}, []

    def keep_input(i):
        def hook(module, args, kwargs):
            ins[i] = (tuple(a.detach() if torch.is_tensor(a) else a for a in args),
                      {k: v.detach() if torch.is_tensor(v) else v for k, v in kwargs.items()})
        return hook

    def keep_output(i):
        def hook(module, args, kwargs, out):
            outs[i] = out[0] if isinstance(out, tuple) else out
        return hook

    for i, layer in enumerate(fp.model.layers):
        hooks.append(layer.register_forward_pre_hook(keep_input(i), with_kwargs=True))
        hooks.append(layer.register_forward_hook(keep_output(i), with_kwargs=True))
    for p in fp.parameters():
        p.requires_grad_(False)
    fp.get_input_embeddings().weight.requires_grad_(True)  # so that the graph reaches the blocks
    logits = fp(input_ids=ids, use_cache=False).logits[:, :-1].float()  # use_cache=False: a cache in the kwargs would grow
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    order = sorted(outs)
    grads = torch.autograd.grad(loss, [outs[i] for i in order], retain_graph=samples > 0)
    # Gauss-Newton (Fisher) samples: labels drawn from the model's own next-token distribution, the gradient
    # of their summed loss at each block output.  E[(G·e)²] over the draws is eᵀ(Σ_t J_tᵀ F_t J_t)e, the
    # Gauss-Newton curvature of the summed loss along e; the positions' cross terms vanish in expectation.
    fisher = {i: [] for i in order}
    gen = torch.Generator().manual_seed(0)
    probs = logits.detach().softmax(-1).flatten(0, 1)
    for k in range(samples):
        y = torch.multinomial(probs, 1, generator=gen).view(ids.shape[0], -1)
        ls = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum")
        for i, gk in zip(order, torch.autograd.grad(ls, [outs[i] for i in order], retain_graph=k < samples - 1)):
            fisher[i].append(gk)
    for h in hooks:
        h.remove()
    return (ins, {i: (outs[i].detach(), g) for i, g in zip(order, grads)}, float(loss),
            {i: torch.stack(v) for i, v in fisher.items()} if samples else None)


def main() -> None:
    from tabulate import tabulate

    import quant
    from example_data import eval_text_path
    from quant.arch import ARCHITECTURES
    from quant.ppl import dequantize_once

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", required=True, help="The full-precision model folder.")
    p.add_argument("--method", required=True, help="A checkpoint of the method (AWQ, GPTQ...).")
    p.add_argument("--rtn", required=True, help="The RTN checkpoint at the same bits and group size.")
    p.add_argument("--text", default="wiki", help="calib (calib/corpus/wiki.txt), wiki, code, or a text file.")
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--fisher-samples", type=int, default=8,
                   help="Label draws for the Gauss-Newton second-order term (0: first order only).")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    path = {"calib": ROOT / "calib/corpus/wiki.txt"}.get(args.text) or (
        eval_text_path(args.text) if args.text in ("wiki", "code") else Path(args.text))
    fp, tok = quant.load_any(args.source, dtype="float32", device="cpu")
    needs_bos = getattr(ARCHITECTURES.get(fp.config.model_type), "needs_bos", False)
    ids = _windows(tok, Path(path).read_text(), args.windows, args.seqlen, needs_bos)
    ins, outs, fp_loss, fisher = _inputs_and_grads(fp, ids, args.fisher_samples)
    n_pred = ids.shape[0] * (ids.shape[1] - 1)
    ckpts = {"method": quant.load_any(args.method, dtype="float32", device="cpu")[0],
             "rtn": quant.load_any(args.rtn, dtype="float32", device="cpu")[0]}
    rows, total, total2 = [], {k: 0.0 for k in ckpts}, {k: 0.0 for k in ckpts}
    with dequantize_once(ckpts["method"]), dequantize_once(ckpts["rtn"]), torch.no_grad():
        measured = {k: float(m(input_ids=ids, labels=ids, use_cache=False).loss) - fp_loss for k, m in ckpts.items()}
        for i in range(len(fp.model.layers)):
            (a, kw), (ref, g) = ins[i], outs[i]
            row, gn = [i], {k: 0.0 for k in ckpts}
            for k, m in ckpts.items():
                o = m.model.layers[i](*a, **kw)
                e = (o[0] if isinstance(o, tuple) else o) - ref
                d_loss = float((g * e).sum())
                total[k] += d_loss
                if fisher is not None:  # ½ eᵀHe of the mean loss: (1/2N) E_draws Σ_windows (G_w·e_w)²
                    dots = (fisher[i] * e).flatten(2).sum(-1)  # [samples, windows]
                    d2 = float(dots.pow(2).mean(0).sum()) / (2 * n_pred)
                    total2[k] += d2
                    gn[k] = d2
                row += [float(e.pow(2).mean()), d_loss]
            rows.append(row[:1] + [f"{row[1]:.3e}", f"{row[2]:+.5f}", f"{row[3]:.3e}", f"{row[4]:+.5f}",
                                   f"{row[1] / row[3]:.3f}", f"{gn['method']:.5f}", f"{gn['rtn']:.5f}",
                                   f"{gn['rtn'] / row[3]:.2f}"])
    rows.append(["sum dL", "", f"{total['method']:+.4f}", "", f"{total['rtn']:+.4f}", ""])
    rows.append(["sum d2L (GN)", "", f"{total2['method']:+.4f}", "", f"{total2['rtn']:+.4f}", ""])
    rows.append(["dL + d2L", "", f"{total['method'] + total2['method']:+.4f}", "",
                 f"{total['rtn'] + total2['rtn']:+.4f}", ""])
    rows.append(["measured", "", f"{measured['method']:+.4f}", "", f"{measured['rtn']:+.4f}", ""])
    print(tabulate(rows, headers=["block", "method mse", "method dL", "rtn mse", "rtn dL", "mse method/rtn",
                                        "method d2L", "rtn d2L", "rtn d2L/mse"]))
    print(f"\n{args.windows} x {args.seqlen} tokens of {args.text}; full-precision loss {fp_loss:.4f} nats/token; "
          "dL and measured are nats/token relative to it.")


if __name__ == "__main__":
    main()
