"""How many windows the whole-model check needs: paired losses of quantized checkpoints against RTN's.

    python benchmarks/check_windows.py --model ~/.cache/qtool/models/Qwen2.5-Coder-0.5B \\
        --rtn ~/.cache/qtool/runs/Qwen2.5-Coder-0.5B/rtn-w4g128 \\
        --candidates gptq=~/.cache/qtool/runs/Qwen2.5-Coder-0.5B/gptq-w4g128 --windows 8,32,64

The whole-model check (``quant.model_check.check_model``) refuses a candidate whose mean next-token
loss on ``--check-windows`` windows of another kind of text is above the all-RTN model's.
Both models are scored on the same windows, so what decides is the mean of the per-window
differences; this script prints that mean and its standard error for each number of windows,
on the windows the check itself would draw (``calib.data.calibration_batch`` of each built-in
kind, seed 0, as ``quant.pipeline._calibration_ids`` draws them), and on the first 20
consecutive windows of each evaluation text (``benchmarks/example_data.py``), which is what
the perplexity tables score. A plain forward of each loaded checkpoint gives the same losses
as the check's streamed pass (checked in tests/test_guard.py).

Differences are in nats per token, candidate minus RTN; "refused" is what the check would
decide on that kind with that many windows.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import quant  # noqa: E402
from calib.data import BUILTIN_KINDS, builtin_text, calibration_batch  # noqa: E402
from example_data import eval_text_path  # noqa: E402
from quant import arch as arch_table  # noqa: E402
from quant import folder, model_io  # noqa: E402
from quant.modules import dense_weights  # noqa: E402

EVAL_WINDOWS = 20


def window_losses(model, windows: torch.Tensor) -> list[float]:
    """Mean next-token loss of each window ``[n, seqlen]`` (int64), nats per token."""
    out = []
    with torch.no_grad():
        for w in windows:
            out.append(float(model(w[None], labels=w[None]).loss))
    return out


def eval_windows(tok, name: str, seqlen: int, bos: int | None, n: int = EVAL_WINDOWS) -> torch.Tensor:
    """The first ``n`` consecutive windows ``[n, seqlen]`` of evaluation text ``name`` (BOS first if given), as
    ``qtool ppl`` and ``model_table.py`` score them."""
    ids = tok(eval_text_path(name).read_text(), return_tensors="pt", add_special_tokens=False).input_ids[0]
    width = seqlen - (bos is not None)
    if len(ids) < n * width:
        raise SystemExit(f"{eval_text_path(name)} has {len(ids)} tokens; {n} windows need {n * width}")
    windows = ids[: n * width].reshape(n, width)
    if bos is None:
        return windows
    return torch.cat([torch.full((n, 1), bos, dtype=windows.dtype), windows], dim=1)


def paired(diffs: list[float]) -> tuple[float, float]:
    n = len(diffs)
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1) if n > 1 else math.nan
    return mean, math.sqrt(var / n)


def named_checkpoints(parser: argparse.ArgumentParser, runs: str, first: dict[str, str]) -> dict[str, str]:
    """``first`` then each ``NAME=CHECKPOINT`` of the comma-separated ``runs``; a malformed entry, a name
    given twice or already in ``first``, or a folder that does not exist ends the script with ``parser.error``
    (exit 2) before any model is read."""
    out = dict(first)
    for item in runs.split(","):
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            parser.error(f"{item!r} is not NAME=CHECKPOINT")
        if name in out:
            parser.error(f"the name {name!r} is given twice" if name not in first else
                         f"no checkpoint may be named {name!r}: that name is {first[name]}")
        if not Path(path).expanduser().is_dir():
            parser.error(f"{name}={path}: no such checkpoint folder")
        out[name] = path
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="The source model folder (tokenizer, BOS).")
    p.add_argument("--rtn", required=True, help="The RTN checkpoint (the check's all-RTN model).")
    p.add_argument("--candidates", required=True, help="Comma-separated NAME=CHECKPOINT.")
    p.add_argument("--kinds", default="fiction,code", help=f"Built-in kinds of text, from {', '.join(BUILTIN_KINDS)}.")
    p.add_argument("--windows", default="8,32", help="Comma-separated numbers of check windows per kind.")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-eval", action="store_true", help="Leave out the evaluation texts' windows.")
    args = p.parse_args()
    paths = named_checkpoints(p, args.candidates, {"rtn": args.rtn})
    if not Path(args.rtn).expanduser().is_dir():
        p.error(f"--rtn {args.rtn}: no such checkpoint folder")
    windows = [int(n) for n in args.windows.split(",") if n.strip().isdigit()]
    if len(windows) != len(args.windows.split(",")) or min(windows) < 2:
        p.error(f"--windows {args.windows}: give whole numbers of at least 2 (a standard error needs two windows)")
    for kind in args.kinds.split(","):
        if kind not in BUILTIN_KINDS:
            p.error(f"--kinds: {kind!r} is not a built-in kind of text; choose from {', '.join(BUILTIN_KINDS)}")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    tok = model_io.load_tokenizer(args.model)
    model_type = folder.read_config(args.model).get("model_type")
    needs_bos = getattr(arch_table.ARCHITECTURES.get(model_type), "needs_bos", False)
    bos = tok.bos_token_id if needs_bos else None
    sets = {}  # (text, n) -> windows
    for kind in args.kinds.split(","):
        for n in map(int, args.windows.split(",")):
            sets[(f"check {kind}", n)] = calibration_batch(tok, [builtin_text(kind)], n, args.seqlen, args.seed, needs_bos)
    for name in () if args.no_eval else ("wiki", "code"):
        sets[(f"eval {name}", EVAL_WINDOWS)] = eval_windows(tok, name, args.seqlen, bos)
    losses = {}
    for name, path in paths.items():
        model, _ = quant.load_any(str(Path(path).expanduser()), dtype="float32", device="cpu")
        with dense_weights(model):  # each weight dequantized once, not on every forward
            losses[name] = {key: window_losses(model, w) for key, w in sets.items()}
        print(f"{name}: scored ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
        del model
    rows = []
    for key in sets:
        rtn = losses["rtn"][key]
        for name in paths:
            if name == "rtn":
                continue
            mean, se = paired([c - r for c, r in zip(losses[name][key], rtn)])
            rows.append([name, key[0], key[1], f"{sum(losses[name][key]) / key[1]:.4f}", f"{sum(rtn) / key[1]:.4f}",
                         f"{mean:+.4f} ± {se:.4f}", f"{mean / se:+.1f}" if se else "",
                         ("refused" if mean > 0 else "kept") if key[0].startswith("check") else ""])
    print(f"\n{Path(args.model).name}; seed {args.seed}; {time.perf_counter() - t0:.0f} s\n")
    print(tabulate(rows, headers=["candidate", "windows of", "n", "loss", "RTN loss", "candidate - RTN (± SE)",
                                  "in SE", "check decides"], tablefmt="github"))


if __name__ == "__main__":
    main()
