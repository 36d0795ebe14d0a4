"""What a training step holds and sends, measured the same way on real and on fake tensors.

`StepAccountant` is a dispatch mode (torch's `TorchDispatchMode`): every aten op, and every c10d
collective, passes through it. It keeps

- the live tensor bytes, by storage (views and in-place ops share one), with a weak reference on
  each storage so its bytes leave when torch frees it; the peak of the total, and what each
  category held at that peak:
    parameters   the weights (the dp buckets' flat parameter buffers, frozen weights, buffers);
    gradients    the dp buckets' gradient buffers (and ZeRO's reduce-scatter shards);
    optimizer    AdamW's exp_avg and exp_avg_sq;
    activations  everything else allocated during a forward pass (saved for backward, or not
                 yet freed);
    temporaries  everything else allocated elsewhere: backward (recomputed activations
                 included), communication buffers, the optimizer's working tensors.
  The first three are labelled by the driver (`label`); the last two follow from when a tensor
  was allocated (`torch._C._current_graph_task_id()` says whether autograd's backward is running).
- every collective's bytes, by the class of its process group (`classify`: tp, cp, ep, etp, dp,
  edp, pp, or other) and kind. The bytes of a collective are those of the buffer it runs on, as
  each rank sees it: all-reduce the tensor, all-gather the gathered output, reduce-scatter the
  full input, all-to-all the tensor sent, send and recv the tensor (see planner/comm.py).

It counts tensor bytes (`untyped_storage().nbytes()`), not what an allocator reserves: a CUDA
caching allocator rounds each block up (to 512 bytes) and keeps freed blocks, so
`torch.cuda.max_memory_allocated` reads slightly higher, and `memory_reserved` higher still.
"""
from __future__ import annotations

import weakref
from collections import defaultdict

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

CATEGORIES = ("parameters", "gradients", "optimizer", "activations", "temporaries")
LABELLED = ("parameters", "gradients", "optimizer")


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


class StepAccountant(TorchDispatchMode):
    def __init__(self, group_classes: dict | None = None):
        super().__init__()
        self._live: dict[int, list] = {}  # storage key -> [bytes, category]
        self._by_category = dict.fromkeys(CATEGORIES, 0)
        self.current = 0
        self.peak = 0
        self.peak_by_category = dict(self._by_category)
        self.in_optimizer = False  # set by the driver around optimizer.step()
        self._group_classes = {}  # id(process group) -> class name
        for group, name in (group_classes or {}).items():
            self._group_classes[id(group)] = name
        self._groups = list((group_classes or {}).keys())  # keep them alive: ids stay unique
        self.comm: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])  # (class, kind) -> [calls, bytes]
        self.counting_comm = True

    # -- memory ----------------------------------------------------------------------------------
    def _track(self, t: torch.Tensor, category: str | None = None) -> None:
        st = t.untyped_storage()
        key = st._cdata
        entry = self._live.get(key)
        if entry is not None:
            if category is not None and entry[1] != category:
                self._by_category[entry[1]] -= entry[0]
                self._by_category[category] += entry[0]
                entry[1] = category
            return
        nbytes = st.nbytes()
        if category is None:
            category = "temporaries" if self.in_optimizer or _in_backward() else "activations"
        self._live[key] = [nbytes, category]
        self._by_category[category] += nbytes
        self.current += nbytes
        weakref.finalize(st, self._free, key)
        if self.current > self.peak:
            self.peak = self.current
            self.peak_by_category = dict(self._by_category)

    def _free(self, key: int) -> None:
        entry = self._live.pop(key, None)
        if entry is not None:
            self._by_category[entry[1]] -= entry[0]
            self.current -= entry[0]

    def label(self, tensors, category: str) -> int:
        """Put the storages of `tensors` in `category` (tracking them if they were made before
        this mode); returns their bytes (each storage once)."""
        assert category in CATEGORIES, category
        seen, total = set(), 0
        for t in tensors:
            if t is None:
                continue
            self._track(t, category)
            key = t.untyped_storage()._cdata
            if key not in seen:
                seen.add(key)
                total += self._live[key][0]
        return total

    def reset_peak(self) -> None:
        """Start a new peak from what is live now (e.g. after a warm-up step)."""
        self.peak = self.current
        self.peak_by_category = dict(self._by_category)

    def live_by_category(self) -> dict[str, int]:
        return dict(self._by_category)

    # -- communication ---------------------------------------------------------------------------
    def reset_comm(self) -> None:
        self.comm.clear()

    def comm_bytes(self) -> dict[str, int]:
        """Bytes per collective class, all kinds together."""
        out: dict[str, int] = defaultdict(int)
        for (cls, _kind), (_calls, nbytes) in self.comm.items():
            out[cls] += nbytes
        return dict(out)

    def _record_collective(self, func, args) -> None:
        name = func._schema.name.split("::")[-1].rstrip("_")
        group = None
        for a in args:
            if isinstance(a, torch.ScriptObject):
                try:
                    group = dist.ProcessGroup.unbox(a)
                    break
                except RuntimeError:  # a ReduceOp, not a process group
                    continue
        cls = self._group_classes.get(id(group), "other") if group is not None else "other"
        nbytes = _collective_bytes(name, args)
        if nbytes is None:
            return
        entry = self.comm[(cls, name)]
        entry[0] += 1
        entry[1] += nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.counting_comm and func.namespace == "c10d":
            self._record_collective(func, args)
        out = func(*args, **kwargs)
        # A view or an in-place op allocates nothing: its output's storage was made elsewhere,
        # and if this mode never saw it made, it was not megaswift's (e.g. the buffer gloo's
        # worker thread copies a reduce-scatter's input into, and splits back on this thread).
        if not _returns_alias(func):
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self._track(t)
        return out


_ALIASING: dict = {}


def _returns_alias(func) -> bool:
    if func not in _ALIASING:
        _ALIASING[func] = any(r.alias_info is not None for r in func._schema.returns)
    return _ALIASING[func]


def _nbytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(y) for y in x)
    return 0


def _collective_bytes(name: str, args) -> int | None:
    """The bytes a rank's collective runs on (the module docstring's convention); None for what
    moves no tensor data (barriers, work objects)."""
    if name in ("allreduce", "allreduce_coalesced", "broadcast", "send", "recv", "recv_any_source"):
        return _nbytes(args[0])
    if name in ("allgather", "_allgather_base", "allgather_into_tensor_coalesced"):
        return _nbytes(args[0])  # the gathered output
    if name in ("_reduce_scatter_base", "reduce_scatter", "reduce_scatter_tensor_coalesced"):
        return _nbytes(args[1])  # the full input
    if name in ("alltoall_base", "alltoall"):
        return _nbytes(args[1])  # what this rank sends
    return None
