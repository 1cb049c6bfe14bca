"""The held-out text ``qtool ppl`` scores when none is given."""
from __future__ import annotations

from importlib import resources


def default_eval_text() -> str:
    """About 100 kB of held-out English Wikipedia (see quant/data/SOURCE.md)."""
    return resources.files("quant").joinpath("data/wiki_heldout_sample.txt").read_text(encoding="utf-8")
