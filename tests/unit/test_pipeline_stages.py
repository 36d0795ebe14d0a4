"""Pipeline stage arithmetic: layer splits, stage -> rank maps, and the errors that name the numbers."""
import pytest

from megaswift.errors import LayoutError
from megaswift.parallel.pipeline_stages import balanced, num_stages, split_layers, stages_of_rank


def test_stage_counts_per_schedule():
    assert num_stages(4, 1, "1f1b") == 4
    assert num_stages(2, 3, "interleaved") == 6
    assert num_stages(4, 1, "zbv") == num_stages(4, 2, "zbv") == 8
    with pytest.raises(LayoutError, match="vpp=2 needs pp_schedule interleaved"):
        num_stages(2, 2, "1f1b")
    with pytest.raises(LayoutError, match="vpp >= 2"):
        num_stages(2, 1, "interleaved")


def test_even_and_uneven_splits():
    assert split_layers(8, 4) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    assert split_layers(7, 2, [3, 4]) == [range(0, 3), range(3, 7)]
    with pytest.raises(LayoutError, match=r"num_layers \(7\) is not divisible by the 2 .*pp_layers, e.g. \[4, 3\]"):
        split_layers(7, 2)
    with pytest.raises(LayoutError, match="sums to 6, but the model has 7"):
        split_layers(7, 2, [3, 3])
    with pytest.raises(LayoutError, match="has 3 entries but the schedule runs 2"):
        split_layers(7, 2, [2, 2, 3])
    with pytest.raises(LayoutError, match="at least one layer"):
        split_layers(3, 2, [0, 3])


def test_balanced_split_lightens_the_end_stages():
    assert balanced(10, 4) == [2, 3, 3, 2]
    assert balanced(11, 4) == [3, 3, 3, 2]  # the last stage also runs the output layer and loss
    assert sum(balanced(30, 8)) == 30


@pytest.mark.parametrize("pp,vpp,schedule", [(4, 1, "1f1b"), (2, 3, "interleaved"), (4, 1, "zbv")])
def test_every_stage_runs_on_exactly_one_rank(pp, vpp, schedule):
    stages = num_stages(pp, vpp, schedule)
    owned = sorted(s for r in range(pp) for s in stages_of_rank(r, pp, stages, schedule))
    assert owned == list(range(stages))


def test_interleaved_and_v_shapes():
    assert stages_of_rank(1, 2, 6, "interleaved") == [1, 3, 5]
    assert stages_of_rank(0, 4, 8, "zbv") == [0, 7]  # first and last stage on rank 0
    assert stages_of_rank(3, 4, 8, "zbv") == [3, 4]


def test_micro_batch_counts_the_schedules_accept():
    from megaswift.parallel.pipeline import check_microbatches

    check_microbatches("1f1b", 4, 4)
    check_microbatches("interleaved", 4, 10)  # two rounds of 5
    check_microbatches("gpipe", 4, 1)
    with pytest.raises(LayoutError, match="at least pp = 4 micro batches per step, got 3"):
        check_microbatches("1f1b", 4, 3)
    with pytest.raises(LayoutError, match=r"\(9\) to be a multiple of 2"):
        check_microbatches("zbv", 4, 9)


def test_training_plan_refuses_bad_pipelines(tiny_hf, tmp_path):
    """The checks `megaswift launch` runs before any process starts (the tiny models have 2 layers)."""
    from megaswift.config import load_config
    from megaswift.train.plan import plan_training

    data = tmp_path / "d.jsonl"
    data.write_text("{}\n")

    def plan(world, **parallel):
        args = [f"--parallel.{k}={v}" for k, v in parallel.items()]
        base = {"model": {"hf_path": tiny_hf["llama"]}, "data": {"path": str(data)},
                "train": {"micro_batch_size": 1, "global_batch_size": 2}}
        return plan_training(load_config(None, args, base=base), world)

    assert plan(2, pp=2).layout.pp == 2
    with pytest.raises(LayoutError, match=r"num_layers \(2\) is smaller than the 4 pipeline stages"):
        plan(2, pp=2, pp_schedule="zbv")
    with pytest.raises(LayoutError, match=r"pp_layers=\[1, 2\] sums to 3, but the model has 2"):
        plan(2, pp=2, pp_layers="[1,2]")
    with pytest.raises(LayoutError, match="need parallel.pp > 1"):
        plan(1, vpp=2)
    with pytest.raises(LayoutError, match="at least pp = 2 micro batches per step, got 1"):
        plan(4, pp=2)  # dp=2: global batch 2 leaves one micro batch per dp rank
