"""The ``qtool`` console script: restarts once with huge pages for the allocator, then runs the CLI.

Large tensors come from their own memory maps (:mod:`quant.heap`); the kernel faults each 4 KiB page
in and zeroes it on first touch, which costs a CPU quantization run a fifth of its time. glibc (2.35
and later) backs its maps with transparent huge pages when the tunable ``glibc.malloc.hugetlb=1`` is
set, but reads tunables only when a process starts. So the command sets it and runs itself again
(``os.execve``: the same process id, arguments and standard streams) before anything is imported;
the Python API leaves the process alone (set ``GLIBC_TUNABLES`` yourself for the same effect).
Where the kernel's THP setting is ``never`` or glibc is older, the tunable is ignored.
"""
from __future__ import annotations

import os
import sys

HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"


def huge_pages_environment(env: dict[str, str]) -> dict[str, str] | None:
    """``env`` with the huge-pages tunable added to ``GLIBC_TUNABLES``, or None where it is already there or
    does not apply (not Linux)."""
    if not sys.platform.startswith("linux") or HUGE_PAGES_TUNABLE.split("=")[0] in env.get("GLIBC_TUNABLES", ""):
        return None
    return {**env, "GLIBC_TUNABLES": ":".join(filter(None, [env.get("GLIBC_TUNABLES"), HUGE_PAGES_TUNABLE]))}


def restart_with_huge_pages() -> None:
    """Run this process's command again with :func:`huge_pages_environment` (``os.execve``); returns where
    nothing needs to change or the restart failed (the run is then slower, not wrong). Call it first thing:
    what ran before it runs twice."""
    env = huge_pages_environment(dict(os.environ))
    if env is not None and getattr(sys, "orig_argv", None):
        try:
            os.execve(sys.executable, sys.orig_argv, env)
        except OSError:
            pass


def console() -> None:
    restart_with_huge_pages()
    from cli.main import main

    main()
