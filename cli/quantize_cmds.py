"""``qtool rtn|awq|gptq``: quantize a model folder into a packed checkpoint."""
from __future__ import annotations

import click

from cli.options import calib_options, quant_options, setup_logging
from cli.report import print_quant_report


def run_quantize(method: str, model_dir: str, out: str, verbose: bool, overwrite: bool, device: str,
                 **fields) -> None:
    import quant
    from quant.config import QuantConfig

    setup_logging(verbose)
    fields["skip"] = tuple(fields.get("skip", ()))
    cfg = QuantConfig(method=method, **fields)
    report = quant.quantize(model_dir, out, cfg, overwrite=overwrite, device=device)
    print_quant_report(report, verbose)


@click.command()
@quant_options
def rtn(model_dir, out, verbose, overwrite, device, **fields):
    """Round-to-nearest: each weight group quantized on its own min/max. No calibration data.

    The baseline that AWQ and GPTQ are measured against; fast and data-free.
    """
    run_quantize("rtn", model_dir, out, verbose, overwrite, device, **fields)


COMMANDS = [rtn]
