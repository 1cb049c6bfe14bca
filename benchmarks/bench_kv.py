"""KV-cache quantization benchmark: perplexity, bytes per token, long generation, GPU decode throughput.

    PYTHONPATH=. python benchmarks/bench_kv.py                       # every CPU section on SmolLM2-135M
    PYTHONPATH=. python benchmarks/bench_kv.py --sections ppl --tokens 4096
    PYTHONPATH=. python benchmarks/bench_kv.py --sections decode --device cuda   # GPU: batch 1/16/64

Sections:
* ``ppl``: perplexity on the held-out Wikipedia text, fp cache / int8 / int4 x per-token or calibrated
  per-channel keys x fp window 0 or ``--window``, through ``quant.kv.kv_perplexity`` (the cache is read by
  every query; see its docstring for the chunking rule).
* ``bytes``: bytes per token of the whole model's cache (all layers, K and V, scales and zeros included),
  measured from the cache after ``--bytes-tokens`` tokens, against a float16 and a float32 cache.
* ``gen``: one greedy generation to a ``--gen-context``-token context (``--gen-prompt`` tokens of prompt,
  the rest generated), each cache type in its own process: peak RSS, cache bytes at the end, decode tokens/s.
* ``decode``: decode tokens/s at batch 1/16/64 (needs a GPU; skipped otherwise).
"""
from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.example_data import ensure_example, eval_text_path
from quant.kv import (
    KVCacheConfig,
    KVCalibration,
    QuantizedKVCache,
    cache_nbytes,
    kv_perplexity,
)

logger = logging.getLogger("bench_kv")
KINDS = ("fp", "int8", "int4")


@dataclass
class PplRow:
    cache: str
    keys: str
    window: int
    ppl: float
    vs_fp_pct: float
    chunk: int
    seconds: float


@dataclass
class BytesRow:
    cache: str
    keys: str
    bytes_per_token: float
    vs_fp16: float
    vs_fp32: float


@dataclass
class GenRow:
    cache: str
    context: int
    new_tokens: int
    decode_tok_s: float
    kv_mib: float
    peak_rss_mib: float
    same_tokens_as_fp: str


def kv_config(kind: str, keys: str, window: int, calib: KVCalibration | None) -> KVCacheConfig | None:
    if kind == "fp":
        return None
    return KVCacheConfig(bits=int(kind[3:]), keys=keys, window=window, calibration=calib if keys == "channel" else None)


def load_model(path, dtype=torch.float32, device="cpu"):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    return model, AutoTokenizer.from_pretrained(path)


def ensure_calibration(model_dir: Path, path: Path) -> KVCalibration:
    if not path.exists():
        from calib.data import calibration_batch, load_texts
        from calib.kv import collect_key_ranges

        model, tok = load_model(model_dir)
        ids = calibration_batch(tok, load_texts(None), 32, 512, 0)
        collect_key_ranges(model, ids).save(path)
    return KVCalibration.load(path)


def run_ppl(args, calib) -> list[PplRow]:
    model, tok = load_model(args.model)
    text = eval_text_path("wiki").read_text(encoding="utf-8")
    windowed = args.windowed.split(",") if args.windowed else []
    configs = [("fp", "-", 0)] + [(k, keys, w) for k in ("int8", "int4") for keys in ("token", "channel")
                                  for w in (0, args.window) if w == 0 or k in windowed]
    rows, fp_ppl = [], None
    for kind, keys, window in configs:
        kv = kv_config(kind, keys, window, calib)
        chunk = args.chunk if window else args.seqlen
        res = kv_perplexity(model, tok, text, kv, seqlen=args.seqlen, max_tokens=args.tokens, chunk=chunk)
        fp_ppl = fp_ppl or res.ppl
        rows.append(PplRow(kind, keys, window, res.ppl, 100 * (res.ppl / fp_ppl - 1), chunk, res.seconds))
        logger.info("%s", rows[-1])
    return rows


def run_bytes(args, calib) -> list[BytesRow]:
    from transformers import AutoConfig, DynamicCache

    config = AutoConfig.from_pretrained(args.model)
    n = args.bytes_tokens
    heads, d = calib.shape
    kv_in = torch.randn(1, heads, n, d, dtype=torch.float16)

    def measured(cache) -> float:
        for i in range(config.num_hidden_layers):
            cache.update(kv_in, kv_in, i)
        return cache_nbytes(cache) / n

    fp16 = measured(DynamicCache(config=config))
    rows = [BytesRow("fp16", "-", fp16, 1.0, 2.0), BytesRow("fp32", "-", 2 * fp16, 0.5, 1.0)]
    for kind in ("int8", "int4"):
        for keys in ("token", "channel"):
            b = measured(QuantizedKVCache(config, kv_config(kind, keys, 0, calib)))
            rows.append(BytesRow(kind, keys, b, fp16 / b, 2 * fp16 / b))
    return rows


def gen_one(args) -> dict:
    """One generation in this process (so that peak RSS belongs to one cache type)."""
    import psutil
    from transformers import DynamicCache

    model, tok = load_model(args.model)
    calib = KVCalibration.load(args.calib) if args.gen_keys == "channel" else None
    kv = kv_config(args.gen_one, args.gen_keys, args.window if args.gen_window else 0, calib)
    text = eval_text_path("wiki").read_text(encoding="utf-8")
    ids = tok(text[: args.gen_prompt * 8], add_special_tokens=False, return_tensors="pt").input_ids[:, : args.gen_prompt]
    cache = DynamicCache(config=model.config) if kv is None else QuantizedKVCache(model.config, kv)
    new = args.gen_context - args.gen_prompt
    t0 = time.perf_counter()
    with torch.no_grad():
        model(ids[:, :-1], past_key_values=cache, use_cache=True)  # prefill, not timed as decode
    t1 = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=new,
                         min_new_tokens=new, do_sample=False, pad_token_id=tok.eos_token_id)
    t2 = time.perf_counter()
    rss = psutil.Process().memory_info()
    peak = getattr(rss, "peak_wset", None) or _peak_rss_bytes()
    return {"tokens": out[0, ids.shape[1]:].tolist(), "decode_tok_s": new / (t2 - t1), "prefill_s": t1 - t0,
            "kv_bytes": cache_nbytes(cache), "peak_rss": peak}


def _peak_rss_bytes() -> int:
    from quant.heap import peak_rss_mb

    return int(peak_rss_mb() * 2**20)  # this process's own (ru_maxrss would inherit this script's parent's)


def run_gen(args) -> list[GenRow]:
    runs = [("fp", "token", False), ("int8", "token", False), ("int4", "token", False), ("int4", "channel", True)]
    rows, fp_tokens = [], None
    for kind, keys, window in runs:
        cmd = [sys.executable, __file__, "--gen-one", kind, "--gen-keys", keys, "--model", str(args.model),
               "--calib", str(args.calib), "--gen-prompt", str(args.gen_prompt), "--gen-context", str(args.gen_context),
               "--window", str(args.window)] + (["--gen-window"] if window else [])
        res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        fp_tokens = fp_tokens or res["tokens"]
        same = sum(a == b for a, b in zip(res["tokens"], fp_tokens))
        name = kind if kind == "fp" else f"{kind} {keys} keys" + (f", window {args.window}" if window else "")
        rows.append(GenRow(name, args.gen_context, len(res["tokens"]), res["decode_tok_s"], res["kv_bytes"] / 2**20,
                           res["peak_rss"] / 2**20, f"{same}/{len(fp_tokens)}"))
        logger.info("%s", rows[-1])
    return rows


def random_llama(layers: int):
    """A Llama-7B-shaped decoder (hidden 4096, 32 heads, MHA) with ``layers`` layers and random fp16
    weights on the GPU: decode speed depends on shapes, not weight values, and needs no model files."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.float16).eval()
    return model


def run_decode(args) -> list[dict]:
    """Decode tokens/s at batch 1/16/64 after a 1024-token prompt, fp16 cache vs int8/int4 (GPU only)."""
    if not torch.cuda.is_available():
        logger.warning("decode section skipped: no GPU")
        return []
    if args.model is None:
        model = random_llama(args.decode_layers)
    else:
        model, _ = load_model(args.model, dtype=torch.float16, device="cuda")
    from transformers import DynamicCache

    def new_cache(kv):  # the fp16 baseline is an explicit DynamicCache, not whatever generate() picks
        return DynamicCache(config=model.config) if kv is None else QuantizedKVCache(model.config, kv)

    rows = []
    for batch in (1, 16, 64):
        base = None
        for kind in KINDS:
            kv = kv_config(kind, "token", 0, None)
            ids = torch.randint(0, 1000, (batch, 1024), device="cuda")
            mask = torch.ones_like(ids)
            model.generate(ids, attention_mask=mask, past_key_values=new_cache(kv), max_new_tokens=4, min_new_tokens=4,
                           do_sample=False, pad_token_id=0)
            times = []
            for _ in range(2):  # the faster of two (the first run of a cache type can carry one-time costs)
                cache = new_cache(kv)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=64, min_new_tokens=64,
                               do_sample=False, pad_token_id=0)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
                del cache
            tok_s = batch * 64 / min(times)
            base = base or tok_s
            rows.append({"batch": batch, "cache": kind, "tok_s": tok_s, "vs_fp16_cache": tok_s / base,
                         "runs_s": " ".join(f"{t:.2f}" for t in times)})
            torch.cuda.empty_cache()
    return rows


def table(rows, floatfmt=".3f") -> str:
    return tabulate([asdict(r) if not isinstance(r, dict) else r for r in rows], headers="keys", tablefmt="github",
                    floatfmt=floatfmt)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None,
                    help="model folder (default: the example SmolLM2-135M; for the decode section alone, a random-weight "
                         "Llama-7B-shaped model of --decode-layers layers)")
    ap.add_argument("--decode-layers", type=int, default=8, help="decode: layers of the random Llama-7B-shaped model")
    ap.add_argument("--calib", type=Path, default=None, help="KV calibration file (made if missing)")
    ap.add_argument("--sections", default="ppl,bytes,gen,decode")
    ap.add_argument("--tokens", type=int, default=10_240, help="perplexity: tokens of the Wikipedia text")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--window", type=int, default=64, help="fp window of the windowed rows")
    ap.add_argument("--windowed", default="int4", help="cache types that also get a row with the fp window")
    ap.add_argument("--chunk", type=int, default=16, help="perplexity: tokens per forward when a window is set")
    ap.add_argument("--bytes-tokens", type=int, default=4096)
    ap.add_argument("--gen-prompt", type=int, default=3584)
    ap.add_argument("--gen-context", type=int, default=4096)
    ap.add_argument("--gen-one", choices=KINDS, help=argparse.SUPPRESS)
    ap.add_argument("--gen-keys", default="token", help=argparse.SUPPRESS)
    ap.add_argument("--gen-window", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=None, help="also write the tables (markdown) here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sections = args.sections.split(",")
    if args.model is None and (sections != ["decode"] or args.gen_one):
        args.model = ensure_example()["model"]
    if sections == ["decode"] and not args.gen_one:  # needs no calibration
        rows = run_decode(args)
        where = f"model {args.model}" if args.model else f"random-weight Llama-7B-shaped model, {args.decode_layers} layers"
        report = (f"### GPU decode throughput ({where}, 1024-token prompt, 64 new tokens, per-token keys)\n\n"
                  + (table(rows, ".2f") if rows else "skipped: no GPU"))
        print(report)
        if args.out:
            with open(args.out, "a") as f:
                f.write(report + "\n")
        return
    if args.calib is None:
        args.calib = Path.home() / ".cache" / "qtool" / "kv" / f"{args.model.name}.kv_calib.safetensors"
    if args.gen_one:
        print(json.dumps(gen_one(args)))
        return
    calib = ensure_calibration(args.model, args.calib)
    parts = []
    if "ppl" in sections:
        parts.append(f"### Perplexity, {args.tokens:,} tokens of wiki_eval.txt, {args.seqlen}-token windows\n\n"
                     + table(run_ppl(args, calib)))
    if "bytes" in sections:
        parts.append(f"### KV cache bytes per token (whole model, after {args.bytes_tokens} tokens)\n\n"
                     + table(run_bytes(args, calib), ".2f"))
    if "gen" in sections:
        parts.append(f"### Generation to a {args.gen_context}-token context ({args.gen_prompt}-token prompt)\n\n"
                     + table(run_gen(args), ".2f"))
    if "decode" in sections:
        rows = run_decode(args)
        parts.append("### GPU decode throughput\n\n" + (table(rows, ".1f") if rows else "skipped: no GPU"))
    report = "\n\n".join(parts)
    print(report)
    if args.out:
        with open(args.out, "a") as f:  # append: gpu_check.sh gathers every benchmark's tables in one file
            f.write(report + "\n")


if __name__ == "__main__":
    main()
