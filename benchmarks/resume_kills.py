"""kill -9 at random blocks, three times in one run, then finish: the checkpoint and the time lost.

    python benchmarks/resume_kills.py                       # AWQ w4 g64 on the example model, 32 windows
    python benchmarks/resume_kills.py --method rtn --kills 3 --seed 1
    python benchmarks/resume_kills.py --model DIR --n-samples 128

As a user would: the ``qtool`` command quantizes the model once without interruption, then again into
another folder, where each attempt is killed with SIGKILL (its process group: no cleanup of any kind runs)
in the middle of a block chosen at random (the kill lands a random fraction of a median block's time after
the block before it was recorded), and the same command is run again until it finishes. Prints, per attempt,
the block it resumed at, the blocks finished and its wall time; then the sha256 of every output file of both
runs (``qtool.json`` aside: it records times and paths), and the time lost to the kills against the median
block time, split into the unfinished blocks' work and the cost of starting again. Asserts nothing; exit 1
if a file differs.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))


def digests(path: Path) -> dict[str, str]:
    """sha256 of every file under ``path`` except ``qtool.json``."""
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(path.rglob("*")) if f.is_file() and f.name != "qtool.json"}


def blocks_done(out: Path) -> int:
    """Blocks recorded in the stopped run's progress record of ``out`` (0 where there is none yet)."""
    for record in out.parent.glob(f".{out.name}.tmp-*/progress.json"):
        try:
            return int(json.loads(record.read_text())["blocks_done"])
        except (OSError, ValueError, KeyError):
            return 0  # being replaced this instant: the next poll reads it
    return 0


def command(args, out: Path) -> list[str]:
    return [sys.executable, "-c", "from cli.entry import console; console()", args.method, args.model, "-o", str(out),
            "--group-size", str(args.group_size), *(["--n-samples", str(args.n_samples)] if args.method != "rtn" else [])]


def attempt(args, out: Path, kill_after: int | None, delay: float) -> tuple[float, int, int]:
    """One run of the command; killed ``delay`` seconds after block ``kill_after`` is recorded (None: to the end).
    Returns (wall seconds, the blocks recorded when it started, exit status)."""
    start_blocks = blocks_done(out)
    t = time.perf_counter()
    # A progress record after every block (the default is at most one a minute): the kills follow given blocks.
    proc = subprocess.Popen(command(args, out), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env={**os.environ, "QTOOL_PROGRESS_EVERY_S": "0"})
    if kill_after is not None:
        while proc.poll() is None and blocks_done(out) < kill_after:
            time.sleep(0.05)
        time.sleep(delay)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    _, err = proc.communicate()
    if kill_after is None and proc.returncode:
        sys.exit(f"the run failed (exit {proc.returncode}): {err.strip().splitlines()[-1] if err.strip() else ''}")
    return time.perf_counter() - t, start_blocks, proc.returncode


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="Model folder (default: the example model).")
    p.add_argument("--method", default="awq", choices=["rtn", "awq", "gptq"])
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--n-samples", type=int, default=32)
    p.add_argument("--kills", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tmp", default="/tmp/qtool-resume-bench")
    args = p.parse_args()
    from tabulate import tabulate

    if args.model is None:
        from example_data import ensure_example, example_model_dir

        ensure_example()
        args.model = str(example_model_dir())
    tmp = Path(args.tmp)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    straight, killed = tmp / "straight", tmp / "killed"

    t_straight, _, _ = attempt(args, straight, None, 0.0)
    report = json.loads((straight / "qtool.json").read_text())["qtool"]["report"]
    block_s = [b["seconds"] for b in report["blocks"]]
    n_blocks, median = len(block_s), statistics.median(block_s)
    rng = random.Random(args.seed)
    kill_at = sorted(rng.sample(range(1, n_blocks - 1), args.kills))  # distinct blocks, never the first or last
    rows, total, redone = [], 0.0, 0.0
    for k in kill_at + [None]:
        delay = rng.uniform(0.1, 0.9) * median if k is not None else 0.0
        seconds, start, rc = attempt(args, killed, k, delay)
        total += seconds
        redone += delay if rc else 0.0  # the part of a block a kill threw away
        rows.append([len(rows) + 1, start, k if k is not None else n_blocks, "-" if k is None else f"{delay:.1f}",
                     rc, f"{seconds:.1f}"])
        print(rows[-1], file=sys.stderr, flush=True)
    print(tabulate(rows, headers=["attempt", "resumed at block", "killed after block", "kill delay s", "exit",
                                  "seconds"], tablefmt="github"))
    a, b = digests(straight), digests(killed)
    same = a == b
    print(f"\n{len(a)} files; sha256 of every one equal to the uninterrupted run's: {same}")
    for name in sorted(set(a) | set(b)):
        if a.get(name) != b.get(name):
            print(f"  differs: {name}")
    lost, kills = total - t_straight, max(args.kills, 1)
    # What a kill costs: the unfinished block's work (at most one block), and starting again (imports, the
    # calibration text tokenized, the saved activations read): a fixed cost, not a function of the depth.
    print(tabulate([[n_blocks, f"{median:.1f}", f"{t_straight:.1f}", f"{total:.1f}", f"{lost:.1f}",
                     f"{lost / kills:.1f}", f"{lost / kills / median:.2f}", f"{redone / kills:.1f}",
                     f"{(lost - redone) / kills:.1f}"]],
                   headers=["blocks", "median block s", "uninterrupted s", f"with {args.kills} kills s", "lost s",
                            "lost per kill s", "per kill / block", "block work lost per kill s",
                            "restart per kill s"], tablefmt="github"))
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
