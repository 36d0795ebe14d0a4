"""Streaming access to HF safetensors checkpoints: read slices, write shards with an index."""
from __future__ import annotations

import json
import os

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from megaswift.errors import CheckpointError

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


def open_safetensors(path: str):
    """safe_open, with a damaged file (truncated, not safetensors at all) named in one line;
    safetensors' own message does not say which file it was reading."""
    try:
        return safe_open(path, framework="pt")
    except SafetensorError as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}); it is probably truncated: "
                              "download or export it again") from None


class HFReader:
    """Reads tensor slices with `safe_open(...).get_slice`, so a rank touches only its bytes."""

    def __init__(self, hf_dir: str):
        self.hf_dir = hf_dir
        index = os.path.join(hf_dir, INDEX_FILE)
        if os.path.isfile(index):
            weight_map = read_json(index, INDEX_FILE).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index} has no weight_map object; restore it from the original checkpoint")
            self.weight_map = weight_map
        elif os.path.isfile(os.path.join(hf_dir, SINGLE_FILE)):
            with open_safetensors(os.path.join(hf_dir, SINGLE_FILE)) as f:
                self.weight_map = {k: SINGLE_FILE for k in f.keys()}
        else:
            raise CheckpointError(
                f"{hf_dir} has no {SINGLE_FILE} or {INDEX_FILE}; megaswift reads safetensors only "
                "(re-save .bin checkpoints with transformers' save_pretrained(safe_serialization=True))")
        self._files: dict[str, object] = {}

    def _file(self, name: str):
        if name not in self.weight_map:
            raise CheckpointError(f"tensor {name!r} is missing from the checkpoint in {self.hf_dir}")
        fname = self.weight_map[name]
        if fname not in self._files:
            path = os.path.join(self.hf_dir, fname)
            if not os.path.isfile(path):
                raise CheckpointError(f"{path} (listed in {INDEX_FILE} for {name!r}) does not exist")
            self._files[fname] = open_safetensors(path)
        return self._files[fname]

    def _slice(self, name: str):
        try:
            return self._file(name).get_slice(name)
        except SafetensorError:  # "File does not contain tensor ...", without the file's name
            path = os.path.join(self.hf_dir, self.weight_map[name])
            raise CheckpointError(f"{path} does not hold tensor {name!r}, which {INDEX_FILE} lists in it; "
                                  "the index and the shards are from different saves: download the "
                                  "checkpoint again") from None

    def names(self) -> set[str]:
        return set(self.weight_map)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def read(self, name: str, dim: int, start: int, n: int) -> torch.Tensor:
        sl = self._slice(name)
        index = [slice(None)] * len(sl.get_shape())
        index[dim] = slice(start, start + n)
        return sl[tuple(index)]

    def dtype(self, name: str) -> torch.dtype:
        return self.read(name, 0, 0, 1).dtype


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
