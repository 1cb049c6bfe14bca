"""Quantization settings as frozen, validated dataclasses. The CLI only builds these."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields, replace

from quant.errors import QtoolError

METHODS = ("rtn", "awq", "gptq")
GROUP_SIZES = (-1, 16, 32, 64, 128, 256)
BITS = (2, 3, 4, 8)  # the code widths some layout holds (quant.formats: each Format's bits), checked before torch loads
OUTPUT_DTYPES = ("auto", "float16", "bfloat16", "float32")
MAX_WINDOWS = 4096  # calibration or held-out windows of one run
CLIP_GRID_MAX = 1000  # AWQOptions.clip_grid
# Command-line options whose Python spelling is elsewhere (quantize()'s own keywords, or an options class).
_CLI_NAMES = {"max_shard_size": "quantize(..., max_shard_bytes=N) (bytes)",
              "apply_search": "awq=AWQOptions(search_file=...)",
              "verbose": "quantize(..., progress=True) and the logging level of the 'quant' logger",
              "format": "fmt=..."}


# What each simply typed field of the settings accepts (the annotation, as a string under __future__.annotations)
_ACCEPTS = {
    "bool": ("True or False", lambda v: isinstance(v, bool)),
    "int": ("a whole number", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "float": ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
    "str": ("a string", lambda v: isinstance(v, str)),
    "str | None": ("a string or None", lambda v: v is None or isinstance(v, (str, os.PathLike))),
}


def _check_types(obj) -> None:
    """Refuse a field of ``obj`` (a settings dataclass) whose value is not of its annotated type, before any range
    check compares it: ``sym="false"`` is truthy and wrote symmetric weights, ``block_size=1.5`` failed in the solver."""
    for f in fields(obj):
        accepts = _ACCEPTS.get(f.type) if f.init else None
        if accepts and not accepts[1](getattr(obj, f.name)):
            raise QtoolError(f"{f.name} must be {accepts[0]}, got {getattr(obj, f.name)!r}")


def check_seed(seed: int) -> None:
    """Refuse a seed that torch's random generator cannot take (it holds 64 bits)."""
    if not -2**63 <= seed < 2**64:
        raise QtoolError(f"--seed {seed} is out of range; use a whole number of at most 64 bits, e.g. 0 "
                         f"(0 to {2**64 - 1})")


# AWQ's search results, saved in a subfolder of the checkpoint: loaders that read every top-level
# *.safetensors of a folder without an index (vLLM does) must not take them for weights.
SEARCH_FILE = "qtool/awq_search.safetensors"
# The search of a model the whole-model check did not keep (quant.model_check.check_model): SEARCH_FILE then
# replays the kept model, and this file AWQ's own (``--apply-search`` takes either).
REFUSED_SEARCH_FILE = "qtool/awq_search.refused.safetensors"
# `qtool kv calibrate`'s default file in a model folder (quant.kv.config), beside the searches
KV_CALIB_FILE = "qtool/kv_calib.safetensors"

@dataclass(frozen=True)
class AWQOptions:
    """Activation-aware scale search (``n_grid`` ratios in [0, 1)) and range clipping.

    The closed-form output error of the scaled linears screens the grid, from ``XᵀX`` of
    the first ``screen_windows`` calibration windows (the clip search uses the same); the
    ``n_judge`` best ratios (α = 0, plain RTN, always among them) are judged on the
    output of the module they feed (:mod:`quant.awq.judge`) on the first
    ``judge_windows`` windows, and clips are tested on ``judge_windows`` held-out ones.
    ``judge="loss"`` judges (and tests clips) by the change of the model's next-token
    loss that the module's output error makes, to second order: the loss gradient at
    that output plus its Gauss-Newton curvature from ``fisher_probes`` label draws, from
    one backward pass of the full-precision model over the judge and clip-test windows
    (:mod:`calib.gradients`); every scaling group is judged then, the norm groups at the
    attention or MLP output, the others at the consumer linear's output.
    ``judge="error"`` judges by the token-weighted squared output error instead, where
    ``token_weighting`` weighs every token's error by ``1 / ‖h‖²`` of its residual
    stream, as the next norm sees it. The next block sees the search windows as the
    full-precision block outputs them unless ``quantized_inputs`` (the held-out windows
    always go through the quantized blocks: they judge the quantized model).
    """

    n_grid: int = 20
    n_judge: int = 4
    judge_windows: int = 4
    screen_windows: int = 64
    # The search windows reach the next block through the quantized block (as GPTQ's do) instead of as the
    # full-precision block's outputs, which the statistics pass computes anyway (the AWQ paper's and AutoAWQ's way).
    quantized_inputs: bool = False
    token_weighting: bool = True
    judge: str = "loss"
    fisher_probes: int = 4
    clip: bool = True
    clip_grid: int = 20
    clip_max_shrink: float = 0.5
    search_file: str | None = None  # replay saved search results (SEARCH_FILE of a checkpoint) instead of searching

    def __post_init__(self):
        _check_types(self)
        if self.search_file is not None:  # a pathlib.Path as the string it spells (the records are JSON)
            object.__setattr__(self, "search_file", os.fspath(self.search_file))
        if not 1 <= self.n_grid <= 1000:
            raise QtoolError(f"--n-grid {self.n_grid} is out of range; use a whole number from 1 to 1000")
        if self.judge not in ("loss", "error"):
            raise QtoolError(f"--judge {self.judge!r} is not a judge; use loss (the model's loss, to second order) "
                             "or error (the squared output error)")
        if not 0 <= self.fisher_probes <= 64:
            raise QtoolError(f"--fisher-probes {self.fisher_probes} is out of range; use a whole number from 0 "
                             "(the loss gradient alone) to 64")
        for name in ("judge_windows", "screen_windows"):
            if not 1 <= getattr(self, name) <= MAX_WINDOWS:
                raise QtoolError(f"--{name.replace('_', '-')} {getattr(self, name)} is out of range; use a whole "
                                 f"number of calibration windows from 1 to {MAX_WINDOWS}")
        if not 1 <= self.n_judge <= 1000:
            raise QtoolError(f"--n-judge {self.n_judge} is out of range; use a whole number from 1 to 1000 "
                             "(1: the closed form alone)")
        if not 1 <= self.clip_grid <= CLIP_GRID_MAX:
            raise QtoolError(f"--clip-grid {self.clip_grid} is out of range; use a whole number from 1 to {CLIP_GRID_MAX}")
        if not 0.0 < self.clip_max_shrink < 1.0:
            raise QtoolError(f"clip_max_shrink {self.clip_max_shrink} must lie strictly between 0 and 1")
        if self.search_file is not None and not str(self.search_file).strip():
            raise QtoolError("--apply-search is blank; give the search file, or the checkpoint folder holding it, "
                             "or leave the option out to search")


SHRINK_DEFAULT = 0.3


RANGE_SEARCHES = ("minmax", "hessian", "mse")  # GPTQOptions.range_search


@dataclass(frozen=True)
class GPTQOptions:
    """The GPTQ solver: Hessian shrinkage, damping, block size, act-order, static groups, true-sequential.

    ``shrink`` (β) replaces each Hessian ``H = XᵀX / n`` by ``(1 - β) H + β diag(H)``
    before the solve: the calibration text's correlations between input channels are
    trusted only in part (shrinkage of a sample covariance toward its diagonal, as in
    Ledoit and Wolf, 2004). GPTQ spreads each column's rounding error over the columns it
    is correlated with; correlations of one kind of text do not all hold on another, and
    on the benchmarks' real models an unshrunk Hessian from Wikipedia text made GPTQ
    worse than round-to-nearest on Python code (benchmarks/RESULTS.md, issue 20). β = 0 is
    the paper's GPTQ; β = 1 keeps only the diagonal (no error feedback between columns).
    ``damp`` (λ) then adds ``λ · mean(diag H)`` to the diagonal, as in the paper.

    ``range_search`` sets each group's scale and zero point as the solver reaches the group:
    "minmax" spans the group's columns, as in the paper; "hessian" shrinks that range to the
    factor in [0.5, 1] (21 steps) with the least rounding error of the group weighted by the
    Hessian's diagonal, ``Σ_j H_jj Δw_j²`` per output row; "mse" to the one with the least
    ``Σ_j |Δw_j|^2.4`` (the grid search of the GPTQ authors' reference code, ``mse=True``).
    A clip from AWQ (``awq_first``) replaces the search. "minmax" stays the default: "hessian"
    helped SmolLM2-135M and hurt Qwen2.5-Coder-0.5B (benchmarks/RESULTS.md, issue 20).
    """

    shrink: float = SHRINK_DEFAULT
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    static_groups: bool = False
    true_sequential: bool = True
    awq_first: bool = False  # apply AWQ scales, then GPTQ rounding
    value_hessian: bool = True  # v_proj per key/value head under the attention-weighted Hessian
    range_search: str = "minmax"

    def __post_init__(self):
        _check_types(self)
        if self.range_search not in RANGE_SEARCHES:
            raise QtoolError(f"--range-search {self.range_search!r} is not one of: {', '.join(RANGE_SEARCHES)}")
        if not 0.0 <= self.shrink <= 1.0:
            raise QtoolError(f"--shrink {self.shrink} is out of range; use a fraction from 0 (the paper's GPTQ) "
                             "to 1 (the Hessian's diagonal only)")
        if not 0.0 < self.damp < 1.0:
            raise QtoolError(f"--damp {self.damp} is out of range; use a fraction of the mean diagonal in (0, 1)")
        if self.block_size < 1:
            raise QtoolError(f"GPTQ block size {self.block_size} must be a positive whole number")
        if self.static_groups and not self.act_order:
            raise QtoolError("--static-groups only changes --act-order runs (natural groups are static already); "
                             "add --act-order or leave it out")


# The settings of the calibration (the text, its windows, the held-out and check windows): unused by RTN and replays.
CALIBRATION_FIELDS = ("n_samples", "held_out", "check_windows", "seqlen", "seed", "calib_data", "text_field")


@dataclass(frozen=True)
class QuantConfig:
    """Everything that decides a quantized checkpoint.

    ``fmt`` names the checkpoint layout asked for (:func:`quant.formats.get_format`: "awq",
    "gptq" or "gptq_v2"); ``None`` lets ``target`` pick it, and ``layout`` holds the layout written, picked again
    by every ``with_`` or ``dataclasses.replace`` that changes the bits, sym, act-order or target
    (:func:`quant.formats.compat.choose_layout`): for "any", the layout the most loaders
    read right (AWQ gemm for asymmetric 4-bit weights without act-order, GPTQ v1 for
    symmetric ones, GPTQ v2 for other asymmetric ones); for a loader ("vllm",
    "lmdeploy", "transformers", "gptqmodel", "autoawq"), one that loader reads right, or a
    one-sentence refusal. A ``fmt`` given with a loader target is checked against it.
    The CLI and the API share these defaults: the same settings give the same checkpoint.
    """

    method: str = "rtn"
    bits: int = 4
    group_size: int = 128
    sym: bool = False
    fmt: str | None = None
    layout: str = field(init=False, compare=False)  # the layout written: fmt, or the one target picks
    target: str = "any"  # the loader the checkpoint is for (quant.formats.compat.TARGETS)
    n_samples: int = 128
    held_out: int = 16  # extra windows no search sees: half for the RTN guard, the rest (AWQ: at most judge_windows) test clips
    # Windows per built-in kind of text the calibration lacks (calib.data.check_kinds) that the whole-model
    # check also scores: a candidate worse than all-RTN on any kind is not kept (0: the guard windows only).
    check_windows: int = 8
    seqlen: int = 512
    seed: int = 0
    calib_data: str | None = None
    text_field: str = "text"
    skip: tuple[str, ...] = ()  # extra module names (or suffixes) to leave in full precision
    dtype: str = "auto"  # dtype of the tensors that stay unquantized in the checkpoint
    awq: AWQOptions = field(default_factory=AWQOptions)
    gptq: GPTQOptions = field(default_factory=GPTQOptions)

    def __post_init__(self):
        for name, kind in (("awq", AWQOptions), ("gptq", GPTQOptions)):
            if not isinstance(getattr(self, name), kind):
                raise QtoolError(f"{name} must be {kind.__name__}(...), not {type(getattr(self, name)).__name__}")
        _check_types(self)
        if self.calib_data is not None:  # a pathlib.Path as the string it spells (the records are JSON)
            object.__setattr__(self, "calib_data", os.fspath(self.calib_data))
        check_seed(self.seed)
        if isinstance(self.skip, str):  # one name: not its characters
            object.__setattr__(self, "skip", (self.skip,))
        object.__setattr__(self, "skip", tuple(self.skip))
        if not all(isinstance(n, str) for n in self.skip):
            raise QtoolError(f"skip must be module names (strings), e.g. ('mlp.down_proj',), not {self.skip!r}")
        if self.method not in METHODS:
            raise QtoolError(f"method {self.method!r} is unknown; use one of {', '.join(METHODS)}")
        if self.bits not in BITS and self.fmt is None:  # with a --format, its own sentence (below)
            raise QtoolError(f"--bits {self.bits} is not supported; use {', '.join(map(str, BITS[:-1]))} or {BITS[-1]}")
        if self.group_size not in GROUP_SIZES:
            raise QtoolError(
                f"--group-size {self.group_size} is not supported; use one of "
                f"{', '.join(str(g) for g in GROUP_SIZES if g > 0)} or -1 for one group per output channel"
            )
        if self.n_samples < 1 or self.seqlen < 8:
            raise QtoolError(
                f"--n-samples {self.n_samples} / --seqlen {self.seqlen} are too small; use at least 1 sample of 8 tokens"
            )
        if self.n_samples > MAX_WINDOWS:  # every window's hidden states are held per block: bounded by memory
            raise QtoolError(f"--n-samples {self.n_samples} is out of range; use 1 to {MAX_WINDOWS} calibration windows "
                             "(128 is the usual number)")
        if not 0 <= self.held_out <= MAX_WINDOWS:
            raise QtoolError(f"--held-out {self.held_out} is out of range; use 0 (no checks) to {MAX_WINDOWS} windows")
        if not 0 <= self.check_windows <= 256:
            raise QtoolError(f"--check-windows {self.check_windows} is out of range; use 0 (the guard windows only) "
                             "to 256 windows per kind of text")
        if self.dtype not in OUTPUT_DTYPES:
            raise QtoolError(f"--dtype {self.dtype!r} is unknown; use one of {', '.join(OUTPUT_DTYPES)}")
        # the layout last: its checks import the formats, and with them torch (seconds)
        from quant.formats import format_names, get_format
        from quant.formats.compat import Written, check_target, choose_layout

        layout = self.fmt or choose_layout(self.bits, self.sym, self.act_order, self.group_size, self.target)
        if layout not in format_names():
            raise QtoolError(f"--format {layout!r} is unknown; use one of {', '.join(format_names())}")
        problem = get_format(layout).settings_error(self.bits, self.sym, self.act_order)
        if problem:
            what = f"--format {layout}" if self.fmt else f"--bits {self.bits}"
            raise QtoolError(f"{what}: {problem}" + (" (use --format gptq)" if layout == "awq" else ""))
        check_target(self.target, Written(layout, self.bits, self.sym, self.act_order, self.group_size))
        object.__setattr__(self, "layout", layout)

    @property
    def act_order(self) -> bool:
        """Input rows quantized in act-order (GPTQ ``--act-order``): the checkpoint carries a g_idx."""
        return self.method == "gptq" and self.gptq.act_order

    @property
    def format(self):
        """The :class:`quant.formats.Format` the checkpoint is written in."""
        from quant.formats import get_format

        return get_format(self.layout)

    @property
    def dtype_option(self) -> str | None:
        """``--dtype X`` where the user chose the output dtype, for a sentence about it; None for ``auto``."""
        return None if self.dtype == "auto" else f"--dtype {self.dtype}"

    @property
    def min_zero(self) -> int:
        """The lowest zero point the layout stores (1 for asymmetric GPTQ v1), which rounding respects."""
        return self.format.min_zero(self.sym)

    @property
    def label(self) -> str:
        """The method as the summary and the whole-model check name it: ``rtn``, ``awq``, ``gptq``, ``gptq+awq``."""
        return "gptq+awq" if self.method == "gptq" and self.gptq.awq_first else self.method

    @property
    def searches_awq(self) -> bool:
        """AWQ's search runs (``awq``, or ``gptq`` with ``awq_first``), not a replay."""
        return self.needs_calibration and (self.method == "awq" or self.gptq.awq_first)

    @property
    def folds_scales(self) -> bool:
        """AWQ's scales are folded into the blocks (``awq``, searched or replayed, or ``gptq`` with ``awq_first``),
        so the checkpoint gets :data:`SEARCH_FILE` (the scales and clips, for ``--apply-search``)."""
        return self.method == "awq" or (self.method == "gptq" and self.gptq.awq_first)

    @property
    def held_out_split(self) -> tuple[int, int]:
        """``(accept, guard)`` windows: the held-out windows halved between AWQ's clip test (at most
        ``awq.judge_windows`` of its half are drawn) and the RTN guard (which gets the odd one); all to the
        guard where no AWQ search runs."""
        if not self.needs_calibration:
            return 0, 0
        half = self.held_out // 2 if self.searches_awq else 0
        return min(half, self.awq.judge_windows), self.held_out - half

    @property
    def needs_calibration(self) -> bool:
        return self.method != "rtn" and not (self.method == "awq" and self.awq.search_file)

    def settings(self) -> dict:
        """Every field as a dict (``dataclasses.asdict``), ``fmt`` holding the layout written, asked for or picked,
        as records made before ``fmt`` and ``layout`` were two fields hold it."""
        out = asdict(self)
        out["fmt"] = out.pop("layout")
        return out

    def recorded(self) -> dict:
        """The settings this run uses, as ``qtool.json`` records them: the calibration settings only where the
        run calibrates; GPTQ's options only for GPTQ; AWQ's search options only where AWQ searches (a replay
        records its search file alone: the file's header holds the settings it was searched with)."""
        out = self.settings()
        if not self.needs_calibration:
            for name in CALIBRATION_FIELDS:
                del out[name]
        if self.method != "gptq":
            del out["gptq"]
        if self.method == "awq" and self.awq.search_file:
            out["awq"] = {"search_file": self.awq.search_file}
        elif not self.searches_awq:
            del out["awq"]
        return out

    @classmethod
    def from_options(cls, base: QuantConfig | None = None, **options) -> QuantConfig:
        """``base`` (or the defaults) with ``options`` changed. Raises :class:`QtoolError` for a name that is no
        field, naming the options class (:class:`AWQOptions`, :class:`GPTQOptions`) that holds it, if one does."""
        known = {f.name for f in fields(cls) if f.init}  # not layout: fmt asks for one
        for name in options:
            if name in known:
                continue
            for key, sub in (("awq", AWQOptions), ("gptq", GPTQOptions)):
                if name in {f.name for f in fields(sub)}:
                    raise QtoolError(f"{name!r} is an option of {sub.__name__}; pass {key}={sub.__name__}({name}=...)")
            if name in _CLI_NAMES:
                raise QtoolError(f"{name!r} is the command line's name; in Python pass {_CLI_NAMES[name]}")
            raise QtoolError(f"{name!r} is not a quantization setting; use one of {', '.join(sorted(known))}")
        if base is not None and not isinstance(base, cls):
            raise QtoolError(f"the settings are a {type(base).__name__}, not a QuantConfig; pass them as keywords "
                             "(quantize(src, out, method='awq', bits=4)) or as QuantConfig(...)")
        cfg = replace(base, **options) if base is not None else cls(**options)
        # What the caller asked for only (inside a run, AWQ+GPTQ's plain GPTQ keeps its AWQ options, unused)
        uses = {"rtn": (), "awq": ("awq",), "gptq": ("gptq", "awq") if cfg.gptq.awq_first else ("gptq",)}
        unused = [name for name, kind in (("awq", AWQOptions), ("gptq", GPTQOptions))
                  if name not in uses.get(cfg.method, (name,)) and getattr(cfg, name) != kind()]
        if unused:
            raise QtoolError(f"{' and '.join(unused)} options are set, but method {cfg.method!r} does not use them"
                             + ("; AWQ's scales before GPTQ take gptq=GPTQOptions(awq_first=True)"
                                if cfg.method == "gptq" else ""))
        return cfg

    def with_(self, **changes) -> QuantConfig:
        return replace(self, **changes)


def parse_size(text: str, what: str = "size") -> int:
    """Bytes in ``text`` such as ``"500MB"`` or ``"2GiB"``, read as Hugging Face reads ``max_shard_size``
    (transformers' ``convert_file_size_to_int``). Raises QtoolError for anything else, under 1 MB, or in bits
    (``"8gb"``, which transformers reads as 1 GB: a lower-case b is refused, not taken as bits)."""
    from transformers.utils.hub import convert_file_size_to_int

    stripped = str(text).strip()
    if stripped.endswith("b") and not stripped.lower().endswith("ib"):
        # transformers reads "8gb" as 8 gigabits (1 GB): a shard an eighth of what was meant, said nowhere
        unit = 2 if len(stripped) > 1 and stripped[-2].isalpha() else 1
        raise QtoolError(f"{what} {text!r} ends in a lower-case b, which reads as bits (8gb is 1GB); write a capital "
                         f"B for bytes, e.g. {stripped[:-unit]}{stripped[-unit:].upper()}")
    try:
        n = convert_file_size_to_int(stripped)
    except ValueError:
        raise QtoolError(f"{what} {text!r} is not a size; write a whole number and one of the units KB, MB, GB, "
                         "KiB, MiB or GiB (those transformers reads), e.g. 1500MB, 4GB, 2GiB or 1000GB") from None
    if n < 10**6:
        raise QtoolError(f"{what} {text!r} is below 1MB; shards that small only multiply files")
    return n
