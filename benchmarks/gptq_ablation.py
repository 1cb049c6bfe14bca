"""Where GPTQ helps and where it hurts: one sub-layer group at a time, on the example model.

Non-sequential on purpose: every Hessian comes from the full-precision model
(one forward pass, cached), so that a row differs from another only in which
linears GPTQ rounds and which RTN rounds. The value Hessians here are computed
independently of ``calib.value_hessian``: from transformers' own eager attention
probabilities (``attn_implementation="eager"``), in float64.

    PYTHONPATH=. python benchmarks/gptq_ablation.py \\
        "rtn;gptq;gptq,only=qkv;gptq,only=qkv,rows=v;gptq,only=qkv,rows=v,value=1;gptq,value=1"

A variant is a method (``rtn`` or ``gptq``) then options, comma-separated:
``sym=0|1`` (default 1), ``bits=N`` (4), ``actorder=1``, ``damp=F`` (0.01);
``only=qkv|o|gateup|down`` GPTQ on that group only (RTN elsewhere);
``rows=q|k|v|qk...`` within the q/k/v group, keep GPTQ's rows only for these;
``layers=A-B`` GPTQ on those blocks only; ``value=1`` v_proj per key/value head
under the attention-weighted Hessian. Prints wiki perplexity (20 × 512 tokens)
per variant. Group size 64; calibration: the default 128 × 512 tokens.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GROUPS = {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "o": ("self_attn.o_proj",),
          "gateup": ("mlp.gate_proj", "mlp.up_proj"), "down": ("mlp.down_proj",)}


def hessians(model, cal, cache: Path):
    """Per block: ``XᵀX`` per group and the value Hessian per key/value head, both summed (float64)."""
    if cache.exists():
        return torch.load(cache)
    cfg = model.config
    n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    H, HV, xs, handles = {}, {}, {}, []
    for L, layer in enumerate(model.model.layers):
        for g, names in GROUPS.items():
            def acc(m, a, key=(L, g)):
                x = a[0].reshape(-1, a[0].shape[-1]).double()
                H[key] = H.get(key, 0) + x.t() @ x
            handles.append(layer.get_submodule(names[0]).register_forward_pre_hook(acc))

        def keep(m, a, L=L):
            xs[L] = a[0].detach()

        def value(m, a, out, L=L):
            P, x = out[1], xs.pop(L)  # eager attention probabilities [batch, heads, T, T]
            hv = HV.setdefault(L, torch.zeros(n_kv, x.shape[-1], x.shape[-1], dtype=torch.float64))
            for q in range(n_heads):
                y = (P[:, q] @ x).reshape(-1, x.shape[-1]).double()
                hv[q // (n_heads // n_kv)] += y.t() @ y
        handles.append(layer.self_attn.v_proj.register_forward_pre_hook(keep))
        handles.append(layer.self_attn.register_forward_hook(value))
    with torch.no_grad():
        for b in cal.split(8):
            model.model(b)
    for h in handles:
        h.remove()
    torch.save((H, HV), cache)
    return H, HV


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variants", help="semicolon-separated variants")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", type=Path, default=Path("/tmp/qtool_gptq_ablation.pt"),
                   help="where the Hessians are kept between runs")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from calib.data import calibration_batch, load_texts
    from quant import gptq
    from quant.config import GPTQOptions, QuantConfig
    from quant.layers import rtn_packed

    src = Path.home() / ".cache/qtool/models/SmolLM2-135M"
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, attn_implementation="eager").eval()
    orig = {k: v.clone() for k, v in model.state_dict().items()}
    cal = calibration_batch(tok, load_texts(None), 128, 512, 0)
    ev = tok((Path.home() / ".cache/qtool/data/wiki_eval.txt").read_text(), return_tensors="pt").input_ids[0]
    ev = ev[: 20 * 512].view(20, 512)
    H, HV = hessians(model, cal, args.cache)
    n_tok = cal.numel()
    n_heads, n_kv = model.config.num_attention_heads, model.config.num_key_value_heads
    head_dim = model.model.layers[0].self_attn.head_dim

    def ppl():
        nll = n = 0
        with torch.no_grad():
            for b in ev.split(4):
                nll += float(model(b, labels=b).loss) * b.numel()
                n += b.numel()
        return math.exp(nll / n)

    for v in args.variants.split(";"):
        model.load_state_dict(orig)
        method, *opts = v.split(",")
        kw = dict(o.split("=") for o in opts)
        cfg = QuantConfig(method="gptq", bits=int(kw.get("bits", 4)), group_size=64, sym=kw.get("sym", "1") == "1",
                          gptq=GPTQOptions(act_order=kw.get("actorder") == "1", damp=float(kw.get("damp", 0.01))))
        lo, hi = map(int, kw.get("layers", "0-999").split("-"))
        t = time.time()
        for L, layer in enumerate(model.model.layers):
            for g, names in GROUPS.items():
                lins = [layer.get_submodule(n) for n in names]
                W = torch.cat([lin.weight.detach() for lin in lins])
                rtn = rtn_packed(W, cfg).dequantize(torch.float32)
                use_gptq = method == "gptq" and kw.get("only", g) == g and lo <= L <= hi
                Wq = gptq.gptq_quantize(W, (H[(L, g)] / n_tok).float(), cfg).packed.dequantize(torch.float32) \
                    if use_gptq else rtn
                if use_gptq and g == "qkv" and kw.get("value") == "1":
                    v0 = lins[0].out_features + lins[1].out_features
                    for h in range(n_kv):
                        r = slice(v0 + h * head_dim, v0 + (h + 1) * head_dim)
                        Hh = (HV[L][h] / (n_tok * (n_heads // n_kv))).float()
                        Wq[r] = gptq.gptq_quantize(W[r], Hh, cfg).packed.dequantize(torch.float32)
                r = 0
                with torch.no_grad():
                    for n, lin in zip(names, lins):
                        keep = "rows" not in kw or n.rsplit(".", 1)[-1][0] in kw["rows"]
                        lin.weight.copy_((Wq if keep else rtn)[r:r + lin.out_features])
                        r += lin.out_features
        print(f"{v}\t{ppl():.3f}\t{time.time() - t:.0f}s", flush=True)


if __name__ == "__main__":
    main()
