"""The `qtool` console script restarts itself once with glibc's huge-pages tunable (cli/entry.py)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli.entry import HUGE_PAGES_TUNABLE, huge_pages_environment

ROOT = Path(__file__).resolve().parents[1]


def test_the_tunable_is_added_once_and_other_tunables_are_kept():
    env = huge_pages_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "X": "1"})
    if not sys.platform.startswith("linux"):
        assert env is None
        return
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{HUGE_PAGES_TUNABLE}" and env["X"] == "1"
    assert huge_pages_environment(env) is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tunables are Linux-only")
def test_the_command_runs_again_in_the_same_process_with_the_tunable():
    code = ("import os, sys; print('run', os.getpid(), os.environ.get('GLIBC_TUNABLES'), flush=True); "
            "sys.argv = ['qtool', '--version']; from cli.entry import console; console()")
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    runs = [ln.split() for ln in out.stdout.splitlines() if ln.startswith("run ")]
    assert [r[2] for r in runs] == ["None", HUGE_PAGES_TUNABLE]  # restarted once, with the tunable
    assert runs[0][1] == runs[1][1]  # execve: the same process
    assert "version" in out.stdout


@pytest.mark.parametrize("args,said", [
    (["awq", "M", "-o", "X", "--n-grid", "0"], "--n-grid 0 is out of range"),
    (["gptq", "M", "-o", "X", "--shrink", "2"], "--shrink 2.0 is out of range"),
    (["rtn", "M", "-o", "X", "--group-size", "48"], "--group-size 48 is not supported"),
    (["awq", "M", "-o", "X", "--seed", str(2**64)], f"--seed {2**64} is out of range"),  # was a traceback
    (["kv", "calibrate", "M", "--seed", str(-2**63 - 1)], f"--seed {-2**63 - 1} is out of range"),  # was a traceback
    (["kv", "calibrate", "M", "--n-samples", "100000"], "--n-samples 100000 is out of range"),  # was no limit
    # options that were silently unused
    (["awq", "M", "-o", "X", "--judge", "error", "--fisher-probes", "8"], "--fisher-probes 8 would not be used"),
    (["awq", "M", "-o", "X", "--no-clip", "--clip-grid", "5"], "--clip-grid 5 would not be used: --no-clip"),
    (["gptq", "M", "-o", "X", "--calib-data", "a.txt", "--text-field", "t"], "--text-field t would not be used"),
    (["kv", "calibrate", "M", "--text-field", "t"], "--text-field t would not be used: the shipped corpus"),
    # a wrong model folder (it was said after torch was imported)
    (["awq", "nope", "-o", "X"], "nope: no such folder"), (["ppl", "nope"], "nope: no such folder"),
    (["info", "nope"], "nope: no such folder"), (["kv", "calibrate", "nope"], "nope: no such folder"),
    (["--help"], ""), (["awq", "--help"], "")])
def test_help_and_bad_options_are_answered_before_torch_is_imported(args, said, tmp_path):
    """Importing torch and transformers takes seconds: help, a refused option and a wrong path must not wait for them
    (quant's API names are imported on first use, cli/report.py imports what it needs inside its functions)."""
    (tmp_path / "M").mkdir()
    (tmp_path / "M" / "config.json").write_text("{}")  # a folder that passes the path check: "M" is the options'
    args = [str(tmp_path / a) if a in ("M", "nope") else a for a in args]
    said = said.replace("nope", str(tmp_path / "nope"))
    code = (f"import sys; sys.argv = ['qtool', *{args!r}]\n"
            "from cli.main import main\n"
            "code = 0\n"
            "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
            "print('exit', code, 'torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.stdout.splitlines()[-1] == f"exit {2 if said else 0} False False", out.stderr
    if said:
        assert out.stderr.startswith(f"error: {said}") and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_the_api_names_are_imported_on_first_use():
    code = ("import sys, quant; before = 'torch' in sys.modules; f = quant.quantize; names = dir(quant)\n"
            "from quant.pipeline import quantize\n"
            "print(before, f is quantize, quant.kv.__name__, 'perplexity' in names)\n"
            "try:\n    quant.nonexistent\nexcept AttributeError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.stdout.splitlines() == ["False True quant.kv True", "module 'quant' has no attribute 'nonexistent'"], \
        out.stderr
