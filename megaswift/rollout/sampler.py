"""The built-in rollout engine: batched sampling from the training model, under its own layout.

No second copy of the weights and no weight push: the model that trains is the model that
samples, so the rollouts always come from the current policy. Prompts are left-padded into one
batch; the first forward fills the KV cache (models/kv_cache.py) with every prompt, then each
step feeds one token per row. Layouts:
- TP: every tp rank gathers the last position's vocab-parallel logits ([rows, vocab], small) and
  samples the same token with the same generator, so the ranks stay in step without a broadcast.
  Sequence parallelism and the MoE 1/tp token split are off while generating (generation_mode).
- PP: the stages run one after another (the model's forward_without_schedule); the last stage
  samples and broadcasts tokens and log-probabilities over the pp group.
- CP: every cp rank generates the same rows (weights are whole on each), so nothing is split.
- DP: each dp rank generates its own rows.

Determinism: each row draws its uniforms from its own torch.Generator seeded by the caller (GRPO
seeds by the run seed, rollout number and the row's global index) and samples by inverse CDF on
the CPU, so a row's completion depends on its seed and the model's logits only, not on the
layout or on which rows share its batch.

Log-probabilities are those of the full softmax of logits / temperature (TRL's convention, what
the trainer recomputes), not of the top-k/top-p filtered distribution the token was drawn from.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megaswift.models.kv_cache import KVCache
from megaswift.parallel.collectives import all_reduce, broadcast
from megaswift.parallel.tp_comm import gather_from_tp_region, group_size


@dataclass
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0
    """0 = greedy (log-probabilities then at temperature 1)."""
    top_p: float = 1.0
    top_k: int = 0
    """0 = no top-k filter."""
    stop_token_ids: tuple[int, ...] = ()
    """A row stops after sampling one of these (kept in its completion, as TRL keeps the EOS)."""
    stop_strings: tuple[str, ...] = ()
    """A row stops once its decoded completion contains one of these (needs a tokenizer)."""


@dataclass
class Generation:
    completion_ids: list[list[int]] = field(default_factory=list)
    logps: list[list[float]] = field(default_factory=list)
    truncated: list[bool] = field(default_factory=list)
    """True where the row hit max_new_tokens without stopping."""


@torch.no_grad()
def generate(model, prompts: list[list[int]], params: SamplingParams, seeds: list[int], *, pad_id: int = 0,
             tokenizer=None) -> Generation:
    """Complete every prompt (token ids) on this rank's model; every rank of a model replica
    (tp, pp, cp) must call this with the same prompts and seeds."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    if params.stop_strings and tokenizer is None:
        raise ValueError("stop strings need the tokenizer to decode completions")
    dev = _device(model)
    b, n_new = len(prompts), params.max_new_tokens
    width = max(len(p) for p in prompts)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    valid = torch.zeros(b, width, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        valid[i, width - len(p):] = True
    positions = (valid.long().cumsum(1) - 1).clamp_min(0)
    next_pos = valid.sum(1)  # position of each row's next token
    # each row's uniforms for every step, drawn up front from its own generator (inverse-CDF
    # sampling then needs no per-row call in the loop)
    uniforms = torch.stack([torch.rand(n_new, generator=torch.Generator().manual_seed(int(s)), dtype=torch.float64)
                            for s in seeds]) if b else torch.zeros(0, n_new, dtype=torch.float64)
    cache = KVCache(b, width + n_new, device=dev)
    out = Generation([[] for _ in range(b)], [[] for _ in range(b)], [True] * b)
    done = torch.zeros(b, dtype=torch.bool)
    saved_temperature = model.logits_temperature
    model.logits_temperature = params.temperature if params.temperature > 0 else 1.0
    try:
        with model.generation_mode():
            for step in range(n_new):
                cache.begin(valid.to(dev), positions.to(dev))
                logits = _forward(model, ids.to(dev), positions.to(dev), cache)
                cache.advance()
                tokens, logps = _sample_on_last_stage(model, logits, params, uniforms[:, step])
                for i in range(b):
                    if done[i]:
                        continue
                    t = int(tokens[i])
                    out.completion_ids[i].append(t)
                    out.logps[i].append(float(logps[i]))
                    if t in params.stop_token_ids or _hits_stop_string(out.completion_ids[i], params, tokenizer):
                        done[i] = True
                        out.truncated[i] = False
                if _all_done(done, model):
                    break
                # next forward: one token per row; finished rows feed padding that nothing sees
                ids = torch.where(done, pad_id, tokens.long()).view(b, 1)
                valid = (~done).view(b, 1)
                positions = next_pos.view(b, 1).clone()
                next_pos = next_pos + 1
    finally:
        model.logits_temperature = saved_temperature
    return out


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _forward(model, ids, positions, cache):
    """The last stage's logits; None on ranks without it (pipeline stages)."""
    return model.forward_without_schedule(input_ids=ids, position_ids=positions, kv_cache=cache)


def _sample_on_last_stage(model, logits, params: SamplingParams, u) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [b], log-probabilities [b] float64) on every rank of the replica."""
    st = model.st
    b = u.shape[0]
    result = torch.zeros(b, 2, dtype=torch.float64)
    if logits is not None:
        last = gather_from_tp_region(logits[:, -1].float().contiguous(), st.tp_group, dim=-1)
        last = last[:, : model.cfg.vocab_size].cpu()
        tokens, logps = sample(last, params, u)
        result[:, 0], result[:, 1] = tokens.double(), logps.double()
    if group_size(st.pp_group) > 1:  # the last stage's owner tells the other stages
        owner = st.group_ranks["pp"][model.owner(model.num_stages - 1)]
        buf = result.to(_device(model))
        broadcast(buf, src=owner, group=st.pp_group)
        result = buf.cpu()
    return result[:, 0].long(), result[:, 1]


def sample(logits: torch.Tensor, params: SamplingParams, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of `logits` [b, vocab] (already divided by the temperature), drawn by
    inverse CDF with the row's uniform u [b] in [0, 1), and its log-probability under the
    unfiltered softmax. A token of zero probability (filtered out) is never drawn."""
    logp_all = torch.log_softmax(logits, dim=-1)
    if params.temperature <= 0:
        tokens = logits.argmax(-1)
    else:
        probs = torch.softmax(_filter(logits, params.top_k, params.top_p), dim=-1).double()
        cdf = probs.cumsum(-1)
        target = (u.double() * cdf[:, -1]).unsqueeze(-1)
        tokens = torch.searchsorted(cdf, target, right=True)[:, 0].clamp_max(logits.shape[-1] - 1)
    return tokens, logp_all.gather(1, tokens[:, None])[:, 0]


def _filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Logits outside the top-k, or outside the smallest set whose probability reaches top_p,
    become -inf (the most likely token always stays)."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = probs.cumsum(-1) - probs  # probability of the tokens ranked above each one
        drop_sorted = before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _hits_stop_string(completion: list[int], params: SamplingParams, tokenizer) -> bool:
    if not params.stop_strings:
        return False
    text = tokenizer.decode(completion, skip_special_tokens=False)
    return any(s in text for s in params.stop_strings)


def _all_done(done: torch.Tensor, model) -> bool:
    """Every row finished. With expert parallelism every rank of an ep group must run each
    forward (the token exchange is collective), and ep groups span dp ranks, which generate
    different rows: they stop together, when all have finished."""
    st = model.st
    finished = bool(done.all())
    if st.ep_size > 1 and group_size(st.dp_group) > 1:
        flag = torch.tensor([0.0 if finished else 1.0], device=_device(model))
        all_reduce(flag, group=st.dp_group)
        finished = flag.item() == 0
    return finished
