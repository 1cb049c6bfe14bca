"""One quantization run timed on two commits of qtool, alternating, on the same machine in the same session.

    python benchmarks/side_by_side.py --base ec8f89d --run awq:w4g64 --pairs 3

Issue 20's speed bar ("AWQ on the example model is not slower than today") is a ratio of two codes' times, and
this machine's times of one code spread by several percent from run to run and more from session to session: a
ratio is only meaningful between runs made one after the other, interleaved so that a drift of the machine falls on
both codes alike. Each commit is checked out into its own git worktree (the repository's files are not touched) and
each run is that worktree's ``benchmarks/quality.py --worker`` in a fresh process (its own time and peak RSS, no
scoring). A warm-up run of each code (not counted) fills the page cache and compiles its bytecode first; then the
pairs run in the order base-head, head-base, base-head, ... (ABBA), so that a steady drift of the machine falls on
each code as often first as second and cancels over an even number of pairs. Run nothing else heavy beside it.

Prints one row per run (seconds and peak RSS as the worker measured them: the quantization alone), the ratio
head / base of the mean times, each pair's ratio, and each code's spread (max - min over its mean, from two runs on):
a ratio whose distance from 1 is inside half the spread reads as level.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
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


def _check_run_name(tree: Path, run: str) -> str | None:
    """Why ``tree``'s own ``benchmarks/quality.py`` refuses the run name ``run`` (its message), or None where it
    accepts it: checked before any run, so that a variant one of the two codes lacks stops the comparison at once,
    not after the other code's warm-up."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import quality; quality._parse_run(sys.argv[2])")
    proc = subprocess.run([sys.executable, "-c", code, str(tree / "benchmarks"), run], cwd=tree,
                          env=dict(os.environ, PYTHONPATH=str(tree)), capture_output=True, text=True)
    return None if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["(no message)"])[-1]


@dataclass(frozen=True)
class Comparison:
    mean: dict[str, float]  # seconds, per code
    ratio: float  # head / base of the means
    pairs: list[float]  # head / base within each pair, in the order run
    spread: dict[str, float | None]  # (max - min) / mean per code; None below two runs


def summary(runs: list[tuple[int, str, float]]) -> Comparison:
    """``runs``: ``(pair, code, seconds)`` of the counted runs, ``code`` "base" or "head", two runs per pair.

    Raises ValueError without a run of each code."""
    by = {c: [s for _, k, s in runs if k == c] for c in ("base", "head")}
    if not by["base"] or not by["head"]:
        raise ValueError("a ratio needs at least one run of each code")
    mean = {c: statistics.fmean(v) for c, v in by.items()}
    per_pair: dict[int, dict[str, float]] = {}
    for pair, code, s in runs:
        per_pair.setdefault(pair, {})[code] = s
    pairs = [p["head"] / p["base"] for p in per_pair.values() if len(p) == 2]
    spread = {c: (max(v) - min(v)) / mean[c] if len(v) > 1 else None for c, v in by.items()}
    return Comparison(mean, mean["head"] / mean["base"], pairs, spread)


def _print(rows: list, runs: list, head_line: str) -> None:
    print(f"\n{head_line}\n")
    print(tabulate(rows, headers=["order", "code", "quantize s", "peak RSS MiB", ""], tablefmt="github"))
    if not any(c == "base" for _, c, _ in runs) or not any(c == "head" for _, c, _ in runs):
        return
    s = summary(runs)
    spread = {c: f"{100 * v:.1f}%" if v is not None else "n/a (one run)" for c, v in s.spread.items()}
    print(f"\nmean: base {s.mean['base']:.1f} s, head {s.mean['head']:.1f} s; head / base = {s.ratio:.3f}x "
          f"(pairs: {', '.join(f'{r:.3f}' for r in s.pairs)}); spread of the same code: base {spread['base']}, "
          f"head {spread['head']}")


def _interrupted(signum, frame):
    raise SystemExit(f"stopped by signal {signum}")  # so that the worktrees are removed (finally)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="the commit to compare against (e.g. the code before an issue)")
    p.add_argument("--head", default="HEAD", help="the commit measured (default: HEAD; uncommitted changes are not used)")
    p.add_argument("--run", default="awq:w4g64", help="one run as quality.py names it (default: awq:w4g64)")
    p.add_argument("--pairs", type=int, default=4, help="base/head pairs after the warm-up runs (default: 4)")
    p.add_argument("--model", default=None, help="model folder (default: the example model)")
    p.add_argument("--n-samples", type=int, default=128, help="calibration windows (default: 128)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window (default: 512)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of each run (default: 2)")
    args = p.parse_args()
    for flag, value in (("--pairs", args.pairs), ("--threads", args.threads)):
        if value < 1:
            p.error(f"{flag} {value}: at least 1")
    from example_data import ensure_example, example_model_dir

    if args.model is None:
        ensure_example()
        model = str(example_model_dir())
    elif (Path(args.model) / "config.json").is_file():
        model = str(Path(args.model).resolve())  # the runs start in the worktrees
    else:
        p.error(f"--model {args.model}: no config.json there (a Hugging Face model folder is needed)")
    commits = {}
    for code, rev in (("base", args.base), ("head", args.head)):
        try:
            commits[code] = _git("rev-parse", "--short", f"{rev}^{{commit}}")
        except subprocess.CalledProcessError:
            p.error(f"--{code} {rev}: not a commit of {ROOT}")
    signal.signal(signal.SIGTERM, _interrupted)
    work = Path(tempfile.mkdtemp(prefix="qtool-side-"))
    trees = {c: work / f"{c}-{commits[c]}" for c in commits}
    # (pair, code): pair 0 is the warm-up of both codes, not counted; then base-head, head-base, ...
    order = [(0, "base"), (0, "head")] + [(k, c) for k in range(1, args.pairs + 1)
                                          for c in (("base", "head") if k % 2 else ("head", "base"))]
    rows, runs = [], []
    try:
        for code, tree in trees.items():
            _git("worktree", "add", "--detach", "--quiet", str(tree), commits[code])
        for code, tree in trees.items():
            if why := _check_run_name(tree, args.run):
                raise SystemExit(f"--run {args.run}: the {code} code ({commits[code]}) does not take it: {why}")
        for n, (pair, code) in enumerate(order):
            spec = {"run": args.run, "model": model, "out": str(work / f"out-{n}"), "texts": {}, "eval_tokens": 0,
                    "n_samples": args.n_samples, "seqlen": args.seqlen, "seed": 0, "threads": args.threads,
                    "calib_data": None, "peer_python": None}
            got = _run_once(trees[code], spec, args.threads)
            shutil.rmtree(spec["out"], ignore_errors=True)
            rows.append([n + 1, f"{code} ({commits[code]})", f"{got['quant_seconds']:.1f}",
                         f"{got['peak_rss_mib']:,.0f}", "warm-up, not counted" if pair == 0 else f"pair {pair}"])
            if pair:
                runs.append((pair, code, got["quant_seconds"]))
            print(f"run {n + 1}/{len(order)}: {code} {got['quant_seconds']:.1f} s", file=sys.stderr, flush=True)
    finally:
        for tree in trees.values():
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
        done = len(rows) == len(order)
        if rows:
            _print(rows, runs, f"{args.run} on {model}, {args.n_samples} x {args.seqlen} tokens, {args.threads} threads, "
                               f"{os.cpu_count()} CPUs; base {commits['base']}, head {commits['head']}"
                               + ("" if done else f"; STOPPED after {len(rows)} of {len(order)} runs"))


if __name__ == "__main__":
    main()
