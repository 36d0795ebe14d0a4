"""Process groups: each group holds the ranks Megatron's order gives it."""
import pytest
import torch.distributed as dist

from megaswift.errors import LayoutError
from megaswift.parallel.layout import Layout
from megaswift.parallel.state import ParallelState
from megaswift.testing.dist import run_distributed


def _groups(rank, world, tp, cp, pp, ep, etp):
    st = ParallelState.build(Layout(world_size=world, tp=tp, cp=cp, pp=pp, ep=ep, etp=etp))
    out = dict(st.group_ranks)
    # a collective on every group proves each one is usable
    import torch
    for name in out:
        t = torch.ones(1)
        dist.all_reduce(t, group=getattr(st, f"{name}_group"))
        assert int(t.item()) == len(out[name]), name
    out["coords"] = (st.tp_rank, st.cp_rank, st.dp_rank, st.pp_rank)
    return out


def test_megatron_rank_order_8_ranks():
    # world 8 = tp2 x cp1 x dp2 x pp2; experts: ep2 etp1 -> edp2
    res = run_distributed(_groups, 8, 2, 1, 2, 2, 1)
    r5 = res[5]  # rank 5 = tp 1, dp 0, pp 1  (5 = 1 + 2*(0 + 1*(0 + 2*1)))
    assert r5["coords"] == (1, 0, 0, 1)
    assert r5["tp"] == [4, 5]
    assert r5["dp"] == [5, 7]
    assert r5["pp"] == [1, 5]
    assert r5["dp_cp"] == [5, 7]
    assert r5["ep"] == [4, 5]
    assert r5["edp"] == [5, 7]


def test_cp_between_tp_and_dp():
    res = run_distributed(_groups, 8, 2, 2, 1, 1, 1)
    r3 = res[3]  # tp 1, cp 1, dp 0
    assert r3["tp"] == [2, 3] and r3["cp"] == [1, 3] and r3["dp"] == [3, 7]
    assert r3["dp_cp"] == [1, 3, 5, 7]


def test_world_size_mismatch_is_a_clear_error():
    with pytest.raises(LayoutError, match=r"world size 6 is not divisible by tp\(4\)"):
        Layout(world_size=6, tp=4)
    with pytest.raises(LayoutError, match=r"ep\(4\) \* etp\(1\) = 4"):
        Layout(world_size=2, tp=2, ep=4)
