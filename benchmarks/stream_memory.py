"""Peak host memory of quantization: flat in depth, and a model larger than RAM under a hard cap.

    python benchmarks/stream_memory.py example [--old DIR] [--methods awq]   # RTN/AWQ/GPTQ w4 g64, example model
    python benchmarks/stream_memory.py depth                 # synthetic llamas, 1x / 2x / 4x the depth
    python benchmarks/stream_memory.py capped                # RTN and AWQ on a 3.15 GB bf16 llama under a 1 GiB cap
    python benchmarks/stream_memory.py capped --methods awq --cap-gb 1.5 --layers 52   # AWQ: 4.95 GB (3.07x) under 1.5 GiB
    python benchmarks/stream_memory.py device --layers 16    # on a GPU: peak device memory against one block's weights

Every quantization runs in its own process; its peak RSS is that process's own
``VmHWM`` (``QuantReport.peak_rss_mb``; not ``ru_maxrss``, which inherits this script's peak from writing the
synthetic models). ``--old DIR`` also runs the same
quantization with the qtool checkout in DIR (e.g. a worktree at an older commit), in
the same invocation, for a before/after table. ``capped`` puts the process in a
cgroup-v1 memory controller (``/sys/fs/cgroup/memory/qtool-bench``; needs root) whose
limit kills it past the cap, and compares the checkpoint with an uncapped run's
(sha256 of every tensor file). Prints tables; asserts nothing.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

WORKER = """
import json, logging, sys, time
sys.path.insert(0, {root!r})
import quant
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")  # per block, live
t = time.perf_counter()
r = quant.quantize({src!r}, {out!r}, progress=False, overwrite=True, **{kw})
print(json.dumps({{"peak_rss_mb": r.peak_rss_mb, "peak_device_mb": r.peak_device_mb,
                  "seconds": time.perf_counter() - t, "block_seconds": [b.seconds for b in r.blocks],
                  "blocks": [dict(b.info) for b in r.blocks]}}, default=str))
"""


def run(root: Path, src: Path, out: Path, kw: str, cgroup: Path | None = None) -> dict:
    """Quantize in a fresh process with the qtool checkout ``root``; its peak RSS and wall time."""
    code = WORKER.format(root=str(root), src=str(src), out=str(out), kw=kw)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):  # a stopped earlier benchmark: start over
        shutil.rmtree(stale)

    def enter_cgroup():
        (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    env = None
    if (root / "cli" / "entry.py").is_file():  # as that checkout's qtool command runs: with huge pages
        sys.path.insert(0, str(root))
        from cli.entry import huge_pages_environment

        env = huge_pages_environment(dict(os.environ))
        sys.path.remove(str(root))
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, preexec_fn=enter_cgroup if cgroup else None)
    err = []
    for line in proc.stderr:  # passed on as it comes (the log of each block), so a stopped benchmark shows where
        err.append(line)
        print(line, end="", file=sys.stderr, flush=True)
    stdout = proc.stdout.read()
    if proc.wait():
        return {"error": f"exit {proc.returncode}: {err[-1].strip() if err else ''}"}
    return json.loads(stdout.strip().splitlines()[-1])


def synthetic_llama(path: Path, layers: int, hidden: int, inter: int, heads: int, kv_heads: int, dtype: str,
                    vocab: int = 32000) -> Path:
    """A random-weight llama with a byte tokenizer (the test models' one), written once and reused."""
    if (path / "config.json").is_file():
        return path
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import byte_tokenizer

    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                                  num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                                  max_position_embeddings=2048, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(path, max_shard_size="1GB")
    byte_tokenizer().save_pretrained(path)
    return path


def digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.glob("model*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def size_gb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) / 1e9


def example(args) -> None:
    from example_data import ensure_example, example_model_dir
    from tabulate import tabulate

    ensure_example()
    src = example_model_dir()
    roots = [("this checkout", ROOT)] + ([("--old " + args.old, Path(args.old))] if args.old else [])
    rows = []
    for method in (args.methods or "rtn,awq,gptq").split(","):
        kw = f"dict(method='{method}', group_size=64" + (f", n_samples={args.n_samples})" if method != "rtn" else ")")
        for name, root in roots:
            r = run(root, src, Path(args.tmp) / f"{method}-{name.split()[0]}", kw)
            rows.append([method, name, f"{r.get('peak_rss_mb', 0):,.0f}", f"{r.get('seconds', 0):.0f}", r.get("error", "")])
            print(rows[-1], file=sys.stderr, flush=True)
    print(tabulate(rows, headers=["method (w4 g64)", "code", "peak RSS MiB", "seconds", "error"], tablefmt="github"))


def depth(args) -> None:
    from tabulate import tabulate

    rows = []
    for mult in (1, 2, 4):
        src = synthetic_llama(Path(args.tmp) / f"depth{mult}", 8 * mult, 576, 1536, 9, 3, "float32")
        for method in ("rtn", "awq"):
            kw = f"dict(method='{method}', group_size=64, n_samples={args.n_samples}, seqlen=256)"
            r = run(ROOT, src, Path(args.tmp) / f"depth{mult}-{method}", kw)
            rows.append([method, 8 * mult, f"{size_gb(src):.2f}", f"{r.get('peak_rss_mb', 0):,.0f}",
                         f"{r.get('seconds', 0):.0f}", r.get("error", "")])
            print(rows[-1], file=sys.stderr, flush=True)
    print(tabulate(rows, headers=["method", "blocks", "source GB (fp32)", "peak RSS MiB", "seconds", "error"],
                   tablefmt="github"))


def capped(args) -> None:
    from tabulate import tabulate

    # Named by depth: a model written for another --layers is not reused.
    src = synthetic_llama(Path(args.tmp) / f"big-{args.layers}", args.layers, 2048, 5632, 16, 4, "bfloat16")
    cap = int(args.cap_gb * 2**30)
    ratio = size_gb(src) * 1e9 / cap
    print(f"source {size_gb(src):.2f} GB of bf16 weights: {ratio:.2f}x the {args.cap_gb} GiB cap"
          + ("" if ratio >= 3 else " (under 3x: give more --layers)"), file=sys.stderr, flush=True)
    cgroup = Path("/sys/fs/cgroup/memory/qtool-bench")
    cgroup.mkdir(exist_ok=True)
    (cgroup / "memory.limit_in_bytes").write_text(str(cap))
    rows = []
    for method in (args.methods or "rtn,awq").split(","):
        kw = f"dict(method='{method}', group_size=128, n_samples={args.n_samples}, seqlen=128)"
        # Capped first: a kill shows at once, not after the uncapped run.
        for label, cg in ((f"cap {args.cap_gb} GiB", cgroup), ("uncapped", None)):
            out = Path(args.tmp) / f"big-{method}-{label.split()[0]}"
            t = time.perf_counter()
            r = run(ROOT, src, out, kw, cg)
            rows.append([method, label, f"{size_gb(src):.2f}", f"{r.get('peak_rss_mb', 0):,.0f}",
                         f"{time.perf_counter() - t:.0f}", digest(out) if "error" not in r else "", r.get("error", "")])
            print(rows[-1], file=sys.stderr, flush=True)
    print(tabulate(rows, headers=["method", "run", "source GB (bf16)", "peak RSS MiB", "seconds",
                                  "sha256 of the shards", "error"], tablefmt="github"))
    print(f"\ncgroup memory.failcnt {(cgroup / 'memory.failcnt').read_text().strip()}, "
          f"max_usage {int((cgroup / 'memory.max_usage_in_bytes').read_text()) / 2**30:.2f} GiB")


def device(args) -> None:
    """The streaming path on a GPU (``--device``): only the current block and its activations are on the device, so
    the peak device memory is about one block plus the calibration activations, not the model. Synthetic bf16 llama
    of width 2048 (``--layers`` blocks of 90 MiB each); w4 g128, ``--n-samples`` x 512 windows."""
    from statistics import median

    from safetensors import safe_open
    from tabulate import tabulate

    src = synthetic_llama(Path(args.tmp) / f"big-{args.layers}", args.layers, 2048, 5632, 16, 4, "bfloat16")
    block = 0
    for f in src.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            block += sum(st.get_slice(k).get_shape()[0] * st.get_slice(k).get_shape()[-1] * 2
                         for k in st.keys() if ".layers.0." in k and len(st.get_slice(k).get_shape()) == 2)
    block_mb = block / 2**20
    acts_mb = args.n_samples * 512 * 2048 * 2 / 2**20  # one set of hidden states, bf16
    rows = []
    for method in (args.methods or "rtn,gptq,awq").split(","):
        kw = (f"dict(method='{method}', group_size=128, n_samples={args.n_samples}, seqlen=512, "
              f"device={args.device!r})")
        r = run(ROOT, src, Path(args.tmp) / f"device-{method}", kw)
        secs = r.get("block_seconds") or [0.0]
        rows.append([method, args.layers, f"{block_mb * args.layers:,.0f}", f"{block_mb:,.0f}", f"{acts_mb:,.0f}",
                     f"{r.get('peak_device_mb', 0):,.0f}", f"{r.get('peak_rss_mb', 0):,.0f}", f"{median(secs):.2f}",
                     f"{r.get('seconds', 0):.0f}", r.get("error", "")])
        print(rows[-1], "seconds per block:", " ".join(f"{s:.1f}" for s in secs), file=sys.stderr, flush=True)
    print(tabulate(rows, headers=["method (w4 g128)", "blocks", "all blocks' weights MiB (bf16)", "one block MiB",
                                  "hidden states MiB (bf16)", "peak device MiB", "peak RSS MiB", "median s / block",
                                  "seconds", "error"], tablefmt="github"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["example", "depth", "capped", "device"])
    p.add_argument("--old", help="Another qtool checkout to run side by side (example).")
    p.add_argument("--n-samples", type=int, default=32)
    p.add_argument("--layers", type=int, default=32, help="Blocks of the capped model (2048 wide: 0.09 GB each in bf16, plus 0.26 GB of embeddings and head).")
    p.add_argument("--cap-gb", type=float, default=1.0)
    p.add_argument("--methods", help="The methods to run, comma-separated (example: rtn,awq,gptq; capped: rtn,awq).")
    p.add_argument("--tmp", default="/tmp/qtool-stream-bench")
    p.add_argument("--device", default="cuda", help="Where the blocks are computed (device).")
    args = p.parse_args()
    Path(args.tmp).mkdir(parents=True, exist_ok=True)
    {"example": example, "depth": depth, "capped": capped, "device": device}[args.what](args)


if __name__ == "__main__":
    main()
