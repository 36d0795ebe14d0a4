"""TP layers, sequence parallelism and the vocab-parallel loss against plain torch (picotron-style):
the same seeded weights and inputs, the matching slices copied in, then outputs, input gradients
and weight gradients compared on every rank. One spawn per world size runs every check."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from megaswift.parallel.cross_entropy import vocab_parallel_cross_entropy, vocab_parallel_log_probs
from megaswift.parallel.layout import Layout
from megaswift.parallel.state import ParallelState
from megaswift.parallel.tp_comm import reduce_scatter_to_sp_region, scatter_to_sp_region
from megaswift.parallel.grads import allreduce_tp_partial_grads, mark_tp_partial_grad
from megaswift.parallel.tp_layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from megaswift.testing.dist import run_distributed

TOL = dict(rtol=1e-5, atol=1e-6)
B, S, H, FFN = 2, 8, 8, 16  # S and FFN divisible by tp 2 and 4
VOCAB, VOCAB_PADDED = 37, 40


def close(actual, expected, what):
    torch.testing.assert_close(actual, expected, **TOL, msg=lambda m: f"{what}: {m}")


def leaf(t):
    return t.detach().clone().requires_grad_()


def _check_mlp(st, sp):
    """Column -> gelu -> row with bias; under SP the input and output are sequence shards."""
    tp, r, g = st.tp_size, st.tp_rank, st.tp_group
    torch.manual_seed(1)
    fc1, fc2 = nn.Linear(H, FFN, bias=False), nn.Linear(FFN, H, bias=True)
    x, gy = torch.randn(B, S, H), torch.randn(B, S, H)
    cols = slice(r * FFN // tp, (r + 1) * FFN // tp)
    seq = slice(r * S // tp, (r + 1) * S // tp) if sp else slice(None)
    col = ColumnParallelLinear(H, FFN // tp, tp_group=g, sequence_parallel=sp)
    row = RowParallelLinear(FFN // tp, H, tp_group=g, bias=True, sequence_parallel=sp)
    with torch.no_grad():
        col.weight.copy_(fc1.weight[cols])
        row.weight.copy_(fc2.weight[:, cols])
        row.bias.copy_(fc2.bias)
    x_ref, x_tp = leaf(x), leaf(x[:, seq])
    y_ref = fc2(F.gelu(fc1(x_ref)))
    y_tp = row(F.gelu(col(x_tp)))
    close(y_tp, y_ref[:, seq], f"mlp sp={sp} output")
    y_ref.backward(gy)
    y_tp.backward(gy[:, seq])
    allreduce_tp_partial_grads(row, g)  # the bias saw only this rank's shard under SP
    close(x_tp.grad, x_ref.grad[:, seq], f"mlp sp={sp} input grad")
    close(col.weight.grad, fc1.weight.grad[cols], f"mlp sp={sp} fc1 weight grad")
    close(row.weight.grad, fc2.weight.grad[:, cols], f"mlp sp={sp} fc2 weight grad")
    close(row.bias.grad, fc2.bias.grad, f"mlp sp={sp} fc2 bias grad")


def _check_column_gather_output(st, sp):
    tp, r, g = st.tp_size, st.tp_rank, st.tp_group
    torch.manual_seed(2)
    ref = nn.Linear(H, FFN, bias=True)
    x, gy = torch.randn(B, S, H), torch.randn(B, S, FFN)
    cols = slice(r * FFN // tp, (r + 1) * FFN // tp)
    seq = slice(r * S // tp, (r + 1) * S // tp) if sp else slice(None)
    col = ColumnParallelLinear(H, FFN // tp, tp_group=g, bias=True, sequence_parallel=sp, gather_output=True)
    with torch.no_grad():
        col.weight.copy_(ref.weight[cols])
        col.bias.copy_(ref.bias[cols])
    x_ref, x_tp = leaf(x), leaf(x[:, seq])
    y_ref, y_tp = ref(x_ref), col(x_tp)
    close(y_tp, y_ref, f"gather_output sp={sp} output")  # full [b, s, out] on every rank
    y_ref.backward(gy)
    y_tp.backward(gy)
    close(x_tp.grad, x_ref.grad[:, seq], f"gather_output sp={sp} input grad")
    close(col.weight.grad, ref.weight.grad[cols], f"gather_output sp={sp} weight grad")
    close(col.bias.grad, ref.bias.grad[cols], f"gather_output sp={sp} bias grad")


def _check_embedding(st, sp):
    tp, r, g = st.tp_size, st.tp_rank, st.tp_group
    torch.manual_seed(3)
    ref = nn.Embedding(VOCAB, H)
    tokens = torch.randint(0, VOCAB, (B, S))
    tokens[0, :6] = torch.tensor([0, 9, 10, 19, 20, 36])  # both sides of every shard boundary
    gy = torch.randn(B, S, H)
    padded = torch.cat([ref.weight.detach(), torch.randn(VOCAB_PADDED - VOCAB, H)])  # [40, h]
    rows = slice(r * VOCAB_PADDED // tp, (r + 1) * VOCAB_PADDED // tp)
    seq = slice(r * S // tp, (r + 1) * S // tp) if sp else slice(None)
    emb = VocabParallelEmbedding(VOCAB_PADDED, H, tp_group=g, tp_rank=r, tp_size=tp, sequence_parallel=sp)
    with torch.no_grad():
        emb.weight.copy_(padded[rows])
    y_ref, y_tp = ref(tokens), emb(tokens)
    close(y_tp, y_ref[:, seq], f"embedding sp={sp} output")
    y_ref.backward(gy)
    y_tp.backward(gy[:, seq])
    ref_grad = torch.cat([ref.weight.grad, torch.zeros(VOCAB_PADDED - VOCAB, H)])  # padded rows: no grad
    close(emb.weight.grad, ref_grad[rows], f"embedding sp={sp} weight grad")


def _check_cross_entropy(st):
    """Loss and log-probs on vocab-sharded logits with -inf padded columns and ignored tokens."""
    tp, r, g = st.tp_size, st.tp_rank, st.tp_group
    torch.manual_seed(4)
    logits = torch.randn(B, S, VOCAB_PADDED)
    logits[..., VOCAB:] = float("-inf")
    target = torch.randint(0, VOCAB, (B, S))
    target[0, 0], target[1, 3] = -100, -100
    target[0, 1:4] = torch.tensor([0, 36, VOCAB_PADDED // tp])  # first, last, and a shard's first id
    gl = torch.rand(B, S)
    cols = slice(r * VOCAB_PADDED // tp, (r + 1) * VOCAB_PADDED // tp)
    keep = target != -100
    for name in ("loss", "log_probs"):
        ref_in, tp_in = leaf(logits[..., :VOCAB]), leaf(logits[..., cols])
        if name == "loss":
            ref = F.cross_entropy(ref_in.reshape(-1, VOCAB), target.reshape(-1), reduction="none").view(B, S)
            out = vocab_parallel_cross_entropy(tp_in, target, g)
        else:
            ref = torch.log_softmax(ref_in, -1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * keep
            out = vocab_parallel_log_probs(tp_in, target, g)
        close(out, ref, f"{name} value")
        ref.backward(gl)
        out.backward(gl)
        assert torch.isfinite(tp_in.grad).all(), f"{name}: non-finite grad"
        ref_grad = torch.cat([ref_in.grad, torch.zeros(B, S, VOCAB_PADDED - VOCAB)], dim=-1)
        close(tp_in.grad, ref_grad[..., cols], f"{name} logits grad")


def _check_scatter_and_errors(st):
    tp, r, g = st.tp_size, st.tp_rank, st.tp_group
    # scatter: a replicated input's grad is every rank's shard grad joined
    x, gy = leaf(torch.arange(B * S * H, dtype=torch.float32).view(B, S, H)), torch.randn(B, S, H)
    seq = slice(r * S // tp, (r + 1) * S // tp)
    y = scatter_to_sp_region(x, g, dim=1)
    close(y, x.detach()[:, seq], "scatter output")
    y.backward(gy[:, seq])
    close(x.grad, gy, "scatter input grad")
    # a sequence the group cannot split fails on every rank before any collective
    with pytest.raises(ValueError, match=rf"dim 1 of size 7 over {tp} .*7 is not divisible by {tp}"):
        reduce_scatter_to_sp_region(torch.ones(B, 7, H), g, dim=1)
    # marked grads are summed over tp, coalesced across shapes
    a, b = mark_tp_partial_grad(nn.Parameter(torch.zeros(3))), mark_tp_partial_grad(nn.Parameter(torch.zeros(2, 2)))
    c = nn.Parameter(torch.zeros(2))  # not marked: left alone
    m = nn.ParameterList([a, b, c])
    for p in m:
        p.grad = torch.full_like(p, float(r + 1))
    allreduce_tp_partial_grads(m, g)
    total = tp * (tp + 1) / 2
    assert (a.grad == total).all() and (b.grad == total).all() and (c.grad == r + 1).all()


def _all_checks(rank, world):
    st = ParallelState.build(Layout(world_size=world, tp=world, sp=True))
    assert st.sp and st.tp_size == world
    for sp in (False, True):
        _check_mlp(st, sp)
        _check_column_gather_output(st, sp)
        _check_embedding(st, sp)
    _check_cross_entropy(st)
    _check_scatter_and_errors(st)
    return rank


@pytest.mark.timeout(60)
@pytest.mark.parametrize("tp", [2, 4])
def test_tp_layers_match_single_process(tp):
    assert run_distributed(_all_checks, tp, timeout_s=50) == list(range(tp))
