"""What an error at a module's output costs the model: the loss gradient and its Gauss-Newton curvature.

An error ``e`` added to the output ``h`` of a module inside the network changes the mean
next-token loss (nats/token) by, to second order,

    ΔL(e) ≈ Σ g·e + ½ eᵀ H e,    g = ∂L/∂h,    H ≈ (1/N) E_y[(G_y·e)²]-form (Gauss-Newton)

where the Gauss-Newton curvature is estimated from *probes*: ``G_y = ∂/∂h Σ_t ℓ_t(y_t)``, the
gradient of the summed loss of labels ``y_t`` drawn from the model's own next-token distribution.
For the softmax cross-entropy ``E_y[G_y G_yᵀ]`` is ``Σ_t J_tᵀ F_t J_t`` (Fisher = Gauss-Newton;
the cross terms of different positions vanish in expectation), so ``½ eᵀ H e`` of the mean loss is
``(1/2N) E_y Σ_windows (G_y·e)²`` (Martens, "New insights and perspectives on the natural gradient
method", JMLR 2020, §9). Windows do not interact, so each probe gives one sample per window.

Why: every squared-error objective (AWQ's closed form and judge, the RTN guard) misses the first
term. On Qwen2.5-Coder-0.5B AWQ's choices raise it by as much as they lower the second, and the
model ends worse than RTN; ``benchmarks/block_taylor.py`` checks the sum of both terms over the
blocks against the measured loss of whole checkpoints (benchmarks/RESULTS.md).

:func:`loss_gradients` runs the full-precision model once forward and ``1 + probes`` times
backward over a few windows, one decoder block at a time (blocks are loaded and released as the
pipeline streams them), and keeps ``g`` and the probes at every block's output;
:func:`module_gradients` carries them back to modules inside a block (AWQ's judges).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from calib.collectors import record_block_calls, take_first_hidden
from calib.runner import first_output, move
from quant.errors import QtoolError

log = logging.getLogger(__name__)

STORE_DTYPE = torch.bfloat16  # every block's gradients wait (on disk, in the pipeline) until its turn
HEAD_TOKENS = 128  # positions through the head at a time: their logits are [HEAD_TOKENS, vocab] float32


@dataclass
class OutputGradients:
    """At one module's output ``[n, t, d]`` on ``n`` windows: ``grad`` (``∂L/∂h`` of the mean loss over
    ``n_tokens`` predicted tokens) and ``probes [k, n, t, d]`` (Gauss-Newton probes of the summed loss)."""

    grad: torch.Tensor
    probes: torch.Tensor
    n_tokens: int

    def loss_change(self, error: torch.Tensor) -> float:
        """``Σ g·e + (1/2N) mean_k Σ_w (G_kw·e_w)²`` (nats per token) for an output error ``e [n, t, d]``."""
        e = error.float()
        first, second = 0.0, 0.0
        for w in range(e.shape[0]):  # a window at a time, as matrix-vector products: no [k, n, t, d] temporaries
            e_w = e[w].reshape(-1)  # the gradients wait on the CPU; the error is where the block computes
            first += float(self.grad[w].reshape(-1).to(e.device, torch.float32) @ e_w)
            if len(self.probes):
                g = self.probes[:, w].reshape(len(self.probes), -1).to(e.device, torch.float32)
                second += float((g @ e_w).pow(2).mean())
        return first + second / (2 * self.n_tokens)

    def save(self, path) -> None:
        from safetensors.torch import save_file

        save_file({"grad": self.grad.contiguous(), "probes": self.probes.contiguous()}, str(path),
                  metadata={"n_tokens": str(self.n_tokens)})

    @classmethod
    def load(cls, path) -> OutputGradients:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            return cls(f.get_tensor("grad"), f.get_tensor("probes"), int(f.metadata()["n_tokens"]))

    def windows(self, start: int, stop: int) -> OutputGradients:
        return OutputGradients(self.grad[start:stop], self.probes[:, start:stop], self.n_tokens)


def loss_gradients(model: nn.Module, blocks: nn.ModuleList, input_ids: torch.Tensor, probes: int = 4,
                   device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                   load: Callable[[int], None] | None = None, release: Callable[[int], None] | None = None,
                   seed: int = 0, keep: Callable[[int, OutputGradients], None] | None = None) -> list[OutputGradients]:
    """Per decoder block, the :class:`OutputGradients` at its output on ``input_ids [n, seq]``; with ``keep``,
    each is handed to ``keep(i, gradients)`` as it is computed (last block first) and not held (the list is
    of None).

    ``load(i)``/``release(i)`` bring block ``i``'s weights in and out (each block is loaded twice: once
    forward, once backward); the embeddings, final norm and head must be loaded. The blocks run on
    ``device`` in ``dtype``, one at a time, and go back to the CPU as they were. ``probes`` label draws per
    window (seeded by ``seed``) give the curvature; 0 gives the gradient only. Held in bfloat16:
    ``(1 + probes) × n × seq × hidden × 2`` bytes per block.
    """
    calls = record_block_calls(model, blocks, input_ids)
    hidden = move(take_first_hidden(calls), device, dtype)
    inputs = []  # each block's input [n, t, d], on the CPU
    for i, block in enumerate(blocks):
        stored = _bring(block, i, load, device, dtype)
        inputs.append(hidden.cpu())
        with torch.no_grad():
            hidden = first_output(block(hidden, *move(calls[i].args, device, dtype), **move(calls[i].kwargs, device, dtype)))
        _send_back(block, i, release, stored)
        if not bool(torch.isfinite(hidden).all()):  # the probes' labels would be drawn from NaN probabilities
            raise QtoolError(f"the full-precision model's activations are not finite on the calibration text: decoder "
                             f"block {i}'s output holds NaN or inf in {str(dtype).removeprefix('torch.')}, so AWQ's "
                             "loss judge has no gradient to follow; qtool ppl on the model names the first module, "
                             "and qtool rtn needs no activations")
    cotangents = _head_gradients(model, blocks, input_ids, hidden, probes, seed)  # [1 + k, n, t, d]
    n_tokens = input_ids.shape[0] * (input_ids.shape[1] - 1)
    out: list[OutputGradients | None] = [None] * len(blocks)
    for i in reversed(range(len(blocks))):
        out[i] = OutputGradients(cotangents[0].to(STORE_DTYPE), cotangents[1:].to(STORE_DTYPE), n_tokens)
        if keep is not None:
            keep(i, out[i])
            out[i] = None
        stored = _bring(blocks[i], i, load, device, dtype)
        args, kwargs = move(calls[i].args, device, dtype), move(calls[i].kwargs, device, dtype)
        cotangents = _backward(blocks[i], inputs[i].to(device), args, kwargs, cotangents.to(device), [], True)[0].cpu()
        inputs[i] = None
        _send_back(blocks[i], i, release, stored)
    return out


def module_gradients(block: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict, at_output: OutputGradients,
                     modules: list[str]) -> dict[str, OutputGradients]:
    """``{module: OutputGradients}`` at the outputs of ``modules`` (names relative to ``block``) for the block's
    call on ``hidden [n, t, d]`` (with ``args``, ``kwargs``), from those at the block's output: one forward
    and ``1 + probes`` backward passes of the block (as it computes now, on its device)."""
    cot = torch.cat([at_output.grad[None], at_output.probes]).to(device=hidden.device, dtype=hidden.dtype)
    grads = _backward(block, hidden, args, kwargs, cot, modules, False)
    return {m: OutputGradients(g[0].to("cpu", STORE_DTYPE), g[1:].to("cpu", STORE_DTYPE), at_output.n_tokens)
            for m, g in zip(modules, grads)}


def _backward(block, hidden, args, kwargs, cotangents, modules: list[str], at_input: bool) -> list[torch.Tensor]:
    """``[1 + k, ...]`` gradients at the block's input (if ``at_input``) and at each module's output, for the
    ``1 + k`` output ``cotangents``: one forward, then one backward per cotangent. Without ``at_input`` the
    backward runs only as far as the earliest module asked for (autograd computes only what the targets need:
    for the attention's and the MLP's outputs, not through q/k/v and the softmax)."""
    x = hidden.detach().requires_grad_(True)  # the graph from it either way (the weights may not ask for one)
    seen: dict[str, torch.Tensor] = {}
    hooks = [block.get_submodule(m).register_forward_hook(_keep(seen, m)) for m in modules]
    try:
        with torch.enable_grad():
            y = first_output(block(x, *args, **kwargs))
            targets = [x] * at_input + [seen[m] for m in modules]
            per = [torch.autograd.grad(y, targets, c.to(y.dtype), retain_graph=j < len(cotangents) - 1, allow_unused=True)
                   for j, c in enumerate(cotangents)]
    finally:
        for h in hooks:
            h.remove()
    return [torch.stack([torch.zeros_like(t) if g[k] is None else g[k] for g in per]).detach()
            for k, t in enumerate(targets)]


def _head_gradients(model, blocks, input_ids, final, probes: int, seed: int) -> torch.Tensor:
    """``[1 + probes, n, t, d]``: at the last block's output, the gradient of the mean loss (true labels), then
    the probes (labels drawn from the model's own distribution, summed loss). ``HEAD_TOKENS`` positions of one
    window at a time: their logits are ``[HEAD_TOKENS, vocab]`` (the final norm and the head act per token).

    The head (``model.get_output_embeddings()``, a linear ``z = u Wᵀ``, then an elementwise map such as Gemma's
    soft-capping, slope ``σ``) is differentiated by hand: the cross-entropy's gradient at ``z`` for label ``y``
    is ``σ ⊙ (p - e_y)``, so at ``u`` it is ``(σ ⊙ p) W - σ_y W[y]``: one ``[t, vocab] × [vocab, d]`` product for
    every label set, not one per probe (the head is the largest matrix of a small model)."""
    from quant.model_check import logits_from_final_hidden  # quant imports calib: not at the top

    gen = torch.Generator().manual_seed(seed)
    n_tokens = input_ids.shape[0] * (input_ids.shape[1] - 1)
    head = model.get_output_embeddings()
    weight = head.weight.float()  # [vocab, d]
    out = torch.zeros((1 + probes, *final.shape), dtype=torch.float32)
    for w in range(input_ids.shape[0]):
        for a in range(0, input_ids.shape[1] - 1, HEAD_TOKENS):  # the positions a..b-1 predict tokens a+1..b
            b = min(a + HEAD_TOKENS, input_ids.shape[1] - 1)
            h = final[w:w + 1, a:b].detach().requires_grad_(True)
            seen = {}
            hook = head.register_forward_hook(lambda m, args, z: seen.update(u=args[0], z=z))
            try:
                with torch.enable_grad():
                    logits = logits_from_final_hidden(model, blocks, input_ids[w:w + 1, a:b], h, grad=True)
            finally:
                hook.remove()
            u, z = seen["u"], seen["z"]
            slope = None
            if logits is not z:  # the elementwise map after the head's product: its slope at z
                slope = torch.autograd.grad(logits, z, torch.ones_like(logits), retain_graph=True)[0][0].float()
            p = logits.detach()[0].float().softmax(-1)  # [b - a, vocab]
            del logits, z
            labels = input_ids[w:w + 1, a + 1:b + 1].to(p.device)  # [1, b - a]
            if probes:
                labels = torch.cat([labels, torch.multinomial(p.cpu(), probes, replacement=True, generator=gen).t().to(p.device)])
            w_p = weight.to(p.device)  # the head's weight beside its logits (a no-op where they share a device)
            common = (p if slope is None else p * slope) @ w_p  # [b - a, d]
            rows = w_p[labels]  # [1 + probes, b - a, d]
            if slope is not None:
                rows = rows * slope.gather(1, labels.t()).t()[..., None]
            du = (common[None] - rows).to(u.dtype)
            del p, slope, common, rows, w_p
            du[0] /= n_tokens  # the mean loss; the probes are of the summed loss
            for j in range(1 + probes):
                g = torch.autograd.grad(u, h, du[j][None], retain_graph=j < probes)[0]
                out[j, w, a:b] = g[0].float().cpu()
    return out


def _keep(seen: dict, name: str):
    def hook(module, args, output):
        seen[name] = first_output(output)
    return hook


def _bring(block, i, load, device, dtype) -> torch.dtype:
    """Block ``i`` loaded and on ``device`` in ``dtype``; returns the dtype it is stored in."""
    if load is not None:
        load(i)
    stored = next((p.dtype for p in block.parameters() if p.is_floating_point()), dtype)
    block.to(device=device, dtype=dtype)
    return stored


def _send_back(block, i, release, stored: torch.dtype):
    block.to(device="cpu", dtype=stored)  # an in-memory model is left as it was
    if release is not None:
        release(i)


class LossGradientFiles:
    """For AWQ judging by the loss: the full-precision model's loss gradients and Gauss-Newton probes at every
    block's output (:func:`loss_gradients`) on the windows the judges see (the first
    ``judge_windows`` search windows) and the clip-test windows, in that order, one file per block in
    ``folder`` (on disk, not in memory: ``(1 + probes) × windows × seqlen × hidden`` bfloat16 values per block,
    gigabytes for a large model).

    ``src`` is a :class:`quant.source.SourceModel` (blocks loaded and released as the pass streams them), ``cfg``
    a :class:`quant.config.QuantConfig`. The folder lives in the run's folder (:mod:`quant.resume`): a resumed run
    whose blocks from ``start`` on all have their file (each written whole, under a temporary name first) reads them instead of another pass over
    the model, which gives the same files (same model, settings and windows: the run's key)."""

    def __init__(self, src, cfg, calib_ids, held_out, dev, compute_dtype, folder: Path, start: int = 0):
        self.folder = folder
        n_search = len(calib_ids) - sum(held_out)
        self.n_judge, self.n_accept = min(cfg.awq.judge_windows, n_search), held_out[0]
        ids = torch.cat([calib_ids[:self.n_judge], calib_ids[n_search:n_search + self.n_accept]])
        if all(self._readable(i) for i in range(start, len(src.blocks))):
            log.info("loss gradients of blocks %d-%d kept by the stopped run", start, len(src.blocks) - 1)
            return
        folder.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        loss_gradients(src.model, src.blocks, ids, cfg.awq.fisher_probes, dev, compute_dtype, load=src.load_block,
                       release=src.release, seed=cfg.seed, keep=self._save)
        log.info("loss gradients at every block's output on %d windows, %d Fisher probes: %.1f s", len(ids),
                 cfg.awq.fisher_probes, time.perf_counter() - t)

    @classmethod
    def wanted(cls, cfg, calib_ids) -> bool:
        return calib_ids is not None and cfg.searches_awq and cfg.awq.judge == "loss" and not cfg.awq.search_file

    def _path(self, i: int) -> Path:
        return self.folder / f"{i:05d}.safetensors"

    def _readable(self, i: int) -> bool:
        """Whether block ``i``'s file is there and whole: its header read, its size the header's."""
        from safetensors import safe_open

        try:
            with safe_open(str(self._path(i)), "pt") as f:
                return {"grad", "probes"} <= set(f.keys())
        except Exception:  # noqa: BLE001 - missing, empty or cut short: the OS and safetensors raise many kinds
            return False

    def _save(self, i: int, gradients: OutputGradients) -> None:
        from quant import resume  # quant imports calib: not at the top

        # Under a temporary name, fsynced, renamed: no file that looks whole until it is on disk, before the
        # progress record that counts on it.
        resume._atomic_write(self._path(i), gradients.save)

    def for_block(self, i: int) -> dict:
        """:attr:`calib.runner.BlockInputs.loss` of block ``i``: the gradients on the judge windows (``"calls"``)
        and on the clip-test windows (``"accept"``, if any)."""
        at_output = OutputGradients.load(self._path(i))
        loss = {"calls": at_output.windows(0, self.n_judge)}
        if self.n_accept:
            loss["accept"] = at_output.windows(self.n_judge, self.n_judge + self.n_accept)
        return loss
