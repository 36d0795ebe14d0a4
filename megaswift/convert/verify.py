"""Run the HF model (transformers) and the megaswift model on the same tokens; compare logits."""
from __future__ import annotations

import torch

from megaswift.parallel.collectives import all_gather_object, broadcast_object, initialized
from megaswift.parallel.context_parallel import shard_batch
from megaswift.parallel.tp_comm import gather_from_sp_region, gather_from_tp_region

from .hf_import import load_hf_into_model


@torch.no_grad()
def megaswift_logits(model, tokens) -> torch.Tensor | None:
    """Full-vocab logits [b, s, vocab] of a loaded megaswift model (a GPTModel or this rank's
    pipeline stages); None on ranks that do not run the last pipeline stage. Under context
    parallelism each cp rank runs its zigzag share of the tokens, as in training, and the
    logits are gathered back into row order."""
    st, cfg = model.st, model.cfg
    model.eval()
    tokens = tokens.to(st.device)
    if st.cp_size > 1:
        return _context_parallel_logits(model, tokens)
    out = model.forward_without_schedule(input_ids=tokens)  # None on ranks without the last stage
    if out is None:
        return None
    logits = gather_from_tp_region(out, st.tp_group, dim=-1)[..., : cfg.vocab_size]
    return logits.float().cpu()


def _context_parallel_logits(model, tokens) -> torch.Tensor | None:
    st, cfg = model.st, model.cfg
    b, s = tokens.shape
    multiple = st.layout.seq_multiple(bool(cfg.moe_layers))
    if s % multiple:
        raise ValueError(f"verify under cp needs a sequence length divisible by {multiple}; got {s}")
    positions = torch.arange(s, device=tokens.device).expand(b, s)
    mb = shard_batch({"input_ids": tokens, "position_ids": positions}, st.cp_size, st.cp_rank, multiple=multiple)
    out = model.forward_without_schedule(input_ids=mb["input_ids"], position_ids=mb["position_ids"],
                                         document_ids=mb["document_ids"], cp_index=mb["cp_index"].to(tokens.device))
    if out is None:
        return None
    local = gather_from_tp_region(out, st.tp_group, dim=-1)[..., : cfg.vocab_size].float()  # [b, s/cp, V]
    every = gather_from_sp_region(local, st.cp_group, dim=1)  # the cp ranks' tokens, in rank order
    # rank r's tokens sit at positions cp_index[:, r] of the row (no padding: s divides)
    where = mb["cp_index"].reshape(b, -1, 1).expand(-1, -1, local.shape[-1]).to(local.device)
    return torch.zeros(b, s, local.shape[-1], device=local.device).scatter(1, where, every).cpu()


def hf_model_class(hf_dir):
    """transformers' class for a checkpoint, never its own code: AutoModelForCausalLM by
    model_type, or, for a model_type transformers does not know (Kimi-K2's kimi_k2, whose
    auto_map points at remote code), the transformers class its `architectures` names
    (DeepseekV3ForCausalLM)."""
    import transformers

    from .families import known_to_transformers
    from .hf_io import read_hf_config

    hf = read_hf_config(hf_dir)
    if known_to_transformers(hf.get("model_type")):
        return transformers.AutoModelForCausalLM
    for arch in hf.get("architectures") or []:
        if hasattr(transformers, arch):
            return getattr(transformers, arch)
    raise ValueError(f"transformers {transformers.__version__} has no class for model_type "
                     f"{hf.get('model_type')!r} or architectures {hf.get('architectures')}")


def load_hf_model(hf_dir, dtype, **kwargs):
    """The transformers model of a checkpoint (see hf_model_class). For an architecture reached
    through `architectures`, its own config class reads config.json, so transformers converts
    the checkpoint's tensors as it does for that architecture's own model_type."""
    from transformers import AutoModelForCausalLM

    from .hf_io import read_hf_config

    cls = hf_model_class(hf_dir)
    hf = read_hf_config(hf_dir)
    if (hf.get("quantization_config") or {}).get("quant_method") == "mxfp4":
        # dequantized on load, as megaswift reads it: never transformers' Triton path, which
        # downloads its kernels from the hub
        import transformers

        kwargs.setdefault("quantization_config", transformers.Mxfp4Config(dequantize=True))
    if cls is not AutoModelForCausalLM:
        # transformers picks how to convert a checkpoint's tensors (the hub's per-expert tensors
        # into its fused experts) by the config's model_type: give it the architecture's own
        hf = {k: v for k, v in hf.items() if k not in ("model_type", "auto_map")}
        kwargs["config"] = cls.config_class.from_dict(hf)
    return cls.from_pretrained(hf_dir, dtype=dtype, attn_implementation="eager", **kwargs)


@torch.no_grad()
def hf_logits(hf_dir, dtype, tokens) -> torch.Tensor:
    model = load_hf_model(hf_dir, dtype)
    model.eval()
    return model(tokens).logits.float()


def verify(hf_dir, model, dtype, seq_len=64, batch_size=2, seed=0, attention_backend="auto") -> dict:
    """`model` is built (empty) for the layout; it is filled from `hf_dir` here."""
    model.set_attention_backend(attention_backend)
    load_hf_into_model(model, hf_dir)
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.cfg.vocab_size, (batch_size, seq_len), generator=gen)
    ours = megaswift_logits(model, tokens)
    # one reference model is enough: the first rank holding full logits compares, the rest wait
    st = model.st
    judge = _first_rank_with_logits(ours is not None)
    result = None
    if st.rank == judge:
        diff = (ours - hf_logits(hf_dir, dtype, tokens)).abs()
        result = {"max_abs_diff": diff.max().item(), "mean_abs_diff": diff.mean().item()}
    return broadcast_object(result, src=judge)


def _first_rank_with_logits(have: bool) -> int:
    if not initialized():
        return 0
    return all_gather_object(have).index(True)
