import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # tests/tiny_models.py

import pytest
import torch


def pytest_configure(config):
    """``make test`` runs the suite in pytest-xdist workers, as many as the machine's cores (the Makefile's
    TEST_WORKERS): each worker computes on one thread, and so do the qtool processes a test starts
    (OMP_NUM_THREADS is inherited). Two workers on two cores with two threads each would oversubscribe them, and
    torch's small ops then wait on each other's threads (quant/gptq/solver.py measured 50x on a busy machine)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def progress_after_every_block(monkeypatch):
    """A tiny model's blocks take milliseconds: the progress record would be saved after the last block only
    (quant.block_loop.PROGRESS_EVERY_S). The tests of stopping and resuming stop after a given block's record, as a
    large model's run records every block; the test of the interval sets its own."""
    monkeypatch.setattr("quant.block_loop.PROGRESS_EVERY_S", 0)
