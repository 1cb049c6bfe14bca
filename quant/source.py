"""A source model read block by block: the skeleton on the meta device, tensors read from the shards on demand.

The quantization pipeline never holds the whole model. :class:`SourceModel` builds the
transformers model on the meta device (no memory), reads the tensors outside the
decoder blocks (embeddings, final norm, ``lm_head``) once, and each block's tensors
when that block is processed, in the source dtype, straight from the weight files:
safetensors through their headers (one tensor at a time), ``.bin`` shards memory-mapped
(``torch.load(mmap=True)``), so only what is touched is read. :meth:`release` puts a
finished block back on the meta device. Peak host memory is then the tensors outside
the blocks plus one block, flat in the number of blocks.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from quant import folder, heap, model_io
from quant.moe import swap_in_expert_linears
from quant.errors import QtoolError
from quant.ranges import abs_max, all_finite, converted

log = logging.getLogger(__name__)


class SourceModel:
    """The model in folder ``model_dir`` as a meta-device skeleton plus an index of its stored tensors.

    ``model`` is the transformers causal LM (its blocks, the modules under ``blocks_path``, on the meta
    device until :meth:`load_block`; with ``blocks_path=None`` every tensor is read at once, the whole
    model in one copy); ``dtype`` the source's floating dtype. With ``dtype`` given (a floating dtype, or
    ``"auto"`` as transformers reads it: config.json's ``dtype``, else the stored one), the skeleton is built
    in it and every floating tensor is converted to it as it is read, a slice at a time (one copy of each
    tensor, in the target dtype); without, tensors keep their stored dtype. Raises QtoolError (one sentence)
    for a folder without weights, unreadable weight files, or tensors that do not match ``config.json`` (missing
    ones would be random weights; extra ones mean another architecture).
    """

    def __init__(self, model_dir: str | os.PathLike, blocks_path: str | None, outside: bool = True,
                 dtype: torch.dtype | str | None = None):
        from transformers import AutoModelForCausalLM

        from quant.arch import layout_of
        from quant.layouts import Shape

        self.dir = Path(model_dir)
        self.files = folder.weight_files(model_dir)
        self._bin: dict[Path, dict] = {}
        self._headers: dict[Path, tuple[tuple, dict, int]] = {}  # file -> (identity, JSON header, data offset)
        # Tensors read whole and found finite: a block read again (the loss gradients' two passes, then the
        # quantization's) is not scanned again; a slice-wise read is checked every time.
        self._finite: set[str] = set()
        # A remote-code family's checkpoint (quant.layouts) is read under the native class's names.
        self.layout = layout_of(folder.read_config(model_dir))
        config = model_io.model_config(model_dir)
        self.shape = Shape.of(config) if self.layout is not None else None
        self.stored = self._read_index()  # stored tensor name -> file
        # native name -> the stored tensor holding it, and its file
        self._from = {n: k for k in self.stored for n in self._native_names(k)}
        self.index = {n: self.stored[k] for n, k in self._from.items()}
        self.dtype = self._stored_dtype()
        why = "--dtype {}"  # what chose the dtype tensors are converted to, for an overflow's sentence
        if dtype == "auto":  # as transformers reads "auto": config.json's dtype, else the stored one
            dtype = getattr(config, "dtype", None)
            dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
            why = "config.json's dtype {} (what --dtype auto reads)"
            if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
                dtype, why = self.dtype, "the stored dtype {} (what --dtype auto reads)"
        self._convert = dtype
        self._why = why.format(str(dtype).removeprefix("torch.")) if dtype is not None else None
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(config, dtype=self._convert or self.dtype)
        swap_in_expert_linears(self.model)  # routed experts as one nn.Linear per expert and projection
        self.model.eval()
        self.blocks_path = blocks_path
        # Tensors old checkpoints carry that transformers ignores on load (e.g. per-layer rotary inv_freq buffers).
        if (ignore := model_io.ignored_on_load(self.model)) is not None:
            self.index = {k: f for k, f in self.index.items() if not ignore.search(k)}
        # Parameters the skeleton ties (a tied lm_head) -> the one they share.
        ties, first = {}, {}
        for n, p in self.model.named_parameters(remove_duplicate=False):
            if id(p) in first:
                ties[n] = first[id(p)]
            else:
                first[id(p)] = n
        self._check_names(set(ties))
        self._check_ties(ties)
        names = sorted(k for k in self.index if not self._in_blocks(k))
        if outside:
            for n in names:
                self.load_tensor(n, self._convert)
        else:  # left on the meta device until written (load_tensor), but checked now, a slice at a time
            for stored in sorted({self.stored_name(n) for n in names}):
                for part in self._stored_slices(stored):
                    self._check_finite(stored, part, stored=True)
        self.model.tie_weights()
        self._rebuild_buffers()
        # The tensors outside the blocks that a checkpoint stores (a tied lm_head is not stored).
        self.outside = [n for n in names if n not in ties]
        # Parameters outside the blocks that share a stored tensor (a tied lm_head): released with it.
        self._tied_outside = sorted(n for n in ties if not self._in_blocks(n))

    def _check_ties(self, ties: dict[str, str]) -> None:
        """Refuse a tensor that config.json ties to another (``tie_word_embeddings``) but that the checkpoint stores
        with other values: transformers would use the stored one, vLLM and the tie the other. Compared a slice at a
        time from the files (nothing of either stays in memory)."""
        for name, shared in sorted(ties.items()):
            if name not in self.index or shared not in self.index:
                continue
            a, b = self.stored_name(name), self.stored_name(shared)  # as the files name them
            if self._native_names(a) != [name] or self._native_names(b) != [shared] or \
                    self._stored_dtype(a) != self._stored_dtype(b):
                pairs = [tuple(t.float() for t in self.tensors([name, shared]).values())]
            else:  # the same dtype and shape (checked): the two are sliced at the same rows
                pairs = zip(self._stored_slices(a), self._stored_slices(b))
            # NaN where the other has NaN is the same value here: a damaged tensor is refused as such when it is read
            same = all(torch.allclose(x, y, rtol=0, atol=0, equal_nan=True) for x, y in pairs)
            if not same:
                raise folder.tied_tensors_differ(self.index[name], a, b)

    def _in_blocks(self, name: str) -> bool:
        return self.blocks_path is not None and name.startswith(self.blocks_path + ".")

    # --- reading ------------------------------------------------------------------------------------

    def _read_index(self) -> dict[str, Path]:
        if all(f.suffix == ".safetensors" for f in self.files):
            return folder.tensor_index(self.dir, self.files)
        index: dict[str, Path] = {}
        for f in self.files:
            try:
                self._bin[f] = torch.load(str(f), map_location="cpu", mmap=True, weights_only=True)
            except Exception as e:  # noqa: BLE001 - torch raises many kinds for a damaged file
                raise folder.unreadable(f, e) from None
            for key in self._bin[f]:
                if index.setdefault(key, f) != f:
                    raise QtoolError(f"{self.dir}: {key} is in both {index[key].name} and {f.name}; loaders would "
                                     "take either: keep one of the files")
        return index

    def _native_names(self, stored: str) -> list[str]:
        return [stored] if self.layout is None else self.layout.native_names(stored, self.shape)

    def stored_name(self, name: str) -> str:
        """The stored tensor that holds native tensor ``name`` (as the source names it)."""
        return self._from.get(name, name)

    def _stored_slices(self, stored: str):
        """Stored tensor ``stored`` as consecutive slices along its first dimension, each at most
        ``_SLICE_BYTES``, read with plain file reads into one reused buffer (a consumer copies what it keeps).
        A memory-mapped read would leave every page it touched in this process's resident memory until the
        whole tensor is dropped: for a float32 embedding that is the run's peak. Tensors a plain read cannot
        slice (``.bin`` shards, scalars, a big-endian host) come whole."""
        f = self.stored[stored]
        header, data = (None, 0) if f in self._bin or sys.byteorder != "little" else self._header(f)
        entry = header and header.get(stored)
        if entry is None or not entry["shape"] or entry["dtype"] not in _SAFETENSORS_DTYPES:
            yield self._read_stored(stored)
            return
        dtype, shape = _SAFETENSORS_DTYPES[entry["dtype"]], entry["shape"]
        begin, end = (data + o for o in entry["data_offsets"])
        row = (end - begin) // max(shape[0], 1)
        rows = max(1, _SLICE_BYTES // max(row, 1))
        buf = torch.empty(min(rows, shape[0]) * row, dtype=torch.uint8)
        with open(f, "rb", buffering=0) as fh:
            for r in range(0, shape[0], rows):
                n = min(rows, shape[0] - r)
                fh.seek(begin + r * row)
                view = buf[:n * row]
                if fh.readinto(memoryview(view.numpy())) != n * row:
                    raise QtoolError(f"{f}: ends inside tensor {stored}; the file is truncated, download it again")
                yield view.view(dtype).view(n, *shape[1:])

    def _header(self, f: Path) -> tuple[dict, int]:
        """The JSON header of safetensors file ``f`` and the offset of its data; cached while the file is the same
        (inode, size, modification time): a file replaced during the run is read afresh."""
        try:
            st = f.stat()
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
            if self._headers.get(f, (None,))[0] != stamp:
                with open(f, "rb") as fh:
                    size = int.from_bytes(fh.read(8), "little")
                    self._headers[f] = (stamp, json.loads(fh.read(size)), 8 + size)
        except (OSError, ValueError) as e:
            raise _changed(f, e) from None
        return self._headers[f][1:]

    def _read_stored(self, stored: str) -> torch.Tensor:
        f = self.stored[stored]
        if f in self._bin:
            return self._bin[f][stored].clone()  # out of the memory map: the file may go away, the model may not
        try:
            with safe_open(str(f), framework="pt") as st:
                return st.get_tensor(stored)
        except Exception as e:  # noqa: BLE001 - safetensors and the OS raise many kinds for a file changed mid-run
            raise _changed(f, e) from None

    def tensors(self, names) -> dict[str, torch.Tensor]:
        """The tensors ``names`` (native names), with their stored dtype and values; a fused stored
        tensor is read once for all the native tensors it holds."""
        names = list(names)
        if self.layout is None:
            return {n: self._read_stored(n) for n in names}
        stored = {self.stored_name(n) for n in names}
        native = self.layout.to_native({k: self._read_stored(k) for k in sorted(stored)}, self.shape)
        return {n: native[n] for n in names}

    def tensor(self, name: str) -> torch.Tensor:
        """The stored tensor ``name`` (its native name), as stored (dtype and values)."""
        return self.tensors([name])[name]

    def to_stored(self, tensors: dict[str, torch.Tensor], fmt=None, bits: int = 0, group_size: int = 0
                  ) -> dict[str, torch.Tensor]:
        """Checkpoint tensors of the native model under the source's own names and fused layout (the
        identity for families transformers runs natively); packed ones in layout ``fmt``."""
        if self.layout is None:
            return tensors
        return self.layout.to_stored(tensors, self.shape, fmt, bits, group_size)

    def stored_module(self, name: str) -> str:
        """The name the checkpoint gives the native module ``name`` (e.g. in ``modules_to_not_convert``)."""
        if self.layout is None:
            return name
        return self.layout.stored_name(f"{name}.weight").removesuffix(".weight")

    def stored_dtype_of(self, name: str) -> torch.dtype | None:
        """The dtype tensor ``name`` (its native name) is stored in, read from the file header (no data read)."""
        return self._stored_dtype(self.stored_name(name))

    def _stored_dtype(self, stored: str | None = None) -> torch.dtype | None:
        if stored is None:  # the source's: the first floating tensor's (sources hold one)
            for name in self.stored:
                t = self._stored_dtype(name)
                if t is not None and t.is_floating_point:
                    return t
            return torch.float32
        f = self.stored[stored]
        if f in self._bin:
            return self._bin[f][stored].dtype
        return _SAFETENSORS_DTYPES.get(self._header(f)[0][stored]["dtype"])

    def _stored_shape(self, stored: str) -> tuple[int, ...]:
        """The shape of stored tensor ``stored``, from the file header (no data read)."""
        f = self.stored[stored]
        if f in self._bin:
            return tuple(self._bin[f][stored].shape)
        return tuple(self._header(f)[0][stored]["shape"])

    def _check_names(self, tied: set[str]) -> None:
        """Refuse (one sentence) a source whose tensors are not the model config.json describes: one missing, one
        the model does not use, one stored as integers where the model holds floats (an already quantized or
        otherwise packed weight would be read as its integer codes), or one of another shape. File headers only:
        no tensor data is read. ``tied``: the parameters the model ties to another (not stored)."""
        want = set(self.model.state_dict())
        missing = sorted(want - set(self.index) - tied)
        extra = sorted(set(self.index) - want)
        packed = next((self.stored_name(k) for k in extra if k.endswith(".qweight")), None)
        if packed:  # a quantized checkpoint whose config.json lost its quantization_config: not a full-precision model
            raise QtoolError(f"{self.dir}: holds packed weights ({packed}, ...) but config.json has no "
                             "quantization_config, so it reads as a full-precision model with those weights missing; "
                             "restore the quantization_config the checkpoint was written with")
        for what, keys in (("lacks", missing), ("holds tensors the model does not use:", extra)):
            keys = sorted({self.stored_name(k) for k in keys})  # as the files name them
            if keys:
                more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
                raise QtoolError(f"{self.dir}: the checkpoint {what} {', '.join(keys[:3])}{more}"
                                 + (" (they would be random weights)" if what == "lacks" else "")
                                 + "; it does not match its config.json")
        for stored in sorted({self.stored_name(n) for n in self.index}):
            dtype, native = self._stored_dtype(stored), self._native_names(stored)
            if (dtype is not None and not dtype.is_floating_point
                    and self.model.get_parameter_or_buffer(native[0]).is_floating_point()):
                raise QtoolError(f"{self.stored[stored]}: {stored} is stored as {str(dtype).removeprefix('torch.')}, "
                                 "but the model holds floats there; a full-precision model's weights are float32, "
                                 "float16 or bfloat16")
            if len(native) == 1:  # a fused tensor's parts are checked as they are split
                self._check_shape(native[0], self._stored_shape(stored))

    def _assign(self, names, state: dict[str, torch.Tensor] | None = None) -> None:
        state = self.tensors(sorted(names)) if state is None else state
        for k, t in state.items():
            self._check_shape(k, t.shape)
            self._check_finite(k, t)
        if self._convert is not None:
            state = {k: self._converted(k, t, self._convert) for k, t in state.items()}
        self.model.load_state_dict(state, strict=False, assign=True)

    def _converted(self, name: str, t: torch.Tensor, dtype: torch.dtype, why: str | None = None) -> torch.Tensor:
        return converted(t, dtype, self.stored_name(name), lambda: self.abs_max(name),
                         why or (self._why if dtype == self._convert else None))

    def _check_shape(self, name: str, shape) -> None:
        want = tuple(self.model.get_parameter_or_buffer(name).shape)
        if tuple(shape) != want:
            raise QtoolError(f"{self.dir}: weight {self.stored_name(name)} has shape {tuple(shape)}, but config.json "
                             f"gives this model {want}; the checkpoint does not match its config.json")

    def _check_finite(self, name: str, t: torch.Tensor, stored: bool = False) -> None:
        """Refuse a tensor holding NaN or inf. A whole tensor (a native ``name``) found finite once is not scanned
        again; a slice of a stored one (``stored``) is scanned every time."""
        if (name in self._finite and not stored) or not t.is_floating_point():
            return
        if not all_finite(t):
            raise QtoolError(f"{self.dir}: weight {name if stored else self.stored_name(name)} holds NaN or inf "
                             "values; the model is damaged, fix it first")
        if not stored:
            self._finite.add(name)

    def abs_max(self, name: str) -> float:
        """``max |x|`` of stored tensor ``name`` (its native name; a tensor the source stores under that name
        alone), read a slice at a time (nothing of it stays in memory)."""
        stored = self.stored_name(name)
        if self._native_names(stored) != [name]:
            return abs_max(self.tensor(name))
        return max((abs_max(part) for part in self._stored_slices(stored)), default=0.0)

    def load_tensor(self, name: str, dtype: torch.dtype | None = None, why: str | None = None) -> None:
        """Tensor ``name`` (outside the blocks) read into the model, if it is still on the meta device. With
        ``dtype`` it is converted as it is read, a slice at a time: a float32 embedding written as float16
        costs its float16 size, not that plus its float32 size (elementwise, so the values are those of
        ``tensor(name).to(dtype)``; a value beyond ``dtype``'s range is refused, after ``why``, what chose it)."""
        if not self.model.get_parameter_or_buffer(name).is_meta:
            return
        stored, want = self.stored_name(name), self.model.get_parameter_or_buffer(name).shape
        if dtype is None or not want or self._native_names(stored) != [name] or not dtype.is_floating_point or not (
                self._stored_dtype(stored) or torch.int32).is_floating_point:
            self._assign([name])
            return
        self._check_shape(name, self._stored_shape(stored))
        out, r = torch.empty(want, dtype=dtype), 0
        for part in self._stored_slices(stored):
            self._check_finite(stored, part, stored=True)
            out[r:r + len(part)] = self._converted(name, part, dtype, why)
            r += len(part)
        self._assign([name], {name: out})

    def release_tensor(self, name: str) -> None:
        """Tensor ``name`` back on the meta device (its memory freed)."""
        parent, _, leaf = name.rpartition(".")
        owner = self.model.get_submodule(parent)
        t = getattr(owner, leaf)
        if leaf in owner._parameters:
            owner._parameters[leaf] = nn.Parameter(t.to("meta"), requires_grad=False)
        else:
            owner._buffers[leaf] = t.to("meta")

    def release_outside(self) -> None:
        """Every stored tensor outside the blocks (embeddings, final norm, ``lm_head``, tied ones included) back on
        the meta device: a calibrated run needs them to embed its windows and for the whole-model check, not while
        it quantizes the blocks (for a large vocabulary they are the largest tensors of the run)."""
        for name in self.outside + self._tied_outside:
            self.release_tensor(name)
        heap.trim()

    def load_outside(self) -> None:
        """The tensors :meth:`release_outside` released, read again (ties restored)."""
        self._assign([n for n in self.outside if self.model.get_parameter_or_buffer(n).is_meta])
        self.model.tie_weights()

    def _rebuild_buffers(self, within: nn.Module | None = None) -> None:
        from quant.loading import rebuild_nonpersistent_buffers

        rebuild_nonpersistent_buffers(self.model, within)

    # --- blocks -------------------------------------------------------------------------------------

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.get_submodule(self.blocks_path)

    def load_block(self, i: int) -> nn.Module:
        """Block ``i`` with its stored tensors (source dtype, CPU), in place in the skeleton."""
        prefix = f"{self.blocks_path}.{i}."
        self._assign(k for k in self.index if k.startswith(prefix))
        self._rebuild_buffers(self.blocks[i])
        return self.blocks[i]

    def release(self, i: int) -> None:
        """Block ``i`` back on the meta device: its memory is freed (and handed back to the system)."""
        self.blocks[i].to("meta")
        heap.trim()



def _changed(f: Path, e: Exception) -> QtoolError:
    return QtoolError(f"{f}: cannot be read as a weight file any more ({type(e).__name__}: {str(e)[:100]}); was it "
                      "changed during the run?")


_SLICE_BYTES = 16 * 2**20  # per read of a tensor checked or converted as it is read


def source_fingerprint(model_dir: str | os.PathLike) -> str:
    """sha256 over ``config.json`` and the name, size and modification time of every weight file: a
    changed source (re-downloaded, edited) gives another fingerprint. Reads no weights."""
    path = Path(model_dir)
    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in folder.weight_files(path):
        st = f.stat()
        h.update(json.dumps([f.name, st.st_size, st.st_mtime_ns]).encode())
    return h.hexdigest()


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}
