"""Options shared by the quantization commands, and logging setup."""
from __future__ import annotations

import logging
from pathlib import Path

import click
from click.core import ParameterSource

from quant.errors import QtoolError

GROUP_HELP = ("Input features sharing one scale and zero point: 32, 64, 128 (or 16, 256), "
              "or -1 for one group per output channel.")


def _stack(opts):
    def wrap(func):
        for opt in reversed(opts):
            func = opt(func)
        return func

    return wrap


quant_options = _stack([
    click.argument("model_dir", type=click.Path(path_type=str)),
    click.option("-o", "--out", required=True, type=click.Path(path_type=str),
                 help="Output folder for the quantized checkpoint (must not exist unless --overwrite)."),
    click.option("--bits", default=4, show_default=True, type=int,
                 help="Bits per weight: 4 for the AWQ format; 2, 3, 4 or 8 for the GPTQ format."),
    click.option("--group-size", default=128, show_default=True, type=int, help=GROUP_HELP),
    click.option("--sym/--asym", default=False, show_default=True,
                 help="Symmetric groups (zero point fixed at the middle: what GPTQ-only kernels such as Marlin, "
                      "vLLM's GPTQ path and LMDeploy's GPTQ reader take; written as GPTQ v1) or asymmetric ones "
                      "(default: one more level per group, closer to the original at 4 bits)."),
    click.option("--target", default="any", show_default=True,
                 type=click.Choice(["any", "vllm", "lmdeploy", "transformers", "gptqmodel", "autoawq"]),
                 help="The loader the checkpoint is for: the layout is one it reads right, and settings it would "
                      "misread are refused before any work. any: the layout the most loaders read right "
                      "(`qtool info` lists them)."),
    click.option("--format", "fmt", type=click.Choice(["awq", "gptq", "gptq_v2"]), default=None,
                 help="Checkpoint layout: awq (AutoAWQ gemm), gptq (v1, zero points stored minus one) or gptq_v2 "
                      "(zero points as they are). Default (--target any): awq for 4-bit asymmetric weights "
                      "without act-order; gptq for --sym; gptq_v2 for other asymmetric weights (2, 3, 8 bits, "
                      "--act-order): GPTQModel refuses asymmetric v1."),
    click.option("--skip", multiple=True,
                 help="Linears to keep in full precision, by name or a dotted part of it: mlp.down_proj, "
                      "model.layers.3.mlp.down_proj, or a module holding several (mlp.shared_expert, "
                      "model.layers.0); repeatable."),
    click.option("--dtype", default="auto", show_default=True,
                 type=click.Choice(["auto", "float16", "bfloat16", "float32"]),
                 help="Dtype of the tensors left unquantized (auto: float16, or the source's half type)."),
    click.option("--device", default="auto", show_default=True,
                 help="Where each block is quantized: auto, cpu, cuda, cuda:1 ..."),
    click.option("--max-shard-size", "max_shard_size", default="4GB", show_default=True,
                 help="Most tensor bytes in one output safetensors file (e.g. 500MB, 2GB; KB, MB, GB, KiB, MiB, GiB), "
                      "split tensor by tensor as transformers splits (one tensor larger than that is a file of its "
                      "own); past one file, an index is written."),
    click.option("--overwrite", is_flag=True,
                 help="Replace --out if it is an earlier quantized checkpoint or an empty folder (only once the "
                      "new checkpoint is complete); any other folder is refused."),
    click.option("--restart", is_flag=True,
                 help="Start over instead of continuing a stopped run of this output (a run stopped by Ctrl-C "
                      "or a kill keeps its finished blocks; the same command continues it)."),
    click.option("-v", "--verbose", is_flag=True, help="Log details and print the per-block table."),
])

calib_options = _stack([
    click.option("--calib-data", default=None, type=click.Path(path_type=str),
                 help="Calibration text: .txt, .jsonl, .parquet or a saved datasets folder. "
                      "Default: the corpus shipped with qtool."),
    click.option("--text-field", default="text", show_default=True,
                 help="Field that holds the text in .jsonl/.parquet/datasets input."),
    click.option("--n-samples", default=128, show_default=True, type=int, help="Calibration sequences."),
    click.option("--held-out", default=16, show_default=True, type=int,
                 help="Extra calibration sequences no search sees. Each quantized block is compared with its "
                      "round-to-nearest version on them and RTN is kept where it is closer; with AWQ, half of them "
                      "(at most --judge-windows are drawn) instead test its clipping ranges (0: no checks)."),
    click.option("--check-windows", default=8, show_default=True, type=int,
                 help="Windows of each built-in kind of text (Wikipedia, fiction, Python code) that the calibration "
                      "data lacks, scored by the whole-model check beside the held-out windows: a quantized model "
                      "worse than round-to-nearest on any of them is not kept (0: held-out windows only)."),
    click.option("--seqlen", default=512, show_default=True, type=int, help="Tokens per calibration sequence."),
    click.option("--seed", default=0, show_default=True, type=int, help="Seed for drawing the calibration windows."),
])


def check_text_field(calib_data: str | None, given: dict[str, str]) -> None:
    """Refuse a --text-field that the calibration text has no fields for (a .txt file, the shipped corpus)."""
    if "text_field" in given and (calib_data is None or Path(calib_data).suffix.lower() == ".txt"):
        where = f"{calib_data} is read whole" if calib_data else "the shipped corpus has no fields"
        raise QtoolError(f"{given['text_field']} would not be used: {where}; --text-field names the field of "
                         ".jsonl, .parquet or datasets input")


def given_options(ctx: click.Context) -> dict[str, str]:
    """The options typed on the command line (or set in the environment): parameter name -> the flag as typed."""
    given = {}
    for p in ctx.command.params:
        if isinstance(p, click.Option) and ctx.get_parameter_source(p.name) in (ParameterSource.COMMANDLINE,
                                                                                 ParameterSource.ENVIRONMENT):
            value = ctx.params[p.name]
            flag = p.secondary_opts[0] if p.secondary_opts and value is False else p.opts[-1]
            given[p.name] = flag if p.is_flag else f"{flag} {value}"
    return given


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
