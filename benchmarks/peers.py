"""Peer quantizers for qtool's benchmark tables, run in a SEPARATE virtual environment.

This script is NOT part of qtool and imports nothing from it. It quantizes a float32
Hugging Face model folder with another project's quantizer, dequantizes the result and
writes an ordinary float32 Hugging Face folder whose decoder-block linear weights are
the peer's dequantized weights, so any evaluator (``quant.load_any``, ``qtool ppl``,
``from_pretrained``) loads it unchanged and measures the peer's rounding error exactly::

    /root/peers-venv/bin/python benchmarks/peers.py --method hqq --model MODEL_DIR \\
        --bits 4 --group-size 128 --out OUT_DIR [--threads 1]
    /root/peers-venv/bin/python benchmarks/peers.py --method gptq --model MODEL_DIR \\
        --bits 4 --group-size 128 --out OUT_DIR \\
        --calib-data TXT --n-samples 128 --seqlen 512 [--threads 1]

It prints ONE JSON line on stdout at the end:
``{"method": ..., "quant_seconds": ..., "peak_rss_mib": ..., ...}``.
``quant_seconds`` is wall time from the loaded fp32 model to the last dequantized
weight written back into it (for GPTQ: tokenization + window drawing + the calibration
forward passes + the solves), i.e. model loading and saving are excluded.
``peak_rss_mib`` is ``resource.getrusage(RUSAGE_SELF).ru_maxrss / 1024`` for the whole
process (load + quantize + save).

What is quantized: every ``nn.Linear`` inside the decoder blocks (``model.model.layers``
or whatever ``ModuleList`` holds the blocks): q/k/v/o and gate/up/down for llama-like
models. ``lm_head`` and the embeddings stay float32; tied embeddings stay tied
(``save_pretrained`` writes the tied tensor once and the original ``config.json`` with
``tie_word_embeddings`` is copied back). Every ``in_features`` must be a multiple of
``--group-size`` (groups never straddle rows), else the script stops with an error.

Peers
-----
hqq  HQQ, Half-Quadratic Quantization (Badri & Shaji, Mobius Labs, 2023),
     ``pip install hqq``; installed: hqq 0.2.8.post1. Data-free: per group it fits
     the zero point with a half-quadratic proximal solver that minimises an l_p<1
     norm of the weight error (no calibration data). Settings used are exactly those
     of transformers' ``HqqConfig(nbits=B, group_size=G)`` integration, i.e.
     ``hqq.core.quantize.BaseQuantizeConfig(nbits=B, group_size=G, axis=1)``:
     asymmetric (unsigned codes 0..2^B-1 with a float scale and a float zero per
     group), groups of G consecutive input channels (axis=1, the axis transformers
     picks by default), ``optimize=True`` with hqq's default optimizer
     (``optimize_weights_proximal_legacy``: lp_norm=0.7, beta=10, kappa=1.01,
     iters=20, early stop), ``round_zero=True`` for 4-bit (hqq's default; the zero
     point is rounded to an integer before the optimizer refines it, so after
     optimisation it is a float again), scale and zero kept unquantized (no
     ``quant_zero``/``quant_scale``, which hqq deprecates). The quantization runs
     through ``hqq.core.quantize.HQQLinear`` on the CPU with ``compute_dtype=float32``
     (on CPU the optimizer itself also runs in float32; on a GPU hqq would use
     float16) and ``HQQLinear.dequantize()`` gives the weight written back.
     Note: hqq's scale/zero are float, so its grid is not the integer-zero grid of
     AWQ/GPTQ checkpoints; this is HQQ's native format.

gptq GPTQ (Frantar et al. 2022) from GPTQModel (ModelCloud, the successor of
     AutoGPTQ), ``pip install gptqmodel``; installed: GPTQModel 7.6.0. Data-aware.
     It quantizes on the CPU with torch 2.13.0+cpu and transformers 5.24.0 (needs
     GPTQMODEL_CPU_WORKERS=2 on a <= 2-CPU machine; the script sets it). Settings:
     ``QuantizeConfig(bits=B, group_size=G, offload_to_disk=False)`` and GPTQModel's
     defaults otherwise: symmetric, desc_act=False, act_group_aware=True (its "GAR"
     ordering), damp_percent=0.05, true_sequential=True, no MSE clipping search;
     calibration = --n-samples random non-overlapping --seqlen-token windows of
     --calib-data (seed 0), batch size 1. Details in ``quantize_gptq``. The packed
     GPTQ-v1 tensors are dequantized in float32 (``dequant_gptq_v1``).
     Note: GPTQModel runs its own worker threads (2 here), so --threads 1 caps
     torch's intra-op threads but not GPTQModel's pool; observed ~1 core busy.

How the peer venv was made (2-core CPU machine, Python 3.11, torch must stay the
local CPU wheel 2.13.0; versions match /work/main/.venv)::

    python3 -m venv /root/peers-venv
    /root/peers-venv/bin/pip install torch==2.13.0          # local CPU wheel, first
    /root/peers-venv/bin/pip install torch==2.13.0 transformers==5.24.0 \\
        safetensors==0.8.0 accelerate==1.15.0 tokenizers==0.23.3 numpy==2.4.6
    /root/peers-venv/bin/pip install --dry-run torch==2.13.0 hqq   # checked: no torch change
    /root/peers-venv/bin/pip install torch==2.13.0 hqq              # hqq 0.2.8.post1
    /root/peers-venv/bin/pip install --dry-run torch==2.13.0 transformers==5.24.0 gptqmodel
    /root/peers-venv/bin/pip install torch==2.13.0 transformers==5.24.0 gptqmodel==7.6.0
    # GPTQModel pins numpy==2.2.6 (downgrades 2.4.6 in the peer venv only) and pulls
    # torchao 0.18.0, datasets, pyarrow, pandas, ...; it is an sdist but builds no
    # extension at install time (pure-Python wheel).

Never install this into qtool's own .venv.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import sys
import time
from pathlib import Path

import torch
from torch import nn

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")
WEIGHT_INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- model

def load_fp32(model_dir: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, device_map=None, local_files_only=True)
    model.eval()
    return model


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder blocks (model.model.layers for llama/qwen/gemma)."""
    for getter in (lambda m: m.model.layers, lambda m: m.get_decoder().layers,
                   lambda m: m.transformer.h, lambda m: m.model.decoder.layers):
        try:
            blocks = getter(model)
        except AttributeError:
            continue
        if isinstance(blocks, nn.ModuleList) and len(blocks):
            return blocks
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and (best is None or len(mod) > len(best[1])):
            best = (name, mod)
    if best is None:
        raise SystemExit("peers.py: cannot find the decoder blocks of this model")
    return best[1]


def block_linears(block: nn.Module):
    return [(n, m) for n, m in block.named_modules() if isinstance(m, nn.Linear)]


def check_group_size(blocks, group_size: int):
    for i, block in enumerate(blocks):
        for name, lin in block_linears(block):
            if lin.in_features % group_size:
                raise SystemExit(
                    f"peers.py: layers.{i}.{name} has in_features={lin.in_features}, "
                    f"not a multiple of --group-size {group_size}")


# --------------------------------------------------------------------------- HQQ

def hqq_version() -> str:
    from importlib.metadata import version
    return version("hqq")


def quantize_hqq(model, bits: int, group_size: int) -> dict:
    """In place: every decoder-block linear's weight <- HQQ-dequantized weight."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    # == transformers.HqqConfig(nbits=bits, group_size=group_size) (axis defaults to 1)
    cfg = BaseQuantizeConfig(nbits=bits, group_size=group_size, axis=1)
    blocks = decoder_blocks(model)
    n = 0
    with torch.inference_mode():
        for block in blocks:
            for _, lin in block_linears(block):
                w = lin.weight.data
                # HQQLinear quantizes a copy (del_orig=False keeps our module intact).
                hq = HQQLinear(lin, quant_config=cfg, compute_dtype=torch.float32,
                               device="cpu", del_orig=False)
                wd = hq.dequantize().to(dtype=w.dtype).reshape(w.shape)
                w.copy_(wd)
                del hq, wd
                n += 1
    return {"linears": n, "settings": {
        "nbits": bits, "group_size": group_size, "axis": 1, "asymmetric": True,
        "optimize": True, "optimizer": "optimize_weights_proximal_legacy "
        "(lp_norm=0.7, beta=10, kappa=1.01, iters=20)",
        "round_zero": cfg["weight_quant_params"]["round_zero"],
        "compute_dtype": "float32", "hqq_version": hqq_version()}}


# --------------------------------------------------------------------------- calibration

def calib_windows(tokenizer, path: str, n_samples: int, seqlen: int, seed: int = 0):
    """n_samples random non-overlapping windows of seqlen tokens (seed 0) from a text file."""
    text = Path(path).read_text(encoding="utf-8")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    n_slots = ids.numel() // seqlen
    if n_slots < n_samples:
        raise SystemExit(f"peers.py: {path} has {ids.numel()} tokens = {n_slots} windows "
                         f"of {seqlen}, fewer than --n-samples {n_samples}")
    # Non-overlapping: pick distinct window slots after a random offset < seqlen.
    rng = random.Random(seed)
    offset = rng.randrange(0, ids.numel() - n_slots * seqlen + 1)
    slots = sorted(rng.sample(range(n_slots), n_samples))
    return [ids[offset + s * seqlen: offset + (s + 1) * seqlen].clone() for s in slots]


# --------------------------------------------------------------------------- GPTQ (GPTQModel)

def _unpack_int32(x: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """GPTQ int32 packing: 32/bits codes per int32, lowest bits first, along ``dim``."""
    per = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    mask = (1 << bits) - 1
    if dim == 0:
        return ((x.unsqueeze(1) >> shifts.view(1, per, 1)) & mask).reshape(-1, x.shape[1])
    return ((x.unsqueeze(2) >> shifts.view(1, 1, per)) & mask).reshape(x.shape[0], -1)


def dequant_gptq_v1(mod) -> torch.Tensor:
    """[out, in] float32 weight of a GPTQModel packed linear (GPTQ v1 layout, as it
    sits in memory right after ``quantize()``: qzeros hold zero-1).

    W[o, i] = scales[g_idx[i], o] * (q[i, o] - (qzeros[g_idx[i], o] + 1)), computed in
    float32 from GPTQModel's float16 scales. Checked on /tmp/smol3 against
    GPTQModel's own path (save -> GPTQModel.load(backend=TORCH) -> dequantize_weight):
    equal up to that path's bfloat16 output rounding (relative difference 2e-3).
    """
    bits = int(mod.bits)
    q = _unpack_int32(mod.qweight, bits, 0)[: mod.in_features].float()      # [in, out]
    z = _unpack_int32(mod.qzeros, bits, 1)[:, : mod.out_features].float()   # [groups, out]
    s = mod.scales.float()
    g = mod.g_idx.long()
    return ((q - (z[g] + 1.0)) * s[g]).t().contiguous()


def gptqmodel_version() -> str:
    from importlib.metadata import version
    return version("gptqmodel")


def quantize_gptq(model, tokenizer, args) -> dict:
    """GPTQ by GPTQModel 7.6.0 on the CPU; writes its dequantized weights into ``model``.

    Works on this machine (torch 2.13.0+cpu, transformers 5.24.0), with one work-around:
    on a machine with <= 2 CPUs GPTQModel's own thread pool fails to build
    ("ValueError: Virtual pool 'model_loader:cpu' requests 2 workers but parent 'cpu'
    only has 1"), so GPTQMODEL_CPU_WORKERS=2 is set before it is imported.

    Settings: ``QuantizeConfig(bits=B, group_size=G, offload_to_disk=False)``, every
    other field GPTQModel's default for METHOD.GPTQ, i.e. what a user of the toolkit
    gets: symmetric (sym=True), desc_act=False, act_group_aware=True (GPTQModel's
    "GAR" group-aware reordering: columns are processed in an activation-aware order
    but groups keep their natural layout, g_idx stays sorted), damp_percent=0.05
    (+0.01 auto-increment if the Cholesky fails), true_sequential=True, mse=0.0 (no
    clipping search), static_groups=False, lm_head=False, fallback=RTN for a module
    that sees < 0.5% of the calibration tokens (MoE experts; never for a dense model).
    GPTQModel loads the model folder itself (dtype=float32, device cpu) and quantizes
    it block by block with the calibration windows (batch_size=1); offload_to_disk is
    turned off (it only saves memory and writes to /tmp). Its packed linears are then
    dequantized (``dequant_gptq_v1``) into the fp32 model that this script saves.
    """
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    windows = calib_windows(tokenizer, args.calib_data, args.n_samples, args.seqlen)
    calibration = [{"input_ids": w.tolist(), "attention_mask": [1] * w.numel()} for w in windows]

    from gptqmodel import GPTQModel, QuantizeConfig

    qcfg = QuantizeConfig(bits=args.bits, group_size=args.group_size, offload_to_disk=False)
    gm = GPTQModel.load(args.model, qcfg, device="cpu", dtype=torch.float32)
    gm.quantize(calibration, batch_size=1)

    packed = {n: m for n, m in gm.model.named_modules()
              if hasattr(m, "qweight") and hasattr(m, "qzeros") and hasattr(m, "scales")}
    ours = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    blocks = decoder_blocks(model)
    prefix = next(n for n, m in model.named_modules() if m is blocks)
    n = 0
    with torch.no_grad():
        for name, lin in ours.items():
            if not name.startswith(prefix + "."):
                continue
            if name not in packed:
                raise SystemExit(f"peers.py: GPTQModel left {name} unquantized")
            w = dequant_gptq_v1(packed[name])
            if w.shape != lin.weight.shape:
                raise SystemExit(f"peers.py: {name}: dequantized {tuple(w.shape)} "
                                 f"!= {tuple(lin.weight.shape)}")
            lin.weight.copy_(w)
            n += 1
    c = gm.quantize_config
    settings = {k: getattr(c, k, None) for k in (
        "bits", "group_size", "sym", "desc_act", "act_group_aware", "damp_percent",
        "damp_auto_increment", "true_sequential", "mse", "static_groups")}
    settings = {k: (v if isinstance(v, (int, float, bool, str, type(None))) else str(v))
                for k, v in settings.items()}
    settings.update(gptqmodel_version=gptqmodel_version(), calib_batch_size=1)
    del gm, packed
    return {"linears": n, "settings": settings}


# --------------------------------------------------------------------------- output

def write_output(model, model_dir: str, out_dir: str, meta: dict):
    """Atomic: write into a temp folder beside OUT, then rename it into place."""
    src, out = Path(model_dir), Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        # Tokenizer files, config.json (the original one, so the folder describes the
        # same fp32 model: no quantization_config, same tie_word_embeddings),
        # generation config, chat template ...: everything that is not a weight file.
        for f in src.iterdir():
            if not f.is_file() or f.name in WEIGHT_INDEX_NAMES or f.suffix in WEIGHT_SUFFIXES:
                continue
            shutil.copy2(f, tmp / f.name)
        (tmp / "peer_quant.json").write_text(json.dumps(meta, indent=2) + "\n")
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, old)
        os.rename(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --------------------------------------------------------------------------- main

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", required=True, choices=["hqq", "gptq"])
    p.add_argument("--model", required=True, help="fp32 Hugging Face model folder")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--out", required=True, help="output folder (fp32, dequantized)")
    p.add_argument("--calib-data", help="plain-text file (data-aware peers)")
    p.add_argument("--n-samples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--threads", type=int, default=0,
                   help="torch.set_num_threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.method == "gptq" and args.bits not in (2, 4, 8):
        raise SystemExit("peers.py: --method gptq supports --bits 2, 4 or 8 here")

    # The peers log to stdout (GPTQModel's progress bars and tables); keep stdout for
    # the one JSON line: fd 1 -> fd 2 for the whole run, the JSON goes to the saved fd.
    sys.stdout.flush()
    json_fd = os.dup(1)
    os.dup2(2, 1)

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from transformers import AutoTokenizer

    model = load_fp32(args.model)
    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    blocks = decoder_blocks(model)
    check_group_size(blocks, args.group_size)

    t0 = time.perf_counter()
    if args.method == "hqq":
        info = quantize_hqq(model, args.bits, args.group_size)
    else:
        if not args.calib_data:
            raise SystemExit("peers.py: --method gptq needs --calib-data")
        info = quantize_gptq(model, tokenizer, args)
    quant_seconds = time.perf_counter() - t0

    meta = {"method": args.method, "bits": args.bits, "group_size": args.group_size,
            "source_model": str(Path(args.model).resolve()), "quant_seconds": quant_seconds,
            "torch": torch.__version__, "threads": torch.get_num_threads(), **info}
    if args.calib_data:
        meta.update(calib_data=str(Path(args.calib_data).resolve()),
                    n_samples=args.n_samples, seqlen=args.seqlen)
    write_output(model, args.model, args.out, meta)

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    sys.stdout.flush()
    with os.fdopen(json_fd, "w") as json_out:
        print(json.dumps({"method": args.method, "quant_seconds": round(quant_seconds, 3),
                          "peak_rss_mib": round(peak, 1), "bits": args.bits,
                          "group_size": args.group_size, "linears": info.get("linears"),
                          "out": str(Path(args.out).resolve())}), file=json_out, flush=True)


if __name__ == "__main__":
    main()
