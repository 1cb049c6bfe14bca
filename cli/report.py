"""Tables the CLI prints (tabulate). Library code returns data; only this module formats it."""
from __future__ import annotations

import math
import statistics
from pathlib import Path

import click
from tabulate import tabulate

from quant.config import REFUSED_SEARCH_FILE


def mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:,.1f} MiB"


def print_quant_report(r, verbose: bool = False) -> None:
    from quant.formats import get_format

    if verbose and r.blocks:
        keys = list(dict.fromkeys(k for b in r.blocks for k in b.info))  # the order the methods report them in
        rows = [[b.index, b.n_linears, f"{b.seconds:.2f}"] + [b.info.get(k, "") for k in keys] for b in r.blocks]
        click.echo(tabulate(rows, headers=["block", "linears", "seconds"] + keys, tablefmt="github",
                            disable_numparse=True))
        click.echo()
    per_block = [b.seconds for b in r.blocks] or [0.0]
    rows = [
        ["method", f"{r.method} (w{r.bits}, group {r.group_size}, {get_format(r.fmt).title} layout)"],
        ["linears quantized", r.n_quantized],
        ["linears kept in full precision", len(r.skipped)],
        *_guard_rows(r),
        *_expert_rows(r),
        *_resumed_rows(r),
        ["time", f"{r.seconds:.1f} s (calibration data {r.calib_seconds:.1f} s)"],
        ["time per block", f"median {statistics.median(per_block):.2f} s, max {max(per_block):.2f} s"],
        ["peak memory", f"{r.peak_rss_mb:,.0f} MiB RSS" + (f", {r.peak_device_mb:,.0f} MiB GPU" if r.peak_device_mb else "")],
        ["source weights", mib(r.source_bytes)],
        ["checkpoint", f"{mib(r.output_bytes)} ({r.source_bytes / max(r.output_bytes, 1):.2f}x smaller)"],
        ["written to", r.out],
        *_loader_rows(getattr(r, "loaders", None)),
    ]
    click.echo(tabulate(rows, tablefmt="simple"))


def _loader_rows(loaders: dict | None) -> list[list]:
    """Which loaders read the checkpoint right, and why the others do not (quant.formats.compat)."""
    if not loaders:
        return []
    from quant.formats.compat import LOADERS

    right = [LOADERS[n] for n, why in loaders.items() if why is None]
    rows = [["read right by", ", ".join(right) or "none of the loaders in qtool's table"]]
    rows += [[f"not by {LOADERS[n]}", why] for n, why in loaders.items() if why is not None]
    return rows


def _expert_rows(r) -> list[list]:
    """Mixture-of-experts blocks: routed calibration tokens per expert, and the experts whose statistics
    came from every token (too few routed to them)."""
    moe = [b for b in r.blocks if "expert tokens min/med/max" in b.info]
    if not moe:
        return []
    lo, med, hi = zip(*(map(int, b.info["expert tokens min/med/max"].split("/")) for b in moe))
    fell = [f"block {b.index}: {b.info['expert fallback']}" for b in moe if b.info.get("expert fallback", "-") != "-"]
    return [["routed tokens per expert", f"min {min(lo)}, median of medians {sorted(med)[len(med) // 2]}, "
                                         f"max {max(hi)} over {len(moe)} MoE blocks"],
            ["experts with statistics from every token", "; ".join(fell) if fell else "none (every expert got enough routed tokens)"]]


def _losses(by_name: dict[str, float]) -> str:
    """``"5.79912 (gptq) vs 5.79909 (all-RTN)"``: four decimals, more where fewer would print two different
    losses alike (up to eight), so that a verdict never reads as a choice between equal numbers."""
    values = list(by_name.values())
    digits = 4
    while digits < 8 and len({f"{v:.{digits}f}" for v in values}) < len(set(values)):
        digits += 1
    return " vs ".join(f"{v:.{digits}f} ({k})" for k, v in by_name.items())


def _resumed_rows(r) -> list[list]:
    """Where the run continued a stopped one: at which block, and what it read instead of computing."""
    start = getattr(r, "resumed_from", None)
    if start is None:
        return []
    done = ("its calibration windows and loss gradients were computed by a stopped run" if start == 0 else
            "the blocks before it were finished by a stopped run")
    return [["resumed at", f"block {start} ({done}; time and peak memory are this run's)"]]


def _guard_rows(r) -> list[list]:
    """The RTN guard's verdict, where a data-aware method ran: which blocks it kept at round-to-nearest."""
    from quant.guard import FALLBACK_KEY
    from quant.model_check import describe, partial_module

    label = "blocks kept at RTN (closer on held-out windows)"
    if not any("held-out err" in b.info for b in r.blocks):
        return [[label, "not checked (--held-out 0)"]] if r.guarded is False else []
    check = getattr(r, "model_check", None)
    # a block's own verdict is "rtn"; "rtn (whole model...)" where only the whole-model check chose RTN
    fell_back = [b.index for b in r.blocks if b.info.get(FALLBACK_KEY) == "rtn"]
    which = f" (block{'s' if len(fell_back) > 1 else ''} {', '.join(map(str, fell_back))})" if fell_back else ""
    rows = [[label, f"{len(fell_back)} of {sum(b.n_linears > 0 for b in r.blocks)}{which}"]]  # quantized blocks
    if check:
        label, kept = check["method"], check["kept"]
        name = lambda k: describe(k, label)  # noqa: E731
        scored = {label: check["nll"], **{name(k): v for k, v in check["alternatives"].items()}}
        worse, above = check.get("worse_than_rtn", {}), check.get("above_rtn", {})
        margin = lambda m, se: f"+{m:.4f} ± {se:.4f}"  # noqa: E731 - a candidate's loss minus all-RTN's, nats/token
        margins = above.get(label, {})
        kinds = [f"{k} text ({margin(*margins[k])} nats/token)" if k in margins else f"{k} text"
                 for k in worse.get(label, [])]
        listed = " and ".join([", ".join(kinds[:-1]), kinds[-1]] if len(kinds) > 1 else kinds)
        why = f"{label} is worse than all-RTN on {listed}" if kinds else "the whole model scored better with it"
        if kept == label:
            verdict = f"{kept} kept"
        elif partial_module(kept, label):
            verdict = f"{describe(kept, label)}, kept ({why})"
        else:
            verdict = f"{'RTN' if kept == 'rtn' else kept} kept for every block ({why})"
        inside = [f"{k} text by {margin(m, se)}" for k, (m, se) in above.get(kept, {}).items() if m > 0]
        if inside:  # kept although above all-RTN there: say so, and by how little
            verdict += f"; it is above all-RTN on {' and '.join(inside)} nats/token, inside the windows' spread"
        if not all(math.isfinite(v) for v in scored.values()):
            verdict += "; a loss that is not finite could not be compared (check the model's outputs)"
        rows.append(["held-out loss of the whole model", f"{_losses(scored)} nats/token: {verdict}"])
        refused = Path(r.out) / REFUSED_SEARCH_FILE
        if kept != label and refused.is_file():
            # the file holds scales and clips, not GPTQ's rounding: its replay is AWQ's model, whatever the method
            replay = "replays it" if label == "awq" else "replays its scales and clips with AWQ's rounding, not GPTQ's"
            module = partial_module(kept, label)
            rows.append([f"whole AWQ search ({f'kept in {module} only' if module else 'not kept'})",
                         f"{refused} (qtool awq --apply-search {replay})"])
        for kind, by_name in check.get("kinds", {}).items():
            rows.append([f"... on built-in {kind} text", _losses({name(k): v for k, v in by_name.items()})])
        if check.get("kinds") and check.get("score"):
            rows.append(["... averaged over the kinds (decides)",
                         _losses({name(k): v for k, v in check["score"].items()})])
    return rows


def print_info(info) -> None:
    from quant.formats import get_format

    rows = [
        ["folder", info.path],
        ["model type", info.model_type],
        ["format", f"{info.fmt} ({get_format(info.fmt).title} layout)"],
        ["made by", f"qtool {info.method}" if info.method else "another tool"],
        ["bits", info.bits],
        ["group size", info.group_size],
        ["zero points", "none (symmetric)" if info.sym else "yes (asymmetric)"],
        ["act-order (desc_act)", "yes" if info.act_order else "no"],
        ["linears quantized", info.n_quantized],
        ["linears kept in full precision", len(info.skipped)],
        ["checkpoint size", mib(info.checkpoint_bytes)],
        ["same model in float16", f"{mib(info.fp16_bytes)} ({info.ratio:.2f}x larger)"],
        *_loader_rows(info.loaders),
    ]
    click.echo(tabulate(rows, tablefmt="simple"))
    for name in info.skipped:
        click.echo(f"  kept in full precision: {name}")


def print_ppl(model_dir: str, res, kv=None) -> None:
    """The perplexity row; ``kv`` (a :class:`quant.kv.KVCacheConfig`, None for the full-precision cache) names
    the KV cache the number was measured with."""
    cache = kv.name if kv is not None else "full precision"
    rows = [[model_dir, cache, f"{res.ppl:.3f}", res.n_tokens, res.n_windows, f"{res.tokens_per_s:,.0f}"]]
    click.echo(tabulate(rows, headers=["model", "KV cache", "perplexity", "tokens", "windows", "tokens/s"],
                        tablefmt="github"))


def print_self_samples(r) -> None:
    """The summary of ``qtool self-calib`` (calib.self_samples.SamplingReport)."""
    rows = [
        ["sequences kept", r.kept],
        ["redrawn (repetition loops)", r.redrawn],
        ["tokens", f"{r.tokens:,}"],
        ["zlib ratio of the kept text", f"median {r.median_zlib_ratio:.2f}, lowest {r.min_zlib_ratio:.2f}"],
        *([["resumed", f"after {r.resumed_batches} finished batches of a stopped run"]] if r.resumed_batches else []),
        ["time", f"{r.seconds:.1f} s"],
        ["written to", f"{r.out} (give it to --calib-data)"],
    ]
    click.echo(tabulate(rows, tablefmt="simple"))
