"""Tiny FP8 block-quantized checkpoints and multi-token-prediction layers, for tests.

`make_fp8_hf` turns a tiny HF checkpoint (testing/tiny.py) into the format DeepSeek-V3 and
Kimi-K2 publish: 2-D linear weights float8_e4m3fn with a float32 `*.weight_scale_inv` grid, the
rest bf16, config.json's quantization_config. A small block size (tests use sizes the tiny
dimensions are not multiples of) gives several blocks per tensor and partial ones at the edges.
`add_mtp_layer` adds pass-through tensors (an MTP layer after the last decoder layer).
"""
from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file

from megaswift.convert import fp8

INDEX = "model.safetensors.index.json"


def _weight_map(hf_dir: str) -> dict[str, str]:
    index = os.path.join(hf_dir, INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            return json.load(f)["weight_map"]
    return {k: "model.safetensors" for k in load_file(os.path.join(hf_dir, "model.safetensors"))}


def _write_index(hf_dir: str, weight_map: dict[str, str]) -> None:
    total = sum(os.path.getsize(os.path.join(hf_dir, f)) for f in set(weight_map.values()))
    with open(os.path.join(hf_dir, INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def make_fp8_hf(src_dir: str, out_dir: str, block: tuple[int, int] = (8, 8)) -> str:
    """Write an fp8 block-quantized copy of the HF checkpoint in `src_dir` to `out_dir` (same
    shards, each quantized weight's grid in its weight's file) and return `out_dir`. Which
    tensors are quantized, and how, is export's rule (convert/fp8.py)."""
    def quantize(name, t):
        if not fp8.quantizable(name, t.shape):
            return None
        q, scale = fp8.quantize(name, t, block)
        return {name: q, name + fp8.SCALE_SUFFIX: scale}
    return quantized_copy(src_dir, out_dir, quantize, fp8.quantization_config(block))


def quantized_copy(src_dir: str, out_dir: str, quantize, quantization_config: dict) -> str:
    """A copy of the HF checkpoint in `src_dir` in `out_dir`, same shards: `quantize(name, t)`
    gives the stored tensors of a quantized one (None: not quantized), every other floating
    tensor becomes bf16; the other files are copied, config.json gets `quantization_config`."""
    os.makedirs(out_dir, exist_ok=True)
    weight_map = _weight_map(src_dir)
    new_map = {}
    for fname in sorted(set(weight_map.values())):
        out = {}
        for name, t in load_file(os.path.join(src_dir, fname)).items():
            stored = quantize(name, t)
            if stored is None:
                stored = {name: t.to(torch.bfloat16) if t.is_floating_point() else t}
            out.update(stored)
        save_file(out, os.path.join(out_dir, fname), metadata={"format": "pt"})
        new_map.update({k: fname for k in out})
    _write_index(out_dir, new_map)
    for name in os.listdir(src_dir):
        path = os.path.join(src_dir, name)
        if os.path.isfile(path) and not name.endswith(".safetensors") and name not in (INDEX, "config.json"):
            shutil.copy2(path, os.path.join(out_dir, name))
    with open(os.path.join(src_dir, "config.json")) as f:
        config = json.load(f)
    config.update(torch_dtype="bfloat16", dtype="bfloat16", quantization_config=quantization_config)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return out_dir


def add_mtp_layer(hf_dir: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Give the HF checkpoint in `hf_dir` one multi-token-prediction layer, as DeepSeek-V3 stores
    it (`num_nextn_predict_layers: 1`, tensors of the layer after the last): an enorm, an hnorm,
    eh_proj and an attention projection, of odd shapes, in a shard of their own. Returns them."""
    with open(os.path.join(hf_dir, "config.json")) as f:
        config = json.load(f)
    hidden, layer = config["hidden_size"], config["num_hidden_layers"]
    g = torch.Generator().manual_seed(seed)
    p = f"model.layers.{layer}."
    shapes = {"enorm.weight": (hidden,), "hnorm.weight": (hidden,), "eh_proj.weight": (hidden, 2 * hidden),
              "self_attn.q_proj.weight": (37, hidden)}
    tensors = {p + k: (0.05 * torch.randn(s, generator=g)).to(dtype) for k, s in shapes.items()}
    weight_map = _weight_map(hf_dir)
    if not os.path.isfile(os.path.join(hf_dir, INDEX)) and os.path.isfile(os.path.join(hf_dir, "model.safetensors")):
        os.replace(os.path.join(hf_dir, "model.safetensors"), os.path.join(hf_dir, "model-base.safetensors"))
        weight_map = {k: "model-base.safetensors" for k in weight_map}
    save_file(tensors, os.path.join(hf_dir, "model-mtp.safetensors"), metadata={"format": "pt"})
    weight_map.update({k: "model-mtp.safetensors" for k in tensors})
    _write_index(hf_dir, weight_map)
    config["num_nextn_predict_layers"] = 1
    with open(os.path.join(hf_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return tensors
