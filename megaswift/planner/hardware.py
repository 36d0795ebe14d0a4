"""The planner's constants: what each GPU offers, and what fraction of it a training step gets.

Every number here is printed by `megaswift plan --explain` and can be overridden on its command
line (`--set name=value`). Sources: NVIDIA's datasheets (SXM parts; dense bf16 tensor-core peak,
without sparsity; HBM bandwidth; NVLink bandwidth per GPU and direction) and the usual cluster
fabric (one InfiniBand NIC per GPU: HDR 200 Gb/s for A100 systems, NDR 400 Gb/s for H100/H200,
XDR 800 Gb/s for B200). `memory_gib` is what torch reports as the device's total memory.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from megaswift.errors import ConfigError

GIB = 1024 ** 3


@dataclass(frozen=True)
class Hardware:
    name: str
    memory_gib: float           # device memory torch sees
    peak_tflops: float          # dense bf16 tensor-core peak
    hbm_tbps: float             # device memory bandwidth, TB/s
    nvlink_gbps: float          # intra-node bandwidth per GPU and direction, GB/s
    network_gbps: float         # inter-node bandwidth per GPU and direction, GB/s
    # what a step gets of the above (assumptions, not measurements: override them with yours)
    compute_efficiency: float = 0.40   # of peak, for matmul-heavy bf16 steps (Megatron reports 38-47% MFU on H100)
    comm_efficiency: float = 0.75      # of link bandwidth that NCCL's ring collectives reach (bus bandwidth)
    reserve_gib: float = 3.0           # CUDA context, NCCL buffers, kernels' workspaces: not tensors
    fragmentation: float = 0.05        # the caching allocator's rounding and free blocks, over the tensor peak

    @property
    def usable_bytes(self) -> float:
        """What the tensors of a step may peak at."""
        return (self.memory_gib - self.reserve_gib) * GIB / (1 + self.fragmentation)

    def explain(self) -> list[str]:
        doc = {"memory_gib": "device memory (GiB)", "peak_tflops": "dense bf16 peak (TFLOP/s)",
               "hbm_tbps": "HBM bandwidth (TB/s): the optimizer step is bound by it",
               "nvlink_gbps": "intra-node bandwidth per GPU and direction (GB/s)",
               "network_gbps": "inter-node bandwidth per GPU and direction (GB/s)",
               "compute_efficiency": "share of peak the step's compute reaches (assumption)",
               "comm_efficiency": "share of link bandwidth the collectives reach (assumption)",
               "reserve_gib": "memory that is not tensors: CUDA context, NCCL, workspaces (GiB)",
               "fragmentation": "allocator overhead on top of the tensor peak (fraction)"}
        return [f"{f.name:<20} {getattr(self, f.name)!s:<8} {doc[f.name]}" for f in fields(self) if f.name != "name"]

    def to_dict(self) -> dict:
        return asdict(self)


GPUS = {
    "a100": Hardware("A100 80GB SXM", 79.2, 312, 2.04, 300, 25),
    "h100": Hardware("H100 80GB SXM", 79.1, 989, 3.35, 450, 50),
    "h200": Hardware("H200 141GB SXM", 139.8, 989, 4.8, 450, 50),
    "b200": Hardware("B200 192GB SXM", 178.4, 2250, 8.0, 900, 100),
}


def hardware(name: str, overrides: list[str] | None = None) -> Hardware:
    """The named GPU with `name=value` overrides applied."""
    try:
        hw = GPUS[name.lower()]
    except KeyError:
        raise ConfigError(f"unknown --gpu {name!r}; known: {', '.join(GPUS)} (override any constant with --set)") from None
    known = {f.name: f.type for f in fields(hw) if f.name != "name"}
    for item in overrides or []:
        key, eq, value = item.partition("=")
        if not eq or key not in known:
            raise ConfigError(f"--set {item!r}: expected name=value with name among {', '.join(known)}")
        try:
            hw = replace(hw, **{key: float(value)})
        except ValueError:
            raise ConfigError(f"--set {item!r}: {value!r} is not a number") from None
    return hw
