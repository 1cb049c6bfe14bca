"""Rigs shared by the tests of the per-block RTN guard and of the whole-model check: a tiny run's settings, a scale
search made worse on purpose, and a checkpoint's packed tensors."""
import torch
from safetensors.torch import load_file

from quant.awq.search import ScaleResult, candidate_scales

OPTS = dict(bits=4, group_size=32, n_samples=4, seqlen=32, dtype="float32", progress=False)


def wild_scales(real):
    """search_scale made worse on purpose: ``mean|x| ** 6`` (normalised), a scale no grid offers."""
    def search(w, h, x_mean, spec, n_grid=20):
        res = real(w, h, x_mean, spec, n_grid)
        s = candidate_scales(x_mean, torch.tensor([6.0]))[0]
        return ScaleResult(s, 6.0, res.errors, res.ratios, res.candidates)
    return search


def packed(path):
    return {k: v for k, v in load_file(str(path / "model.safetensors")).items()
            if k.endswith(("qweight", "qzeros", "scales"))}
