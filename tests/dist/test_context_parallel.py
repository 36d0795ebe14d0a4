"""Ring, Ulysses and hybrid attention equal full attention: outputs and the gradients of q, k, v
(fp32, reference kernel: max abs diff 2e-5 and rel 1e-4 at most; measured about 1e-6), for plain
causal rows and packed rows of odd document lengths, a sliding window, GQA with fewer KV heads than
the Ulysses degree, at cp = 2 and 4, and V's head dim other than Q/K's (multi-latent attention; K
and V then travel the ring concatenated, and the CPU kernels run zero-padded). Also the sharding
itself: zigzag chunks, padding after odd documents, and gathering per-token values back into the
original order."""
import pytest
import torch

from megaswift.testing.dist import run_distributed

B, S, D = 2, 22, 8  # S = 22 is not a multiple of 2 cp: only the packed cases use it


def _case(name, hq, hkv, S_row, window=None, packed=False, seed=0, d=D, dv=D):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, S_row, hq, d, generator=g)
    k = torch.randn(B, S_row, hkv, d, generator=g)
    v = torch.randn(B, S_row, hkv, dv, generator=g)
    weight = torch.randn(B, S_row, hq, dv, generator=g)
    docs = None
    if packed:  # odd document lengths, different per row, a trailing padding run
        lengths = [[5, 9, 3, S_row - 17], [1, 13, S_row - 14]]
        docs = torch.tensor([sum(([d] * n for d, n in enumerate(row)), []) for row in lengths])
    return dict(name=name, q=q, k=k, v=v, weight=weight, docs=docs, window=window)


CASES = [
    _case("causal", 8, 2, 24),
    _case("causal_window_gqa1", 4, 1, 24, window=5, seed=1),
    _case("packed_odd_docs", 8, 4, 22, packed=True, seed=2),
    _case("packed_window", 4, 4, 22, window=4, packed=True, seed=3),
    # V's head dim narrower than Q/K's (as DeepSeek-V3's 128 beside 192), and wider
    _case("dv_lt_d_packed_window_gqa", 8, 2, 22, window=6, packed=True, seed=4, d=20, dv=12),
    _case("dv_gt_d_causal_gqa1", 4, 1, 24, seed=5, d=12, dv=20),
]


def _full(c):
    from megaswift.kernels.attention import attention

    q, k, v = (c[x].clone().requires_grad_() for x in ("q", "k", "v"))
    out, _ = attention(q, k, v, causal=True, document_ids=c["docs"], window=c["window"], backend="reference")
    (out * c["weight"]).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


def _cp(rank, world, ulysses, backend, cases):
    """Each case through cp attention on this rank's shard: (cp_index, out, q/k/v grads[, sinks
    grad]). Also used by tests/dist/test_attention_sinks_cp.py."""
    from megaswift.parallel.context_parallel import context_parallel_attention, shard_batch
    from megaswift.parallel.layout import Layout
    from megaswift.parallel.state import ParallelState

    st = ParallelState.build(Layout(world_size=world, cp=world, ulysses=ulysses))
    results = []
    for c in cases:
        mb = {"input_ids": torch.zeros(c["q"].shape[:2], dtype=torch.long), "document_ids": c["docs"],
              "q": c["q"], "k": c["k"], "v": c["v"], "weight": c["weight"]}
        local = shard_batch(mb, world, st.cp_rank)
        q, k, v = (local[x].clone().requires_grad_() for x in ("q", "k", "v"))
        sinks = c["sinks"].clone().requires_grad_() if "sinks" in c else None  # attention sinks (gpt-oss)
        out = context_parallel_attention(q, k, v, cp_index=local["cp_index"], document_ids=local["document_ids"],
                                         window=c["window"], backend=backend, ulysses_group=st.cp_ulysses_group,
                                         ring_group=st.cp_ring_group, sinks=sinks)
        (out * local["weight"]).sum().backward()
        grads = (q.grad, k.grad, v.grad) + ((sinks.grad,) if sinks is not None else ())
        results.append((local["cp_index"][:, st.cp_rank], out.detach(), *grads))
    return results


def _original_positions(c, world):
    """For the padded row positions, the original row position (-1 for padding)."""
    from megaswift.parallel.context_parallel import shard_batch

    n = c["q"].shape[1]
    mb = {"input_ids": torch.zeros(B, n, dtype=torch.long), "pos": torch.arange(n).expand(B, n),
          "document_ids": c["docs"]}
    return [shard_batch(mb, world, r)["pos"] for r in range(world)], \
        [shard_batch({**mb, "input_ids": torch.ones(B, n, dtype=torch.long)}, world, r, pad_id=0)["input_ids"]
         for r in range(world)]


@pytest.mark.parametrize("world,ulysses,backend", [
    (2, 1, "reference"), (4, 1, "reference"), (2, 2, "reference"), (4, 4, "reference"), (4, 2, "reference"),
    (2, 1, "sdpa")], ids=["ring2", "ring4", "ulysses2", "ulysses4_gqa_replicated", "hybrid_u2_r2", "ring2_sdpa"])
def test_context_parallel_attention_matches_full(world, ulysses, backend):
    cases = CASES if ulysses < 4 else [c for c in CASES if c["q"].shape[2] % 4 == 0]
    got = run_distributed(_cp, world, ulysses, backend, cases)
    for i, c in enumerate(cases):
        want = _full(c)
        positions, real = _original_positions(c, world)
        for rank in range(world):
            _, out, dq, dk, dv = got[rank][i]
            pos, is_real = positions[rank], real[rank].bool()
            for name, mine, full in (("out", out, want[0]), ("dq", dq, want[1]), ("dk", dk, want[2]),
                                     ("dv", dv, want[3])):
                expect = full.gather(1, pos.view(B, -1, 1, 1).expand(-1, -1, *full.shape[2:]))
                # padding positions are not compared: no real token sees them, no loss reads them
                torch.testing.assert_close(mine[is_real], expect[is_real], rtol=1e-4, atol=2e-5,
                                           msg=f"{c['name']} rank {rank} {name}")


def test_zigzag_shards_and_document_padding():
    from megaswift.parallel.context_parallel import shard_batch

    ids = torch.arange(16).view(1, 16)
    parts = [shard_batch({"input_ids": ids}, 2, r)["input_ids"].tolist()[0] for r in range(2)]
    assert parts == [[0, 1, 2, 3, 12, 13, 14, 15], [4, 5, 6, 7, 8, 9, 10, 11]]  # chunks r and 2cp-1-r
    docs = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1]])  # lengths 5 and 7: each padded to 8
    labels = torch.arange(12).view(1, 12)
    shards = [shard_batch({"input_ids": labels + 100, "labels": labels, "document_ids": docs}, 2, r)
              for r in range(2)]
    # padded row: doc 0 at 0-4 (+3 padding), doc 1 at 8-14 (+1); 4 chunks of 2 per document
    assert shards[0]["labels"].tolist()[0] == [0, 1, -100, -100, 5, 6, 11, -100]
    assert shards[1]["labels"].tolist()[0] == [2, 3, 4, -100, 7, 8, 9, 10]
    assert shards[0]["document_ids"].tolist()[0] == [0] * 5 + [-1] * 3 + [1] * 7 + [-1]
    with pytest.raises(Exception, match="not divisible by 4"):
        shard_batch({"input_ids": torch.zeros(1, 10, dtype=torch.long)}, 2, 0)


def _gather(rank, world):
    from megaswift.parallel.context_parallel import gather_sequence, shard_batch
    from megaswift.parallel.layout import Layout
    from megaswift.parallel.state import ParallelState

    st = ParallelState.build(Layout(world_size=world, cp=world))
    docs = torch.tensor([[0] * 7 + [1] * 11])
    values = torch.arange(18.0).view(1, 18)
    local = shard_batch({"input_ids": torch.zeros(1, 18, dtype=torch.long), "values": values, "document_ids": docs},
                        world, st.cp_rank)
    return gather_sequence(local["values"], local["cp_index"], local["cp_source"], 18, st.cp_group).tolist()


def test_gather_sequence_restores_the_original_order():
    for row in run_distributed(_gather, 2):
        assert row == [list(map(float, range(18)))]
