"""GRPO on one process: the rows it trains on, the weight-sync check, dynamic sampling, the prompt
order, and a failing reward plugin through the CLI."""
import copy
import os
import re

import pytest
import torch

from tests.helpers.cli import megaswift
from tests.helpers.train import GRPO_REWARDS, grpo_config, write_prompt_data

from megaswift.data.prompts import PromptOrder  # noqa: E402


def _trainer(hf_dir, tmp_path, **overrides):
    from megaswift.train.build import build_trainer
    from megaswift.train.grpo import GRPO

    data = write_prompt_data(str(tmp_path / "prompts.jsonl"))
    return build_trainer(grpo_config(hf_dir, data, str(tmp_path / "out"), **overrides), GRPO())


def test_rows_hold_prompt_then_completion_labelled_where_it_is_predicted(tiny_hf, tmp_path):
    tr = _trainer(tiny_hf["llama"], tmp_path)
    mbs = tr.data.next_global_batch()
    assert len(mbs) == 4 and all(mb["input_ids"].shape == (2, 32) for mb in mbs)
    for mb in mbs:
        for i in range(2):
            n = int(mb["comp_mask"][i].sum())
            where = mb["comp_index"][i, :n]
            assert torch.equal(mb["labels"][i, where], mb["input_ids"][i, where + 1])  # the completion tokens
            assert int((mb["labels"][i] != -100).sum()) == n
            assert torch.all(mb["old_logps"][i, :n] < 0) and torch.all(mb["old_logps"][i, n:] == 0)
    adv = torch.cat([mb["advantages"] for mb in mbs]).view(-1, 4)  # groups of 4, one per prompt
    torch.testing.assert_close(adv.mean(1), torch.zeros(2), atol=1e-6, rtol=0)


def test_sync_check_passes_on_the_policy_and_stops_a_stale_rollout_model(tiny_hf, tmp_path):
    from megaswift.train.grpo import RolloutMismatchError

    tr = _trainer(tiny_hf["qwen3"], tmp_path)
    tr.train_step(tr.data.next_global_batch())
    assert tr.alg.rollout_stats["rollout/logp_diff_max"] < 1e-5
    stale = copy.deepcopy(tr.model)  # as if a weight push had not happened: the weights of a step ago
    with torch.no_grad():
        for p in stale.parameters():
            p.add_(0.01 * torch.randn_like(p))
    tr.alg.engine.model = stale
    with pytest.raises(RolloutMismatchError, match="rollout engine and trainer disagree"):
        tr.train_step(tr.data.next_global_batch())


def test_num_iterations_reuses_a_rollout_batch(tiny_hf, tmp_path):
    tr = _trainer(tiny_hf["llama"], tmp_path, grpo__num_iterations=3)
    batches = [tr.data.next_global_batch() for _ in range(4)]
    assert batches[0] is batches[1] is batches[2] and batches[3] is not batches[0]
    assert tr.alg.engine.rollouts == 2


def _group_spread(mbs):
    adv = torch.cat([mb["advantages"] for mb in mbs]).view(-1, 4)
    return (adv.max(1).values - adv.min(1).values) > 0


def test_dynamic_sampling_trains_only_on_groups_whose_rewards_vary(tiny_hf, tmp_path):
    """prompt_parity gives every group of an even `answer` equal rewards: without dynamic
    sampling some trained groups carry no advantage; with it every group does."""
    reward = f"[{GRPO_REWARDS}:prompt_parity]"
    plain = _trainer(tiny_hf["llama"], tmp_path / "plain", grpo__reward_funcs=reward,
                     train__global_batch_size=16)
    spreads = [_group_spread(plain.data.next_global_batch()) for _ in range(3)]
    assert not all(bool(s.all()) for s in spreads)
    dyn = _trainer(tiny_hf["llama"], tmp_path / "dyn", grpo__reward_funcs=reward, train__global_batch_size=16,
                   grpo__dynamic_sampling=True, grpo__dynamic_sampling_max_rounds=6)
    for _ in range(3):
        assert bool(_group_spread(dyn.data.next_global_batch()).all())
        assert dyn.alg.rollout_stats["dynamic_sampling/rounds"] >= 1


def test_prompt_order_is_seeded_endless_and_resumable():
    a = PromptOrder(5, seed=1)
    first = a.take(3) + a.take(4)  # crosses into epoch 2
    assert sorted(first[:5]) == list(range(5)) and a.epoch == 1
    b = PromptOrder(5, seed=1)
    b.take(3)
    c = PromptOrder(5, seed=1)
    c.load_state_dict(b.state_dict())
    assert c.take(4) == first[3:]


def test_a_failing_reward_plugin_stops_the_cli_with_one_line(tiny_hf, tmp_path):
    import yaml

    data = write_prompt_data(str(tmp_path / "prompts.jsonl"))
    cfg = grpo_config(tiny_hf["llama"], data, str(tmp_path / "out"),
                      grpo__reward_funcs=f"[{GRPO_REWARDS}:raises_on_long]").to_dict()
    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = megaswift("train", "grpo", "--config", path, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("megaswift: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    assert "grpo_rewards.py:raises_on_long raised ZeroDivisionError" in errors[0]
    assert re.search(r"on completion \d+ \('.*' for prompt '", errors[0])


def test_a_run_resumes_with_the_prompt_order_and_rollout_count(tiny_hf, tmp_path):
    """2 steps with a checkpoint, then a resumed run to step 3: it goes on from step 2 with the
    next prompts and rollout number (a fresh rollout batch), and logs GRPO's metrics."""
    import json

    from megaswift.train.build import build_trainer
    from megaswift.train.grpo import GRPO

    data = write_prompt_data(str(tmp_path / "prompts.jsonl"))
    out = str(tmp_path / "out")
    first = build_trainer(grpo_config(tiny_hf["llama"], data, out, train__steps=2), GRPO())
    first.train()
    state = first.data.state_dict()
    again = build_trainer(grpo_config(tiny_hf["llama"], data, out, train__steps=3, checkpoint__load="latest"),
                          GRPO())
    assert again.step == 2 and again.data.state_dict() == state
    summary = again.train()
    assert again.alg.engine.rollouts == 3 and summary["steps"] == 1 and summary["reward"] is not None
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("reward", "reward_std", "rewards/multiples_of_three/mean", "advantages/std", "clip_ratio/region",
                "completions/mean_length", "completions/truncated_fraction", "time/rollout_share",
                "rollout/logp_diff_max"):
        assert all(key in r for r in rows), key


@pytest.mark.parametrize("overrides, message", [
    ({"train__global_batch_size": 6}, r"global_batch_size=6 \(completions per step\) must be a multiple of "
                                      r"grpo.num_generations x dp = 4 x 1 = 4"),
    ({"grpo__max_new_tokens": 32}, r"data.seq_len=32 must hold data.max_prompt_len"),
    ({"data__max_prompt_len": 30}, r"data.seq_len=32 must hold data.max_prompt_len \(30\) \+ grpo.max_new_tokens"),
    ({"grpo__reward_funcs": "[megaswift.rewards:nope]"}, r"has no function 'nope'"),
    ({"data__packing": True}, r"data.packing is not supported by grpo"),
])
def test_plan_refuses_bad_grpo_settings_before_any_process_starts(tiny_hf, tmp_path, overrides, message):
    from megaswift.errors import ConfigError
    from megaswift.train.plan import plan_training

    data = write_prompt_data(str(tmp_path / "prompts.jsonl"))
    cfg = grpo_config(tiny_hf["llama"], data, str(tmp_path / "out"), **overrides)
    with pytest.raises(ConfigError, match=message):
        plan_training(cfg, 1, algorithm="grpo")


def test_completions_stop_on_every_eos_the_checkpoint_lists(tmp_path):
    from types import SimpleNamespace

    from transformers import GenerationConfig

    from megaswift.rollout.generation import stop_token_ids

    tok = SimpleNamespace(eos_token_id=2)
    assert stop_token_ids(str(tmp_path), tok) == (2,)  # no generation_config.json
    GenerationConfig(eos_token_id=[7, 5]).save_pretrained(str(tmp_path))
    assert stop_token_ids(str(tmp_path), tok) == (2, 5, 7)
