"""Mixture-of-experts on synthetic models (no MoE weights are available offline).

    python benchmarks/moe_synthetic.py experts [--n-samples 16]   # 8 vs 64 experts: peak RSS against block weights
    python benchmarks/moe_synthetic.py block [--n-samples 32]     # one Qwen3-30B-A3B-shaped block: time, memory, tokens
    python benchmarks/moe_synthetic.py block --methods gptq --old /tmp/wt   # beside another checkout of qtool

``experts``: two random qwen3_moe models that differ only in the number of experts (8 and 64;
hidden 512, expert FFN 128, top-2, 2 blocks, bf16), quantized with RTN, GPTQ and AWQ; the growth
of the peak RSS from 8 to 64 experts beside the growth of one block's weights (float32, as the block is
computed on the CPU) and of the whole model's.

``block``: a random model with one decoder block of Qwen3-30B-A3B's shape (hidden 2048, 32 query / 4
key-value heads of 128, 128 experts of FFN 768, top-8, vocab 151,936, bf16), quantized with RTN, GPTQ and
AWQ at w4 g128: seconds, peak RSS, and the routed calibration tokens per expert (min / median / max)
with the experts that took their statistics from every token. ``--old``: each method also with another
checkout of qtool, right after this one's run (a before/after in one invocation).

Each quantization runs in its own process (peak RSS = its own ``VmHWM``: ``QuantReport.peak_rss_mb``). Prints tables; asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def synthetic_moe(path: Path, **shape) -> Path:
    """A random-weight qwen3_moe in bf16 with the tests' byte tokenizer, written once and reused."""
    if (path / "config.json").is_file():
        return path
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import byte_tokenizer

    config = AutoConfig.for_model("qwen3_moe", decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False,
                                  max_position_embeddings=4096, bos_token_id=256, eos_token_id=257,
                                  pad_token_id=257, **shape)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02)
    model.save_pretrained(path, max_shard_size="2GB")
    byte_tokenizer().save_pretrained(path)
    return path


def block_bytes(path: Path) -> int:
    """Bytes of decoder block 0's weights in float32 (as a block is computed on the CPU)."""
    from math import prod

    from safetensors import safe_open

    n = 0
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), "pt") as s:
            n += sum(prod(s.get_slice(k).get_shape()) for k in s.keys() if ".layers.0." in k)
    return 4 * n


def _quantize(src: Path, out: Path, method: str, n_samples: int, seqlen: int, group: int, checkout: Path = ROOT) -> dict:
    from stream_memory import run

    kw = f"dict(method='{method}', bits=4, group_size={group}, n_samples={n_samples}, seqlen={seqlen})"
    return run(checkout, src, out, kw)


def experts(tmp: Path, n_samples: int) -> None:
    from tabulate import tabulate

    rows, rss = [], {}
    sizes = {}
    for n in (8, 64):
        src = synthetic_moe(tmp / f"moe-{n}", hidden_size=512, moe_intermediate_size=128, intermediate_size=1024,
                            num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                            num_experts=n, num_experts_per_tok=2, vocab_size=300)
        sizes[n] = (block_bytes(src), sum(f.stat().st_size for f in src.glob("*.safetensors")))
        for method in ("rtn", "gptq", "awq"):
            r = _quantize(src, tmp / f"out-{n}-{method}", method, n_samples, 128, 128)
            rss[n, method] = r.get("peak_rss_mb", float("nan"))
            print(n, method, r, file=sys.stderr, flush=True)
    d_block = (sizes[64][0] - sizes[8][0]) / 2**20
    d_model = (sizes[64][1] - sizes[8][1]) / 2**20
    for method in ("rtn", "gptq", "awq"):
        d = rss[64, method] - rss[8, method]
        rows.append([method, f"{rss[8, method]:,.0f}", f"{rss[64, method]:,.0f}", f"{d:,.0f}", f"{d_block:,.0f}",
                     f"{d / d_block:.2f}", f"{d_model:,.0f}"])
    print(tabulate(rows, headers=["method (w4 g128)", "peak RSS MiB, 8 experts", "64 experts", "growth MiB",
                                  "growth of one block's weights (fp32) MiB", "RSS growth / block growth",
                                  "growth of the bf16 model files MiB"], tablefmt="github"))


def block(tmp: Path, n_samples: int, methods: list[str], old: Path | None = None) -> None:
    from tabulate import tabulate

    src = synthetic_moe(tmp / "qwen3-30b-a3b-1block", hidden_size=2048, moe_intermediate_size=768,
                        intermediate_size=6144, num_hidden_layers=1, num_attention_heads=32, num_key_value_heads=4,
                        head_dim=128, num_experts=128, num_experts_per_tok=8, vocab_size=151936)
    size = sum(f.stat().st_size for f in src.glob("*.safetensors")) / 2**30
    rows = []
    runs = [(m, code) for m in methods for code in ([ROOT] + ([old] if old else []))]
    for method, code in runs:
        r = _quantize(src, tmp / f"out-{method}", method, n_samples, 512, 128, code)
        info = (r.get("blocks") or [{}])[0]
        label = method if code == ROOT else f"{method} ({code})"
        rows.append([label, f"{size:.2f}", f"{r.get('peak_rss_mb', float('nan')):,.0f}", f"{r.get('seconds', 0):.0f}",
                     info.get("expert tokens min/med/max", "-"), info.get("expert fallback", "-"),
                     info.get("kept", ""), r.get("error", "")])
        print(rows[-1], file=sys.stderr, flush=True)
    print(tabulate(rows, headers=["method (w4 g128)", "source GiB (bf16)", "peak RSS MiB", "seconds",
                                  "routed tokens per expert min/med/max", "experts with every token's statistics",
                                  "guard", "error"], tablefmt="github"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["experts", "block"])
    p.add_argument("--n-samples", type=int, default=None, help="calibration windows (experts: 16 x 128; block: 32 x 512)")
    p.add_argument("--tmp", default=str(Path(tempfile.gettempdir()) / "qtool-moe-bench"))
    p.add_argument("--methods", default="rtn,gptq,awq", help="block: the methods to run, comma-separated")
    p.add_argument("--old", help="block: another qtool checkout to run each method with as well")
    args = p.parse_args()
    tmp = Path(args.tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    if args.what == "experts":
        experts(tmp, args.n_samples or 16)
    else:
        block(tmp, args.n_samples or 32, args.methods.split(","), Path(args.old) if args.old else None)


if __name__ == "__main__":
    main()
