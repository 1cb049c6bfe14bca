"""Decode / prefill throughput of a Llama-7B-shaped model (random weights), fp16 vs int4 QuantLinear.

``qtool bench`` and ``benchmarks/bench_decode.py`` print :func:`decode_report`. A minimal Llama decoder (RMSNorm, RoPE, attention over a static KV cache, SwiGLU)
so that the numbers measure the linears, not a library's cache logic. Decode
steps are captured into a CUDA graph (static cache, position as a device
tensor) and replayed; prefill is one eager forward of a prompt. Reports tokens/s,
the weight memory of the linear layers and the peak GPU memory.
"""
from __future__ import annotations

import datetime
import gc
import sys
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch import nn

from quant.errors import QtoolError
from quant.formats import PackedWeight
from quant.kernels import dispatch, loader
from quant.modules import QuantLinear


@dataclass(frozen=True)
class Shape:
    hidden: int = 4096
    intermediate: int = 11008
    layers: int = 32
    heads: int = 32
    vocab: int = 32000


# Decoder widths to time (multi-head attention throughout: the KV projections' width differs from the real
# Qwen's 2 KV heads, the MLP and the 16-bit head do not).
SHAPES = {"llama-7b": Shape(), "qwen2.5-1.5b": Shape(hidden=1536, intermediate=8960, layers=28, heads=12, vocab=151936)}


def make_linear(in_f: int, out_f: int, int4: bool, group_size: int) -> nn.Module:
    if not int4:
        lin = nn.Linear(in_f, out_f, bias=False, device="cuda", dtype=torch.float16)
        nn.init.normal_(lin.weight, std=0.02)
        return lin
    ng = in_f // group_size
    pw = PackedWeight(q=torch.randint(0, 16, (out_f, in_f), dtype=torch.int32, device="cuda"),
                      scale=(torch.rand(out_f, ng, device="cuda") * 0.004 + 0.001).half(),
                      zero=torch.randint(0, 16, (out_f, ng), dtype=torch.int32, device="cuda"), bits=4, group_size=group_size)
    # What quant.load(..., device="cuda") gives: the AWQ checkpoint tensors, compacted so that the
    # codes live only in the kernels' tile32 copy (scales and zeros are kept for state_dict()).
    layer = QuantLinear.from_packed(pw, None, "awq")
    if not layer.compact(torch.float16):
        raise SystemExit(f"the CUDA kernels cannot take a {in_f}x{out_f} g{group_size} layer")
    return layer


class Block(nn.Module):
    def __init__(self, s: Shape, int4: bool, g: int, batch: int, max_len: int):
        super().__init__()
        h, i = s.hidden, s.intermediate
        self.heads, self.hd = s.heads, h // s.heads
        self.qkv = make_linear(h, 3 * h, int4, g)
        self.o = make_linear(h, h, int4, g)
        self.gate_up = make_linear(h, 2 * i, int4, g)
        self.down = make_linear(i, h, int4, g)
        self.n1 = nn.RMSNorm(h, device="cuda", dtype=torch.float16)
        self.n2 = nn.RMSNorm(h, device="cuda", dtype=torch.float16)
        shape = (batch, self.heads, max_len, self.hd)
        self.register_buffer("k_cache", torch.zeros(shape, device="cuda", dtype=torch.float16))
        self.register_buffer("v_cache", torch.zeros(shape, device="cuda", dtype=torch.float16))

    def forward(self, x, pos, cos, sin, mask):
        b, t, _ = x.shape
        q, k, v = self.qkv(self.n1(x)).view(b, t, 3, self.heads, self.hd).permute(2, 0, 3, 1, 4)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        self.k_cache.index_copy_(2, pos, k)  # positions as a device tensor: graph-replayable
        self.v_cache.index_copy_(2, pos, v)
        a = F.scaled_dot_product_attention(q, self.k_cache, self.v_cache, attn_mask=mask)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, -1))
        gate, up = self.gate_up(self.n2(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


def rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Model(nn.Module):
    def __init__(self, s: Shape, int4: bool, g: int, batch: int, max_len: int):
        super().__init__()
        self.embed = nn.Embedding(s.vocab, s.hidden, device="cuda", dtype=torch.float16)
        self.blocks = nn.ModuleList(Block(s, int4, g, batch, max_len) for _ in range(s.layers))
        self.norm = nn.RMSNorm(s.hidden, device="cuda", dtype=torch.float16)
        self.head = nn.Linear(s.hidden, s.vocab, bias=False, device="cuda", dtype=torch.float16)  # kept 16-bit
        hd = s.hidden // s.heads
        inv = 1.0 / (10000 ** (torch.arange(0, hd, 2, device="cuda").float() / hd))
        ang = torch.arange(max_len, device="cuda").float()[:, None] * inv
        self.register_buffer("cos", ang.cos().half())
        self.register_buffer("sin", ang.sin().half())
        self.max_len = max_len

    def forward(self, ids, pos):
        x = self.embed(ids)
        cos, sin = self.cos[pos][None, None], self.sin[pos][None, None]
        mask = torch.arange(self.max_len, device="cuda")[None, :] <= pos[:, None]  # [t, max_len]
        for blk in self.blocks:
            x = blk(x, pos, cos, sin, mask)
        return self.head(self.norm(x[:, -1]))


@dataclass
class Result:
    model: str
    batch: int
    decode_tok_s: float
    prefill_tok_s: float
    linear_weight_gib: float
    peak_gib: float


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes of every quantized (or fp16) decoder linear: buffers kept plus the kernels' copy."""
    total = 0
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            total += sum(b.numel() * b.element_size() for b in mod.buffers() if not b.is_meta)
            for kw, bias in (v for k, v in mod.kernel_cache.items() if isinstance(k, tuple) and k[0] == "tile32"):
                total += sum(t.numel() * t.element_size() for t in (kw.qweight, kw.scales, kw.zeros) if t is not None)
        elif isinstance(mod, nn.Linear) and mod.out_features != model.head.out_features:
            total += mod.weight.numel() * mod.weight.element_size()
    return total


def run(s: Shape, int4: bool, batch: int, g: int, prompt: int, steps: int) -> Result:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    max_len = prompt + steps + 8
    model = Model(s, int4, g, batch, max_len)
    with torch.inference_mode():
        ids = torch.randint(0, s.vocab, (batch, prompt), device="cuda")
        pos = torch.arange(prompt, device="cuda")
        model(ids, pos)  # warm-up
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        model(ids, pos)
        end.record()
        end.synchronize()
        prefill = batch * prompt / (start.elapsed_time(end) / 1e3)
        tok = torch.randint(0, s.vocab, (batch, 1), device="cuda")
        p = torch.tensor([prompt], device="cuda")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            model(tok, p)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            model(tok, p)
        for _ in range(3):
            graph.replay()
        start.record()
        for i in range(steps):
            p.fill_(prompt + i)  # a device-side update, outside the graph
            graph.replay()
        end.record()
        end.synchronize()
        decode = batch * steps / (start.elapsed_time(end) / 1e3)
    res = Result("int4" if int4 else "fp16", batch, decode, prefill, linear_weight_bytes(model) / 2**30,
                 torch.cuda.max_memory_allocated() / 2**30)
    del model, graph
    gc.collect()
    return res


def decode_report(layers: int | None = 32, batches=(1, 8, 32), group_size: int = 128, prompt: int = 512,
                  steps: int = 64, *, shape: str = "llama-7b", split_k_ablation: bool = False) -> str:
    """Markdown: device, date and command, the fp16 and int4 rows per batch size, and their ratios.

    ``shape`` names a :data:`SHAPES` entry (``layers`` None: its own depth); ``split_k_ablation`` adds an
    int4 row with the split-K GEMV switched off (the same weights' layout, the plain GEMV at every M), the
    baseline of the split-K dispatch in the same run."""
    if not torch.cuda.is_available():
        raise QtoolError("the decode benchmark needs a CUDA GPU and torch sees none")
    why = loader.load_library()
    if why is not None:
        raise QtoolError(f"the decode benchmark needs the compiled kernels: {why}")
    if shape not in SHAPES:
        raise QtoolError(f"shape {shape!r}: the decode benchmark knows {', '.join(SHAPES)}")
    s = SHAPES[shape] if layers is None else replace(SHAPES[shape], layers=layers)
    results, ratios = [], []
    for b in batches:
        fp16, int4 = run(s, False, b, group_size, prompt, steps), run(s, True, b, group_size, prompt, steps)
        results += [fp16, int4]
        ratios.append(f"batch {b}: int4/fp16 decode {int4.decode_tok_s / fp16.decode_tok_s:.2f}x, "
                      f"weights {int4.linear_weight_gib / fp16.linear_weight_gib:.1%}")
        if split_k_ablation:
            saved, dispatch.SPLITK_MAX_M = dispatch.SPLITK_MAX_M, 0
            try:
                plain = replace(run(s, True, b, group_size, prompt, steps), model="int4 no split-K")
            finally:
                dispatch.SPLITK_MAX_M = saved
            results.append(plain)
            ratios[-1] += f"; split-K on/off decode {int4.decode_tok_s / plain.decode_tok_s:.3f}x"
    table = tabulate([asdict(r) for r in results], headers="keys", floatfmt=".4g", tablefmt="github")
    props = torch.cuda.get_device_properties(0)
    head = (f"## decode: {shape} shape, {s.layers} layers, group {group_size}, prompt {prompt}, {steps} decode steps\n\n"
            f"- device: {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}, "
            f"CUDA {torch.version.cuda}\n- date: {datetime.datetime.now().isoformat(timespec='seconds')}\n"
            f"- command: `{' '.join(['python'] + sys.argv)}`\n")
    return f"{head}\n{table}\n\n" + "\n".join(f"- {r}" for r in ratios) + "\n"
