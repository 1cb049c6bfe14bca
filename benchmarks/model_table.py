"""The multi-model quality table: every method at its defaults on several real models, beside RTN and peers.

    python benchmarks/model_table.py                                  # every model of real_models.MODELS_TABLE
    python benchmarks/model_table.py --models SmolLM2-135M,gemma-3-270m --peer-python /root/peers-venv/bin/python
    python benchmarks/model_table.py --calibration domain --models Qwen2.5-Coder-0.5B  # calibrated on Python
    python benchmarks/model_table.py --calibration domain --seeds 0,1,2  # three draws of the calibration windows

Per model: fp32, RTN, AWQ, GPTQ and AWQ+GPTQ at w4 and the model's group size (128, or
64 where the hidden size needs it), and each peer of ``--peers`` (run by
``benchmarks/peers.py`` in its own venv, given by ``--peer-python``; left out without
it). Calibration: ``--n-samples`` windows of one built-in text, the Wikipedia half in
``calib/corpus/wiki.txt`` for every model (``--calibration wiki``, the default), or the
text of each model's own domain (``--calibration domain``: Python, ``calib/corpus/code.txt``,
for the Qwen2.5-Coder models, Wikipedia for the others). Evaluation, whichever the
calibration: the other Wikipedia half and Python code from modules the calibration text
does not hold (``benchmarks/example_data.py``), so one of the two texts is always of a
kind the calibration lacks.

Every run is a process of ``benchmarks/quality.py`` and is cached beside its
checkpoint (``<cache>/runs/<model>/<run>.result.json``): an interrupted table
resumes where it stopped; ``--fresh`` redoes everything. Prints one table per model,
then the summary the acceptance bars are read from.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402
from example_data import cache_dir  # noqa: E402
from real_models import MODELS, ensure_model  # noqa: E402

from calib.data import BUILTIN_KINDS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODELS = ("SmolLM2-135M", "gemma-3-270m", "Qwen2.5-Coder-0.5B", "Qwen2.5-Coder-1.5B")
METHODS = ("awq", "gptq", "gptq+awq")  # quality.py run names: AWQ, GPTQ, AWQ+GPTQ at their defaults
TEXTS = ("wiki", "code")


def gap_closed(row, rtn, fp, text: str) -> float:
    return (rtn.ppl[text] - row.ppl[text]) / (rtn.ppl[text] - fp.ppl[text])


def mean_gap_closed(by_run: dict, method: str) -> float:
    """``method``'s gap closed averaged over the two texts (the bars' per-model figure); ``by_run``: run name ->
    quality.Row, with ``fp32`` and ``rtn``."""
    return sum(gap_closed(by_run[method], by_run["rtn"], by_run["fp32"], t) for t in TEXTS) / len(TEXTS)


def calib_kind(name: str, calibration: str) -> str:
    """The built-in kind of text (a key of ``calib.data.BUILTIN_KINDS``) that model ``name`` is calibrated on."""
    return MODELS[name].domain if calibration == "domain" else "wiki"


def summary(results: dict[str, list], peers: list[str], calibration: str) -> str:
    """Per model: each method's gap closed on both texts, and whether it is at or below RTN."""
    from tabulate import tabulate

    rows, per_method = [], {m: [] for m in METHODS}
    for name, table in results.items():
        by_run = {r.run.split(":")[0]: r for r in table}
        fp, rtn = by_run["fp32"], by_run["rtn"]
        best_peer = min((by_run[f"peer-{p}"] for p in peers if f"peer-{p}" in by_run),
                        key=lambda r: sum(r.ppl.values()), default=None)
        cells = [f"{name} (calibrated on {calib_kind(name, calibration)})"]
        for m in METHODS:
            if m not in by_run:
                cells.append("")
                continue
            gaps = [gap_closed(by_run[m], rtn, fp, t) for t in TEXTS]
            per_method[m].append(mean_gap_closed(by_run, m))
            worse = [t for t in TEXTS if by_run[m].ppl[t] > rtn.ppl[t]]
            cells.append(" / ".join(f"{g:.0%}" for g in gaps) + (f" (worse than RTN on {', '.join(worse)})" if worse else ""))
        ours = [by_run[m] for m in METHODS if m in by_run]
        best = min(ours, key=lambda r: sum(r.ppl.values()), default=None)
        if best_peer and best:
            beats = all(best.ppl[t] <= best_peer.ppl[t] for t in TEXTS)
            cells.append(f"{best.run.split(':')[0]} {'beats' if beats else 'does not beat'} {best_peer.run.split(':')[0]}")
        else:
            cells.append("")
        rows.append(cells)
    rows.append(["mean"] + [f"{sum(v) / len(v):.0%}" if v else "" for v in per_method.values()] + [""])
    headers = ["model"] + [f"{m} gap closed (wiki / code)" for m in METHODS] + ["best qtool vs best peer"]
    return tabulate(rows, headers=headers, tablefmt="github")


def spread(by_seed: dict[int, dict[str, list]], methods: list[str]) -> str:
    """Per model and method, the gap closed (two texts averaged) at each calibration seed, their mean and range; then
    the best method's mean over the models at each seed and over the seeds (the issue-20 bar read from several runs).

    ``by_seed``: ``{seed: {model: [quality.Row]}}``, every seed with the same models. Raises ValueError where a seed
    lacks a model or a model lacks its fp32 or RTN row."""
    from tabulate import tabulate

    seeds = sorted(by_seed)
    models = list(by_seed[seeds[0]])
    if any(list(by_seed[s]) != models for s in seeds):
        raise ValueError(f"every seed needs the same models; got {({s: list(by_seed[s]) for s in seeds})}")
    rows, best_means = [], {s: [] for s in seeds}
    for name in models:
        by_run = {}
        for s in seeds:
            by_run[s] = {r.run.split(":")[0]: r for r in by_seed[s][name]}
            if "fp32" not in by_run[s] or "rtn" not in by_run[s]:
                raise ValueError(f"{name}, seed {s}: the fp32 and RTN rows are needed for the gap closed")
        best = []
        for m in methods:
            if any(m not in by_run[s] for s in seeds):
                continue
            means = [mean_gap_closed(by_run[s], m) for s in seeds]
            rows.append([name, m] + [f"{g:.1%}" for g in means]
                        + [f"{sum(means) / len(means):.1%}", f"{max(means) - min(means):.1%}"])
            best = [max(b, g) for b, g in zip(best, means)] if best else means
        for s, b in zip(seeds, best):
            best_means[s].append(b)
    per_seed = [sum(v) / len(v) for v in best_means.values() if v]
    rows.append(["best method, mean over models", ""] + [f"{v:.1%}" for v in per_seed]
                + [f"{sum(per_seed) / len(per_seed):.1%}" if per_seed else "", f"{max(per_seed) - min(per_seed):.1%}" if per_seed else ""])
    headers = ["model", "method"] + [f"seed {s}" for s in seeds] + ["mean", "max - min"]
    return tabulate(rows, headers=headers, tablefmt="github")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help=f"Comma-separated, from {', '.join(MODELS)}.")
    p.add_argument("--methods", default=",".join(METHODS), help="Comma-separated quality.py run names.")
    p.add_argument("--peers", default="hqq,gptq", help="Comma-separated peer methods of benchmarks/peers.py.")
    p.add_argument("--peer-python", help="Python of the peers' venv; without it peer rows are left out.")
    p.add_argument("--calibration", choices=("wiki", "domain"), default="wiki",
                   help="wiki: every model calibrated on calib/corpus/wiki.txt; domain: each on the built-in text "
                        "of its own domain (Python for the Qwen2.5-Coder models). Cached apart.")
    p.add_argument("--seeds", default="0",
                   help="Comma-separated seeds that draw the calibration windows (default 0). Each seed's data-aware "
                        "runs are cached apart (seed 0 where they always were); fp32 and RTN, which read no "
                        "calibration, are run once. With several seeds a spread table follows the summaries.")
    p.add_argument("--n-samples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=10240)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--fresh", action="store_true")
    p.add_argument("--cache", default=str(cache_dir()))
    args = p.parse_args()
    try:
        seeds = [int(x) for x in args.seeds.split(",") if x]
    except ValueError:
        p.error(f"--seeds {args.seeds!r}: give whole numbers separated by commas, e.g. 0,1,2")
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        p.error(f"--seeds {args.seeds!r}: give one or more distinct non-negative whole numbers, e.g. 0,1,2")
    unknown = [n for n in args.models.split(",") if n not in MODELS]
    if unknown:
        p.error(f"--models: {', '.join(unknown)} not among {', '.join(MODELS)}")
    peers = [x for x in args.peers.split(",") if x] if args.peer_python else []
    methods = [m for m in args.methods.split(",") if m]
    by_seed: dict[int, dict[str, list]] = {s: {} for s in seeds}
    t0 = time.perf_counter()
    for name in args.models.split(","):
        model = MODELS[name]
        g = f"w4g{model.group_size}"
        kind = calib_kind(name, args.calibration)
        # Wikipedia-calibrated rows keep the cache they always had; other calibrations get their own folder.
        cache = Path(args.cache) if kind == "wiki" else Path(args.cache) / f"calib-{kind}"
        model_dir = str(ensure_model(name))
        aware = [f"{m}:{g}" for m in methods] + [f"peer-{x}:{g}" for x in peers]

        def run_args(seed: int, folder: Path) -> argparse.Namespace:
            return argparse.Namespace(model=model_dir, calib_data=str(ROOT / "calib/corpus" / BUILTIN_KINDS[kind]),
                                      n_samples=args.n_samples, seqlen=args.seqlen, seed=seed, threads=args.threads,
                                      eval_tokens=args.eval_tokens, cache=str(folder), peer_python=args.peer_python,
                                      fresh=args.fresh)

        base = quality.run_all(["fp32", f"rtn:{g}"], list(TEXTS), run_args(0, cache))  # no calibration read
        for seed in seeds:
            rows = quality.run_all(aware, list(TEXTS), run_args(seed, cache if seed == 0 else cache / f"seed-{seed}"))
            by_seed[seed][name] = base + rows
            print(f"\n## {name} ({model.family}, w4 {g[2:]}, calibrated on calib/corpus/{BUILTIN_KINDS[kind]}, "
                  f"seed {seed})\n")
            print(quality.table(by_seed[seed][name], list(TEXTS)))
    print(f"\nCalibration {args.n_samples} x {args.seqlen} tokens of each model's text above; {args.eval_tokens} tokens "
          f"per text; {args.threads} threads; total {time.perf_counter() - t0:.0f} s "
          "(cached runs count only their load)\n")
    for seed in seeds:
        print(f"\nSeed {seed}:\n")
        print(summary(by_seed[seed], peers, args.calibration))
    if len(seeds) > 1:
        print("\nGap closed, the two texts averaged, per calibration seed:\n")
        print(spread(by_seed, methods))


if __name__ == "__main__":
    main()
