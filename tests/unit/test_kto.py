"""KTO on one process: the loss against TRL's KTOTrainer on the same log-probabilities (values,
gradients, KL and reward metrics), the unpaired data formats, the KL rows, the config checks,
the three reference modes, and `megaswift train kto` for two steps."""
import json
import os
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from megaswift.data.unpaired import kl_partners, split_unpaired
from megaswift.errors import ConfigError, DataError
from megaswift.train.kto_loss import kl_estimate, kto_loss

WORDS = ["kalo", "mine", "ruza", "tovi", "zequ", "anel", "sato", "vimi", "loka", "neru"]


def write_kto_data(path: str, n: int = 32, seed: int = 0) -> str:
    """Unpaired rows in every supported format, in turn: message-list prompt and completion,
    string prompt and completion, message-list prompt with a string completion, messages; labels
    in an uneven pattern (desirable about 60%)."""
    import random

    rng = random.Random(seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)

    def text(k):
        return " ".join(rng.choice(WORDS) for _ in range(k))

    with open(path, "w") as f:
        for i in range(n):
            q, a, label = text(rng.randint(2, 6)), text(rng.randint(1, 6)), i % 5 < 3
            user = [{"role": "user", "content": q}]
            if i % 4 == 0:
                row = {"prompt": user, "completion": [{"role": "assistant", "content": a}]}
            elif i % 4 == 1:
                row = {"prompt": q, "completion": " " + a}
            elif i % 4 == 2:
                row = {"prompt": user, "completion": a}
            else:
                row = {"messages": user + [{"role": "assistant", "content": a}]}
            f.write(json.dumps({**row, "label": label}) + "\n")
    return path


def kto_config(hf_dir, data, output_dir, **overrides):
    from tests.helpers.train import train_config

    return train_config(hf_dir, data, output_dir, **overrides)


def run_kto_steps(rank, world, hf_dir, data, output_dir, steps=None, **overrides) -> list[dict]:
    """Build a KTO Trainer and run `steps` optimizer steps; per-step metrics."""
    from megaswift.train.build import build_trainer
    from megaswift.train.kto import KTO

    cfg = kto_config(hf_dir, data, output_dir, **overrides)
    trainer = build_trainer(cfg, KTO())
    return [trainer.train_step(trainer.data.next_global_batch()) for _ in range(steps or cfg.train.steps)]


# -- the loss against TRL ------------------------------------------------------------------------
class _Accelerator:
    device = torch.device("cpu")

    def gather_for_metrics(self, x):
        return x


def trl_kto(logps, ref_logps, kl_logps, ref_kl_logps, labels, beta, w_good, w_bad):
    """TRL 1.16 keeps KTO's loss inside KTOTrainer._compute_loss: call it with a stand-in trainer
    and a model whose per-token log-probabilities put each sequence's log-probability on its first
    token (the KL rows told apart by their input ids), so TRL's sums are exactly our inputs."""
    from trl.trainer.kto_trainer import KTOTrainer

    n = logps.shape[0]

    def model(input_ids, **kw):
        values = kl_logps if bool(input_ids[0, 0]) else logps
        per_token = values[:, None]  # sequences of 2 tokens: one log-probability each
        return SimpleNamespace(log_probs=per_token, entropy=torch.zeros_like(per_token),
                               mean_logits=torch.zeros_like(per_token))

    stub = SimpleNamespace(model=SimpleNamespace(training=True), accelerator=_Accelerator(), calculate_KL=True,
                           aux_loss_enabled=False, precompute_ref_logps=True, loss_type="kto", beta=beta,
                           desirable_weight=w_good, undesirable_weight=w_bad, _total_train_tokens=0, _tp_size=1,
                           _metrics=defaultdict(lambda: defaultdict(list)))
    stub._compute_kl_logps = lambda m, batch: KTOTrainer._compute_kl_logps(stub, m, batch)
    ones = torch.ones(n, 2, dtype=torch.long)
    inputs = {"input_ids": ones * 0, "attention_mask": ones, "completion_mask": ones, "KL_input_ids": ones,
              "KL_attention_mask": ones, "KL_completion_mask": ones, "label": labels,
              "ref_logps": ref_logps, "ref_KL_logps": ref_kl_logps}
    loss = KTOTrainer._compute_loss(stub, model, inputs, False)
    return loss, {k: v[0] for k, v in stub._metrics["train"].items()}


CASES = {"mixed": ([1, 0, 1, 1, 0, 0, 1], 0.5), "kl_clamped": ([1, 0, 0, 1, 1], -0.5),
         "all_desirable": ([1, 1, 1, 1], 0.3), "weighted": ([1, 0, 1, 0, 0, 0], 0.2)}


@pytest.mark.parametrize("case", list(CASES))
def test_loss_equals_trl(case):
    """fp32: the loss, its gradient with respect to the policy log-probabilities, z0 and the
    reward/log-probability metrics equal TRL's on the same numbers."""
    labels, kl_shift = CASES[case]
    labels = torch.tensor(labels, dtype=torch.bool)
    w_good, w_bad = (1.0, 1.0) if case != "weighted" else (1.3, 0.7)
    g = torch.Generator().manual_seed(len(labels))
    n = labels.numel()
    ref = -20 - 10 * torch.rand(n, generator=g)
    logps = ref + torch.randn(n, generator=g)
    ref_kl = -25 - 10 * torch.rand(n, generator=g)
    kl_logps = ref_kl + kl_shift + 0.3 * torch.randn(n, generator=g)

    a = logps.clone().requires_grad_()
    want, metrics = trl_kto(a, ref, kl_logps, ref_kl, labels, 0.3, w_good, w_bad)
    want.backward()
    b = logps.clone().requires_grad_()
    z0 = kl_estimate((kl_logps - ref_kl).sum(), torch.tensor(float(n)))
    losses, rewards = kto_loss(b, ref, labels, z0, beta=0.3, desirable_weight=w_good, undesirable_weight=w_bad)
    losses.mean().backward()
    torch.testing.assert_close(losses.mean(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-6, atol=1e-7)
    assert z0.item() == pytest.approx(metrics["kl"], rel=1e-6, abs=1e-6)
    assert (z0.item() == 0) == (case == "kl_clamped")
    assert metrics["rewards/chosen"] == pytest.approx(rewards[labels].mean().item(), rel=1e-6)
    assert metrics["logps/chosen"] == pytest.approx(logps[labels].mean().item(), rel=1e-6)
    if (~labels).any():
        assert metrics["rewards/rejected"] == pytest.approx(rewards[~labels].mean().item(), rel=1e-6)
    else:
        assert "rewards/rejected" not in metrics


# -- data --------------------------------------------------------------------------------------
def test_row_formats():
    user = [{"role": "user", "content": "q"}]
    reply = [{"role": "assistant", "content": "a"}]
    assert split_unpaired({"prompt": "q", "completion": " a", "label": True}, "f:1") == ("q", " a", True)
    assert split_unpaired({"prompt": user, "completion": "a", "label": False}, "f:1") == (user, reply, False)
    assert split_unpaired({"prompt": user, "completion": reply, "label": True}, "f:1") == (user, reply, True)
    assert split_unpaired({"messages": user + reply, "label": True}, "f:1") == (user, reply, True)


@pytest.mark.parametrize("row, needle", [
    ({"prompt": "q", "completion": "a"}, "needs \"label\""),
    ({"prompt": "q", "completion": "a", "label": 1}, "needs \"label\""),
    ({"prompt": "q", "label": True}, "got keys"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                   {"role": "user", "content": "q"}], "label": True}, "assistant's completion"),
    ({"prompt": "q", "completion": [{"role": "assistant", "content": "a"}], "label": True}, "must be a string"),
])
def test_malformed_rows_name_file_and_line(row, needle):
    with pytest.raises(DataError, match="f.jsonl:3") as e:
        split_unpaired(row, "f.jsonl:3")
    assert needle in str(e.value)


def test_kl_partners_skip_equal_prompts_and_need_two_prompts():
    assert kl_partners([[1], [2], [3]]) == [2, 0, 1]  # TRL's rotation by one
    assert kl_partners([[1], [1], [2], [2]]) == [3, 3, 1, 1]  # the nearest earlier with another prompt
    with pytest.raises(DataError, match="no mismatched"):
        kl_partners([[1, 2], [1, 2]])


def test_dataset_rows_and_kl_rows(tmp_path, tiny_hf):
    """A micro batch holds the examples' rows, then their KL rows: the same prompt tokens with the
    partner's completion; labels on completions only."""
    from transformers import AutoTokenizer

    from megaswift.data.unpaired import UnpairedDataset, UnpairedLoader

    path = str(tmp_path / "k.jsonl")
    with open(path, "w") as f:
        f.write(json.dumps({"prompt": [{"role": "user", "content": "kalo mine"}], "completion": "ruza tovi",
                            "label": True}) + "\n")
        f.write(json.dumps({"prompt": "kalo", "completion": " mine", "label": False}) + "\n")
    tok = AutoTokenizer.from_pretrained(tiny_hf["llama"])
    ds = UnpairedDataset(path, tok, seq_len=64)
    (ids0, lab0), (kl_ids0, kl_lab0), label0 = ds[0]
    (ids1, lab1), _, label1 = ds[1]
    assert (label0, label1) == (True, False) and ds.partner == [1, 0] and ds.desirable == 1
    assert tok.decode([t for t in lab0 if t != -100]) == "ruza tovi<|im_end|>"
    assert lab1[-1] == tok.eos_token_id
    n_prompt = next(i for i, t in enumerate(lab0) if t != -100) + 1
    assert kl_ids0[:n_prompt] == ids0[:n_prompt]  # example 0's prompt ...
    assert [t for t in kl_lab0 if t != -100] == [t for t in lab1 if t != -100]  # ... with example 1's completion
    loader = UnpairedLoader(ds, seq_len=64, micro_batch_size=2, global_batch_size=2, dp_rank=0, dp_size=1, seed=0,
                            pad_id=0)
    (mb,) = loader.next_global_batch()
    assert mb["input_ids"].shape == (4, 64)
    first = mb["example_index"][0].item()
    assert mb["label"][0].item() == ds[first][2]
    assert mb["input_ids"][2, : len(ds[first][1][0])].tolist() == ds[first][1][0]  # KL rows second


# -- config and plan checks ----------------------------------------------------------------------
@pytest.mark.parametrize("key, value", [("desirable_weight", 0), ("undesirable_weight", -1), ("beta", 0)])
def test_bad_settings_are_one_line_errors(tmp_path, key, value):
    with pytest.raises(ConfigError, match=f"kto.{key} must be >"):
        kto_config("unused", "unused", str(tmp_path), **{f"kto__{key}": value})


def test_kto_refuses_packing_before_any_process_starts(tmp_path, tiny_hf):
    from megaswift.train.plan import plan_training

    cfg = kto_config(tiny_hf["llama"], write_kto_data(str(tmp_path / "k.jsonl"), n=4), str(tmp_path),
                     data__packing=True)
    with pytest.raises(ConfigError, match="data.packing is not supported by kto"):
        plan_training(cfg, 1, algorithm="kto")


# -- the trainer -------------------------------------------------------------------------------
def test_reference_modes_agree_and_the_first_step_is_at_the_reference(tmp_path, tiny_hf):
    """A frozen copy, the precomputed table and (under LoRA) the policy with adapters off give the
    same reference log-probabilities; at the first step the policy is the reference, so z0 = 0,
    the rewards are 0 and each example's loss is its weight x 1/2."""
    from megaswift.train.build import build_trainer
    from megaswift.train.kto import KTO

    data = write_kto_data(str(tmp_path / "k.jsonl"), n=8)
    refs = {}
    for name, overrides in {"copy": {}, "precompute": {"kto__precompute_ref": True},
                            "adapters": {"model__lora__rank": 4}}.items():
        cfg = kto_config(tiny_hf["qwen2"], data, str(tmp_path / name), kto__desirable_weight=1.5, **overrides)
        trainer = build_trainer(cfg, KTO())
        assert trainer.alg.mode == name
        batch = trainer.data.next_global_batch()
        labels = torch.cat([mb["label"] for mb in batch])
        if name == "copy":
            m = trainer.train_step(batch)
            want = (1.5 * labels.sum() + (~labels).sum()).item() * 0.5 / labels.numel()
            assert m["loss"] == pytest.approx(want, rel=1e-6)
            assert abs(m["kl"]) < 1e-6 and abs(m["rewards/chosen"]) < 1e-6 and abs(m["rewards/rejected"]) < 1e-6
            assert m["count/desirable"] == pytest.approx(labels.sum().item())
            assert m["count/undesirable"] == pytest.approx((~labels).sum().item())
            assert m["logps/chosen"] < 0
        mbs = [trainer.prepare_micro_batch(mb) for mb in batch]
        with torch.no_grad():
            trainer.alg.before_step(mbs)
        refs[name] = torch.cat([mb["ref_logps"] for mb in mbs])
    torch.testing.assert_close(refs["precompute"], refs["copy"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(refs["adapters"], refs["copy"], rtol=1e-6, atol=1e-6)


def test_train_kto_from_the_cli(tmp_path, tiny_hf, capsys):
    """`megaswift train kto` (the CLI's entry point, in this process) runs 2 steps and writes the
    KTO metrics."""
    from megaswift.cli import main

    data = write_kto_data(str(tmp_path / "k.jsonl"), n=8)
    with pytest.raises(SystemExit) as e:
        main(["train", "kto", "--model.hf_path", tiny_hf["llama"], "--data.path", data, "--data.seq_len", "64",
              "--train.steps", "2", "--train.micro_batch_size", "2", "--train.global_batch_size", "4",
              "--train.output_dir", str(tmp_path / "run"), "--kto.beta", "0.2"])
    assert e.value.code == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("loss", "kl", "rewards/chosen", "rewards/rejected", "count/desirable", "count/undesirable"):
        assert all(key in r for r in rows), key


def test_progress_line_shows_the_kl_and_both_rewards(tmp_path):
    from megaswift.train.metrics import MetricsLogger

    m = {"step": 2, "loss": 0.5, "lr": 1e-5, "grad_norm": 1.0, "tokens_per_s": 100.0, "peak_mem_gb": 0.1,
         "kl": 0.25, "rewards/chosen": 0.125, "rewards/rejected": -0.5, "count/desirable": 3}
    line = MetricsLogger(str(tmp_path), total_steps=5, enabled=False).progress_line(m)
    assert "kl 0.250 r+ 0.125 r- -0.500" in line
