"""Export of a LoRA run: a PEFT adapter that `peft.PeftModel.from_pretrained` loads on the HF
base model, or the base weights with the adapters merged in (export-hf --merge-lora).

A fused megaswift adapter becomes one adapter per HF module: linear_qkv's B rows go to
q_proj/k_proj/v_proj by the family's own row map (the same segments as the weight) and its A is
shared by all three, which is exactly the fused computation; linear_fc1 likewise splits into
gate_proj and up_proj.
"""
from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

from megaswift.checkpoint.model_state import META_FILE, read_canonical
from megaswift.checkpoint.safe_load import read_dcp_metadata
from megaswift.errors import CheckpointError
from megaswift.models.sharding import lora_layout

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def adapter_tensors(ckpt_dir: str, meta: dict, cfg, dtype) -> dict[str, torch.Tensor]:
    """Every canonical `<layer>.lora.A/B` tensor of the checkpoint."""
    # through the allow-listed reader: DCP's own would unpickle whatever .metadata holds
    names = [n for n in read_dcp_metadata(os.path.join(ckpt_dir, "model")).state_dict_metadata if ".lora." in n]
    rank = meta["lora"]["rank"]
    shapes = {n: lora_layout(n, cfg, rank, 1, 0).canonical_shape for n in names}
    return read_canonical(ckpt_dir, shapes, dtype)


def _layers(adapters: dict) -> list[str]:
    return sorted({n.rsplit(".lora.", 1)[0] for n in adapters})


def write_peft_adapter(ckpt_dir: str, out_dir: str, meta: dict, cfg, spec, dtype) -> dict:
    lora = meta["lora"]
    adapters = adapter_tensors(ckpt_dir, meta, cfg, torch.float32)
    tensors: dict[str, torch.Tensor] = {}
    modules = set()
    for layer in _layers(adapters):
        if ".experts." in layer:
            raise CheckpointError(f"{layer}: PEFT cannot hold adapters of grouped experts; export with --merge-lora")
        A, B = adapters[layer + ".lora.A"], adapters[layer + ".lora.B"]
        rows: dict[str, list] = {}
        for seg in spec.segments(layer + ".weight", cfg):
            rows.setdefault(seg.hf_name, []).append((seg.hf_start, B.narrow(0, seg.canon_start, seg.length)))
        for hf_name, parts in rows.items():
            parts.sort(key=lambda p: p[0])
            module = hf_name[: -len(".weight")]
            tensors[f"base_model.model.{module}.lora_A.weight"] = A.to(dtype).clone()  # each its own copy
            tensors[f"base_model.model.{module}.lora_B.weight"] = torch.cat([t for _, t in parts]).to(dtype)
            modules.add(module.rsplit(".", 1)[-1])
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora["rank"], "lora_alpha": lora["alpha"],
              "lora_dropout": lora["dropout"], "target_modules": sorted(modules), "bias": "none",
              "base_model_name_or_path": lora["base"], "fan_in_fan_out": False, "inference_mode": True,
              "use_rslora": False, "init_lora_weights": True}
    with open(os.path.join(out_dir, ADAPTER_CONFIG), "w") as f:
        json.dump(config, f, indent=2)
    return {"tensors": sum(t.numel() * t.element_size() for t in tensors.values()), "files": 1, "adapter": True}


def merged_reader(ckpt_dir: str, meta: dict, cfg, dtype):
    """A `read_group(shapes)` for export_hf: base canonical tensors (from where the run read its
    base: an HF directory or a megaswift checkpoint) plus (alpha / r) B A where adapted."""
    lora = meta["lora"]
    base = lora["base"]
    adapters = adapter_tensors(ckpt_dir, meta, cfg, torch.float32)
    scale = lora["alpha"] / lora["rank"]

    def read_base(shapes):
        if os.path.isfile(os.path.join(base, META_FILE)):
            return read_canonical(base, shapes, torch.float32)
        from megaswift.convert.families import FAMILIES
        from megaswift.convert.hf_import import read_canonical_box
        from megaswift.convert.hf_io import HFReader

        reader, spec = HFReader(base), FAMILIES[cfg.family]
        # into fp32 whatever the base stores: an fp8 base's weights dequantize to fp32
        return {n: read_canonical_box(reader, spec.segments(n, cfg), s, (0,) * len(s), s,
                                      torch.empty(s, dtype=torch.float32)) for n, s in shapes.items()}

    def read_group(shapes):
        return {n: t.to(dtype) for n, t in merge_adapters(read_base(shapes), adapters, scale).items()}
    return read_group


def merge_adapters(tensors: dict[str, torch.Tensor], adapters: dict[str, torch.Tensor], scale: float) -> dict:
    """Canonical weights with (alpha / r) B A added where `adapters` (canonical `<layer>.lora.A`
    and `.lora.B`) adapt them; grouped experts per expert."""
    out = dict(tensors)
    for name in tensors:
        layer = name[: -len(".weight")]
        if layer + ".lora.A" in adapters:
            A, B = adapters[layer + ".lora.A"], adapters[layer + ".lora.B"]
            delta = torch.bmm(B, A) if A.ndim == 3 else B @ A
            out[name] = tensors[name] + scale * delta
    return out
