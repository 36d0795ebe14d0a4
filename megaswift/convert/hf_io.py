"""Streaming access to HF safetensors checkpoints: read slices, write shards with an index."""
from __future__ import annotations

import json
import math
import os
from typing import NamedTuple

import torch
from safetensors.torch import save_file

from megaswift.errors import CheckpointError

from . import fp8, mxfp4

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def read_json(path: str, what: str) -> dict:
    """A JSON object from `path`, or a one-line CheckpointError naming the file (a truncated
    download or a hand edit gone wrong is the usual cause)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); "
                              f"restore the {what} from the original checkpoint") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{path} is not a text file; restore the {what} from the original checkpoint") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a JSON {type(data).__name__}, not an object; "
                              f"restore the {what} from the original checkpoint")
    return data


def read_hf_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{hf_dir} has no config.json; is it a Hugging Face checkpoint directory?")
    return read_json(path, "config.json")


# safetensors dtype names -> torch (F4 and F6 are packed formats torch has no dtype for)
_DTYPES = {name: getattr(torch, attr) for name, attr in (
    ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"),
    ("I64", "int64"), ("I32", "int32"), ("I16", "int16"), ("I8", "int8"), ("U8", "uint8"), ("BOOL", "bool"),
    ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"),
    ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("F8_E8M0", "float8_e8m0fnu"),
    ("F8_E4M3FNUZ", "float8_e4m3fnuz"), ("F8_E5M2FNUZ", "float8_e5m2fnuz"), ("C64", "complex64"))
    if hasattr(torch, attr)}

# Column slices are read in blocks of whole rows of at most this size, then narrowed; a
# rank's extra memory for a row-parallel weight is one block, not the whole tensor.
_BLOCK_BYTES = 16 << 20
_MAX_HEADER = 100 << 20  # safetensors' own limit; a larger one is damage, not a header to read in


class _Entry(NamedTuple):
    """One tensor of a safetensors file; `start` and `end` are absolute byte offsets in it."""
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def _damaged(path: str, why: str) -> CheckpointError:
    return CheckpointError(f"{path} is not a readable safetensors file ({why}); it is probably truncated: "
                           "download or export it again")


def _read_header(path: str) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the offset its data starts at."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= min(size - 8, _MAX_HEADER):
            raise _damaged(path, f"a header of {n} bytes in a file of {size}")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _damaged(path, f"the header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise _damaged(path, "the header is not a JSON object")
    return header, 8 + n


def read_safetensors_metadata(path: str) -> dict:
    """The file's `__metadata__` (string keys and values), {} when it has none."""
    meta = _read_header(path)[0].get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise _damaged(path, "its __metadata__ is not a JSON object")
    return meta


def read_safetensors_header(path: str) -> dict[str, _Entry]:
    """Every tensor of a safetensors file (an 8-byte little-endian header length, a JSON header,
    then the data), each checked against the file's size, so that a truncated download is named
    here in one line and not half-way through an import."""
    size = os.path.getsize(path)
    header, base = _read_header(path)
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if isinstance(info, dict) and isinstance(info.get("dtype"), str) and info["dtype"] not in _DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {info['dtype']}, which torch "
                                  f"{torch.__version__} cannot hold; megaswift reads {', '.join(_DTYPES)}")
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            start, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise _damaged(path, f"tensor {name!r} has the header entry {info!r}") from None
        if min(shape, default=0) < 0 or not 0 <= start <= end or end - start != math.prod(shape) * dtype.itemsize:
            raise _damaged(path, f"tensor {name!r} has {end - start} bytes for shape {list(shape)} of {dtype}")
        if base + end > size:
            raise _damaged(path, f"tensor {name!r} ends at byte {base + end}, the file has {size}")
        entries[name] = _Entry(dtype, shape, base + start, base + end)
    return entries


def _read_at(f, path: str, offset: int, out: torch.Tensor) -> None:
    """Fill the contiguous CPU tensor `out` with the file's bytes from `offset` on."""
    view = memoryview(out.detach().view(-1).view(torch.uint8).numpy())
    f.seek(offset)
    while view:
        got = f.readinto(view)  # a single read(2): it may stop short of a large request
        if not got:
            raise _damaged(path, f"it ends before byte {offset + len(view)}")
        view, offset = view[got:], offset + got


class HFReader:
    """Reads slices of the tensors of an HF checkpoint, so that a rank reads only its own bytes.

    Slices are read with plain file reads into tensors this reader allocates (or into the
    caller's `out`), never through a memory map. safetensors' `safe_open` maps the whole file,
    and every tensor it hands out, `get_slice` ones included, is a view of that mapping: the
    pages a read touched stay in the process's RSS for as long as the handle or any such tensor
    lives, so an import that kept its handles held every shard it had read until it ended
    (issue 18 item 10). Here a read holds exactly its slice, and nothing of a file is held
    once its tensors are read; the file's pages stay in the kernel's page cache, which is
    shared and reclaimable, and not in the rank's RSS. Only the parsed headers are kept.

    An fp8 block-quantized checkpoint (config.json's quantization_config: DeepSeek-V3, Kimi-K2)
    reads as its dequantized weights: `names()` hides the `*.weight_scale_inv` grids, `dtype()`
    of a quantized weight is float32 (the dequantization's precision, convert/fp8.py), and
    `read()` reads the fp8 bytes of the slice and only the scale blocks covering it. The stored
    tensors stay reachable through `stored_names()` and `stored_entry()` (pass-through copies).

    An MXFP4 checkpoint (quantization_config.quant_method mxfp4: gpt-oss) reads as its bf16 expert
    weights: `names()` shows `X` for each stored pair `X_blocks` / `X_scales`, `shape()` its
    [experts, in, out], `dtype()` bfloat16 (exact: every MXFP4 value is a bf16 value), and `read()`
    dequantizes the experts asked for from their own bytes (convert/mxfp4.py)."""

    def __init__(self, hf_dir: str):
        self.hf_dir = hf_dir
        self._headers: dict[str, dict[str, _Entry]] = {}
        config = os.path.join(hf_dir, "config.json")
        self.hf_config = read_json(config, "config.json") if os.path.isfile(config) else {}
        self.mxfp4 = mxfp4.is_mxfp4(self.hf_config, config)
        """Whether the checkpoint is MXFP4 (gpt-oss); then `block` is None."""
        self.block = None if self.mxfp4 else fp8.block_config(self.hf_config, config)
        """(rows, cols) of the fp8 scale blocks; None for an unquantized checkpoint."""
        self._scales: dict[str, str | None] = {}
        index = os.path.join(hf_dir, INDEX_FILE)
        if os.path.isfile(index):
            weight_map = read_json(index, INDEX_FILE).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index} has no weight_map object; restore it from the original checkpoint")
            self.weight_map = weight_map
        elif os.path.isfile(os.path.join(hf_dir, SINGLE_FILE)):
            self._headers[SINGLE_FILE] = read_safetensors_header(os.path.join(hf_dir, SINGLE_FILE))
            self.weight_map = {k: SINGLE_FILE for k in self._headers[SINGLE_FILE]}
        else:
            raise CheckpointError(
                f"{hf_dir} has no {SINGLE_FILE} or {INDEX_FILE}; megaswift reads safetensors only "
                "(re-save .bin checkpoints with transformers' save_pretrained(safe_serialization=True))")
        self._mx: dict[str, tuple[str, str]] = self._mxfp4_pairs() if self.mxfp4 else {}
        """MXFP4 weight name -> its stored (blocks, scales) tensors."""
        self._mx_shapes: dict[str, tuple[int, int, int]] = {}

    def _mxfp4_pairs(self) -> dict[str, tuple[str, str]]:
        """Each `X_blocks` with its `X_scales`, by name (headers are read when a shape is asked for);
        a one-line CheckpointError for half a pair, or a pair beside an unquantized `X`."""
        pairs = {}
        for name in self.weight_map:
            for suffix, other in ((mxfp4.BLOCKS_SUFFIX, mxfp4.SCALES_SUFFIX), (mxfp4.SCALES_SUFFIX, mxfp4.BLOCKS_SUFFIX)):
                if not name.endswith(suffix):
                    continue
                base = name[: -len(suffix)]
                if base + other not in self.weight_map:
                    raise CheckpointError(f"tensor {name!r} has no {base + other!r} beside it in {self.hf_dir}; "
                                          "an mxfp4 weight is stored as both: restore the checkpoint's tensors")
                if base in self.weight_map:
                    raise CheckpointError(f"{self.hf_dir} holds {base!r} both unquantized and as mxfp4 "
                                          f"{base + mxfp4.BLOCKS_SUFFIX!r}; keep one of them")
                pairs[base] = (base + mxfp4.BLOCKS_SUFFIX, base + mxfp4.SCALES_SUFFIX)
        return pairs

    def _mxfp4_shape(self, name: str) -> tuple[int, int, int]:
        """[experts, in, out] of the MXFP4 weight `name`, its blocks and scales checked once."""
        if name not in self._mx_shapes:
            blocks, scales = self._mx[name]
            b, s = self._entry(blocks)[0], self._entry(scales)[0]
            self._mx_shapes[name] = mxfp4.check_stored(blocks, b.shape, b.dtype, scales, s.shape, s.dtype)
        return self._mx_shapes[name]

    def _entry(self, name: str) -> tuple[_Entry, str]:
        if name not in self.weight_map:
            raise CheckpointError(f"tensor {name!r} is missing from the checkpoint in {self.hf_dir}")
        fname = self.weight_map[name]
        path = os.path.join(self.hf_dir, fname)
        if fname not in self._headers:
            if not os.path.isfile(path):
                raise CheckpointError(f"{path} (listed in {INDEX_FILE} for {name!r}) does not exist")
            self._headers[fname] = read_safetensors_header(path)
        entry = self._headers[fname].get(name)
        if entry is None:
            raise CheckpointError(f"{path} does not hold tensor {name!r}, which {INDEX_FILE} lists in it; "
                                  "the index and the shards are from different saves: download the "
                                  "checkpoint again")
        return entry, path

    def stored_entry(self, name: str) -> tuple[_Entry, str]:
        """Where tensor `name` is stored: its header entry and its file's path."""
        return self._entry(name)

    def stored_names(self) -> set[str]:
        """Every tensor the checkpoint stores, fp8 scale grids included."""
        return set(self.weight_map)

    def names(self) -> set[str]:
        """The checkpoint's tensors as they read: without the scale grids of quantized weights."""
        if self._mx:
            stored = {n for pair in self._mx.values() for n in pair}
            return {k for k in self.weight_map if k not in stored} | set(self._mx)
        if self.block is None:
            return set(self.weight_map)
        n = len(fp8.SCALE_SUFFIX)
        return {k for k in self.weight_map if not (k.endswith(fp8.SCALE_SUFFIX) and k[:-n] in self.weight_map)}

    def _scale_of(self, name: str) -> str | None:
        """The scale grid of `name` when it is a quantized weight (checked against it once), else None."""
        if self.block is None:
            return None
        if name not in self._scales:
            scale = name + fp8.SCALE_SUFFIX
            entry = self._entry(name)[0]
            if scale not in self.weight_map:
                if entry.dtype.itemsize == 1 and entry.dtype.is_floating_point:
                    raise CheckpointError(f"tensor {name!r} is {entry.dtype} without a {scale!r} beside it in "
                                          f"{self.hf_dir}; restore the checkpoint's scale tensors")
                scale = None
            else:
                s = self._entry(scale)[0]
                fp8.check_scale(name, entry.shape, scale, s.shape, s.dtype, entry.dtype, self.block)
            self._scales[name] = scale
        return self._scales[name]

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._mx:
            return self._mxfp4_shape(name)
        return self._entry(name)[0].shape

    def dtype(self, name: str) -> torch.dtype:
        """The dtype `read` returns: the stored one, float32 for an fp8 weight, bfloat16 for an
        MXFP4 one."""
        if name in self._mx:
            self._mxfp4_shape(name)
            return torch.bfloat16
        return torch.float32 if self._scale_of(name) else self._entry(name)[0].dtype

    def read(self, name: str, dim: int, start: int, n: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Entries [start, start + n) along `dim` of tensor `name`, in `dtype(name)`; or written into
        `out` (a tensor of the slice's shape, any dtype or device) and `out` returned. A
        contiguous CPU `out` of the file's dtype receives the bytes directly, with no copy. A
        quantized weight is dequantized (fp32 multiply, then cast to `out`'s dtype)."""
        if name in self._mx:
            return self._read_mxfp4(name, dim, start, n, out)
        scale = self._scale_of(name)
        if scale is None:
            return self.read_stored(name, dim, start, n, out)
        shape = list(self._entry(name)[0].shape)
        if not 0 <= dim < 2 or start < 0 or n < 0 or start + n > shape[dim]:
            raise IndexError(f"{name}: [{start}, {start + n}) along dim {dim} is outside its shape {shape}")
        shape[dim] = n
        if out is not None and list(out.shape) != shape:
            raise ValueError(f"{name}: a slice of shape {shape} cannot fill a tensor of shape {list(out.shape)}")
        q = self.read_stored(name, dim, start, n)
        b = self.block[dim]
        first = start // b
        blocks = -(-(start + n) // b) - first if n else 0
        grid = self.read_stored(scale, dim, first, blocks)
        return fp8.dequantize(q, grid, self.block, (start, 0) if dim == 0 else (0, start), out)

    def _read_mxfp4(self, name: str, dim: int, start: int, n: int, out: torch.Tensor | None) -> torch.Tensor:
        """`read` of an MXFP4 weight [experts, in, out]. Along dim 0 (whole experts, as import reads
        them): the bytes of those experts' blocks and scales and no others. Along dim 2 (`out`):
        those rows of the stored [E, out, ...] tensors. Along dim 1 (`in`): the 32-blocks covering
        the range, of every expert and row, then narrowed."""
        shape = list(self._mxfp4_shape(name))
        if not 0 <= dim < 3 or start < 0 or n < 0 or start + n > shape[dim]:
            raise IndexError(f"{name}: [{start}, {start + n}) along dim {dim} is outside its shape {shape}")
        shape[dim] = n
        if out is not None and list(out.shape) != shape:
            raise ValueError(f"{name}: a slice of shape {shape} cannot fill a tensor of shape {list(out.shape)}")
        blocks, scales = self._mx[name]
        if dim != 1:
            stored_dim = 0 if dim == 0 else 1  # [E, out, in / 32, 16]: `out` is the stored dim 1
            return mxfp4.dequantize(self.read_stored(blocks, stored_dim, start, n),
                                    self.read_stored(scales, stored_dim, start, n), out)
        first, end = start // mxfp4.BLOCK, -(-(start + n) // mxfp4.BLOCK)
        whole = mxfp4.dequantize(self.read_stored(blocks, 2, first, end - first),
                                 self.read_stored(scales, 2, first, end - first))
        part = whole.narrow(1, start - first * mxfp4.BLOCK, n)
        return part.contiguous() if out is None else out.copy_(part)

    def read_stored(self, name: str, dim: int, start: int, n: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """`read` of the bytes as stored (an fp8 weight as fp8, with no scale applied)."""
        entry, path = self._entry(name)
        shape = list(entry.shape)
        if not 0 <= dim < len(shape) or start < 0 or n < 0 or start + n > shape[dim]:
            raise IndexError(f"{name}: [{start}, {start + n}) along dim {dim} is outside its shape {shape}")
        shape[dim] = n
        if out is not None and list(out.shape) != shape:  # copy_ would broadcast a wrong shape silently
            raise ValueError(f"{name}: a slice of shape {shape} cannot fill a tensor of shape {list(out.shape)}")
        direct = out is not None and out.dtype == entry.dtype and out.device.type == "cpu" and out.is_contiguous()
        buf = out if direct else torch.empty(shape, dtype=entry.dtype)
        if buf.numel():
            with open(path, "rb", buffering=0) as f:
                self._read_slice(f, path, entry, dim, start, n, buf.detach())
        if out is not None and not direct:
            out.copy_(buf)
        return buf if out is None else out

    def read_rows(self, name: str, start: int, n: int) -> torch.Tensor:
        """Rows [start, start + n) of a 3-D tensor [a, b, c] seen as [a x b, c] (fused experts:
        expert e's rows start at e x b): one contiguous run of bytes."""
        if name in self._mx:  # whole experts (the rows' own), dequantized, then the rows
            b = self.shape(name)[1]
            if start < 0 or n < 0 or start + n > self.shape(name)[0] * b:
                raise IndexError(f"{name}: rows [{start}, {start + n}) are outside its {list(self.shape(name))} "
                                 "seen as 2-D")
            first = start // b
            experts = self.read(name, 0, first, -(-(start + n) // b) - first if n else 0)
            return experts.flatten(0, 1).narrow(0, start - first * b, n)
        entry, path = self._entry(name)
        if self._scale_of(name):
            raise CheckpointError(f"{name}: fp8 block-quantized fused expert tensors are not supported; "
                                  "import the checkpoint's bf16 release")
        cols = entry.shape[-1]
        if start < 0 or n < 0 or start + n > math.prod(entry.shape[:-1]):
            raise IndexError(f"{name}: rows [{start}, {start + n}) are outside its {list(entry.shape)} seen as 2-D")
        buf = torch.empty(n, cols, dtype=entry.dtype)
        if buf.numel():
            with open(path, "rb", buffering=0) as f:
                _read_at(f, path, entry.start + start * cols * entry.dtype.itemsize, buf)
        return buf

    @staticmethod
    def _read_slice(f, path: str, entry: _Entry, dim: int, start: int, n: int, buf: torch.Tensor) -> None:
        outer = math.prod(entry.shape[:dim])
        inner = math.prod(entry.shape[dim + 1:]) * entry.dtype.itemsize  # bytes per entry along dim
        if outer == 1 or n == entry.shape[dim]:  # one contiguous run of bytes
            _read_at(f, path, entry.start + start * inner, buf)
            return
        row = entry.shape[dim] * inner
        per = max(1, _BLOCK_BYTES // row)
        take = buf.view(-1).view(torch.uint8).view(outer, n * inner)
        block = torch.empty(min(per, outer), row, dtype=torch.uint8)
        for o in range(0, outer, per):
            k = min(per, outer - o)
            _read_at(f, path, entry.start + o * row, block[:k])
            take[o:o + k].copy_(block[:k, start * inner:(start + n) * inner])


_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


def default_dtype(reader: HFReader) -> torch.dtype:
    """What a model of this checkpoint is imported (and so exported) in unless told otherwise:
    the dtype of its embedding, or bf16 for an fp8 block-quantized checkpoint, whose weights
    dequantize to more than fp8 holds and whose unquantized tensors are bf16 as published."""
    if reader.block:
        return torch.bfloat16
    from .families import family_for  # the embedding's name: model.embed_tokens, or Qwen3.5's nested one

    return reader.dtype(family_for(reader.hf_config).hf_prefix + "embed_tokens.weight")


def read_tensor(path: str, entry: _Entry) -> torch.Tensor:
    """A whole tensor of a safetensors file, as stored."""
    buf = torch.empty(entry.shape, dtype=entry.dtype)
    if buf.numel():
        with open(path, "rb", buffering=0) as f:
            _read_at(f, path, entry.start, buf)
    return buf


def copy_safetensors(path: str, tensors: list[tuple[str, _Entry, str]], metadata: dict | None = None) -> None:
    """Write a safetensors file of `tensors` ((name, entry, source file)), their bytes copied
    from the source files as stored, a few MiB at a time: nothing is converted, and nothing
    more than one copy buffer is held, however large the tensors."""
    header, offset = {}, 0
    for name, entry, _ in tensors:
        size = entry.end - entry.start
        header[name] = {"dtype": _DTYPE_NAMES[entry.dtype], "shape": list(entry.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as out:
        out.write(len(raw).to_bytes(8, "little"))
        out.write(raw)
        src, f = None, None
        try:
            for _, entry, source in tensors:
                if source != src:
                    if f is not None:
                        f.close()
                    src, f = source, open(source, "rb")
                f.seek(entry.start)
                left = entry.end - entry.start
                while left:
                    chunk = f.read(min(left, _BLOCK_BYTES))
                    if not chunk:
                        raise _damaged(source, f"it ends before byte {entry.end}")
                    out.write(chunk)
                    left -= len(chunk)
        finally:
            if f is not None:
                f.close()


class ShardedSafetensorsWriter:
    """Buffers tensors and writes a shard whenever `max_shard_bytes` is reached, so export holds at
    most one shard in memory. Files get their final `-of-N` names once N is known."""

    def __init__(self, out_dir: str, max_shard_bytes: int = 2 * 1024**3):
        self.out_dir, self.max = out_dir, max_shard_bytes
        os.makedirs(out_dir, exist_ok=True)
        self.buffer: dict[str, torch.Tensor] = {}
        self.size = 0
        self.written: list[tuple[str, list[str]]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.buffer and self.size + nbytes > self.max:
            self._flush()
        self.buffer[name] = tensor.contiguous()
        self.size += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        tmp = f"shard-{len(self.written)}.tmp"
        save_file(self.buffer, os.path.join(self.out_dir, tmp), metadata={"format": "pt"})
        self.written.append((tmp, list(self.buffer)))
        self.buffer, self.size = {}, 0

    def close(self) -> None:
        if self.buffer or not self.written:
            self._flush()
        n = len(self.written)
        if n == 1:
            os.replace(os.path.join(self.out_dir, self.written[0][0]), os.path.join(self.out_dir, SINGLE_FILE))
            return
        weight_map = {}
        for i, (tmp, names) in enumerate(self.written):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(os.path.join(self.out_dir, tmp), os.path.join(self.out_dir, final))
            weight_map.update({k: final for k in names})
        with open(os.path.join(self.out_dir, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": self.total}, "weight_map": weight_map}, f, indent=2)
