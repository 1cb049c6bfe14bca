"""InternLM2 without its remote code: tiny-model equivalence, and AWQ on a synthetic 1.8B-shaped InternLM2.

    python benchmarks/internlm_synthetic.py [--blocks 4] [--n-samples 128] [--seqlen 512]

No InternLM weights are available offline, so this measures what can be measured here:

1. **equivalence**: tiny random Llamas written as InternLM2 checkpoints (fused ``wqkv`` in the
   documented interleave, InternLM2 names and config, ``auto_map`` to files that do not exist)
   for GQA ratios 1, 2 and 4, read through qtool's layout: largest |logit difference| against
   the Llama, and the same for the RTN checkpoints of both, reloaded;
2. **AWQ on a synthetic internlm2-chat-1_8b shape** (hidden 2048, 16 query / 8 key-value heads of
   128, FFN 8192, vocab 92544, bf16, random weights), with ``--blocks`` of its 24 blocks (peak
   memory is flat in depth, issue 15): seconds per block and peak RSS, in its own process.

Prints tables; asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def equivalence(tmp: Path) -> list[list]:
    import torch
    from internlm_models import llama, save_internlm2
    from tiny_models import byte_tokenizer

    import quant

    ids = torch.randint(3, 300, (2, 64), generator=torch.Generator().manual_seed(0))
    rows = []
    for heads, kv in ((4, 4), (4, 2), (4, 1)):
        ref = llama(heads, kv)
        src = save_internlm2(ref, tmp / f"il2-{kv}")
        ref.save_pretrained(tmp / f"llama-{kv}")
        byte_tokenizer().save_pretrained(tmp / f"llama-{kv}")
        fp, _ = quant.load_any(src)
        with torch.no_grad():
            d_fp = float((fp(ids).logits - ref(ids).logits).abs().max())
        kw = dict(method="rtn", bits=4, group_size=32, progress=False, overwrite=True)
        quant.quantize(src, tmp / f"q-il2-{kv}", **kw)
        quant.quantize(tmp / f"llama-{kv}", tmp / f"q-llama-{kv}", **kw)
        a, b = (quant.load(tmp / f"q-{n}-{kv}", dtype=torch.float32) for n in ("il2", "llama"))
        with torch.no_grad():
            d_q = float((a(ids).logits - b(ids).logits).abs().max())
        rows.append([f"{heads}/{kv} (GQA {heads // kv})", f"{d_fp:.1e}", f"{d_q:.1e}"])
    return rows


def synthetic_internlm2(path: Path, blocks: int) -> Path:
    """internlm2-chat-1_8b's shapes with random bf16 weights, ``blocks`` decoder blocks, in InternLM2's layout."""
    if (path / "config.json").is_file():
        return path
    import torch
    from internlm_models import save_internlm2
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=blocks,
                                  num_attention_heads=16, num_key_value_heads=8, vocab_size=92544,
                                  max_position_embeddings=32768, tie_word_embeddings=False, bos_token_id=1,
                                  eos_token_id=2, pad_token_id=2, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0).add_(0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.02)
    save_internlm2(model, path, rope_scaling={"type": "dynamic", "factor": 2.0})
    cfg = json.loads((path / "config.json").read_text())
    cfg["torch_dtype"] = "bfloat16"
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path


def main() -> None:
    from stream_memory import run
    from tabulate import tabulate

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--n-samples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--tmp", default=str(Path(tempfile.gettempdir()) / "qtool-internlm-bench"))
    args = p.parse_args()
    tmp = Path(args.tmp)
    tmp.mkdir(parents=True, exist_ok=True)

    print(tabulate(equivalence(tmp), headers=["heads q/kv", "max |Δlogit| fp vs Llama", "max |Δlogit| RTN w4 vs Llama's RTN"],
                   tablefmt="github"))
    src = synthetic_internlm2(tmp / f"internlm2-1_8b-shape-{args.blocks}", args.blocks)
    size = sum(f.stat().st_size for f in src.glob("*.safetensors")) / 1e9
    rows = []
    for method in ("rtn", "awq"):
        kw = f"dict(method='{method}', bits=4, group_size=128, n_samples={args.n_samples}, seqlen={args.seqlen})"
        r = run(ROOT, src, tmp / f"out-{method}", kw)
        secs = r.get("seconds", 0)
        rows.append([method, args.blocks, f"{size:.2f}", f"{r.get('peak_rss_mb', 0):,.0f}", f"{secs:.0f}",
                     f"{secs / args.blocks:.0f}", r.get("error", "")])
        print(rows[-1], file=sys.stderr, flush=True)
    print(tabulate(rows, headers=["method (w4 g128)", "blocks", "source GB (bf16)", "peak RSS MiB", "seconds",
                                  "seconds / block", "error"], tablefmt="github"))


if __name__ == "__main__":
    main()
