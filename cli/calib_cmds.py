"""``qtool self-calib``: a calibration text sampled from the model itself (calib.self_samples)."""
from __future__ import annotations

import click

from cli.options import setup_logging
from cli.report import print_self_samples


@click.command("self-calib")
@click.argument("model_dir", type=click.Path(path_type=str))
@click.option("-o", "--out", required=True, type=click.Path(path_type=str),
              help="The .txt calibration file to write (give it to --calib-data; join it to another text to mix).")
@click.option("--n-sequences", default=144, show_default=True, type=int,
              help="Sequences to sample (144: the default calibration's 128 windows and 16 held-out ones).")
@click.option("--tokens", default=512, show_default=True, type=int, help="New tokens per sequence.")
@click.option("--t-start", default=1.5, show_default=True, type=float, help="Temperature of the first new token.")
@click.option("--t-end", default=0.7, show_default=True, type=float,
              help="Temperature of the last new token (it falls linearly between).")
@click.option("--top-k", default=50, show_default=True, type=int,
              help="Only the k most likely tokens are drawn from (a hot start over the whole vocabulary is noise).")
@click.option("--top-p", default=0.95, show_default=True, type=float, help="Nucleus sampling mass (within the top k).")
@click.option("--repetition-penalty", default=1.1, show_default=True, type=float,
              help="Penalty on tokens already in the sequence (1: none).")
@click.option("--min-zlib-ratio", default=0.2, show_default=True, type=float,
              help="Sequences whose text zlib compresses below this fraction (repetition loops) are drawn again.")
@click.option("--batch-size", default=16, show_default=True, type=int, help="Sequences sampled at once.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the draws (batch b: its own seed).")
@click.option("--dtype", default="auto", show_default=True,
              type=click.Choice(["auto", "float16", "bfloat16", "float32"]),
              help="Compute dtype (auto: float32 on the CPU, the checkpoint's dtype on a GPU).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda ... (the whole model on it).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option("-v", "--verbose", is_flag=True)
def self_calib(model_dir, out, n_sequences, tokens, t_start, t_end, top_k, top_p, repetition_penalty, min_zlib_ratio,
               batch_size, seed, dtype, device, overwrite, verbose):
    """Sample calibration text from the full-precision model itself (self-calibration, Williams et al., NAACL
    2025): sequences from its start token, the temperature falling over each, repetition loops drawn again.
    A stopped run given the same command resumes from its finished batches."""
    from calib.self_samples import SamplingOptions, write_self_samples

    setup_logging(verbose)
    opts = SamplingOptions(n_sequences=n_sequences, new_tokens=tokens, t_start=t_start, t_end=t_end, top_k=top_k,
                           top_p=top_p, repetition_penalty=repetition_penalty, min_zlib_ratio=min_zlib_ratio,
                           batch_size=batch_size, seed=seed)
    print_self_samples(write_self_samples(model_dir, out, opts, dtype=dtype, device=device, overwrite=overwrite,
                                          progress=True))


COMMANDS = [self_calib]
