"""``qtool ppl`` and ``qtool info``: measure and inspect models and checkpoints."""
from __future__ import annotations

from pathlib import Path

import click

from cli.kv_cmds import kv_config_from_options, kv_ppl_options
from cli.options import setup_logging
from cli.report import print_info, print_ppl
from quant.errors import QtoolError


def _read_text(path: str) -> str:
    """The text of ``--data`` (a file, or anything that reads as one: a pipe, /dev/stdin); QtoolError in one
    sentence for a missing path, a folder, an unreadable file or bytes that are not UTF-8."""
    if not path.strip():  # an unset shell variable: it scored the shipped sample without a word
        raise QtoolError("--data is blank; give a UTF-8 text file (leave --data out for the shipped sample)")
    p = Path(path)
    if p.is_dir():
        raise QtoolError(f"{path}: is a folder; --data takes a UTF-8 text file")
    if not p.exists():
        raise QtoolError(f"{path}: no such file; --data takes a UTF-8 text file")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise QtoolError(f"{path}: is not UTF-8 text; --data takes a UTF-8 text file") from None
    except OSError as e:
        raise QtoolError(f"{path}: cannot be read ({e.strerror}); --data takes a UTF-8 text file") from None


@click.command()
@click.argument("model_dir", type=click.Path(path_type=str))
@click.option("--data", default=None, type=click.Path(path_type=str),
              help="UTF-8 text to score. Default: a held-out Wikipedia sample shipped with qtool.")
@click.option("--seqlen", default=512, show_default=True, type=int, help="Tokens per window.")
@click.option("--stride", default=None, type=int, help="Step between windows (default: --seqlen, no overlap).")
@click.option("--max-tokens", default=None, type=int, help="Score only the first N tokens of the text.")
@click.option("--dtype", default="auto", show_default=True,
              type=click.Choice(["auto", "float16", "bfloat16", "float32"]),
              help="Compute dtype (auto: float32 on the CPU, the checkpoint's dtype on a GPU).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda ...")
@kv_ppl_options
@click.option("-v", "--verbose", is_flag=True)
def ppl(model_dir, data, seqlen, stride, max_tokens, dtype, device, kv, kv_keys, kv_window, kv_calib, kv_chunk,
        verbose):
    """Perplexity of a model folder or a quantized checkpoint on a text, with tokens/s."""
    from quant import folder

    folder.read_config(model_dir)  # a wrong path said before torch is imported (seconds)
    import quant
    from quant.eval_data import default_eval_text
    from quant.kv.eval import check_kv_window, kv_perplexity
    from quant.ppl import check_windows

    setup_logging(verbose)
    check_windows(seqlen, stride, max_tokens)  # before the model is read (minutes for a large one)
    text = _read_text(data) if data is not None else default_eval_text()
    kv_cfg = kv_config_from_options(model_dir, kv, kv_keys, kv_window, kv_calib, kv_chunk)
    check_kv_window(kv_cfg, seqlen, max_tokens)
    model, tokenizer = quant.load_any(model_dir, dtype=dtype, device=device)
    if kv_cfg is None:
        res = quant.perplexity(model, tokenizer, text, seqlen=seqlen, stride=stride, max_tokens=max_tokens,
                               progress=True)
    else:
        res = kv_perplexity(model, tokenizer, text, kv_cfg, seqlen=seqlen, stride=stride,
                                     max_tokens=max_tokens, chunk=kv_chunk, progress=True)
    print_ppl(model_dir, res, kv_cfg)


@click.command()
@click.argument("checkpoint_dir", type=click.Path(path_type=str))
def info(checkpoint_dir):
    """What a quantized checkpoint holds: format, bits, group size, symmetry, act-order, the layers kept in
    full precision, size against float16, and which loaders (transformers, GPTQModel, vLLM, LMDeploy,
    AutoAWQ) read it right and why the others do not."""
    from quant import folder

    folder.read_config(checkpoint_dir)  # a wrong path said before torch is imported (seconds)
    from quant.info import checkpoint_info

    setup_logging(False)  # its warnings (a file left out, a declaration the tensors contradict) were dropped
    print_info(checkpoint_info(checkpoint_dir))


@click.command()
@click.option("--batch", "batches", multiple=True, type=click.IntRange(min=1), default=(1, 8, 32),
              show_default=True, help="Decode batch size (repeatable).")
@click.option("--layers", default=32, show_default=True, type=click.IntRange(min=1),
              help="Decoder layers of the Llama-7B-shaped model (fewer fit smaller GPUs).")
@click.option("--group-size", default=128, show_default=True, type=click.Choice(["32", "64", "128"]),
              help="Int4 group size.")
@click.option("--prompt", default=512, show_default=True, type=click.IntRange(min=1), help="Prefill tokens.")
@click.option("--steps", default=64, show_default=True, type=click.IntRange(min=1), help="Timed decode steps.")
@click.option("--out", default=None, type=click.Path(path_type=str), help="Also append the table to this markdown file.")
def bench(batches, layers, group_size, prompt, steps, out):
    """Decode and prefill tokens/s on the GPU: a Llama-7B-shaped model, fp16 against int4 (random weights).

    Decode steps run as a CUDA graph over a static KV cache; the int4 linears are
    QuantLinear on the compiled W4A16 kernels. Prints tokens/s, weight memory and peak
    GPU memory for each batch size, and the int4/fp16 ratios.
    """
    from quant.bench import decode_report

    text = decode_report(layers, batches, int(group_size), prompt, steps)
    click.echo(text)
    if out:
        with open(out, "a") as f:
            f.write(text + "\n")


COMMANDS = [ppl, info, bench]
