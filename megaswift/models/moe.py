"""Mixture-of-experts MLP: a router, SwiGLU experts, and the load-balancing loss.

The router comes from the registry in models/routers.py (ModelConfig.moe_router); today's
`softmax_topk` follows transformers' Qwen3-MoE and Mixtral exactly (softmax in fp32 over a
linear gate, top-k, optional renormalisation), so `megaswift verify` compares logits with theirs.

The load-balancing loss (`moe.aux_loss_type`) is either

- `global`: transformers' `load_balancing_loss_func`: with f_e the share of top-k assignments
  that go to expert e and P_e the mean router probability of e, both taken over every MoE layer
  and every (non-padding) token at once, aux = E x sum_e f_e P_e;
- `seq`: DeepSeek-V3's sequence-wise balance loss: per MoE layer and per batch row with T real
  tokens, f_e = E / (k T) x #{t : e in top-k(t)} and P_e = mean_t p_e,t; the loss is
  sum_e f_e P_e averaged over the rows of the global micro batch, summed over the layers;

added to the loss as coefficient x aux.

Because both couple tokens that sit on other ranks, and the global one couples layers that may
sit on different pipeline stages, each layer adds one row of statistics to a small tensor that
travels with the hidden states (`[MoE layers, 2E + 2]`: probability sums, the z-loss sum,
assignment counts, token count; `seq` keeps them per batch row, `[MoE layers, rows, 2E + 2]`);
the last stage turns it into the loss (`aux_loss_parts`, `seq_aux_loss_parts`), and the
gradient flows back through the same tensor to every router. The counts are reduced over every
rank that holds tokens of the micro batch (dp x cp x tp; per row: the tp x cp ranks that share
the row), so the loss is the one of the global micro batch, whatever the layout.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from megaswift.parallel.collectives import all_reduce
from megaswift.parallel.experts import balanced_counts, capacity_keep, clamped_swiglu, dispatch_combine, swiglu
from megaswift.parallel.grads import mark_tp_partial_grad
from megaswift.parallel.state import ParallelState
from megaswift.parallel.tp_comm import gather_from_tp_region, group_size, scatter_to_sp_region

from .config import ModelConfig
from .mlp import MLP
from .routers import balanced_ids, build_router
from .sharding import layout_on


def stats_width(num_experts: int) -> int:
    return 2 * num_experts + 2


def stats_shape(num_layers: int, num_experts: int, rows: int | None = None) -> tuple[int, ...]:
    """Shape of the statistics a micro batch carries through the layers: [MoE layers, 2E + 2],
    or with `rows` (moe.aux_loss_type seq) one set per batch row, [MoE layers, rows, 2E + 2]."""
    width = stats_width(num_experts)
    return (num_layers, width) if rows is None else (num_layers, rows, width)


def layer_stats(logits: Tensor, probs: Tensor, ids: Tensor, mask: Tensor | None, rows: int | None = None) -> Tensor:
    """One layer's row [P sums (E) | z sum | counts (E) | tokens] over this rank's tokens; the
    sums carry gradients, counts and tokens do not. `mask` [T] is 1 for real tokens. With
    `rows`, the T tokens are `rows` batch rows of T / rows tokens each (row-major) and the
    result is one such row per batch row, [rows, 2E + 2]."""
    E = probs.shape[-1]
    m = torch.ones(probs.shape[0], device=probs.device) if mask is None else mask.float()
    if rows is not None:
        return _per_row_stats(logits, probs, ids, m, rows)
    p_sum = (probs * m.unsqueeze(1)).sum(0)
    z_sum = (torch.logsumexp(logits.float(), dim=-1).square() * m).sum()
    with torch.no_grad():
        counts = torch.zeros(E, device=probs.device).index_add_(
            0, ids.reshape(-1), m.repeat_interleave(ids.shape[1]))
    return torch.cat([p_sum, z_sum.view(1), counts, m.sum().view(1)])


def _per_row_stats(logits: Tensor, probs: Tensor, ids: Tensor, m: Tensor, rows: int) -> Tensor:
    T, E = probs.shape
    p_sum = (probs * m.unsqueeze(1)).view(rows, -1, E).sum(1)
    z_sum = (torch.logsumexp(logits.float(), dim=-1).square() * m).view(rows, -1).sum(1)
    with torch.no_grad():
        row_of = torch.arange(rows, device=probs.device).repeat_interleave(T // rows)
        slots = (row_of.unsqueeze(1) * E + ids).reshape(-1)
        counts = torch.zeros(rows * E, device=probs.device).index_add_(
            0, slots, m.repeat_interleave(ids.shape[1])).view(rows, E)
    return torch.cat([p_sum, z_sum.unsqueeze(1), counts, m.view(rows, -1).sum(1, keepdim=True)], dim=1)


def load_balancing_loss(counts: Tensor, p_sum: Tensor, tokens: Tensor, num_experts: int) -> Tensor:
    """transformers' aux loss from summed statistics: counts and p_sum [E] summed over layers
    and tokens, `tokens` the number of (layer, token) rows they sum over."""
    return num_experts * torch.sum((counts / tokens) * (p_sum / tokens))


@torch.no_grad()
def _summed_over(stats: Tensor, groups) -> Tensor:
    """A detached copy of the statistics, summed over each process group in turn."""
    out = stats.detach().clone()
    for group in groups:
        if group_size(group) > 1:
            all_reduce(out, group=group)
    return out


def aux_loss_parts(stats: Tensor, num_experts: int, group_list) -> tuple[Tensor, Tensor, dict]:
    """This rank's differentiable parts of the load-balancing loss and the z-loss, whose sums
    over the token-holding ranks are the global micro batch's losses, and their reduced
    values for the metrics.

    stats [L, 2E + 2] (rows as `layer_stats`). The counts are global (all-reduced over
    `group_list`); the probability sums are local, so the local part is linear in them and the
    gradient of the sum over ranks reaches every rank's routers exactly."""
    E, L = num_experts, stats.shape[0]
    glob = _summed_over(stats, group_list)
    counts, tokens = glob[:, E + 1: 2 * E + 1].sum(0), glob[:, -1].sum().clamp_min(1)
    aux_part = load_balancing_loss(counts, stats[:, :E].sum(0), tokens, E)
    # z-loss (Zoph et al. 2022) per layer, mean over tokens, summed over layers as in Megatron
    z_part = stats[:, E].sum() * L / tokens
    # kept on the device: a float() here would stop the host at every micro batch; the engine
    # reads them once per step
    values = {"aux": load_balancing_loss(counts, glob[:, :E].sum(0), tokens, E),
              "z": glob[:, E].sum() * L / tokens, "counts": glob[:, E + 1: 2 * E + 1]}
    return aux_part, z_part, values


def seq_aux_loss_parts(stats: Tensor, num_experts: int, topk: int, row_groups,
                       batch_group) -> tuple[Tensor, Tensor, dict]:
    """As `aux_loss_parts`, for DeepSeek-V3's sequence-wise balance loss (moe.aux_loss_type
    seq): per layer, sum_e f_e P_e of each batch row, averaged over the rows of the global micro
    batch that hold a real token, summed over the layers.

    stats [L, rows, 2E + 2] (rows as `layer_stats(..., rows=)`): this rank's tokens of each of
    its rows. A row's tokens are spread over `row_groups` (tp: SP or the MoE tp split; cp), so
    its counts and token number are reduced there; the other rows of the global micro batch
    are on `batch_group` (dp). Row r's loss is E / (k T_r^2) x sum_e c_re x S_re with S_re the
    sum of p_e over the row's tokens: linear in this rank's share of S, so this rank's part
    uses its local sums (with the row's global counts and T) and the parts of all ranks add up
    to the loss, gradients included. The z-loss and the counts are the global ones, as there."""
    E, L = num_experts, stats.shape[0]
    full = _summed_over(stats, row_groups)
    with torch.no_grad():
        counts, tokens = full[..., E + 1: 2 * E + 1], full[..., -1]
        real = (tokens > 0).float()  # a row of padding only is no sequence to balance
        weight = counts * (real * E / (topk * tokens.clamp_min(1).square())).unsqueeze(-1)  # [L, rows, E]
        # one reduction over dp: the layout's sums, each layer's row losses (from the rows' whole
        # P sums: the value to report), the number of real rows
        totals = torch.cat([full.sum(1).reshape(-1), (weight * full[..., :E]).sum((1, 2)), real[0].sum().view(1)])
        if group_size(batch_group) > 1:
            all_reduce(totals, group=batch_group)
        glob = totals[: full.shape[-1] * L].view(L, -1)
        row_losses, n_rows = totals[glob.numel(): glob.numel() + L], totals[-1].clamp_min(1)
    aux_part = (weight * stats[..., :E]).sum() / n_rows
    tokens_all = glob[:, -1].sum().clamp_min(1)
    z_part = stats[..., E].sum() * L / tokens_all
    values = {"aux": row_losses.sum() / n_rows, "z": glob[:, E].sum() * L / tokens_all,
              "counts": glob[:, E + 1: 2 * E + 1]}
    return aux_part, z_part, values


class AttachAuxLoss(torch.autograd.Function):
    """Returns `output` unchanged; in backward the auxiliary loss gets gradient `scale`, as if
    `scale x aux` had been added to the loss (Megatron's MoEAuxLossAutoScaler). The engine's
    loss is a per-token sum normalised by the global batch; the aux loss is a per-micro-batch
    mean, so it joins the gradient here rather than the per-token loss."""

    @staticmethod
    def forward(ctx, output, aux, scale):
        ctx.save_for_backward(aux)
        ctx.scale = scale
        return output

    @staticmethod
    def backward(ctx, grad):
        (aux,) = ctx.saved_tensors
        return grad, torch.full_like(aux, ctx.scale), None


class GroupedLinear(nn.Module):
    """One weight [local experts, out, in] for all of a rank's experts, and optionally a bias
    [local experts, out] (gpt-oss)."""

    def __init__(self, shape, dtype=None, device=None, bias_shape=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(shape, dtype=dtype, device=device))
        self.weight.expert = True  # reduced over expert-dp, not dp (parallel/data_parallel.py)
        self.bias = None
        if bias_shape is not None:
            self.bias = nn.Parameter(torch.zeros(bias_shape, dtype=dtype, device=device))
            self.bias.expert = True
        self.lora = None  # parallel/lora.py: merged into the weight at each forward

    def effective_weight(self) -> Tensor:
        if self.lora is not None and self.lora.enabled:
            return self.lora.merged(self.weight)
        return self.weight


class Experts(nn.Module):
    def __init__(self, cfg: ModelConfig, st: ParallelState, layer_idx: int, dtype=None, device=None):
        super().__init__()
        p = f"decoder.layers.{layer_idx}.mlp.experts."

        def bias(name):
            return layout_on(p + name, cfg, st).local_shape if cfg.moe_expert_bias else None
        self.linear_fc1 = GroupedLinear(layout_on(p + "linear_fc1.weight", cfg, st).local_shape, dtype, device,
                                        bias("linear_fc1.bias"))
        self.linear_fc2 = GroupedLinear(layout_on(p + "linear_fc2.weight", cfg, st).local_shape, dtype, device,
                                        bias("linear_fc2.bias"))
        if self.linear_fc2.bias is not None and group_size(st.etp_group) > 1:
            # whole on every etp rank, added by the first (parallel/experts.py): summed over etp
            self.linear_fc2.bias.etp_partial_grad = True
        self.act = (clamped_swiglu(cfg.moe_swiglu_limit, cfg.moe_swiglu_alpha)
                    if cfg.moe_activation == "clamped_swiglu" else swiglu)


class MoELayer(nn.Module):
    """Router + experts for one layer: the `moe` MLP block (models/blocks.py). Takes [b, s, h]
    (or [b, s/tp, h] under sequence parallelism) and returns the same shape, with the layer's
    router statistics added to its row `stats_row` of `moe_stats` (when given).

    Run-time switches, set in __init__: `capacity_factor`, `backend` and `force_balance`
    (set_moe_options), `whole_sequence` (generation: every tp rank routes all tokens itself)."""

    def __init__(self, cfg: ModelConfig, st: ParallelState, layer_idx: int, dtype=None, device=None):
        super().__init__()
        self.cfg, self.st = cfg, st
        self.stats_row = cfg.moe_layers.index(layer_idx)
        self.router = build_router(cfg, dtype, device)
        self.experts = Experts(cfg, st, layer_idx, dtype, device)
        self.capacity_factor: float | None = None  # set_moe_options
        self.backend = "auto"
        self.force_balance = False  # moe.router_force_balance: benchmarks and dry runs only
        self.whole_sequence = False  # generation (rollout/): every tp rank routes all tokens itself
        # Each tp rank routes its own share of the tokens (its sequence shard under SP, else a
        # split of the replicated sequence), so the router's gradient is a partial sum over tp.
        if st.tp_size > 1:
            mark_tp_partial_grad(self.router.weight)
            if getattr(self.router, "bias", None) is not None:
                mark_tp_partial_grad(self.router.bias)
        self.shared_expert = self.shared_expert_gate = None
        if cfg.moe_shared_expert_ffn_hidden_size:  # every token also takes a dense MLP
            self.shared_expert = MLP(cfg, st, layer_idx, dtype, device, width=cfg.moe_shared_expert_ffn_hidden_size)
            if cfg.moe_shared_expert_gate:  # Qwen2-MoE gates it; DeepSeek-V3 and GLM-4.5 do not
                self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False, dtype=dtype, device=device)
                if st.sp:  # the gate sees only this rank's sequence shard
                    mark_tp_partial_grad(self.shared_expert_gate.weight)

    def set_moe_options(self, capacity_factor: float | None = None, backend: str = "auto",
                        force_balance: bool = False) -> None:
        self.capacity_factor, self.backend, self.force_balance = capacity_factor, backend, force_balance

    def forward(self, x: Tensor, token_mask: Tensor | None = None,
                moe_stats: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        per_row = moe_stats is not None and moe_stats.dim() == 3  # moe.aux_loss_type seq
        out, row = self._routed(x, token_mask, per_row)
        if self.shared_expert is not None:  # on the layer's input as it comes (tp-split like any MLP)
            shared = self.shared_expert(x)[0]
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        if moe_stats is not None:
            hot = torch.zeros(moe_stats.shape[0], *(1,) * row.dim(), device=row.device)
            hot[self.stats_row] = 1
            moe_stats = moe_stats + hot * row
        return out, moe_stats

    def _routed(self, x: Tensor, token_mask: Tensor | None, per_row: bool = False) -> tuple[Tensor, Tensor]:
        st, cfg = self.st, self.cfg
        split = st.tp_size > 1 and not st.sp and not self.whole_sequence  # replicated: each rank takes 1/tp
        if split:
            x = scatter_to_sp_region(x, st.tp_group, dim=1)
        if token_mask is not None and st.tp_size > 1 and not self.whole_sequence:
            token_mask = token_mask.chunk(st.tp_size, dim=1)[st.tp_rank]
        b, s, h = x.shape
        flat = x.reshape(b * s, h)
        logits, probs, weights, ids = self.router(flat)
        keep = uniform = None
        if self.force_balance:
            # the router still weighs each token's (imposed) experts, so it trains and its
            # memory and compute stay in the step; no expert exceeds ceil(T k / E), so a
            # capacity factor >= 1 (config.py checks) drops nothing
            ids = balanced_ids(b * s, ids.shape[1], cfg.num_moe_experts, flat.device)
            weights = probs.gather(1, ids)
            if cfg.moe_norm_topk_prob:
                weights = weights / weights.sum(dim=-1, keepdim=True)
            uniform = balanced_counts(ids.numel(), cfg.num_moe_experts)
        elif self.capacity_factor is not None:
            keep = capacity_keep(ids, weights, cfg.num_moe_experts, self.capacity_factor)
        out = dispatch_combine(flat, ids, weights.to(x.dtype), cfg.num_moe_experts,
                               self.experts.linear_fc1.effective_weight(), self.experts.linear_fc2.effective_weight(),
                               keep=keep, ep_group=st.ep_group, etp_group=st.etp_group, backend=self.backend,
                               uniform_counts=uniform, b1=self.experts.linear_fc1.bias,
                               b2=self.experts.linear_fc2.bias, act=self.experts.act).view(b, s, h)
        if split:
            out = gather_from_tp_region(out, st.tp_group, dim=1)
        mask = None if token_mask is None else token_mask.reshape(-1)
        return out, layer_stats(logits, probs, ids, mask, rows=b if per_row else None)
