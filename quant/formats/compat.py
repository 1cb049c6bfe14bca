"""Which loaders read which checkpoints right: the compatibility table, and the choice of layout for a target.

A quantized checkpoint is only useful if the loader a user serves with reads it as written. Every row
below says, for one loader and one layout, which settings it reads right; anything else it refuses or,
worse, misreads silently. Each row names how it was established: ``ran``, a load run here on the CPU
(``tests/test_loaders.py``, ``benchmarks/RESULTS.md`` "Issue 18"); ``source``, the loader's source read at the file
and commit given.

What qtool writes for every loader at once (so that one checkpoint serves them all where the table allows):

* ``modules_to_not_convert``: the layers kept in full precision (AWQ loaders: transformers, vLLM,
  AutoAWQ), as a block-relative suffix where a layer is kept in every block (AutoAWQ matches that only);
* ``dynamic`` with a negative, exact ``-:^name$`` rule per kept layer (GPTQModel, vLLM's GPTQ path);
* ``modules_in_block_to_quantize`` for GPTQ layouts with kept layers (transformers through optimum,
  vLLM's GPTQ path);
* no weight-like side file in the folder's root (the AWQ search results are under ``qtool/``), and an index
  file whenever there is more than one safetensors file.

Targets: ``any`` (default) writes the layout the most loaders read right for the settings;
a loader's name writes a layout that loader reads right, or refuses with one sentence why.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace

from quant.errors import QtoolError
from quant.formats.base import format_names, get_format
from quant.kernels.dispatch import CPU_INT4_GROUPS

ALL_BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class Reads:
    """What ``loader`` reads right in ``layout``. ``bits``/``sym``/``group_sizes`` list what it accepts (None: any
    group size); ``act_order``: whether g_idx (desc_act) is honoured. ``misread``: where set, the loader accepts
    the layout but reads it wrong (the sentence says how), for every setting. ``per_block``: whether a layer kept
    in full precision in only some blocks loads right; ``fused``: whether a block may keep some but not all of a
    fused group (q/k/v, gate/up, the experts of one layer) in full precision; ``moe``: whether routed experts
    stored one linear per expert (``mlp.experts.{e}.gate_proj.qweight``) load right; ``kept_keys``: the
    ``quantization_config`` keys it learns kept layers from (any one suffices; empty: it needs none);
    ``int4_cpu``: 4-bit weights run through torch's int4 CPU kernel (:data:`INT4_CPU_GROUP_SIZES`);
    ``declared_zeros``: it reads GPTQ zero points by the ``checkpoint_format`` the config declares, not by what is
    stored."""

    loader: str
    layout: str
    bits: tuple[int, ...] = ALL_BITS
    sym: tuple[bool, ...] = (False, True)
    group_sizes: tuple[int, ...] | None = None
    act_order: bool = True
    misread: str = ""
    per_block: bool = True
    fused: bool = True
    moe: bool = False
    kept_keys: tuple[str, ...] = ()
    int4_cpu: bool = False
    declared_zeros: bool = False
    note: str = ""
    source: str = ""


@dataclass(frozen=True)
class Written:
    """One checkpoint as a loader sees it: layout and settings, how layers kept in full precision lie
    (``skips``, :func:`skip_pattern`), whether routed experts are stored one linear per expert (``moe``), and
    which exclusion keys declare every kept layer (``keys``; None: all of them, as qtool writes), the GPTQ
    ``checkpoint_format`` the config declares where the stored zero points contradict it (``declared``; None: they
    agree), and the ``model_type`` of a family written in its own layout that transformers has no class for
    (``family``: InternLM2's fused ``wqkv``; None: a transformers layout)."""

    layout: str
    bits: int
    sym: bool
    act_order: bool
    group_size: int
    skips: frozenset[str] = frozenset()
    moe: bool = False
    keys: frozenset[str] | None = None
    declared: str | None = None
    family: str | None = None  # model_type of a checkpoint in its family's own layout (quant.arch.layout_of)


LOADERS = {  # name -> how messages name it
    "transformers": "transformers 5.24",
    "gptqmodel": "GPTQModel 7.6",
    "vllm": "vLLM",
    "lmdeploy": "LMDeploy TurboMind",
    "autoawq": "AutoAWQ 0.2.9",
}
TARGETS = ("any", *LOADERS)

_VLLM = "vllm-project/vllm"
_IN_BLOCK = "modules_in_block_to_quantize"
# torch's int4 CPU kernel, which transformers and GPTQModel run 4-bit weights through, takes these group sizes only
# (or one group per channel; ran: group 16 loads, then fails at the first forward).
INT4_CPU_GROUP_SIZES = (-1, *CPU_INT4_GROUPS)
_LMD = "InternLM/lmdeploy@1263d5cd889b"
TABLE: tuple[Reads, ...] = (
    # --- transformers 5.24.0 (AWQ through gptqmodel's kernels; GPTQ through optimum + gptqmodel)
    Reads("transformers", "awq", bits=(4,), sym=(False,), act_order=False, int4_cpu=True,
          kept_keys=("modules_to_not_convert",),
          source="ran (tests/test_loaders.py); quantizers/quantizer_awq.py, quantizers_utils.should_convert_module"),
    Reads("transformers", "gptq", int4_cpu=True, kept_keys=(_IN_BLOCK,), declared_zeros=True, note="needs optimum (ran with 2.3.0), which converts v1 zero points itself, so "
          "asymmetric v1 loads right here although GPTQModel alone refuses it",
          source="ran (tests/test_loaders.py); optimum/gptq/quantizer.py post_init_model"),
    Reads("transformers", "gptq_v2", int4_cpu=True, kept_keys=(_IN_BLOCK,), declared_zeros=True, note="needs optimum",
          source="ran (tests/test_loaders.py); optimum reads checkpoint_format"),
    # --- GPTQModel 7.6.0
    Reads("gptqmodel", "awq", bits=(4,), sym=(False,), act_order=False, int4_cpu=True,
          kept_keys=("dynamic",), note="kept layers are read from `dynamic` only (modules_to_not_convert is ignored)",
          source="ran (tests/test_loaders.py); utils/model.py create_quant_module"),
    Reads("gptqmodel", "gptq", sym=(True,), int4_cpu=True, kept_keys=("dynamic",), declared_zeros=True,
          note="asymmetric v1 is refused unless made by gptqmodel >= 0.9",
          source="ran (tests/test_loaders.py); models/loader.py format check"),
    Reads("gptqmodel", "gptq_v2", int4_cpu=True, kept_keys=("dynamic",), declared_zeros=True,
          source="ran (tests/test_loaders.py)"),
    # --- vLLM: main maps gptq to AutoGPTQConfig (4/8-bit symmetric only); v0.11-0.17 fall back to gptq_gemm
    Reads("vllm", "awq", bits=(4,), sym=(False,), act_order=False, fused=False, moe=True,
          kept_keys=("modules_to_not_convert",),
          note="Marlin for group -1/32/64/128, the AWQ kernel otherwise; a fused group (q/k/v, gate/up) must be "
               "all quantized or all kept",
          source=f"{_VLLM} quantization/auto_awq.py@0043d6b52fda, quant_utils.is_layer_skipped"),
    Reads("vllm", "gptq", bits=(4, 8), sym=(True,), group_sizes=(-1, 32, 64, 128), fused=False, moe=True,
          kept_keys=("dynamic", _IN_BLOCK),
          note="main refuses other bits or asymmetric GPTQ (AutoGPTQConfig); kept layers from `dynamic` or "
               "modules_in_block_to_quantize",
          source=f"{_VLLM} quantization/auto_gptq.py@055e47c28003, utils/gptq_utils.py"),
    Reads("vllm", "gptq_v2", bits=(4, 8), sym=(True,), group_sizes=(-1, 32, 64, 128), fused=False, moe=True,
          kept_keys=("dynamic", _IN_BLOCK),
          note="symmetric Marlin kernels ignore zero points, so v1 and v2 read the same",
          source=f"{_VLLM} quantization/auto_gptq.py@055e47c28003 (zero_points=False)"),
    # --- LMDeploy TurboMind (4-bit kernels, group 128 only)
    Reads("lmdeploy", "awq", bits=(4,), sym=(False,), group_sizes=(128,), act_order=False,
          source=f"{_LMD} turbomind/converter.py (_SUPPORTED_GROUP_SIZES, version == 'gemm')"),
    Reads("lmdeploy", "gptq", bits=(4,), sym=(True,), group_sizes=(128,), act_order=False, fused=False,
          note="kept layers load by their float .weight; a block mixing quantized and kept q/k/v fails",
          source=f"{_LMD} turbomind/converter.py (desc_act, sym asserts), linear.py"),
    Reads("lmdeploy", "gptq_v2", misread="it reads v2 zero points as v1 (adds 1): every weight one step off",
          source=f"{_LMD} turbomind/weight_format.py GPTQFormat.normalize (+1, checkpoint_format never read)"),
    # --- AutoAWQ 0.2.9 (archived)
    Reads("autoawq", "awq", bits=(4,), sym=(False,), act_order=False, per_block=False,
          kept_keys=("modules_to_not_convert",),
          note="modules_to_not_convert matches block-relative names: a layer kept in only some blocks is loaded "
               "as quantized",
          source="casper-hansen/AutoAWQ@88e4c76b2075 (v0.2.9) awq/models/base.py, awq/utils/module.py"),
)


def _check_target_name(target: str) -> None:
    if target not in TARGETS:
        raise QtoolError(f"--target {target!r} is unknown; use one of {', '.join(TARGETS)}")


def rule(loader: str, layout: str) -> Reads | None:
    """The table's row for ``loader`` and ``layout``; None where the loader does not read that layout at all."""
    return next((r for r in TABLE if r.loader == loader and r.layout == layout), None)


def problem(loader: str, w: Written) -> str | None:
    """Why ``loader`` would not read the checkpoint ``w`` right, as a clause ("it reads ..."), or None where it
    would."""
    r = rule(loader, w.layout)
    title = get_format(w.layout).title
    if r is None:
        return f"it does not read the {title} layout"
    if w.family and loader not in _FAMILY_READERS:
        return _FAMILY_WHY.get(loader, "it is not established that it reads {family}'s own layout").format(
            family=w.family)
    if r.misread:
        return r.misread
    if w.declared and r.declared_zeros:
        return (f"it reads the zero points as the declared checkpoint_format {w.declared!r} says, but they are stored "
                f"as in {w.layout!r}: every weight one step off")
    if w.bits not in r.bits:
        return f"it reads {'/'.join(map(str, r.bits))}-bit {title} checkpoints only, not {w.bits}-bit"
    if w.sym not in r.sym:
        return f"it reads only {'symmetric' if r.sym == (True,) else 'asymmetric'} {title} weights"
    if w.act_order and not r.act_order:
        return "it does not read act-order (desc_act) weights"
    sizes = INT4_CPU_GROUP_SIZES if r.int4_cpu and w.bits == 4 else r.group_sizes
    if sizes is not None and w.group_size not in sizes:
        return f"it reads {w.bits}-bit {title} group size {'/'.join(map(str, sizes))} only, not {w.group_size}"
    if w.moe and not r.moe:
        return _MOE_WHY.get(loader, "it is not established that it loads routed experts stored one linear per expert")
    if "partial" in w.skips and not r.fused:
        return "it needs each fused group (q/k/v, gate/up, one layer's experts) all quantized or all in full precision"
    if "some" in w.skips and not r.per_block:
        return "it matches kept layers by block-relative name, so a layer kept in only some blocks loads as quantized"
    if w.skips and w.keys is not None and r.kept_keys and not set(r.kept_keys) & w.keys:
        return (f"it learns kept layers from {' or '.join(r.kept_keys)}, which does not list every layer kept in "
                "full precision here")
    return None


_FAMILY_READERS = ("vllm", "lmdeploy")  # read InternLM2's own layout (its InternLM2 classes)
_FAMILY_WHY = {
    "transformers": "it has no {family} model class, so the folder's remote code would run, which breaks on current "
                    "transformers",
}

_MOE_WHY = {
    "transformers": "it fuses routed experts into one module and leaves them randomly initialised, ignoring the "
                    "per-expert quantized weights (ran: transformers 5.24, qwen2_moe and qwen3_moe)",
    "gptqmodel": "it dropped a Mixtral's experts and router (ran: GPTQModel 7.6; other MoE families not established)",
}


def readers(w: Written) -> dict[str, str | None]:
    """Loader -> None (reads ``w`` right) or the reason it does not."""
    return {name: problem(name, w) for name in LOADERS}


def choose_layout(bits: int, sym: bool, act_order: bool, group_size: int, target: str = "any") -> str:
    """The layout written for these settings: of the layouts ``target`` reads right (for "any": every layout
    that holds them), the one the most loaders read right (ties: AWQ gemm, then GPTQ v1, then v2).

    Raises QtoolError naming the loader and why, where the target reads no layout that holds the settings."""
    _check_target_name(target)
    holds = [name for name in format_names() if get_format(name).settings_error(bits, sym, act_order) is None]
    if not holds:
        raise QtoolError(f"--bits {bits}: no layout qtool writes holds these weights ("
                         + "; ".join(get_format(n).settings_error(bits, sym, act_order) for n in format_names()) + ")")
    written = {lay: Written(lay, bits, sym, act_order, group_size) for lay in holds}

    def n_readers(layout):
        return sum(p is None for p in readers(written[layout]).values())

    read = [lay for lay in holds if target == "any" or problem(target, written[lay]) is None]
    if read:
        return max(read, key=n_readers)  # max keeps the first of equals: the registry order
    why = "; ".join(f"{get_format(lay).title}: {problem(target, written[lay])}" for lay in holds)
    raise QtoolError(f"--target {target}: {LOADERS[target]} cannot read {bits}-bit "
                     f"{'symmetric' if sym else 'asymmetric'} weights{' with act-order' if act_order else ''} in "
                     f"group size {group_size} ({why})"
                     + ("; pass --sym for symmetric weights" if not sym and _reads_symmetric(target, bits, act_order,
                                                                                             group_size) else ""))


def _reads_symmetric(target: str, bits: int, act_order: bool, group_size: int) -> bool:
    """Whether ``target`` reads a layout that holds these settings with symmetric weights (``--sym`` would do)."""
    return any(get_format(lay).settings_error(bits, True, act_order) is None
               and problem(target, Written(lay, bits, True, act_order, group_size)) is None for lay in format_names())


def check_target(target: str, w: Written) -> None:
    """Raises QtoolError (one sentence) where ``target`` (a loader) would not read the checkpoint ``w`` right."""
    _check_target_name(target)
    if target == "any":
        return
    why = problem(target, w)
    if why:
        raise QtoolError(f"--target {target}: {LOADERS[target]} would not read this checkpoint right: {why} "
                         f"(layout {get_format(w.layout).title}, {w.bits}-bit, group size {w.group_size})"
                         # only where --sym alone would do: the same checkpoint (experts, kept layers) symmetric
                         + ("; pass --sym for symmetric weights" if not w.sym and problem(
                             target, replace(w, sym=True)) is None else ""))


# --- layers kept in full precision ----------------------------------------------------------------------------

# What vLLM and LMDeploy load as one matrix (InternLM2 and Mixtral name gate/up w1/w3).
FUSED = ({"q_proj", "k_proj", "v_proj"}, {"gate_proj", "up_proj"}, {"w1", "w3"})
_BLOCK = re.compile(r"^(.*?)\.(\d+)\.(.+)$")  # "model.layers.3.mlp.down_proj" -> prefix, block, name inside
_EXPERT = re.compile(r"^(.*\.experts)\.\d+\.")  # "model.layers.3.mlp.experts.7.up_proj" -> its MoE layer


def expert_layer(name: str) -> str | None:
    """The MoE layer (``...mlp.experts``) a routed expert's linear belongs to, or None for other linears."""
    m = _EXPERT.match(name)
    return m.group(1) if m else None


def in_block(name: str) -> tuple[str, str] | None:
    """``(block index, name inside the block)`` of a full module name, or None outside the blocks."""
    m = _BLOCK.match(name)
    return (m.group(2), m.group(3)) if m else None


def skip_pattern(kept: list[str], quantized: list[str]) -> frozenset[str]:
    """How the layers ``kept`` in full precision lie among the ``quantized`` ones (full module names), for
    :func:`problem`: every pattern that holds, "partial" (a block keeps part of a fused group: some of its q/k/v,
    of its gate/up, or of one layer's experts) beside either "some" (the kept layers differ between blocks) or
    "uniform"; empty where none is kept. Both are reported: a loader must read each (``--skip`` of one block's
    layer and of every block's q_proj is partial and differs between blocks)."""
    if not kept:
        return frozenset()
    quantized_set = set(quantized)
    quantized_experts = set(filter(None, map(expert_layer, quantized)))

    def splits_a_group(name: str) -> bool:
        parent, _, leaf = name.rpartition(".")
        return (any(leaf in group and any(f"{parent}.{other}" in quantized_set for other in group - {leaf})
                    for group in FUSED)
                or expert_layer(name) in quantized_experts)  # a fused MoE layer holds every expert alike

    by_block: dict[str, set[str]] = {b: set() for b, _ in filter(None, map(in_block, quantized))}
    for block, inner in filter(None, map(in_block, kept)):
        by_block.setdefault(block, set()).add(inner)
    spread = "uniform" if len({frozenset(s) for s in by_block.values()}) <= 1 else "some"
    return frozenset({spread, "partial"} if any(map(splits_a_group, kept)) else {spread})


def exclusion_keys(quant_method: str, kept: list[str], quantized: list[str]) -> dict:
    """The ``quantization_config`` keys that tell every loader which layers stay in full precision.

    ``kept``, ``quantized``: full module names as stored. Returns ``modules_to_not_convert`` (AWQ loaders; a
    name kept in every block is written once, block-relative, where no quantized name contains it, since vLLM
    matches by substring and AutoAWQ reads only block-relative names), ``dynamic`` (a ``-:^name$`` rule per
    kept layer: GPTQModel, vLLM's GPTQ path) and, for GPTQ, ``modules_in_block_to_quantize`` (the quantized
    names: transformers through optimum, which matches by suffix). ``modules_to_not_convert: None`` alone
    where nothing is kept."""
    if not kept:
        return {"modules_to_not_convert": None}
    blocks = {b for b, _ in filter(None, map(in_block, (*kept, *quantized)))}
    kept_in: dict[str, set[str]] = {}
    for name in kept:
        where = in_block(name)
        if where:
            kept_in.setdefault(where[1], set()).add(where[0])
    listed = []
    for name in kept:
        where = in_block(name)
        rel = where[1] if where else None
        short = rel is not None and kept_in[rel] == blocks and not any(rel in q for q in quantized)
        listed.append(rel if short else name)
    keys = {"modules_to_not_convert": list(dict.fromkeys(listed)),
            "dynamic": {f"-:^{re.escape(name)}$": {} for name in kept}}
    if quant_method == "gptq":
        keys["modules_in_block_to_quantize"] = [list(quantized)]
    return keys


def kept_from_dynamic(dynamic: dict | None) -> list[str]:
    """The exact module names of ``dynamic``'s negative ``-:^name$`` rules (as :func:`exclusion_keys` writes
    them, and GPTQModel does); pattern rules are not names and are left out (:func:`declared_kept` applies them)."""
    names = []
    for key in dynamic or {}:
        m = re.fullmatch(r"-:\^?((?:[\w.]|\\.)+)\$?", key)
        if m:
            names.append(re.sub(r"\\(.)", r"\1", m.group(1)))
    return names


def declared_kept(qc: dict, names: list[str]) -> dict[str, set[str]]:
    """For each exclusion key present in ``quantization_config`` ``qc``, which of the module ``names`` it declares
    kept in full precision, as the loaders that read it match: ``modules_to_not_convert`` by whole name or
    dotted suffix (transformers), ``dynamic`` by its first rule whose regex matches the name's start, negative
    (``-:``) meaning kept (GPTQModel), ``modules_in_block_to_quantize`` as every name that ends with none of
    its entries (optimum)."""
    out: dict[str, set[str]] = {}
    if isinstance(qc.get("modules_to_not_convert"), list):
        listed = [k for k in qc["modules_to_not_convert"] if isinstance(k, str)]
        out["modules_to_not_convert"] = {n for n in names if any(n == k or n.endswith("." + k) for k in listed)}
    if isinstance(qc.get("dynamic"), dict):
        rules = []
        for key in qc["dynamic"]:
            try:
                rules.append((key.startswith("-:"), re.compile(key[2:] if key.startswith(("-:", "+:")) else key)))
            except re.error:
                continue
        out["dynamic"] = {n for n in names if next((neg for neg, rx in rules if rx.match(n)), False)}
    in_block = qc.get("modules_in_block_to_quantize")
    if isinstance(in_block, list):
        listed = [k for part in in_block if isinstance(part, list) for k in part if isinstance(k, str)]
        out["modules_in_block_to_quantize"] = {n for n in names if not any(n.endswith(k) for k in listed)}
    return out
