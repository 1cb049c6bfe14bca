import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # tests/tiny_models.py

import pytest


@pytest.fixture(autouse=True)
def progress_after_every_block(monkeypatch):
    """A tiny model's blocks take milliseconds: the progress record would be saved after the last block only
    (quant.block_loop.PROGRESS_EVERY_S). The tests of stopping and resuming stop after a given block's record, as a
    large model's run records every block; the test of the interval sets its own."""
    monkeypatch.setattr("quant.block_loop.PROGRESS_EVERY_S", 0)
