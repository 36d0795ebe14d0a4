"""Run the HF model (transformers) and the megaswift model on the same tokens; compare logits."""
from __future__ import annotations

import torch
import torch.distributed as dist

from megaswift.parallel.tp_comm import gather_from_tp_region

from .hf_import import load_hf_into_model


@torch.no_grad()
def megaswift_logits(hf_dir, model_cfg, st, dtype, tokens, attention_backend="auto") -> torch.Tensor:
    """Full-vocab logits [b, s, vocab] of the megaswift model under the layout `st`."""
    from megaswift.models.decoder import GPTModel

    model = GPTModel(model_cfg, st, dtype=dtype, device=st.device)
    model.set_attention_backend(attention_backend)
    load_hf_into_model(model, hf_dir)
    model.eval()
    logits = model(tokens.to(st.device))
    logits = gather_from_tp_region(logits, st.tp_group, dim=-1)
    return logits[..., : model_cfg.vocab_size].float().cpu()


@torch.no_grad()
def hf_logits(hf_dir, dtype, tokens) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype, attn_implementation="eager")
    model.eval()
    return model(tokens).logits.float()


def verify(hf_dir, model_cfg, st, dtype, seq_len=64, batch_size=2, seed=0, attention_backend="auto") -> dict:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model_cfg.vocab_size, (batch_size, seq_len), generator=gen)
    ours = megaswift_logits(hf_dir, model_cfg, st, dtype, tokens, attention_backend)
    result = [None]
    if st.rank == 0:  # one reference model is enough; the other ranks wait for the verdict
        diff = (ours - hf_logits(hf_dir, dtype, tokens)).abs()
        result = [{"max_abs_diff": diff.max().item(), "mean_abs_diff": diff.mean().item()}]
    if dist.is_initialized():
        dist.broadcast_object_list(result, src=0)
    return result[0]
