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
