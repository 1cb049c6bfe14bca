"""Perplexity over fixed windows of a text, for full-precision and quantized models alike."""
from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from quant import model_io
from quant.arch import spelling
from quant.errors import QtoolError

log = logging.getLogger(__name__)


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    n_tokens: int  # tokens scored
    n_windows: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.n_tokens / self.seconds if self.seconds > 0 else float("nan")


def _windows(n: int, seqlen: int, stride: int):
    """(begin, end, first scored position) of each window; every token after the first is scored once."""
    begin = 0
    while begin < n - 1:
        end = min(begin + seqlen, n)
        first = 0 if begin == 0 else seqlen - stride
        yield begin, end, first
        if end == n:
            break
        begin += stride


def _first_module(model, window: torch.Tensor, test) -> str:
    """", first in <module>" for the first leaf module (in call order) on which ``test(inputs, output)`` holds when
    ``model`` reads ``window``, else ""; ``output`` is the module's first tensor output."""
    found: list[str] = []

    def hook(name):
        def check(_module, args, out):
            t = out[0] if isinstance(out, tuple) else out
            if not found and isinstance(t, torch.Tensor) and t.is_floating_point() and test(args, t):
                found.append(name)
        return check

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n and not list(m.children())]
    try:
        with torch.no_grad():
            model(window, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return f", first in {spelling(model, module=True)(found[0])}" if found else ""


def _first_non_finite(model, window: torch.Tensor) -> str:
    """The first module whose output holds NaN or inf (:func:`_first_module`)."""
    return _first_module(model, window, lambda _args, out: not torch.isfinite(out).all())


def _first_vanishing(model, window: torch.Tensor) -> str:
    """The first module whose output is all zeros while its input is not (:func:`_first_module`): an RMSNorm whose
    mean square overflowed (|x| beyond ~1.8e19 in float32) scales by rsqrt(inf) = 0."""
    def vanishes(args, out):
        x = next((a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()), None)
        return x is not None and bool(x.any()) and not out.any()
    return _first_module(model, window, vanishes)


def _non_finite_tensor(model) -> str | None:
    """The name (as its checkpoint writes it) of the model's first floating-point parameter or buffer holding NaN
    or inf, else None."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point() and not t.is_meta and not torch.isfinite(t).all():
            return spelling(model)(name)
    return None


def _available_bytes() -> int | None:
    """Memory this process may still take: the kernel's MemAvailable, lowered to its cgroup's limit
    minus usage (cgroup v1 or v2) where one is set; None where /proc/meminfo cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controllers == "":
                d, files = Path("/sys/fs/cgroup") / path.lstrip("/"), ("memory.max", "memory.current")
            elif "memory" in controllers.split(","):
                d, files = Path("/sys/fs/cgroup/memory") / path.lstrip("/"), ("memory.limit_in_bytes",
                                                                               "memory.usage_in_bytes")
            else:
                continue
            limit_file, usage_file = d / files[0], d / files[1]
            if limit_file.is_file() and usage_file.is_file():
                limit = limit_file.read_text().strip()
                if limit.isdigit():
                    avail = min(avail, int(limit) - int(usage_file.read_text()))
    except (OSError, ValueError):
        pass
    return avail


def dequantize_once(model) -> contextlib.AbstractContextManager:
    """``quant.modules.dense_weights(model)`` where it pays and fits, else a no-op; the numbers are the same.

    It pays on the CPU outside bfloat16, where every QuantLinear would otherwise take the reference
    path and unpack its codes on every forward (several times slower per window); it fits when the
    dequantized weights (:func:`quant.modules.dense_bytes`) take at most half the memory left to the
    process (:func:`_available_bytes`, which honours a cgroup limit).
    """
    from quant.modules import dense_bytes, dense_weights

    first = next(model.parameters(), None)
    if first is None or first.device.type != "cpu" or first.dtype == torch.bfloat16:
        return contextlib.nullcontext()
    need = dense_bytes(model, first.dtype)
    if need == 0:
        return contextlib.nullcontext()
    avail = _available_bytes()
    if avail is None or need > avail // 2:
        log.info("scoring with weights unpacked on every forward: their dequantized copies (%.2f GiB) "
                 "would not fit in half the memory left", need / 2**30)
        return contextlib.nullcontext()
    return dense_weights(model)


def check_windows(seqlen: int, stride: int | None, max_tokens: int | None) -> int:
    """The stride :func:`perplexity` steps by (``seqlen`` where None); QtoolError (one sentence) for window settings
    that score nothing sensible. Needs no model: the command line checks them before loading one."""
    for name, value in (("seqlen", seqlen), ("stride", stride), ("max_tokens", max_tokens)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise QtoolError(f"{name} {value!r} must be a whole number of tokens")
    if seqlen < 2:
        raise QtoolError(f"--seqlen {seqlen}: a window needs at least 2 tokens (one to predict from, one to score)")
    if max_tokens is not None and max_tokens < 2:
        raise QtoolError(f"--max-tokens {max_tokens}: score at least 2 tokens (one to predict from, one to score)")
    stride = seqlen if stride is None else stride
    if not 0 < stride <= seqlen:
        raise QtoolError(f"--stride {stride} must lie between 1 and --seqlen {seqlen}")
    return stride


def perplexity(
    model,
    tokenizer,
    text: str,
    seqlen: int = 512,
    stride: int | None = None,
    max_tokens: int | None = None,
    add_bos: bool | None = None,
    progress: bool = False,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``text`` in windows of ``seqlen`` tokens.

    Windows do not overlap unless ``stride < seqlen``; then each window re-reads
    ``seqlen - stride`` tokens of context and scores only its last ``stride`` tokens.
    ``add_bos`` puts the BOS token at the start of every window (gemma needs it);
    by default it follows the architecture table where the tokenizer has a BOS token.
    A quantized model on the CPU is scored with its weights dequantized once where they
    fit (:func:`dequantize_once`): the same numbers, faster.

    Raises :class:`QtoolError` for a ``text`` that is not one string, ``add_bos=True``
    with a tokenizer without a BOS token, window settings that score nothing, a loss
    that is not finite, and a model that predicts nothing (one logit for the vocabulary).
    """
    stride = check_windows(seqlen, stride, max_tokens)
    if not isinstance(text, str):  # a list of documents was scored as its first alone
        raise QtoolError(f"the text to score must be one string (join documents with blank lines), not "
                         f"{type(text).__name__}")
    model_io.check_seqlen(model, seqlen)
    if add_bos is None:
        from quant.arch import ARCHITECTURES

        arch = ARCHITECTURES.get(getattr(model.config, "model_type", ""))
        add_bos = bool(arch and arch.needs_bos) and tokenizer.bos_token_id is not None
    elif add_bos and tokenizer.bos_token_id is None:
        raise QtoolError("add_bos=True, but the tokenizer has no BOS token to put at the start of each window; "
                         "pass add_bos=False")
    bos = [tokenizer.bos_token_id] if add_bos else []
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    width = seqlen - len(bos)
    if ids.numel() < 2:
        raise QtoolError(f"the evaluation text has {ids.numel()} tokens; perplexity needs at least 2")
    device = next(model.parameters()).device
    nll_sum, count, n_windows, flat = 0.0, 0, 0, 0
    spans = list(_windows(ids.numel(), width, min(stride, width)))
    t0 = time.perf_counter()
    with torch.no_grad(), dequantize_once(model):
        for begin, end, first in tqdm(spans, desc="perplexity", unit="window", disable=not progress):
            window = torch.tensor(bos + ids[begin:end].tolist(), device=device)[None]
            logits = model(window, use_cache=False).logits[0, :-1].float()
            targets = window[0, 1:]
            # Target j is window token j+1. With BOS, text token 0 is predicted from BOS and scored;
            # without, a window's first token has no context and is not scored.
            start = first if bos else max(first - 1, 0)
            loss = F.cross_entropy(logits[start:], targets[start:], reduction="sum")
            nll_sum += loss.item()
            count += targets[start:].numel()
            scored = logits[start:]
            flat += int((scored.amax(-1) == scored.amin(-1)).sum())  # one logit for the whole vocabulary
            n_windows += 1
    seconds = time.perf_counter() - t0
    nll = nll_sum / count
    if not math.isfinite(nll):
        bad = _non_finite_tensor(model)
        if bad:
            raise QtoolError(f"the loss is not finite ({nll}): the model's tensor {bad} holds NaN or inf values, so "
                             "the model folder is damaged (or was quantized from one that is)")
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        where = _first_non_finite(model, torch.tensor(bos + ids[:width].tolist(), device=device)[None])
        if dtype == "float16":
            raise QtoolError(f"the loss is not finite ({nll}): the model's activations overflow in {dtype}{where} "
                             "(float16 holds at most 65504); score it with --dtype float32 or bfloat16")
        raise QtoolError(f"the loss is not finite ({nll}): the model's activations are not, in {dtype}{where}"
                         f"{'; score it with --dtype float32' if dtype != 'float32' else ''}")
    if flat:
        where = _first_vanishing(model, torch.tensor(bos + ids[:width].tolist(), device=device)[None])
        raise QtoolError(f"the model predicts nothing at {flat} of {count} scored tokens (its logits there are one "
                         "value for the whole vocabulary, so the perplexity would read the vocabulary's size whatever "
                         f"the text): its activations overflow or vanish{where} (a norm whose input is beyond float32's "
                         "square range, 1.8e19, scales it to zeros); check its weights")
    if nll > math.log(sys.float_info.max):  # exp() of it overflows: no perplexity to print
        raise QtoolError(f"the loss is {nll:.1f} nats per token, so the perplexity is beyond any float (above "
                         f"{sys.float_info.max:.3g}); the model's predictions are far off, check its weights")
    return PerplexityResult(math.exp(nll), nll, count, n_windows, seconds)
