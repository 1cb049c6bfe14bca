"""W4A16 GEMM/GEMV benchmark: our kernels vs cuBLAS fp16/bf16 and torch's int4 (tinygemm), same run.

For each (k, n) and m: µs per call (median of CUDA-graph replays, inputs rotated
to defeat L2), TFLOP/s, GB/s (each input read once, output written once), the
fraction of the device-to-device copy bandwidth measured in this run, and the
speedup over the 16-bit cuBLAS matmul. Every qtool path that can take the shape is
timed (fused GEMV, fused GEMM, dequantize + cuBLAS; with ``--splits 2 4 8`` the
split-K GEMV at each count too); ``*`` marks the one ``quant.kernels.dispatch`` picks on
this GPU. Every int4 path is checked against the reference first (error column). Prints a table; ``--out`` appends it as markdown.
"""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from _timing import copy_bandwidth_gbs, emit, header, rotation_count, time_graph
from tabulate import tabulate

from quant import qmath
from quant.formats import PackedWeight
from quant.kernels import dispatch, layout, loader, ops

SHAPES = ((576, 1536), (896, 4864), (4096, 4096), (4096, 11008), (11008, 4096), (4096, 14336), (8192, 28672))
M_VALUES = (1, 2, 3, 4, 7, 8, 16, 17, 32, 64, 128, 256, 1024)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Result:
    k: int
    n: int
    m: int
    impl: str
    us: float
    tflops: float
    gbs: float
    frac_copy_bw: float
    speedup_vs_16bit: float
    rel_err: float


def random_weight(n: int, k: int, g: int) -> PackedWeight:
    ng = qmath.n_groups(k, g)
    return PackedWeight(q=torch.randint(0, 16, (n, k), dtype=torch.int32, device="cuda"),
                        scale=(torch.rand(n, ng, device="cuda") * 0.01 + 0.001).half(),
                        zero=torch.randint(0, 16, (n, ng), dtype=torch.int32, device="cuda"), bits=4, group_size=g)


def tinygemm_weight(pw: PackedWeight, k: int):
    """torch's int4 CUDA layout: (q - 8) * s + zero with zero = (8 - z) * s, bf16 [K/g, N, 2]."""
    g = qmath.effective_group_size(k, pw.group_size)
    inner = next(t for t in (8, 4, 2) if k % (16 * t) == 0)
    q_u8 = (pw.q[:, ::2] << 4 | pw.q[:, 1::2]).to(torch.uint8)  # [N, K/2]
    packed = torch.ops.aten._convert_weight_to_int4pack(q_u8, inner)
    s, z = pw.scale.float(), pw.zero.float()
    sz = torch.stack([s, (8 - z) * s], -1).transpose(0, 1).contiguous().bfloat16()
    return packed, sz, g


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref).norm() / ref.norm()) if torch.isfinite(y).all() else float("nan")


def bench_shape(k: int, n: int, ms, dtype, g: int, copy_bw: float, splits=()) -> list[Result]:
    sms = dispatch.sm_count(torch.device("cuda"))
    pw = random_weight(n, k, g)
    w_ref = pw.dequantize(torch.float32)
    kw = layout.repack(pw, dtype)
    w16 = w_ref.to(dtype)
    tg = tinygemm_weight(pw, k)
    gsz = qmath.effective_group_size(k, g)
    int4_bytes = n * k // 2 + n * (k // gsz) * 3  # codes + 16-bit scales + 8-bit zeros
    rows: list[Result] = []
    for m in ms:
        act_bytes = 2 * (m * k + m * n)
        flops = 2 * m * n * k
        chosen, why = dispatch.cuda_kernel_for(m, _Shape(n, k, g), sms=sms)
        assert chosen, why
        if chosen == ops.SPLITK_OP:  # timed at the dispatch's count too, and marked there
            picked = dispatch.gemv_splits(m, n, k, sms)
            chosen, splits = f"qtool gemv split-K {picked}", sorted({*splits, picked})
        impls = {}
        # Rotate through enough copies of weights and inputs that no call finds its operands in L2.
        r = rotation_count(int4_bytes + act_bytes, cap=512)
        ws = [kw] + [replace(kw, qweight=kw.qweight.clone(), scales=kw.scales.clone(),
                             zeros=None if kw.zeros is None else kw.zeros.clone()) for _ in range(r - 1)]
        xs = [torch.randn(m, k, device="cuda").to(dtype) for _ in range(r)]
        fused = ["w4a16_gemv", "w4a16_gemm"] if m <= 32 else ["w4a16_gemm"]
        for op_name in fused:
            op = getattr(torch.ops.qtool, op_name)
            impls[op_name] = ([lambda x=x, w=w, op=op: op(x, w.qweight, w.scales, w.zeros, None, w.group_size)
                               for x, w in zip(xs, ws)], int4_bytes, xs[0])
        counters = torch.zeros(n // 32, dtype=torch.int32, device="cuda")  # one set: the replays run in turn
        for sk in splits if m <= 32 else ():
            op = torch.ops.qtool.w4a16_gemv_splitk
            impls[f"qtool gemv split-K {sk}"] = ([lambda x=x, w=w, sk=sk: op(x, w.qweight, w.scales, w.zeros, None,
                                                                           w.group_size, sk, counters)
                                                  for x, w in zip(xs, ws)], int4_bytes, xs[0])
        if m >= 16:  # dequantize to W[N, K] (bandwidth-bound), then cuBLAS
            deq = torch.ops.qtool.w4a16_dequant
            impls["w4a16_dequant"] = ([lambda x=x, w=w: F.linear(x, deq(w.qweight, w.scales, w.zeros, w.group_size))
                                       for x, w in zip(xs, ws)], int4_bytes, xs[0])
        r16 = rotation_count(2 * n * k + act_bytes, cap=512)
        w16s = [w16] + [w16.clone() for _ in range(r16 - 1)]
        x16 = [xs[i % r] for i in range(r16)]
        impls[f"cuBLAS {str(dtype)[6:]}"] = ([lambda x=x, w=w: F.linear(x, w) for x, w in zip(x16, w16s)], 2 * n * k, xs[0])
        if tg[2] in (32, 64, 128, 256):
            tgs = [tg[:2]] + [(tg[0].clone(), tg[1].clone()) for _ in range(r - 1)]
            xb = [x.bfloat16() for x in xs]
            impls["tinygemm bf16"] = ([lambda x=x, t=t: torch.ops.aten._weight_int4pack_mm(x, t[0], tg[2], t[1])
                                       for x, t in zip(xb, tgs)], int4_bytes, xb[0])
        base_us = None
        done = 0
        for name, (calls, wbytes, x0) in impls.items():
            try:
                y = calls[0]()
            except RuntimeError as e:  # e.g. tinygemm refusing a shape: report, keep going
                print(f"skip {name} k={k} n={n} m={m}: {str(e).splitlines()[0]}")
                continue
            err = 0.0 if name.startswith("cuBLAS") else rel_err(y, x0.float() @ w_ref.T)
            us = time_graph(calls)
            base_us = us if name.startswith("cuBLAS") else base_us
            gbs = (wbytes + act_bytes) / (us * 1e-6) / 1e9
            label = IMPL_LABELS.get(name, name) + (" *" if name == chosen else "")
            rows.append(Result(k, n, m, label, us, flops / (us * 1e-6) / 1e12, gbs, gbs / copy_bw, 0.0, err))
            done += 1
        del impls, ws, xs, w16s
        for row in rows[len(rows) - done:]:
            row.speedup_vs_16bit = base_us / row.us if base_us else float("nan")
    return rows


IMPL_LABELS = {"w4a16_gemv": "qtool gemv", "w4a16_gemm": "qtool gemm", "w4a16_dequant": "qtool dequant+cuBLAS"}


@dataclass
class _Shape:  # the attributes dispatch.cuda_kernel_for reads from a QuantLinear
    out_features: int
    in_features: int
    group_size: int
    bits: int = 4
    g_idx = None
    kernel_cache: dict | None = None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", choices=DTYPES, default="fp16")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--m", type=int, nargs="*", default=M_VALUES)
    ap.add_argument("--shapes", nargs="*", default=[f"{k}x{n}" for k, n in SHAPES], help="KxN, e.g. 4096x11008")
    ap.add_argument("--splits", type=int, nargs="*", default=[], help="also time the split-K GEMV at these counts")
    ap.add_argument("--out", help="append the markdown table to this file")
    args = ap.parse_args()
    assert loader.load_library() is None, loader.load_library()
    torch.backends.cuda.matmul.allow_tf32 = False
    copy_bw = copy_bandwidth_gbs()
    results, skipped = [], []
    for shape in args.shapes:
        k, n = map(int, shape.split("x"))
        if args.group_size != -1 and k % args.group_size:
            skipped.append(f"{k}x{n} (K not divisible by group {args.group_size}: no such checkpoint exists)")
            continue
        results += bench_shape(k, n, args.m, DTYPES[args.dtype], args.group_size, copy_bw, args.splits)
        torch.cuda.empty_cache()
    table = tabulate([asdict(r) for r in results], headers="keys", floatfmt=".3g", tablefmt="github")
    text = (header(f"bench_gemm: W4A16 {args.dtype}, group {args.group_size}") +
            f"- measured copy bandwidth: {copy_bw:.0f} GB/s (read + write; the fraction column's denominator)\n"
            + "".join(f"- skipped {s}\n" for s in skipped) + f"\n{table}\n")
    emit(text, args.out)


if __name__ == "__main__":
    main()
