"""Ring, Ulysses and hybrid attention with attention sinks (gpt-oss) equal full attention with
sinks: outputs and the gradients of q, k, v and the sinks (each rank's sink gradient covers its
own queries, and under Ulysses its own heads; their sum over the cp group is compared, as the
dp x cp gradient reduction forms it). fp32; max abs diff 2e-5 and rel 1e-4 at most, measured
about 1e-6. Plain causal rows with GQA, a sliding window with one KV head (replicated under
Ulysses), packed rows of odd document lengths with a window; the reference backend (the blocks'
autograd backward, the CUDA path's) and the CPU sdpa kernel (its fused backward with the union's
sinked out and lse)."""
import pytest
import torch

from megaswift.testing.dist import run_distributed
from tests.dist.test_context_parallel import _cp

B, D, HQ = 2, 8, 4


def _case(name, hkv, S_row, window=None, packed=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, S_row, HQ, D, generator=g)
    k = torch.randn(B, S_row, hkv, D, generator=g)
    v = torch.randn(B, S_row, hkv, D, generator=g)
    weight = torch.randn(B, S_row, HQ, D, generator=g)
    sinks = 2.0 * torch.randn(HQ, generator=g)  # both signs, large enough to take much of a row
    docs = None
    if packed:  # odd document lengths, different per row
        lengths = [[5, 9, 3, S_row - 17], [1, 13, S_row - 14]]
        docs = torch.tensor([sum(([d] * n for d, n in enumerate(row)), []) for row in lengths])
    return dict(name=name, q=q, k=k, v=v, weight=weight, sinks=sinks, docs=docs, window=window)


CASES = [
    _case("causal_gqa", 2, 24),
    _case("window_gqa1", 1, 24, window=5, seed=1),
    _case("packed_window", 2, 22, window=4, packed=True, seed=2),
]


def _full(c):
    from megaswift.kernels.attention import attention

    q, k, v, sinks = (c[x].clone().requires_grad_() for x in ("q", "k", "v", "sinks"))
    out, _ = attention(q, k, v, causal=True, document_ids=c["docs"], window=c["window"], backend="reference",
                       sinks=sinks)
    (out * c["weight"]).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad, sinks.grad


def _positions(c, world):
    """Per rank: the original row position of each local token (-1 for padding)."""
    from megaswift.parallel.context_parallel import shard_batch

    n = c["q"].shape[1]
    mb = {"input_ids": torch.zeros(B, n, dtype=torch.long), "pos": torch.arange(n).expand(B, n) + 1,
          "document_ids": c["docs"]}
    return [shard_batch(mb, world, r)["pos"] - 1 for r in range(world)]  # padding is filled with 0


@pytest.mark.parametrize("world,ulysses,backend", [
    (2, 1, "reference"), (2, 1, "sdpa"), (2, 2, "reference"), (4, 2, "sdpa")],
    ids=["ring2", "ring2_sdpa", "ulysses2", "hybrid_u2_r2_sdpa"])
def test_context_parallel_attention_with_sinks_matches_full(world, ulysses, backend):
    got = run_distributed(_cp, world, ulysses, backend, CASES)
    tol = dict(rtol=1e-4, atol=2e-5)
    for i, c in enumerate(CASES):
        want = _full(c)
        for rank, pos in enumerate(_positions(c, world)):
            _, out, dq, dk, dv, _ = got[rank][i]
            real = pos >= 0
            for name, mine, full in (("out", out, want[0]), ("dq", dq, want[1]), ("dk", dk, want[2]),
                                     ("dv", dv, want[3])):
                expect = full.gather(1, pos.clamp_min(0).view(B, -1, 1, 1).expand(-1, -1, *full.shape[2:]))
                # padding positions are not compared: no real token sees them, no loss reads them
                torch.testing.assert_close(mine[real], expect[real], **tol, msg=f"{c['name']} rank {rank} {name}")
        dsinks = sum(got[rank][i][5] for rank in range(world))
        torch.testing.assert_close(dsinks, want[4], **tol, msg=f"{c['name']} dsinks")
        if ulysses > 1:  # a rank's sink gradient lies on its own heads only
            per = HQ // ulysses
            for rank in range(world):
                u = rank % ulysses
                g = got[rank][i][5].clone()
                g[u * per: (u + 1) * per] = 0
                assert (g == 0).all(), f"{c['name']} rank {rank}: sink gradient outside its heads"


# --- the module: a two-layer model (a sliding and a full layer, both with sinks) -------------------

def _model_cfg():
    from megaswift.models.config import ModelConfig

    return ModelConfig(family="llama", vocab_size=61, hidden_size=32, ffn_hidden_size=48, num_layers=2,
                       num_attention_heads=HQ, num_query_groups=2, kv_channels=8, make_vocab_size_divisible_by=8,
                       attention_sinks=True, sliding_window=5, layer_types=["sliding_attention", "full_attention"])


def _model_loss(rank, world, layout_kw, ids):
    """Per-token loss and each layer's canonical-size sinks gradient (zeros outside this rank's
    heads under tp) of the model on this rank's share of the tokens."""
    from megaswift.models.attention import SelfAttention
    from megaswift.models.decoder import GPTModel
    from megaswift.parallel.context_parallel import shard_batch
    from megaswift.parallel.layout import Layout
    from megaswift.parallel.state import ParallelState

    st = ParallelState.build(Layout(world_size=world, **layout_kw)) if world > 1 else ParallelState.single()
    model = GPTModel(_model_cfg(), st)
    model.reset_parameters(0)
    attns = [m for m in model.modules() if isinstance(m, SelfAttention)]
    n = HQ // st.tp_size
    heads = slice(st.tp_rank * n, (st.tp_rank + 1) * n)
    with torch.no_grad():
        for i, a in enumerate(attns):  # sinks large enough to matter, the same canonical ones everywhere
            a.sinks.copy_(2.0 * torch.randn(HQ, generator=torch.Generator().manual_seed(i))[heads])
    mb = {"input_ids": ids, "labels": ids.roll(-1, 1), "position_ids": torch.arange(ids.shape[1]).expand_as(ids)}
    kw = {}
    if st.cp_size > 1:
        mb = shard_batch(mb, st.cp_size, st.cp_rank)
        kw = dict(document_ids=mb["document_ids"], cp_index=mb["cp_index"])
    loss = model(mb["input_ids"], position_ids=mb["position_ids"], labels=mb["labels"], **kw)
    loss.sum().backward()
    grads = []
    for a in attns:
        g = torch.zeros(HQ)
        g[heads] = a.sinks.grad
        grads.append(g)
    return loss.sum().item(), torch.stack(grads)


@pytest.mark.parametrize("layout_kw", [dict(cp=2, ulysses=2), dict(tp=2)], ids=["cp2_ulysses", "tp2"])
def test_model_with_sinks_matches_single_process(layout_kw):
    """The loss and every layer's sinks gradient: cp ranks' sums (the dp x cp reduction), tp
    ranks' own heads, against one process."""
    ids = torch.randint(0, 61, (2, 16), generator=torch.Generator().manual_seed(0))
    want_loss, want_grads = _model_loss(0, 1, {}, ids)
    got = run_distributed(_model_loss, 2, layout_kw, ids)
    if "cp" in layout_kw:
        loss, grads = sum(r[0] for r in got), sum(r[1] for r in got)
    else:
        assert got[0][0] == pytest.approx(got[1][0], rel=1e-6)
        loss, grads = got[0][0], got[0][1] + got[1][1]
    assert loss == pytest.approx(want_loss, rel=1e-5)
    torch.testing.assert_close(grads, want_grads, rtol=1e-4, atol=1e-6)
    assert (want_grads.abs() > 0).all()
