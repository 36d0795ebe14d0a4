"""Run the HF model (transformers) and the megaswift model on the same tokens; compare logits."""
from __future__ import annotations

import torch

from megaswift.parallel.collectives import all_gather_object, broadcast_object, initialized
from megaswift.parallel.tp_comm import gather_from_tp_region

from .hf_import import load_hf_into_model


@torch.no_grad()
def megaswift_logits(model, tokens) -> torch.Tensor | None:
    """Full-vocab logits [b, s, vocab] of a loaded megaswift model (a GPTModel or this rank's
    pipeline stages); None on ranks that do not run the last pipeline stage."""
    st, cfg = model.st, model.cfg
    model.eval()
    tokens = tokens.to(st.device)
    out = model.forward_without_schedule(input_ids=tokens)  # None on ranks without the last stage
    if out is None:
        return None
    logits = gather_from_tp_region(out, st.tp_group, dim=-1)[..., : cfg.vocab_size]
    return logits.float().cpu()


@torch.no_grad()
def hf_logits(hf_dir, dtype, tokens) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype, attn_implementation="eager")
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
