"""Cross entropy and target log-probabilities over vocab-sharded logits.

The output layer is column-parallel, so rank r holds logits for vocab ids
[r * V_local, (r + 1) * V_local). Gathering them would put `[b, s, V]` on every rank (V is
~150k for recent models); instead three scalars per token cross the group, as in Megatron's
`_VocabParallelCrossEntropy`: the max (for a stable log-sum-exp), then the target's logit and the
sum of exps (one all-reduce for both). The backward needs no communication: softmax - onehot is
local to each vocab slice.

Math is float32 whatever the logits' dtype: a bf16 log-sum-exp over 150k columns loses the
target's logit in rounding. Padded vocab columns must be -inf (the model fills them); they give
exp() = 0 and a zero gradient.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .tp_comm import group_rank, group_size


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group, ignore_index):
        # logits: [..., V_local], target: [...] global ids -> loss: [...] float32
        multi = group_size(group) > 1
        x = logits.float()
        v_local = x.shape[-1]
        start = group_rank(group) * v_local

        row_max = x.max(dim=-1).values
        if multi:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        x = x - row_max.unsqueeze(-1)  # out of place: never touch the caller's logits

        local_target = target - start
        owned = (local_target >= 0) & (local_target < v_local)  # False everywhere for ignore_index
        local_target = local_target.masked_fill(~owned, 0)
        target_logit = x.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).masked_fill(~owned, 0.0)
        exp = x.exp()
        sums = torch.stack([target_logit, exp.sum(dim=-1)])  # [2, ...]: one all-reduce for both
        if multi:
            dist.all_reduce(sums, group=group)
        target_logit, sum_exp = sums[0], sums[1]

        ignored = target == ignore_index
        loss = (sum_exp.log() - target_logit).masked_fill(ignored, 0.0)
        softmax = exp.div_(sum_exp.unsqueeze(-1))  # reuse exp's buffer
        ctx.save_for_backward(softmax, local_target, owned, ignored)
        ctx.logits_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_target, owned, ignored = ctx.saved_tensors
        # d loss / d logits = softmax - onehot(target), on this rank's vocab slice only
        grad = softmax.clone()
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -owned.to(grad.dtype).unsqueeze(-1))
        # masked_fill, not a multiply by 0: an ignored row may be all -inf (NaN softmax)
        grad.mul_(grad_loss.float().unsqueeze(-1)).masked_fill_(ignored.unsqueeze(-1), 0.0)
        return grad.to(ctx.logits_dtype), None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, group,
                                 ignore_index: int = -100) -> torch.Tensor:
    """Per-token loss (float32, shape `target.shape`, 0 where target == ignore_index) from this
    rank's logit slice `[..., V_local]` and global target ids. With no group (or one rank) it
    equals `F.cross_entropy(logits, target, reduction='none', ignore_index=ignore_index)`.

    Targets outside [0, V) other than ignore_index are not checked (that would need a host sync);
    they yield a loss of log-sum-exp, as if their logit were 0.
    """
    return _VocabParallelCrossEntropy.apply(logits, target, group, ignore_index)


def vocab_parallel_log_probs(logits: torch.Tensor, target: torch.Tensor, group,
                             ignore_index: int = -100) -> torch.Tensor:
    """Per-token log p(target) (float32, differentiable), 0 where target == ignore_index; the
    input of the DPO and GRPO losses."""
    return -_VocabParallelCrossEntropy.apply(logits, target, group, ignore_index)
