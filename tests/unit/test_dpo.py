"""DPO on one process: the losses against TRL's DPOTrainer, the preference data formats and their
errors, and the reference log-probabilities of the three reference modes."""
import json
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from megaswift.data.preference import pair_samples, split_row
from megaswift.errors import DataError
from megaswift.train.dpo_loss import LOSS_TYPES, dpo_loss


class _Accelerator:
    device = torch.device("cpu")

    def gather(self, x):
        return x

    gather_for_metrics = gather


def trl_loss(chosen, rejected, ref_chosen, ref_rejected, chosen_tokens, rejected_tokens, loss_type, beta, smoothing):
    """TRL 1.x keeps its DPO losses inside DPOTrainer._compute_loss; call that with a stand-in
    trainer and a model whose per-token log-probabilities put each sequence's log-probability on
    its first completion token, so TRL sums to exactly our inputs."""
    from trl import DPOTrainer

    pairs = chosen.shape[0]
    length = int(max(chosen_tokens.max(), rejected_tokens.max())) + 1
    completion = torch.zeros(2 * pairs, length, dtype=torch.long)
    for i, n in enumerate(torch.cat([chosen_tokens, rejected_tokens]).tolist()):
        completion[i, 1: 1 + int(n)] = 1
    per_token = torch.zeros(2 * pairs, length - 1, dtype=chosen.dtype)
    per_token[:, 0] = torch.cat([chosen, rejected])
    outputs = SimpleNamespace(log_probs=per_token, entropy=torch.zeros_like(per_token),
                              mean_logits=torch.zeros_like(per_token),
                              is_top1=torch.zeros_like(per_token, dtype=torch.bool))
    stub = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=_Accelerator(), aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0],
        beta=beta, label_smoothing=smoothing, use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(2 * pairs, length, dtype=torch.long), "attention_mask": torch.ones(
        2 * pairs, length, dtype=torch.long), "completion_mask": completion, "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected}
    loss = DPOTrainer._compute_loss(stub, lambda **kw: outputs, inputs, False)
    return loss, stub._metrics["train"]


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_losses_equal_trl(loss_type):
    g = torch.Generator().manual_seed(0)
    n = 6
    chosen, rejected, ref_c, ref_r = (-20 - 10 * torch.rand(n, generator=g, dtype=torch.float64) for _ in range(4))
    tok_c, tok_r = torch.randint(1, 9, (n,), generator=g), torch.randint(1, 9, (n,), generator=g)
    smoothing = 0.2 if loss_type == "robust" else 0.0
    ours, chosen_r, rejected_r = dpo_loss(chosen, rejected, ref_c, ref_r, loss_type=loss_type, beta=0.3,
                                          label_smoothing=smoothing, chosen_tokens=tok_c.double(),
                                          rejected_tokens=tok_r.double())
    want, metrics = trl_loss(chosen, rejected, ref_c, ref_r, tok_c, tok_r, loss_type, 0.3, smoothing)
    torch.testing.assert_close(ours.mean(), want.to(ours.dtype), rtol=1e-12, atol=1e-12)
    # TRL's reward metrics from the same log-probabilities
    assert metrics["rewards/chosen"][0] == pytest.approx(chosen_r.mean().item(), rel=1e-12)
    assert metrics["rewards/margins"][0] == pytest.approx((chosen_r - rejected_r).mean().item(), rel=1e-12)
    assert metrics["rewards/accuracies"][0] == pytest.approx((chosen_r > rejected_r).double().mean().item())


def test_losses_reject_unknown_type():
    with pytest.raises(ValueError, match="sigmoid, hinge, ipo, robust"):
        dpo_loss(*(torch.zeros(1) for _ in range(4)), loss_type="kto")


def test_row_formats_give_the_same_prompt_and_responses():
    user = [{"role": "user", "content": "2+2?"}]
    good, bad = {"role": "assistant", "content": "4"}, {"role": "assistant", "content": "5"}
    rows = [{"prompt": user, "chosen": [good], "rejected": [bad]},
            {"prompt": user, "chosen": "4", "rejected": "5"},
            {"chosen": user + [good], "rejected": user + [bad]},
            {"messages": user + [good], "rejected_response": "5"}]
    for row in rows:
        assert split_row(row, "f:1") == (user, [good], [bad])
    assert split_row({"prompt": "2+2?", "chosen": "4", "rejected": "5"}, "f:1") == ("2+2?", "4", "5")


@pytest.mark.parametrize("row,needle", [
    ({"prompt": "q", "chosen": "a"}, "needs \"chosen\" and \"rejected\""),
    ({"chosen": "a", "rejected": "b"}, "must be message lists"),
    ({"prompt": "q", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"}, "must be a string"),
    ({"chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]},
     "share no leading messages"),
    ({"messages": [{"role": "user", "content": "q"}], "rejected_response": "b"}, "no assistant message"),
])
def test_malformed_rows_name_file_and_line(row, needle):
    with pytest.raises(DataError, match="^data.jsonl:7") as e:
        split_row(row, "data.jsonl:7")
    assert needle in str(e.value)


def test_truncation_keeps_the_prompt_end_and_response_start():
    prompt, chosen, rejected = list(range(10, 20)), [1, 2, 3, 4], [5, 6]
    (c_ids, c_lab), (r_ids, r_lab) = pair_samples(prompt, chosen, rejected, seq_len=8, max_prompt_len=4)
    assert c_ids == [16, 17, 18, 19, 1, 2, 3] and c_lab == [-100, -100, -100, 1, 2, 3, 4]
    assert r_ids == [16, 17, 18, 19, 5] and r_lab == [-100, -100, -100, 5, 6]
    assert pair_samples(prompt, chosen, rejected, seq_len=8, max_prompt_len=None) is None  # no response fits


def test_preference_dataset_renders_with_the_chat_template(tmp_path, tiny_hf):
    """The chosen and rejected rows of a pair share their prompt tokens exactly; labels cover the
    response and its end-of-turn token, not the prompt."""
    from transformers import AutoTokenizer

    from megaswift.data.preference import PreferenceDataset, PreferenceLoader

    path = tmp_path / "p.jsonl"
    user = [{"role": "user", "content": "kalo mine"}]
    with open(path, "w") as f:
        f.write(json.dumps({"prompt": user, "chosen": "ruza tovi", "rejected": "zequ"}) + "\n")
        f.write(json.dumps({"prompt": "kalo", "chosen": " mine", "rejected": " ruza"}) + "\n")
    tok = AutoTokenizer.from_pretrained(tiny_hf["llama"])
    ds = PreferenceDataset(str(path), tok, seq_len=64)
    (c_ids, c_lab), (r_ids, r_lab) = ds[0]
    prompt = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    n = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert c_ids[:n] == r_ids[:n]
    assert all(lab == -100 for lab in c_lab[: n - 1]) and c_lab[n - 1] != -100
    assert tok.decode([t for t in c_lab if t != -100]) == "ruza tovi<|im_end|>"
    (c_ids, c_lab), _ = ds[1]
    assert c_lab[-1] == tok.eos_token_id  # plain strings end with EOS, as TRL does
    loader = PreferenceLoader(ds, seq_len=64, micro_batch_size=2, global_batch_size=2, dp_rank=0, dp_size=1, seed=0,
                              pad_id=0)
    (mb,) = loader.next_global_batch()
    assert mb["input_ids"].shape == (4, 64) and mb["pair_index"].numel() == 2
    first = mb["pair_index"][0].item()
    assert mb["input_ids"][0, : len(ds[first][0][0])].tolist() == ds[first][0][0]  # chosen rows first
    assert mb["input_ids"][2, : len(ds[first][1][0])].tolist() == ds[first][1][0]  # then the rejected ones


def test_reference_modes_agree(tmp_path, tiny_hf):
    """A frozen copy, the precomputed table and (under LoRA) the policy with adapters off give the
    same reference log-probabilities (the policy starts at the reference weights)."""
    from tests.helpers.train import train_config, write_preference_data

    from megaswift.train.build import build_trainer
    from megaswift.train.dpo import DPO

    data = write_preference_data(str(tmp_path / "p.jsonl"), n=8)
    tables = {}
    for name, overrides in {"copy": {}, "precompute": {"dpo__precompute_ref": True},
                            "adapters": {"model__lora__rank": 4}}.items():
        cfg = train_config(tiny_hf["qwen2"], data, str(tmp_path / name), **overrides)
        trainer = build_trainer(cfg, DPO())
        assert trainer.alg.mode == name
        mbs = [trainer.prepare_micro_batch(mb) for mb in trainer.data.next_global_batch()]
        trainer.alg.before_step(mbs)
        tables[name] = torch.cat([mb["ref_logps"] for mb in mbs])
    torch.testing.assert_close(tables["precompute"], tables["copy"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(tables["adapters"], tables["copy"], rtol=1e-6, atol=1e-6)


def test_dpo_refuses_packing_before_any_process_starts(tmp_path, tiny_hf):
    from tests.helpers.train import train_config, write_preference_data

    from megaswift.errors import ConfigError
    from megaswift.train.plan import plan_training

    cfg = train_config(tiny_hf["llama"], write_preference_data(str(tmp_path / "p.jsonl"), n=4), str(tmp_path),
                       data__packing=True)
    plan_training(cfg, 1, algorithm="sft")
    with pytest.raises(ConfigError, match="data.packing is not supported by dpo"):
        plan_training(cfg, 1, algorithm="dpo")
