"""Read torch.distributed.checkpoint (DCP) directories without running code stored in them.

DCP's FileSystemReader reads `.metadata` with plain `pickle.load`, so a crafted file can run
anything while a checkpoint is merely opened (design principle 7). Here the metadata goes through
an unpickler that resolves only the classes a megaswift checkpoint really contains (found by
walking the pickles of imported and trained checkpoints, tp=1 and tp=2, full and LoRA), and is
then checked for what DCP would otherwise trust: every entry is a tensor (a bytes entry would be
read with `torch.load(weights_only=False)`), every storage file is a plain name inside the
directory and holds the bytes the metadata points at. Tensor payloads themselves are read by DCP
with `torch.load(weights_only=True)` (torch 2.13, FileSystemReader.read_data).

The checks run when the reader is built, before `dcp.load`: raised inside DCP they would come
back wrapped (its metadata fallback logs a traceback and re-raises an AssertionError; under a
process group every rank's error becomes a CheckpointException), not as one line.
"""
from __future__ import annotations

import os
import pickle

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

from megaswift.errors import CheckpointError

METADATA_FILE = ".metadata"

_DCP = "torch.distributed.checkpoint.metadata"
# Everything a megaswift `.metadata` references by name (pickle protocol 4, torch 2.13).
# BytesStorageMetadata is left out on purpose: megaswift stores tensors only, and DCP reads a
# bytes entry with its other unrestricted unpickle (DefaultLoadPlanner.load_bytes).
ALLOWED_GLOBALS = frozenset({
    (_DCP, "Metadata"),
    (_DCP, "StorageMeta"),
    (_DCP, "TensorStorageMetadata"),
    (_DCP, "TensorProperties"),
    (_DCP, "ChunkStorageMetadata"),
    (_DCP, "MetadataIndex"),
    (_DCP, "_MEM_FORMAT_ENCODING"),  # TensorProperties stores its memory format as this enum
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),  # file, offset, length per chunk
    ("torch.serialization", "_get_layout"),  # how torch pickles torch.strided: a lookup by name
    ("torch", "Size"),
    ("pathlib", "PosixPath"),  # StorageMeta.checkpoint_id: the directory it was saved to
    ("pathlib._local", "PosixPath"),  # the same class as Python >= 3.13 names it
})
# torch pickles a dtype as the global `torch.<name>`
_DTYPE_NAMES = frozenset(name for name, value in vars(torch).items() if isinstance(value, torch.dtype))

_DAMAGED_FIX = "use another checkpoint (checkpoint.load latest skips damaged ones)"
_REFUSED_FIX = ("megaswift never writes one, so the file was altered or not written by megaswift; "
                "it was refused without running anything")


class DamagedCheckpoint(CheckpointError):
    """A checkpoint file that cannot be loaded: `reason` names the file and what is wrong with it,
    the message adds what to do."""

    def __init__(self, path: str, problem: str, fix: str = _DAMAGED_FIX):
        self.reason = f"{path} {problem}"
        super().__init__(f"{self.reason}; {fix}")


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, path: str):
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str):
        if (module, name) in ALLOWED_GLOBALS or (module == "torch" and name in _DTYPE_NAMES):
            return super().find_class(module, name)
        raise DamagedCheckpoint(self._path, f"holds a disallowed object {module}.{name}", _REFUSED_FIX)

    def persistent_load(self, pid):
        raise DamagedCheckpoint(self._path, "holds a disallowed persistent reference", _REFUSED_FIX)


def _one_line(e: Exception) -> str:
    """The exception's type and first sentence (torch's zip reader adds a paragraph of advice)."""
    first = str(e).strip().split(". ")[0].splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}"


def load_weights_only(path: str):
    """`torch.load(path, weights_only=True)` (tensors, plain containers, numbers), its errors as
    one line naming the file."""
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is a paragraph that suggests weights_only=False; keep the refused global
        refused = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line), "")
        raise DamagedCheckpoint(path, f"holds an object torch.load(weights_only=True) refuses ({refused})",
                                _REFUSED_FIX) from None
    except Exception as e:  # truncated or overwritten: torch's zip reader raises a RuntimeError
        raise DamagedCheckpoint(path, f"cannot be read ({_one_line(e)})") from None


def read_dcp_metadata(dcp_dir: str) -> Metadata:
    """The `.metadata` of a DCP directory, unpickled through the allow-list and checked."""
    path = os.path.join(dcp_dir, METADATA_FILE)
    if not os.path.isfile(path):
        raise DamagedCheckpoint(path, "is missing")
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f, path).load()
    except CheckpointError:
        raise
    except Exception as e:  # only allow-listed objects can be built, so any error means damage
        raise DamagedCheckpoint(path, f"is truncated or damaged ({_one_line(e)})") from None
    _check_structure(metadata, path)
    return metadata


def _check_structure(metadata, path: str) -> None:
    if not isinstance(metadata, Metadata):
        raise DamagedCheckpoint(path, f"holds a {type(metadata).__name__}, not DCP metadata")
    entries = metadata.state_dict_metadata
    if not isinstance(entries, dict) or not isinstance(metadata.storage_data, dict):
        raise DamagedCheckpoint(path, "is damaged (its entry tables are not dicts)")
    for fqn, md in entries.items():
        if not isinstance(md, TensorStorageMetadata):
            raise DamagedCheckpoint(path, f"stores {fqn!r} as a {type(md).__name__}; megaswift stores tensors only",
                                    _REFUSED_FIX)
    for index, info in metadata.storage_data.items():
        if not isinstance(info, _StorageInfo):
            raise DamagedCheckpoint(path, f"is damaged (storage entry {type(info).__name__})")
        name = info.relative_path
        # DCP joins this to the directory and opens it: a path could read any file on the machine
        if not isinstance(name, str) or name in ("", ".", "..") or os.path.basename(name) != name:
            raise DamagedCheckpoint(path, f"points {getattr(index, 'fqn', index)!r} at {name!r}, "
                                          "which is not a file of this directory", _REFUSED_FIX)
        if not (_is_count(info.offset) and _is_count(info.length)):
            raise DamagedCheckpoint(path, f"is damaged (byte range {info.offset!r}+{info.length!r} of {name})")
        # DCP would decode the bytes with the named extensions; megaswift never writes any
        if info.transform_descriptors:
            raise DamagedCheckpoint(path, f"asks for transforms {list(info.transform_descriptors)} on {name}; "
                                          "megaswift writes none", _REFUSED_FIX)


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def check_dcp_files(dcp_dir: str, metadata: Metadata) -> None:
    """Every storage file the metadata names exists and is long enough for the bytes it is said
    to hold (one stat per file; the tensor bytes themselves are not read)."""
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    md_path = os.path.join(dcp_dir, METADATA_FILE)
    for name, end in sorted(needed.items()):
        path = os.path.join(dcp_dir, name)
        if not os.path.isfile(path):
            raise DamagedCheckpoint(path, f"is missing (named by {md_path})")
        size = os.path.getsize(path)
        if size < end:
            raise DamagedCheckpoint(path, f"is truncated ({size} bytes; {md_path} needs {end})")


def check_dcp(dcp_dir: str) -> Metadata:
    """The cheap integrity check of one DCP directory: readable metadata, complete files."""
    metadata = read_dcp_metadata(dcp_dir)
    check_dcp_files(dcp_dir, metadata)
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """A FileSystemReader whose metadata went through `check_dcp` when it was built.

    Loads that use it never fall back to DCP's per-rank `__<rank>.metadata` files (megaswift does
    not write them), because the global metadata is always there by the time DCP asks."""

    def __init__(self, path: str):
        super().__init__(path)
        self._metadata = check_dcp(str(self.path))

    def reset(self, checkpoint_id=None) -> None:
        super().reset(checkpoint_id)
        if checkpoint_id:
            self._metadata = check_dcp(str(self.path))

    def read_metadata(self, *args, **kwargs) -> Metadata:
        # as FileSystemReader.read_metadata does after unpickling: tag the metadata with this load
        if getattr(self._metadata, "storage_meta", None) is None:
            self._metadata.storage_meta = StorageMeta()
        self._metadata.storage_meta.load_id = self.load_id
        return self._metadata
