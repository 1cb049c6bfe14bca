"""``qtool rtn|awq|gptq``: quantize a model folder into a packed checkpoint."""
from __future__ import annotations

import click

from cli.options import calib_options, check_text_field, given_options, quant_options, setup_logging
from cli.report import print_quant_report
from quant.config import RANGE_SEARCHES, SHRINK_DEFAULT, GPTQOptions, parse_size
from quant.errors import QtoolError


def run_quantize(method: str, model_dir: str, out: str, verbose: bool, overwrite: bool, device: str,
                 max_shard_size: str, restart: bool = False, **fields) -> None:
    import quant
    from quant import folder
    from quant.config import QuantConfig

    setup_logging(verbose)
    folder.read_config(model_dir)  # a wrong path said before torch is imported (seconds)
    fields["skip"] = tuple(fields.get("skip", ()))
    check_text_field(fields.get("calib_data"), given_options(click.get_current_context()))
    cfg = QuantConfig(method=method, **fields)  # values out of range are refused first
    max_shard_bytes = parse_size(max_shard_size, "--max-shard-size")  # as transformers reads it (imports it)
    if cfg.check_windows and cfg.held_out == 0 and "check_windows" in given_options(click.get_current_context()):
        raise QtoolError(f"--check-windows {cfg.check_windows} asks for the whole-model check, which --held-out 0 "
                         "turns off; give --held-out above 0, or drop --check-windows")
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm():  # log lines above the progress bar, not glued to it
        report = quant.quantize(model_dir, out, cfg, overwrite=overwrite, device=device, max_shard_bytes=max_shard_bytes,
                                restart=restart)
    print_quant_report(report, verbose)


# What only a search uses: a replay (--apply-search) reads the saved scales and clips and no calibration text.
_SEARCH_ONLY = ("n_grid", "n_judge", "judge_windows", "screen_windows", "quantized_inputs", "token_weighting", "judge",
                "fisher_probes", "clip", "clip_grid", "calib_data", "text_field", "n_samples", "held_out",
                "check_windows", "seqlen", "seed")


@click.command()
@quant_options
def rtn(model_dir, out, verbose, overwrite, device, max_shard_size, **fields):
    """Round-to-nearest: each weight group quantized on its own min/max. No calibration data.

    The baseline that AWQ and GPTQ are measured against; fast and data-free.
    """
    run_quantize("rtn", model_dir, out, verbose, overwrite, device, max_shard_size, **fields)


@click.command()
@quant_options
@calib_options
@click.option("--n-grid", default=20, show_default=True, type=int,
              help="Scale exponents tried per layer group, evenly spaced in [0, 1), in closed form.")
@click.option("--n-judge", default=4, show_default=True, type=int,
              help="Of those, RTN's and the best others' run through the module they feed (attention, MLP); "
                   "the lowest output error wins. 1: the closed form alone.")
@click.option("--judge-windows", default=4, show_default=True, type=int,
              help="Calibration windows the candidates run through the module they feed on, and held-out windows "
                   "the clipping ranges are tested on (those at most half of --held-out: the rest are the RTN guard's).")
@click.option("--screen-windows", default=64, show_default=True, type=int,
              help="Calibration windows whose input products XᵀX give the closed-form screen and the clip search.")
@click.option("--quantized-inputs", is_flag=True,
              help="Pass the calibration windows to the next block through the quantized block (as GPTQ does), "
                   "not as the full-precision block outputs them (the AWQ paper's way, one forward pass less).")
@click.option("--token-weighting/--no-token-weighting", default=True, show_default=True,
              help="Weigh each token's error by 1/|h|² of its hidden state, as the next norm sees it (--judge error).")
@click.option("--judge", "judge", default="loss", show_default=True,
              help="loss or error: what a candidate's output error is judged by: the change of the model's loss it makes (its "
                   "gradient and Gauss-Newton curvature from one backward pass over the judge windows), or the "
                   "squared output error.")
@click.option("--fisher-probes", default=4, show_default=True, type=int,
              help="With --judge loss: label draws per window for the loss's curvature (0: its gradient alone).")
@click.option("--clip/--no-clip", default=True, show_default=True,
              help="Also search a per-group clipping range that lowers the output error.")
@click.option("--clip-grid", default=20, show_default=True, type=int, help="Clipping ratios tried per group.")
@click.option("--apply-search", default=None, type=click.Path(path_type=str),  # a missing one: quant's own sentence
              help="Replay the scales and clips of an earlier run (its checkpoint folder, or the "
                   "qtool/awq_search.safetensors inside it; or qtool/awq_search.refused.safetensors, the search of a model "
                   "the whole-model check did not keep) instead of searching; needs no calibration data. It must "
                   "come from the same model at the same --bits, --group-size and --sym.")
def awq(model_dir, out, verbose, overwrite, device, max_shard_size, n_grid, n_judge, judge_windows, screen_windows,
        quantized_inputs, token_weighting, judge, fisher_probes, clip, clip_grid, apply_search, **fields):
    """Activation-aware weight quantization (AWQ), the recommended 4-bit method.

    Scales the input channels that carry large activations before rounding (the
    scale is folded into the preceding norm or linear, so the model computes the
    same function), then searches a clipping range per group. Search results are
    saved in the checkpoint as qtool/awq_search.safetensors. Clips are kept only
    where they lower the output error on held-out windows, and a block is kept at
    round-to-nearest where that is closer to the original (--held-out).
    """
    from quant.config import AWQOptions

    given = given_options(click.get_current_context())
    if apply_search:  # an option the replay would silently ignore, or record as if it had been used: refused
        unused = [flag for name, flag in given.items() if name in _SEARCH_ONLY]
        if unused:
            raise QtoolError(f"{', '.join(unused)}: --apply-search replays the saved scales and clips without "
                             "calibration data, so these search options would not be used; drop them, or search again "
                             "without --apply-search")
    for option, needs, off in (("fisher_probes", judge == "loss", "--judge error"), ("clip_grid", clip, "--no-clip")):
        if option in given and not needs:
            raise QtoolError(f"{given[option]} would not be used: {off} leaves it out; drop one of them")
    run_quantize("awq", model_dir, out, verbose, overwrite, device, max_shard_size,
                 awq=AWQOptions(n_grid=n_grid, n_judge=n_judge, judge_windows=judge_windows,
                                screen_windows=screen_windows, quantized_inputs=quantized_inputs,
                                token_weighting=token_weighting, judge=judge, fisher_probes=fisher_probes, clip=clip,
                                clip_grid=clip_grid, search_file=apply_search), **fields)


@click.command()
@quant_options
@calib_options
@click.option("--act-order", is_flag=True, help="Quantize input rows by decreasing Hessian diagonal (desc_act).")
@click.option("--static-groups", is_flag=True, help="With --act-order: fix group parameters before the solve.")
@click.option("--shrink", default=SHRINK_DEFAULT, show_default=True, type=float,
              help="Hessian shrinkage toward its diagonal, (1-β)H + β·diag(H): how far to distrust the "
                   "calibration text's correlations between input channels (0: the paper's GPTQ).")
@click.option("--damp", default=0.01, show_default=True, type=float,
              help="Dampening added to the Hessian diagonal, as a fraction of its mean.")
@click.option("--range-search", default=GPTQOptions.range_search, show_default=True,
              type=click.Choice(RANGE_SEARCHES),
              help="Each group's scale and zero point: its min/max, or the range shrunk (x0.5..1) to the least "
                   "rounding error weighted by the Hessian's diagonal (hessian) or in |Δw|^2.4 (mse).")
@click.option("--true-sequential/--no-true-sequential", default=True, show_default=True,
              help="Feed each sub-layer group the outputs of the already-quantized ones.")
@click.option("--awq-first", is_flag=True, help="Apply AWQ scales first, then GPTQ rounding.")
@click.option("--value-hessian/--no-value-hessian", default=True, show_default=True,
              help="Solve v_proj per key/value head under the attention-weighted Hessian (the exact one for "
                   "the attention output); off: the paper's XᵀX for v_proj too.")
def gptq(model_dir, out, verbose, overwrite, device, max_shard_size, act_order, static_groups, shrink, damp,
         range_search, true_sequential, awq_first, value_hessian, **fields):
    """GPTQ: Hessian-aware rounding that corrects each column's error on the columns still to come.

    The layout follows the settings and --target (--format overrides it): 4-bit
    asymmetric weights without --act-order, the default, are written in the AWQ
    gemm layout that every loader reads; --sym gives GPTQ v1 (with g_idx), other
    asymmetric weights (2, 3, 8 bits, --act-order) GPTQ v2. Each Hessian is shrunk toward its
    diagonal (--shrink), so that the solve leans less on correlations that only
    the calibration text has.
    """
    opts = GPTQOptions(shrink=shrink, damp=damp, act_order=act_order, static_groups=static_groups,
                       range_search=range_search, true_sequential=true_sequential, awq_first=awq_first,
                       value_hessian=value_hessian)
    run_quantize("gptq", model_dir, out, verbose, overwrite, device, max_shard_size, gptq=opts, **fields)


COMMANDS = [rtn, awq, gptq]
