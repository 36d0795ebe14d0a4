"""TP layers and the vocab-parallel loss in one process (group None): they must be the plain
torch ops, so the same model runs without torch.distributed."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from megaswift.parallel import tp_comm
from megaswift.parallel.cross_entropy import vocab_parallel_cross_entropy, vocab_parallel_log_probs
from megaswift.parallel.grads import allreduce_tp_partial_grads, mark_tp_partial_grad
from megaswift.parallel.tp_layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)

TOL = dict(rtol=1e-5, atol=1e-6)


def test_regions_are_identity_without_a_group():
    x = torch.randn(2, 4, 6)
    for fn in (tp_comm.copy_to_tp_region, tp_comm.reduce_from_tp_region, tp_comm.gather_from_sp_region,
               tp_comm.reduce_scatter_to_sp_region, tp_comm.scatter_to_sp_region, tp_comm.gather_from_tp_region):
        assert fn(x, None) is x


def test_column_row_pair_matches_nn_linear():
    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(8, 16, bias=True), nn.Linear(16, 8, bias=True)
    col = ColumnParallelLinear(8, 16, tp_group=None, bias=True, sequence_parallel=True, gather_output=True)
    row = RowParallelLinear(16, 8, tp_group=None, bias=True, sequence_parallel=True)
    with torch.no_grad():
        for dst, src in ((col, fc1), (row, fc2)):
            dst.weight.copy_(src.weight)
            dst.bias.copy_(src.bias)
    x = torch.randn(2, 5, 8)
    x_ref, x_tp = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref = fc2(F.gelu(fc1(x_ref)))
    y_tp = row(F.gelu(col(x_tp)))
    torch.testing.assert_close(y_tp, y_ref, **TOL)
    g = torch.randn_like(y_ref)
    y_ref.backward(g)
    y_tp.backward(g)
    allreduce_tp_partial_grads(row, None)  # no group: a no-op
    torch.testing.assert_close(x_tp.grad, x_ref.grad, **TOL)
    for dst, src in ((col, fc1), (row, fc2)):
        torch.testing.assert_close(dst.weight.grad, src.weight.grad, **TOL)
        torch.testing.assert_close(dst.bias.grad, src.bias.grad, **TOL)
    assert getattr(row.bias, "tp_partial_grad", False)


def test_reset_parameters():
    torch.manual_seed(0)
    col = ColumnParallelLinear(64, 128, tp_group=None, bias=True)
    col.reset_parameters(0.02)
    assert abs(col.weight.std().item() - 0.02) < 2e-3 and col.bias.abs().max() == 0
    emb = VocabParallelEmbedding(40, 8, tp_group=None, tp_rank=0, tp_size=1)
    emb.reset_parameters(0.5)
    assert emb.weight.shape == (40, 8) and torch.isfinite(emb.weight).all()


def test_embedding_matches_nn_embedding_and_checks_padding():
    torch.manual_seed(0)
    ref = nn.Embedding(40, 6)
    emb = VocabParallelEmbedding(40, 6, tp_group=None, tp_rank=0, tp_size=1, sequence_parallel=True)
    with torch.no_grad():
        emb.weight.copy_(ref.weight)
    tokens = torch.randint(0, 37, (2, 5))
    torch.testing.assert_close(emb(tokens), ref(tokens), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"padded vocabulary size 40 is not divisible by tp \(3\)"):
        VocabParallelEmbedding(40, 6, tp_group=None, tp_rank=0, tp_size=3)


def _padded_logits(dtype=torch.float32):
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 40, dtype=dtype)
    logits[..., 37:] = float("-inf")  # padded vocab columns, as the model fills them
    target = torch.randint(0, 37, (2, 5))
    target[0, 1] = target[1, 4] = -100
    return logits, target


def test_cross_entropy_matches_torch_with_ignore_and_padding():
    logits, target = _padded_logits()
    ref_in, tp_in = logits[..., :37].clone().requires_grad_(), logits.clone().requires_grad_()
    ref = F.cross_entropy(ref_in.reshape(-1, 37), target.reshape(-1), reduction="none").view(2, 5)
    loss = vocab_parallel_cross_entropy(tp_in, target, None)
    assert loss.dtype == torch.float32 and loss.shape == (2, 5)
    torch.testing.assert_close(loss, ref, **TOL)
    g = torch.rand(2, 5)
    ref.backward(g)
    loss.backward(g)
    assert torch.isfinite(tp_in.grad).all()
    torch.testing.assert_close(tp_in.grad[..., :37], ref_in.grad, **TOL)
    assert (tp_in.grad[..., 37:] == 0).all() and (tp_in.grad[0, 1] == 0).all()


def test_cross_entropy_bf16_is_computed_in_float32():
    logits, target = _padded_logits(torch.bfloat16)
    x = logits.clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(x, target, None)
    ref = F.cross_entropy(logits.float()[..., :37].reshape(-1, 37), target.reshape(-1), reduction="none")
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref.view(2, 5), **TOL)
    loss.sum().backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all()


def test_log_probs_match_log_softmax():
    logits, target = _padded_logits()
    ref_in, tp_in = logits[..., :37].clone().requires_grad_(), logits.clone().requires_grad_()
    keep = target != -100
    ref = torch.log_softmax(ref_in, -1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * keep
    lp = vocab_parallel_log_probs(tp_in, target, None)
    torch.testing.assert_close(lp, ref, **TOL)
    g = torch.rand(2, 5)
    ref.backward(g)
    lp.backward(g)
    torch.testing.assert_close(tp_in.grad[..., :37], ref_in.grad, **TOL)


def test_mark_tp_partial_grad():
    p = mark_tp_partial_grad(nn.Parameter(torch.ones(3)))
    assert p.tp_partial_grad is True
