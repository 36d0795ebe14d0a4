"""GRPO losses against a plain reference written from the papers' formulas (loops over sequences
and tokens, Python floats), and the invariance that makes them layout-independent: the sum over
any split of the batch, divided by the summed units, is the whole batch's loss."""
import math

import pytest
import torch

from megaswift.train.grpo_loss import LOSS_TYPES, aggregate, group_advantages, per_token_loss


def _batch(seed=0, B=6, T=7):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = logp + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = torch.tensor([7, 3, 5, 1, 6, 4])[:B]
    mask = (torch.arange(T) < lengths[:, None]).double()
    rewards = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0, 0.0], dtype=torch.float64)[:B]
    return logp, old, ref, mask, rewards


def reference(logp, old, ref, mask, adv, loss_type, eps, eps_high, beta, level, max_new):
    """One number per the formulas, token by token."""
    B, T = logp.shape
    per_seq, total, n_tok = [], 0.0, 0
    for i in range(B):
        toks = [t for t in range(T) if mask[i, t] > 0]
        seq_log_ratio = sum(logp[i, t] - old[i, t] for t in toks) / max(len(toks), 1)
        losses = []
        for t in toks:
            lr = seq_log_ratio if level == "sequence" else logp[i, t] - old[i, t]
            r = math.exp(float(lr))
            a = float(adv[i])
            surrogate = min(r * a, min(max(r, 1 - eps), 1 + eps_high) * a)
            d = float(ref[i, t] - logp[i, t])
            losses.append(-surrogate + beta * (math.exp(d) - d - 1))
        per_seq.append(sum(losses) / max(len(toks), 1))
        total += sum(losses)
        n_tok += len(toks)
    if loss_type == "grpo":
        return sum(per_seq) / B
    if loss_type in ("bnpo", "dapo"):
        return total / n_tok
    return total / (B * max_new)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_losses_equal_the_formulas(loss_type, level):
    logp, old, ref, mask, rewards = _batch()
    adv = group_advantages(rewards, 3)
    l, _ = per_token_loss(logp, old, adv, mask, epsilon=0.2, epsilon_high=0.28, beta=0.05, ref_logp=ref, level=level)
    total, units = aggregate(l, mask, loss_type, max_new_tokens=7)
    want = reference(logp, old, ref, mask, adv, loss_type, 0.2, 0.28, 0.05, level, 7)
    assert (total / units).item() == pytest.approx(want, rel=1e-12)


def test_gradients_equal_the_formulas():
    """d loss / d logp from autograd equals the derivative of the written-out formula, by
    central differences on the reference (float64)."""
    logp, old, ref, mask, rewards = _batch(seed=1)
    adv = group_advantages(rewards, 3)
    x = logp.clone().requires_grad_()
    l, _ = per_token_loss(x, old, adv, mask, epsilon=0.2, beta=0.1, ref_logp=ref)
    total, units = aggregate(l, mask, "grpo", 7)
    (total / units).backward()
    h = 1e-6
    for i, t in [(0, 0), (0, 6), (1, 2), (2, 4), (4, 1)]:
        up, down = logp.clone(), logp.clone()
        up[i, t] += h
        down[i, t] -= h
        num = (reference(up, old, ref, mask, adv, "grpo", 0.2, 0.2, 0.1, "token", 7)
               - reference(down, old, ref, mask, adv, "grpo", 0.2, 0.2, 0.1, "token", 7)) / (2 * h)
        assert x.grad[i, t].item() == pytest.approx(num, rel=1e-5, abs=1e-9)
    assert x.grad[1, 5] == 0  # masked-out tokens get no gradient


def test_advantages_by_scale():
    r = torch.tensor([1.0, 0.0, 0.0, 2.0, 2.0, 2.0])
    g = group_advantages(r, 3, "group")
    assert torch.allclose(g[:3], (r[:3] - r[:3].mean()) / (r[:3].std() + 1e-4))
    assert torch.all(g[3:] == 0)  # no variance in the group: no signal
    assert torch.allclose(group_advantages(r, 3, "none"), torch.tensor([2 / 3, -1 / 3, -1 / 3, 0, 0, 0]))
    b = group_advantages(r, 3, "batch")
    assert torch.allclose(b, torch.tensor([2 / 3, -1 / 3, -1 / 3, 0, 0, 0]) / (r.std() + 1e-4))
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(r, 4)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_split_batches_sum_to_the_whole(loss_type):
    """Summing (sum, units) over any split of the batch (micro batches, dp ranks) gives the
    whole batch's loss: the engine's normalisation is layout-independent."""
    logp, old, ref, mask, rewards = _batch(seed=2)
    adv = group_advantages(rewards, 2)
    whole = aggregate(*per_token_loss(logp, old, adv, mask)[:1], mask, loss_type, 7)
    parts = [aggregate(*per_token_loss(logp[s], old[s], adv[s], mask[s])[:1], mask[s], loss_type, 7)
             for s in (slice(0, 1), slice(1, 4), slice(4, 6))]
    assert (sum(p[0] for p in parts) / sum(p[1] for p in parts)).item() == pytest.approx(
        (whole[0] / whole[1]).item(), rel=1e-12)


def test_clip_statistics_count_the_held_tokens():
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.0]], dtype=torch.float64))
    old = torch.zeros_like(logp)
    mask = torch.ones_like(logp)
    _, pos = per_token_loss(logp, old, torch.tensor([1.0]), mask, epsilon=0.2)
    _, neg = per_token_loss(logp, old, torch.tensor([-1.0]), mask, epsilon=0.2)
    assert pos["clipped_high"] == 1 and pos["clipped_low"] == 0
    assert neg["clipped_low"] == 1 and neg["clipped_high"] == 0


def trl_grpo_loss(logp, old, ref, mask, adv, loss_type, eps, eps_high, beta, level, max_new):
    """TRL 1.x keeps its GRPO losses inside GRPOTrainer._compute_loss; call that with a stand-in
    trainer whose model returns our per-token log-probabilities."""
    from collections import defaultdict
    from types import SimpleNamespace

    from trl import GRPOTrainer

    class Acc:
        device, num_processes, sync_gradients = torch.device("cpu"), 1, True

        def gather(self, x):
            return x
        gather_for_metrics = gather

        def reduce(self, x, reduction="sum"):
            return x

    B, T = logp.shape
    stub = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level=level, beta=beta,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1), loss_type=loss_type,
        epsilon_low=eps, epsilon_high=eps_high, use_vllm=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=max_new, accelerator=Acc(),
        _entropy_bonus_enabled=False, aux_loss_enabled=False, _metrics=defaultdict(lambda: defaultdict(list)))
    inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask.long(),
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": mask.sum()}
    return GRPOTrainer._compute_loss(stub, None, inputs)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_losses_equal_trl(loss_type, level):
    logp, old, ref, mask, rewards = _batch(seed=3)
    adv = group_advantages(rewards, 3)
    l, _ = per_token_loss(logp, old, adv, mask, epsilon=0.2, epsilon_high=0.28, beta=0.05, ref_logp=ref, level=level)
    total, units = aggregate(l, mask, loss_type, max_new_tokens=7)
    want = trl_grpo_loss(logp, old, ref, mask, adv, loss_type, 0.2, 0.28, 0.05, level, 7)
    assert (total / units).item() == pytest.approx(want.item(), rel=1e-12)
