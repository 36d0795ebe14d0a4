"""inf/NaN steps (issue 18): the ranks agree, and nothing of such a step reaches the weights.

A NaN loss is made on one rank only, at one step, by wrapping the algorithm's loss in the test:
the other rank sees finite numbers of its own, so only the agreement makes it skip or stop too.
"""
import math

import numpy as np
import pytest

from tests.helpers.train import train_config, write_chat_data
from megaswift.testing.dist import run_distributed


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_chat_data(str(tmp_path_factory.mktemp("nan") / "train.jsonl"))


def _steps_with_a_nan(rank, world, hf, data, out, nan_rank, nan_step, steps, **overrides):
    """Metrics of `steps` steps (or the error that ended them) and a weight before/after each."""
    from megaswift.train.build import build_trainer
    from megaswift.train.nonfinite import NonFiniteError
    from megaswift.train.sft import SFT

    trainer = build_trainer(train_config(hf, data, out, **overrides), SFT())
    plain = trainer.alg.loss_sum

    def loss_sum(model, mb):
        loss, extra = plain(model, mb)
        if rank == nan_rank and trainer.step + 1 == nan_step:
            loss = loss * float("nan")
        return loss, extra

    trainer.alg.loss_sum = loss_sum
    weight = trainer.model.get_parameter("decoder.layers.0.mlp.linear_fc2.weight")
    rows, snapshots = [], [weight.detach().numpy().copy()]  # numpy: tensors do not survive the queue
    try:
        for _ in range(steps):
            rows.append(trainer.train_step(trainer.data.next_global_batch()))
            snapshots.append(weight.detach().numpy().copy())
    except NonFiniteError as e:
        return rows, snapshots, str(e)
    return rows, snapshots, None


def test_skip_drops_the_step_on_every_rank(tiny_hf, data, tmp_path):
    results = run_distributed(_steps_with_a_nan, 2, tiny_hf["llama"], data, str(tmp_path), 1, 2, 4,
                              train__on_nonfinite="skip")
    for rows, snapshots, error in results:  # rank 0's own loss was finite: it skips all the same
        assert error is None
        assert [r.get("skipped") for r in rows] == [None, 1, 0, 0]
        assert rows[-1]["skipped_steps"] == 1
        assert math.isnan(rows[1]["grad_norm"])
        assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows[2:])
        assert np.array_equal(snapshots[2], snapshots[1])  # the skipped step changed nothing
        assert not np.array_equal(snapshots[3], snapshots[2])  # the next one trains again
        assert all(np.isfinite(s).all() for s in snapshots)
    assert np.array_equal(results[0][1][-1], results[1][1][-1])  # the replicas stay equal


def test_stop_names_the_step_and_the_rank(tiny_hf, data, tmp_path):
    results = run_distributed(_steps_with_a_nan, 2, tiny_hf["qwen3"], data, str(tmp_path), 1, 3, 4,
                              parallel__tp=2)
    for rows, snapshots, error in results:
        assert len(rows) == 2 and error is not None
        assert error.startswith("step 3: the gradient norm is nan and the loss is not finite on rank(s) [1]")
        assert "train.on_nonfinite=stop" in error and "no checkpoint was saved before it" in error
        assert len(snapshots) == 3 and np.isfinite(snapshots[-1]).all()


def test_a_checkpoint_with_nan_weights_is_never_written(tiny_hf, data, tmp_path):
    """The last line of defence behind the step guard: save() checks weights and AdamW state."""
    import os

    import torch

    from megaswift.train.build import build_trainer
    from megaswift.train.nonfinite import NonFiniteError
    from megaswift.train.sft import SFT

    trainer = build_trainer(train_config(tiny_hf["llama"], data, str(tmp_path)), SFT())
    trainer.train_step(trainer.data.next_global_batch())
    first = trainer.save(0.0)
    with torch.no_grad():
        trainer.model.get_parameter("decoder.final_layernorm.weight")[3] = float("inf")
    trainer.step += 1
    with pytest.raises(NonFiniteError, match=rf"refusing to save step 2: .* the last good checkpoint is {first}$"):
        trainer.save(0.0)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_1"]
