"""Quality table: perplexity, size, time and peak memory of each quantization method on the example model.

    python benchmarks/quality.py                       # the README's main job: fp32 / RTN / AWQ at w4 g64
    python benchmarks/quality.py --preset full         # + w4 g32 and w3 g64 rows, GPTQ, a second text genre
    python benchmarks/quality.py --runs rtn:w4g64,awq:w4g64 --texts wiki,code

Each quantization runs in its own process so its time and peak RSS are its own.
Checkpoints are kept under the cache (``$QTOOL_CACHE``, default ~/.cache/qtool/runs).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PRESETS = {
    "example": ("fp32,rtn:w4g64,awq:w4g64", "wiki"),
    "full": ("fp32,rtn:w4g64,awq:w4g64,gptq:w4g64,rtn:w4g32,awq:w4g32,gptq:w4g32,"
             "rtn:w3g64,awq:w3g64,gptq:w3g64", "wiki,code"),
}
_RUN = re.compile(r"^(rtn|awq|gptq)((?:\+\w+)*):w(\d)g(-?\d+)$")
# combinable: gptq+awq+asym:w4g64; damp10 = 0.10; shrink30 = Hessian shrinkage 0.30 (shrink0: none); xtx = the paper's XᵀX for v_proj (--no-value-hessian)
# minmax / hessian / mse = how each group's range is set (--range-search)
_GPTQ_VARIANTS = {"sym", "asym", "actorder", "awq", "dampN", "shrinkN", "xtx", "noguard", "minmax", "hessian", "mse"}
# awq+proxy: the closed form alone chooses scales (--n-judge 1); +unweighted: every token's error counts the
# same (--no-token-weighting); +noclip; +noguard (any data-aware method): no held-out windows (--held-out 0);
# +checkN (any data-aware method): N check windows per other kind of text in the whole-model check (--check-windows N)
_AWQ_VARIANTS = {"proxy", "unweighted", "noclip", "noguard", "qinputs"}


@dataclass
class Row:
    run: str
    ppl: dict  # text name -> perplexity
    eval_tokens: int
    size_mib: float
    quant_seconds: float
    peak_rss_mib: float
    rtn_blocks: str = ""  # blocks the RTN guard kept at round-to-nearest, "k/n"
    kl: dict | None = None  # text name -> mean KL(fp32 || this) of the next-token distributions, nats
    kept: str = ""  # the model the whole-model check kept (the method's, "rtn", "gptq"); "" where none ran


_PEER = re.compile(r"^peer-(\w+):w(\d)g(-?\d+)$")  # peer-hqq:w4g128, run by benchmarks/peers.py in the peers' venv


def _parse_run(run: str) -> dict:
    if run == "fp32":
        return {}
    if m := _PEER.match(run):
        return {"peer": m.group(1), "bits": int(m.group(2)), "group_size": int(m.group(3))}
    m = _RUN.match(run)
    if not m:
        raise SystemExit(f"--runs: {run!r} is not fp32 or METHOD:wBITSgGROUP (e.g. awq:w4g64, gptq+asym:w4g64)")
    method, variants, bits, group = m.groups()
    variants = set(filter(None, variants.split("+")))
    damp = [v for v in variants if re.fullmatch(r"damp\d+", v)]
    shrink = [v for v in variants if re.fullmatch(r"shrink\d+", v)]
    check = [v for v in variants if re.fullmatch(r"check\d+", v)]
    variants -= set(damp) | set(shrink) | set(check)
    if check and method == "rtn":
        raise SystemExit(f"--runs: {run!r}: +checkN is for the data-aware methods (awq, gptq)")
    if (damp or shrink) and method != "gptq":
        raise SystemExit(f"--runs: {run!r}: only gptq takes +dampN and +shrinkN")
    allowed = {"gptq": _GPTQ_VARIANTS, "awq": _AWQ_VARIANTS, "rtn": {"sym"}}[method]
    if variants - allowed:
        raise SystemExit(f"--runs: {run!r}: unknown variant; gptq takes +{', +'.join(sorted(_GPTQ_VARIANTS))}, "
                         f"awq +{', +'.join(sorted(_AWQ_VARIANTS))}, rtn +sym")
    opts = {"method": method, "bits": int(bits), "group_size": int(group)}
    if "noguard" in variants:
        opts["held_out"] = 0
    if check:
        opts["check_windows"] = int(check[0][5:])
    if method == "awq":
        awq = {"n_judge": 1 if "proxy" in variants else None, "clip": False if "noclip" in variants else None,
               "token_weighting": False if "unweighted" in variants else None,
               "quantized_inputs": True if "qinputs" in variants else None}
        opts["awq"] = {k: v for k, v in awq.items() if v is not None}
    if method == "rtn" and "sym" in variants:
        opts["sym"] = True  # the symmetric baseline for gptq+sym
    if method == "gptq":
        opts["sym"] = "sym" in variants  # the default is asymmetric, as for qtool gptq; +asym says it
        gptq = {"act_order": "actorder" in variants, "awq_first": "awq" in variants}
        opts["gptq"] = {k: v for k, v in gptq.items() if v}
        if "xtx" in variants:
            opts["gptq"]["value_hessian"] = False
        for search in ("minmax", "hessian", "mse"):
            if search in variants:
                opts["gptq"]["range_search"] = search
        if damp:
            opts["gptq"]["damp"] = int(damp[0][4:]) / 100
        if shrink:
            opts["gptq"]["shrink"] = int(shrink[0][6:]) / 100
    return opts


def worker(spec: dict) -> dict:
    """In a fresh process: quantize (unless fp32), then score each text. Prints one JSON line."""
    import torch

    import quant
    from quant import folder
    from quant.config import AWQOptions, GPTQOptions
    from quant.ppl import dequantize_once

    torch.set_num_threads(spec["threads"])
    src, out = spec["model"], spec["out"]
    opts = _parse_run(spec["run"])
    t0 = time.perf_counter()
    fell_back = kept = ""
    if "peer" in opts:
        peer = _run_peer(spec, opts)
    elif opts:
        if "gptq" in opts:
            opts["gptq"] = GPTQOptions(**opts["gptq"])
        if "awq" in opts:
            opts["awq"] = AWQOptions(**opts["awq"])
        report = quant.quantize(src, out, overwrite=True, progress=False, n_samples=spec["n_samples"],
                       seqlen=spec["seqlen"], seed=spec["seed"], calib_data=spec["calib_data"], **opts)
    quant_seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if "peer" in opts:  # its own process: its own time and memory
        quant_seconds, peak = peer["quant_seconds"], peer["peak_rss_mib"]
    elif opts and opts["method"] != "rtn":
        fell_back = f"{sum(b.rtn_fallback for b in report.blocks)}/{len(report.blocks)}"
        kept = report.model_check["kept"] if report.model_check else ""
    if not spec["texts"]:  # a timing run (benchmarks/side_by_side.py): nothing to score
        return asdict(Row(spec["run"], {}, 0, 0.0, quant_seconds if opts else 0.0, peak if opts else 0.0, fell_back,
                          None, kept))
    path = out if opts else src
    model, tok = quant.load_any(path, dtype="float32", device="cpu")
    ppl = {}
    n = 0
    with dequantize_once(model):  # one dense copy of each weight for all the scoring below
        for name, text_path in spec["texts"].items():
            r = quant.perplexity(model, tok, Path(text_path).read_text(), seqlen=512, max_tokens=spec["eval_tokens"])
            ppl[name], n = r.ppl, r.n_tokens
        kl = _kl_to_fp(model, tok, spec) if opts else None
    size = 0.0 if "peer" in opts else folder.folder_bytes(path, ("*.safetensors",)) / 2**20  # peers: dequantized
    return asdict(Row(spec["run"], ppl, n, size, quant_seconds if opts else 0.0, peak if opts else 0.0, fell_back,
                      kl, kept))


KL_WINDOWS = 4  # 512-token windows per text for the KL column (the fp32 model runs on them too)


def _kl_to_fp(model, tok, spec: dict) -> dict:
    """Mean KL(fp32 ‖ quantized) per token on the first KL_WINDOWS windows of each text: how far the
    quantized model's predictions moved, whatever the fp32 model's own calibration on the text."""
    import torch

    import quant
    from quant import arch as arch_table

    fp, _ = quant.load_any(spec["model"], dtype="float32", device="cpu")
    needs_bos = getattr(arch_table.ARCHITECTURES.get(fp.config.model_type), "needs_bos", False)
    out = {}
    for name, text_path in spec["texts"].items():
        ids = tok(Path(text_path).read_text()[:200_000], return_tensors="pt").input_ids[0]
        width = 512 - needs_bos
        windows = ids[: KL_WINDOWS * width].reshape(-1, width)
        if needs_bos:
            windows = torch.cat([torch.full((len(windows), 1), tok.bos_token_id), windows], dim=1)
        total = 0.0
        with torch.no_grad():
            for w in windows:
                lp = torch.log_softmax(fp(w[None]).logits.float(), -1)
                lq = torch.log_softmax(model(w[None]).logits.float(), -1)
                total += float((lp.exp() * (lp - lq)).sum(-1).mean())
        out[name] = total / len(windows)
    return out


def _run_peer(spec: dict, opts: dict) -> dict:
    """Quantize with a peer toolkit (benchmarks/peers.py, in the peers' venv): a dequantized fp32 folder."""
    python = spec.get("peer_python") or os.environ.get("QTOOL_PEER_PYTHON")
    if not python:
        raise SystemExit("peer runs need --peer-python (or QTOOL_PEER_PYTHON): the venv holding the peer toolkits")
    cmd = [python, str(Path(__file__).with_name("peers.py")), "--method", opts["peer"], "--model", spec["model"],
           "--bits", str(opts["bits"]), "--group-size", str(opts["group_size"]), "--out", spec["out"],
           "--n-samples", str(spec["n_samples"]), "--seqlen", str(spec["seqlen"])]
    if spec.get("calib_data"):
        cmd += ["--calib-data", spec["calib_data"]]
    # cwd: GPTQModel writes a logs/ folder into the working directory
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(spec["out"]).parent)
    if proc.returncode:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"peer {opts['peer']} failed with exit status {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _code_digest() -> str:
    """md5 of every source file of qtool and of this script: a cached result is reused only for the same code.

    The KV-cache package is left out: no weight-quantization run imports it."""
    import hashlib

    root = Path(__file__).resolve().parents[1]
    files = sorted(p for d in ("quant", "calib") for p in (root / d).rglob("*.py") if "kv" not in p.relative_to(root).parts)
    files += [Path(__file__).resolve()]
    return hashlib.md5(b"".join(f.read_bytes() for f in files)).hexdigest()


def run_all(runs: list[str], texts: list[str], args) -> list[Row]:
    from example_data import ensure_example, eval_text_path, example_model_dir

    ensure_example()
    model = str(args.model or example_model_dir())
    runs_dir = Path(args.cache) / "runs" / (Path(args.model).name if args.model else "")
    runs_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for run in runs:
        spec = {"run": run, "model": model, "out": str(runs_dir / run.replace(":", "-")),
                "texts": {t: str(eval_text_path(t)) for t in texts}, "eval_tokens": args.eval_tokens,
                "n_samples": args.n_samples, "seqlen": args.seqlen, "seed": args.seed, "threads": args.threads,
                "calib_data": args.calib_data, "peer_python": args.peer_python, "code": _code_digest()}
        done = Path(spec["out"] + ".result.json")  # a finished run of the same code is not redone (--fresh redoes it)
        if done.exists() and not args.fresh and json.loads(done.read_text())["spec"] == spec:
            rows.append(Row(**json.loads(done.read_text())["row"]))
            print(f"[{run}] cached: {rows[-1]}", file=sys.stderr, flush=True)
            continue
        print(f"[{run}] running ...", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True)
        if proc.returncode:
            sys.stderr.write(proc.stderr[-3000:])
            raise SystemExit(f"[{run}] failed with exit status {proc.returncode}")
        rows.append(Row(**json.loads(proc.stdout.strip().splitlines()[-1])))
        done.write_text(json.dumps({"spec": spec, "row": asdict(rows[-1])}) + "\n")
        print(f"[{run}] {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def table(rows: list[Row], texts: list[str]) -> str:
    from tabulate import tabulate

    fp = next((r for r in rows if r.run == "fp32"), None)
    rtn = {r.run.split(":")[1]: r for r in rows if r.run.startswith("rtn:")}
    headers = ["run"] + [f"PPL {t}" for t in texts] + [f"gap closed {t}" for t in texts] + [f"KL {t}" for t in texts] + [
        "size MiB", "quantize s", "peak RSS MiB", "blocks at RTN", "model kept"]
    out = []
    for r in rows:
        cells = [r.run] + [f"{r.ppl[t]:.3f}" for t in texts]
        base = rtn.get(r.run.split(":")[1]) if ":" in r.run else None
        for t in texts:
            if fp and base and base is not r and base.ppl[t] != fp.ppl[t]:
                cells.append(f"{(base.ppl[t] - r.ppl[t]) / (base.ppl[t] - fp.ppl[t]):.0%}")
            else:
                cells.append("")
        cells += [f"{r.kl[t]:.4f}" if r.kl else "" for t in texts]
        cells += [f"{r.size_mib:.1f}" if r.size_mib else "", f"{r.quant_seconds:.0f}" if r.quant_seconds else "",
                  f"{r.peak_rss_mib:.0f}" if r.peak_rss_mib else "", r.rtn_blocks, r.kept]
        out.append(cells)
    return tabulate(out, headers=headers, tablefmt="github")


def main() -> None:
    from example_data import cache_dir

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--preset", choices=sorted(PRESETS), default="example")
    p.add_argument("--runs", help="Comma-separated: fp32, METHOD:wBITSgGROUP (overrides the preset).")
    p.add_argument("--texts", help="Comma-separated evaluation texts: wiki, code (overrides the preset).")
    p.add_argument("--eval-tokens", type=int, default=10240, help="Tokens scored per text (512-token windows).")
    p.add_argument("--n-samples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0, help="Seed that draws the calibration windows (default 0).")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", help="A model folder (default: the example model, SmolLM2-135M).")
    p.add_argument("--calib-data", help="Calibration text (default: the built-in corpus).")
    p.add_argument("--peer-python", help="Python of the venv with the peer toolkits, for peer-METHOD runs.")
    p.add_argument("--fresh", action="store_true", help="Redo runs whose results are cached.")
    p.add_argument("--cache", default=str(cache_dir()))
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    runs, texts = PRESETS[args.preset]
    runs = (args.runs or runs).split(",")
    texts = (args.texts or texts).split(",")
    for r in runs:
        _parse_run(r)
    t0 = time.perf_counter()
    rows = run_all(runs, texts, args)
    name = Path(args.model).name if args.model else "SmolLM2-135M-Instruct"
    print(f"\n{name}, {args.eval_tokens} held-out tokens per text in 512-token windows; "
          f"calibration {args.n_samples} x {args.seqlen} tokens of {args.calib_data or 'the built-in corpus'} "
          f"(seed {args.seed}); "
          f"{platform.processor() or platform.machine()}, {args.threads} threads; "
          f"total {time.perf_counter() - t0:.0f} s")
    print("gap closed = (PPL_rtn - PPL) / (PPL_rtn - PPL_fp32) at the same bits and group size\n")
    print(table(rows, texts))


if __name__ == "__main__":
    from cli.entry import restart_with_huge_pages

    restart_with_huge_pages()  # the quantizations run as the qtool command runs them
    main()
