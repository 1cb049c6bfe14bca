"""``qtool kv``: calibrate per-channel key scales for the int8/int4 KV cache."""
from __future__ import annotations

import os
from pathlib import Path

import click
from tabulate import tabulate

from cli.options import _stack, check_text_field, given_options, setup_logging
from quant.errors import QtoolError

kv_ppl_options = _stack([
    click.option("--kv", default=None, type=click.Choice(["int8", "int4"]),
                 help="Read keys and values from an int8 or int4 KV cache (default: the full-precision cache, "
                      "no cache at all)."),
    click.option("--kv-keys", default=None, type=click.Choice(["token", "channel"]),
                 help="Key groups: per (token, head), online [default]; or per channel with calibrated scales."),
    click.option("--kv-window", default=None, type=int,
                 help="Most recent tokens kept in full precision (default 0)."),
    click.option("--kv-calib", default=None, type=click.Path(path_type=str),
                 help="Calibration file from `qtool kv calibrate` (default: the one named in config.json)."),
    click.option("--kv-chunk", default=None, type=int,
                 help="Tokens per forward through the cache (default: the whole --seqlen window at once with "
                      "--kv-window 0, else min(16, --kv-window)); 1 reproduces token-by-token decoding exactly."),
])


def kv_config_from_options(model_dir, kv, kv_keys, kv_window, kv_calib, kv_chunk):
    """The :class:`KVCacheConfig` the ``--kv*`` options ask for, or None without ``--kv``."""
    from quant.kv import parse_kv
    from quant.kv.api import check_folder

    if kv is None:
        given = [name for name, v in (("--kv-keys", kv_keys), ("--kv-window", kv_window), ("--kv-calib", kv_calib),
                                      ("--kv-chunk", kv_chunk)) if v is not None]
        if given:
            raise QtoolError(f"{', '.join(given)} only {'applies' if len(given) == 1 else 'apply'} to a quantized KV "
                             "cache; add --kv int8 or --kv int4")
        return None
    if kv_chunk is not None and kv_chunk < 1:
        raise QtoolError(f"--kv-chunk {kv_chunk} must be a positive number of tokens")
    cfg = parse_kv(kv, keys=kv_keys or "token", window=kv_window or 0, calib=kv_calib, model_dir=model_dir)
    check_folder(model_dir, cfg)  # before the model loads
    return cfg


@click.group()
def kv():
    """Quantized KV cache: calibration of per-channel key scales.

    \b
      qtool kv calibrate MODEL_DIR                 # writes MODEL_DIR/qtool/kv_calib.safetensors, names it in config.json
      qtool ppl MODEL_DIR --kv int4 --kv-keys channel --kv-window 64
    """


@kv.command()
@click.argument("model_dir", type=click.Path(path_type=str))
@click.option("-o", "--out", default=None, type=click.Path(path_type=str),
              help="Calibration file to write (.safetensors; not at the top of MODEL_DIR, where loaders would "
                   "take it for weights). Default: MODEL_DIR/qtool/kv_calib.safetensors. A file inside MODEL_DIR "
                   "is also named in MODEL_DIR/config.json.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it is an earlier KV calibration file.")
@click.option("--calib-data", default=None, type=click.Path(path_type=str),
              help="Calibration text (.txt, .jsonl, .parquet, datasets folder). Default: the shipped corpus.")
@click.option("--text-field", default="text", show_default=True, help="Text field of .jsonl/.parquet input.")
@click.option("--n-samples", default=32, show_default=True, type=int, help="Calibration sequences.")
@click.option("--seqlen", default=512, show_default=True, type=int, help="Tokens per calibration sequence.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed for drawing the windows.")
@click.option("--batch-size", default=4, show_default=True, type=int, help="Sequences per forward.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda ...")
@click.option("-v", "--verbose", is_flag=True)
def calibrate(model_dir, out, overwrite, calib_data, text_field, n_samples, seqlen, seed, batch_size, device,
              verbose):
    """Collect per-channel ranges of the cached keys (after RoPE and q/k norms) of MODEL_DIR."""
    from quant.config import MAX_WINDOWS, check_seed

    if n_samples < 1 or seqlen < 2 or batch_size < 1:
        raise QtoolError(f"--n-samples {n_samples}, --seqlen {seqlen} and --batch-size {batch_size} must be "
                         "positive (--seqlen at least 2)")
    if n_samples > MAX_WINDOWS:
        raise QtoolError(f"--n-samples {n_samples} is out of range; use 1 to {MAX_WINDOWS} calibration windows "
                         "(32 is the usual number)")
    check_seed(seed)
    check_text_field(calib_data, given_options(click.get_current_context()))
    from quant import folder

    folder.read_config(model_dir)  # a wrong path said before torch is imported (seconds)
    import quant
    from calib.data import calibration_batch, load_texts
    from calib.kv import collect_key_ranges, outlier_ratio
    from quant import model_io
    from quant.arch import ARCHITECTURES
    from quant.kv.config import write_calibration_reference

    setup_logging(verbose)
    out_path = _calibration_out(model_dir, out, overwrite)
    model, tokenizer = quant.load_any(model_dir, device=device)
    model_io.check_seqlen(model, seqlen)
    arch = ARCHITECTURES.get(getattr(model.config, "model_type", ""))
    ids = calibration_batch(tokenizer, load_texts(calib_data, text_field=text_field), n_samples, seqlen, seed,
                            add_bos=bool(arch and arch.needs_bos))
    calibration = collect_key_ranges(model, ids, batch_size)
    calibration.save(out_path)
    inside = Path(model_dir).resolve() in out_path.resolve().parents
    if inside:
        write_calibration_reference(model_dir, out_path)
    ratios = outlier_ratio(calibration)
    rows = [
        ["layers", calibration.num_layers],
        ["KV heads x channels", "{} x {}".format(*calibration.shape)],
        ["tokens", f"{calibration.n_tokens:,}"],
        ["widest / median key channel range",
         f"median over layers {sorted(ratios)[len(ratios) // 2]:.1f}, max {max(ratios):.1f}"],
        ["written to", str(out_path)],
        ["named in config.json", "yes" if inside else "no (file outside the model folder: pass --kv-calib)"],
    ]
    click.echo(tabulate(rows, tablefmt="simple"))


def _calibration_out(model_dir: str, out: str | None, overwrite: bool) -> Path:
    """Where ``kv calibrate`` writes, checked before the model loads: a ``.safetensors`` path that is no folder,
    not at the top of the model folder (every loader reads the top-level ``*.safetensors`` as weights), and,
    where a file is there already, an earlier calibration replaced only with ``--overwrite`` (never a model's
    own file)."""
    from quant.folder import is_kv_calibration
    from quant.kv.config import CALIB_FILENAME, calibration_reference

    if out is not None and not out.strip():  # an unset shell variable: not the default path, silently
        raise QtoolError(f"-o is blank; give the calibration file to write, or leave -o out for MODEL_DIR/"
                         f"{CALIB_FILENAME}")
    path = Path(out) if out else Path(model_dir) / CALIB_FILENAME
    where = f"-o {out}" if out else str(path)  # the default path is named as itself, not as an -o never given
    if path.is_dir() or (out and out.endswith(("/", os.sep))):
        raise QtoolError(f"{where}: is a folder; -o takes the calibration file to write, a .safetensors path")
    if path.suffix != ".safetensors":
        raise QtoolError(f"{where}: the calibration is a safetensors file; give a path ending in .safetensors")
    if path.resolve().parent == Path(model_dir).resolve():
        raise QtoolError(f"{where}: a .safetensors file at the top of the model folder would be read as weights "
                         f"by every loader; write it in a subfolder (the default: {CALIB_FILENAME}) or outside")
    if (path.resolve().parent / "config.json").is_file():
        raise QtoolError(f"{where}: {path.resolve().parent} holds another model (its config.json), whose loaders "
                         "would read a .safetensors file at its top as weights; write it in a subfolder or outside")
    parent = next(p for p in path.absolute().parents if p.exists() or p.is_symlink())  # the first that is there
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise QtoolError(f"{where}: cannot be written: {parent} is "
                         f"{'not a folder' if not parent.is_dir() else 'not writable'}")
    if path.exists():
        if not is_kv_calibration(path):
            raise QtoolError(f"{where}: exists and is not a KV calibration file; only an earlier "
                             "calibration is replaced")
        # the default file that config.json does not name was left by a run stopped before it named it: replaced
        if not overwrite and not (out is None and calibration_reference(model_dir) is None):
            raise QtoolError(f"{where}: exists; pass --overwrite to replace it")
    return path


COMMANDS = [kv]
