"""One quantization run timed on two commits of qtool, alternating, on the same machine in the same session.

    python benchmarks/side_by_side.py --base ec8f89d --run awq:w4g64 --pairs 3

Issue 20's speed bar ("AWQ on the example model is not slower than today") is a ratio of two codes' times, and
this machine's times of one code spread by several percent from run to run and more from session to session: a
ratio is only meaningful between runs made one after the other, interleaved so that a drift of the machine falls on
both codes alike. Each commit is checked out into its own git worktree (the repository's files are not touched) and
each run is that worktree's ``benchmarks/quality.py --worker`` in a fresh process (its own time and peak RSS, no
scoring). A warm-up run of the head (not counted) fills the page cache first; then base and head alternate,
``--pairs`` times. Run nothing else heavy beside it.

Prints one row per run (seconds and peak RSS as the worker measured them: the quantization alone) and the ratio
head / base of the mean times, with each pair's ratio and each code's spread (max - min over its mean), so that a
ratio inside the spread reads as level.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from tabulate import tabulate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], check=True, capture_output=True, text=True).stdout.strip()


def _run_once(tree: Path, spec: dict, threads: int) -> dict:
    """``tree``'s own worker on ``spec``: ``{"quant_seconds": s, "peak_rss_mib": MiB}``."""
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, str(tree / "benchmarks" / "quality.py"), "--worker", json.dumps(spec)],
                          cwd=tree, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"{tree.name}: the run failed with exit status {proc.returncode}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"quant_seconds": row["quant_seconds"], "peak_rss_mib": row["peak_rss_mib"]}


def summary(runs: list[tuple[str, float]]) -> dict:
    """``runs``: ``(code, seconds)`` in the order run, ``code`` "base" or "head", alternating from a base run.

    Returns the mean of each code, their ratio head / base, each consecutive (base, head) pair's ratio and each
    code's spread ``(max - min) / mean``. Raises ValueError without a run of each code."""
    by = {c: [s for k, s in runs if k == c] for c in ("base", "head")}
    if not by["base"] or not by["head"]:
        raise ValueError("a ratio needs at least one run of each code")
    mean = {c: statistics.fmean(v) for c, v in by.items()}
    pairs = [h / b for b, h in zip(by["base"], by["head"])]
    spread = {c: (max(v) - min(v)) / mean[c] for c, v in by.items()}
    return {"mean": mean, "ratio": mean["head"] / mean["base"], "pairs": pairs, "spread": spread}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="the commit to compare against (e.g. the code before an issue)")
    p.add_argument("--head", default="HEAD", help="the commit measured (default: HEAD; uncommitted changes are not used)")
    p.add_argument("--run", default="awq:w4g64", help="one run as quality.py names it (default: awq:w4g64)")
    p.add_argument("--pairs", type=int, default=3, help="base/head pairs after the warm-up run (default: 3)")
    p.add_argument("--model", default=None, help="model folder (default: the example model)")
    p.add_argument("--n-samples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if args.pairs < 1:
        p.error(f"--pairs {args.pairs}: at least 1 pair is needed for a ratio")
    from example_data import ensure_example, example_model_dir

    model = args.model or str(example_model_dir())
    if args.model is None:
        ensure_example()
    elif not (Path(model) / "config.json").is_file():
        p.error(f"--model {model}: no config.json there (a Hugging Face model folder is needed)")
    commits = {}
    for code, rev in (("base", args.base), ("head", args.head)):
        try:
            commits[code] = _git("rev-parse", "--short", f"{rev}^{{commit}}")
        except subprocess.CalledProcessError:
            p.error(f"--{code} {rev}: not a commit of {ROOT}")
    _git("worktree", "prune")  # the records of worktrees a killed run left behind (their folders are gone with /tmp)
    work = Path(tempfile.mkdtemp(prefix="qtool-side-"))
    trees = {c: work / f"{c}-{commits[c]}" for c in commits}
    try:
        for code, tree in trees.items():
            _git("worktree", "add", "--detach", "--quiet", str(tree), commits[code])
        order = ["head"] + ["base", "head"] * args.pairs  # the first run warms the page cache and is not counted
        rows, runs = [], []
        for k, code in enumerate(order):
            spec = {"run": args.run, "model": model, "out": str(work / f"out-{k}"), "texts": {}, "eval_tokens": 0,
                    "n_samples": args.n_samples, "seqlen": args.seqlen, "seed": 0, "threads": args.threads,
                    "calib_data": None, "peer_python": None, "code": commits[code]}
            got = _run_once(trees[code], spec, args.threads)
            shutil.rmtree(spec["out"], ignore_errors=True)
            rows.append([k + 1, f"{code} ({commits[code]})", f"{got['quant_seconds']:.1f}", f"{got['peak_rss_mib']:,.0f}",
                         "warm-up, not counted" if k == 0 else ""])
            if k:
                runs.append((code, got["quant_seconds"]))
            print(f"run {k + 1}/{len(order)}: {code} {got['quant_seconds']:.1f} s", file=sys.stderr, flush=True)
    finally:
        for tree in trees.values():
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    s = summary(runs)
    print(f"\n{args.run} on {model}, {args.n_samples} x {args.seqlen} tokens, {args.threads} threads, "
          f"{os.cpu_count()} CPUs; base {commits['base']}, head {commits['head']}\n")
    print(tabulate(rows, headers=["order", "code", "quantize s", "peak RSS MiB", ""], tablefmt="github"))
    print(f"\nmean: base {s['mean']['base']:.1f} s, head {s['mean']['head']:.1f} s; head / base = {s['ratio']:.3f}x "
          f"(pairs: {', '.join(f'{r:.3f}' for r in s['pairs'])}); spread of the same code: base "
          f"{100 * s['spread']['base']:.1f}%, head {100 * s['spread']['head']:.1f}%")


if __name__ == "__main__":
    main()
