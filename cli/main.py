"""The ``qtool`` command line: builds configs, calls the Python API, owns the terminal."""
from __future__ import annotations

import sys

import click

from cli.calib_cmds import COMMANDS as CALIB_COMMANDS
from cli.eval_cmds import COMMANDS as EVAL_COMMANDS
from cli.kv_cmds import COMMANDS as KV_COMMANDS
from cli.quantize_cmds import COMMANDS as QUANT_COMMANDS
from quant.errors import QtoolError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="qtool")
def app():
    """qtool: make Hugging Face causal LMs about 4x smaller.

    \b
    Quantize a model folder (weights to int4/int3/int8) into a checkpoint that
    vLLM, transformers and LMDeploy load unchanged:
      qtool rtn  MODEL_DIR --bits 4 --group-size 128 -o OUT_DIR   # round-to-nearest baseline
      qtool awq  MODEL_DIR --bits 4 -o OUT_DIR                     # activation-aware (recommended)
      qtool gptq MODEL_DIR --bits 4 -o OUT_DIR                     # Hessian-based
    Then measure and inspect it:
      qtool ppl  OUT_DIR --data held_out.txt
      qtool info OUT_DIR
    """


for _cmd in QUANT_COMMANDS + CALIB_COMMANDS + EVAL_COMMANDS + KV_COMMANDS:
    app.add_command(_cmd)


# click 8.2+ raises this (a UsageError whose message is the whole help) for a group given no command
_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


def main() -> None:
    """Console entry point: a user mistake exits 2 with one sentence and no traceback."""
    try:
        app.main(standalone_mode=False)
    except QtoolError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except _NO_ARGS_IS_HELP as e:  # a bare group (``qtool``, ``qtool kv``): its help, as click prints it
        e.show()
        sys.exit(e.exit_code)
    except click.UsageError as e:  # a missing argument, an unknown option or command, a value click refused
        where = f" ('{e.ctx.command_path} --help' lists what is accepted)" if e.ctx else ""
        click.echo(f"error: {e.format_message()}{where}", err=True)
        sys.exit(2)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)


if __name__ == "__main__":
    from cli.entry import console

    console()
