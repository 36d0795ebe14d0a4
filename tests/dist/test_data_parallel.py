"""DataParallel on its own: buckets start reducing during backward, the reduced gradients are the
sum over ranks, and ZeRO-1 shards + all-gather reproduce the plain update exactly."""
import torch
from torch import nn

from megaswift.parallel.data_parallel import DataParallel
from megaswift.testing.dist import run_distributed


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))


def _local_batch(rank):
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(5, 6, generator=g)


def _run(rank, world, zero):
    import torch.distributed as dist

    model = _model()
    ref = _model()
    dp = DataParallel(list(model.parameters()), dist.group.WORLD, zero=zero, bucket_numel=30)
    started_in_backward = []
    model(_local_batch(rank)).pow(2).sum().backward()
    started_in_backward = [b.work is not None for b in dp.buckets]
    dp.finish_grad_sync()
    # reference: local grads summed with a plain all-reduce
    ref(_local_batch(rank)).pow(2).sum().backward()
    want = []
    for p in ref.parameters():
        dist.all_reduce(p.grad)
        want.append(p.grad.reshape(-1))
    got = {}
    for piece in dp.pieces:
        got.setdefault(id(piece.param), {})[piece.start] = piece.grad.clone()
    # an SGD step on the owned pieces, then the all-gather
    for piece in dp.pieces:
        piece.data.add_(piece.grad, alpha=-0.1)
    dp.gather_params()
    params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    ref_params = torch.cat([(p.detach() - 0.1 * p.grad).reshape(-1) for p in ref.parameters()])
    pieces_ok = all(torch.equal(g, w[s: s + g.numel()]) for p, w in zip(model.parameters(), want)
                    for s, g in got.get(id(p), {}).items())
    return {"buckets": len(dp.buckets), "started": started_in_backward, "pieces_ok": pieces_ok,
            "params_equal": torch.allclose(params, ref_params, rtol=0, atol=1e-7),
            "owned": sum(piece.n for piece in dp.pieces)}


def test_plain_dp_overlaps_and_sums():
    for r in run_distributed(_run, 2, 0):
        assert r["buckets"] >= 3
        assert all(r["started"][:-1])  # every bucket but possibly the last starts inside backward
        assert r["pieces_ok"] and r["params_equal"]


def test_zero1_owns_half_and_gathers_the_same_update():
    results = run_distributed(_run, 2, 1)
    total = sum(p.numel() for p in _model().parameters())
    assert sum(r["owned"] for r in results) == total  # each element updated by exactly one rank
    for r in results:
        assert r["pieces_ok"] and r["params_equal"]
