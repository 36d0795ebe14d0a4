"""The reference-free preference losses (dpo.loss_type simpo, cpo, orpo) on one process: values
and gradients against TRL's CPOTrainer / ORPOTrainer (1.16) on the same logits, the plan checks,
and that no reference model is built.

TRL's losses are called through its own `get_batch_loss_metrics` (its `concatenated_forward`,
`get_batch_logps`, NLL and `cpo_loss` / `odds_ratio_loss`) on a trainer object made without its
constructor, with a stand-in model that returns fixed logits. megaswift's side goes through
DPO.loss_from_output on the per-token cross-entropy of the same logits, divided by the pairs as
the engine does.

Two normalisations differ by design, so the inputs make them coincide:
- TRL's NLL is a token mean over the chosen rows of its micro batch; megaswift's is a per-pair
  mean of each chosen response's token mean (layout-independent under the engine's division by
  the global batch's pairs). They are equal when the chosen responses have equal token counts, so
  every chosen response here has CHOSEN_TOKENS tokens (the rejected ones vary, and prompts and
  padding vary).
- TRL 1.16's ORPO NLL also covers the prompt tokens (labels = input_ids wherever the attention
  mask is 1); megaswift's covers the response (the paper's L_SFT). The stand-in model ignores the
  attention mask, so passing the response mask as TRL's attention mask makes TRL score the
  response only.
"""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from megaswift.errors import ConfigError
from megaswift.train.dpo import DPO, DPOSection
from megaswift.train.dpo_loss import log1mexp, reference_free_loss

PAIRS, SEQ, VOCAB, CHOSEN_TOKENS = 4, 12, 11, 5
RTOL, ATOL = 1e-5, 1e-6  # fp32; measured differences are printed by the test


class _Accelerator:
    device = torch.device("cpu")

    def gather_for_metrics(self, x):
        return x


def _batch(seed=0):
    """TRL's tokenized pair batch: prompt labels -100, right padding, chosen responses of
    CHOSEN_TOKENS tokens, rejected ones of 2..6; and logits [2 pairs, SEQ, VOCAB] (leaf)."""
    g = torch.Generator().manual_seed(seed)
    batch = {}
    for side in ("chosen", "rejected"):
        ids = torch.randint(0, VOCAB, (PAIRS, SEQ), generator=g)
        labels = torch.full((PAIRS, SEQ), -100)
        for i in range(PAIRS):
            prompt = 1 + i % 3
            n = CHOSEN_TOKENS if side == "chosen" else 2 + (i + seed) % 5
            labels[i, prompt: prompt + n] = ids[i, prompt: prompt + n]
        batch[f"{side}_input_ids"] = ids
        batch[f"{side}_attention_mask"] = (labels != -100).long()  # see the module docstring (ORPO)
        batch[f"{side}_labels"] = labels
    logits = (2 * torch.randn(2 * PAIRS, SEQ, VOCAB, generator=g)).requires_grad_()
    return batch, logits


def _trl(loss_type, beta, cpo_alpha=1.0, simpo_gamma=0.5):
    """TRL's loss and metrics on `_batch`'s logits, and d loss / d logits."""
    batch, logits = _batch()
    if loss_type == "orpo":
        from trl.experimental.orpo import ORPOTrainer as cls
    else:
        from trl.experimental.cpo import CPOTrainer as cls
    t = cls.__new__(cls)
    t.__dict__.update(is_encoder_decoder=False, pad_token_id=0, padding_value=0, label_pad_token_id=-100, accelerator=_Accelerator(),
                      aux_loss_enabled=False, beta=beta, label_smoothing=0.0, alpha=0.0, cpo_alpha=cpo_alpha,
                      simpo_gamma=simpo_gamma, loss_type="sigmoid" if loss_type == "cpo" else loss_type)
    loss, metrics = t.get_batch_loss_metrics(lambda *a, **k: SimpleNamespace(logits=logits), batch)
    loss.backward()
    return loss.detach(), {k: float(v) for k, v in metrics.items()}, logits.grad


def _ours(section: DPOSection):
    """megaswift's loss (sum over pairs / pairs, as the engine divides), metrics (means) and
    d loss / d logits, through DPO.loss_from_output."""
    batch, logits = _batch()
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])[:, 1:]  # the next token's
    per_token = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100,
                                reduction="none").view(labels.shape)
    alg = DPO()
    alg.cfg, alg.ctx = section, SimpleNamespace(st=SimpleNamespace(cp_group=None))
    total, extra = alg.loss_from_output(per_token, {"labels": labels, "input_ids": ids})
    loss = total / PAIRS
    loss.backward()
    return loss.detach(), {k: float(v) / PAIRS for k, v in extra.items()}, logits.grad


CASES = {
    "simpo": dict(loss_type="simpo", beta=2.0, simpo_gamma=0.7),
    "simpo_cpo_alpha": dict(loss_type="simpo", beta=2.0, simpo_gamma=0.5, cpo_alpha=0.3),
    "cpo": dict(loss_type="cpo", beta=0.1),
    "cpo_alpha_2": dict(loss_type="cpo", beta=0.3, cpo_alpha=2.0),
    "orpo": dict(loss_type="orpo", beta=0.25),
}
# TRL's metric names that megaswift logs under the same name (and meaning)
SHARED = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
          "logps/rejected", "nll_loss")


@pytest.mark.parametrize("case", list(CASES))
def test_loss_and_gradients_equal_trl(case):
    kw = CASES[case]
    section = DPOSection(**kw)
    trl_kw = {"cpo_alpha": section.nll_weight if kw["loss_type"] != "orpo" else 0.0,
              "simpo_gamma": section.simpo_margin}
    want, want_m, want_g = _trl(kw["loss_type"], kw["beta"], **trl_kw)
    got, got_m, got_g = _ours(section)
    print(f"{case}: |loss diff| {abs(got - want).item():.2e}, max |grad diff| {(got_g - want_g).abs().max().item():.2e}"
          f" (max |grad| {want_g.abs().max().item():.2e})")
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(got_g, want_g, rtol=RTOL, atol=ATOL)
    keys = SHARED + (("log_odds_ratio", "log_odds_chosen") if kw["loss_type"] == "orpo" else ())
    for k in keys:
        if k == "nll_loss" and kw["loss_type"] != "orpo" and not section.nll_weight:
            assert want_m[k] == 0.0  # TRL skips the NLL when cpo_alpha is 0; megaswift logs it anyway
            continue
        assert got_m[k] == pytest.approx(want_m[k], rel=RTOL, abs=ATOL), k


def test_defaults_follow_trl():
    simpo, cpo, orpo = (DPOSection(loss_type=t) for t in ("simpo", "cpo", "orpo"))
    assert simpo.simpo_margin == 0.5 and simpo.nll_weight == 0.0 and cpo.nll_weight == 1.0 and orpo.nll_weight == 1.0
    assert simpo.simpo_gamma is None and cpo.cpo_alpha is None  # resolved when used, not written back


def test_log1mexp_is_accurate_on_both_branches():
    x = torch.tensor([-1e-6, -0.1, -0.69, -0.7, -5.0, -20.0], dtype=torch.float64)
    torch.testing.assert_close(log1mexp(x.float()).double(), torch.log(1 - torch.exp(x)), rtol=1e-6, atol=0)


def test_simpo_is_trl_form():
    """beta (a_c - a_r) - gamma with a the mean token log-probability (TRL: beta (a_c - a_r - gamma / beta))."""
    c, r, nc, nr = torch.tensor([-6.0]), torch.tensor([-9.0]), torch.tensor([3.0]), torch.tensor([2.0])
    loss, rc, rr, _ = reference_free_loss(c, r, nc, nr, loss_type="simpo", beta=2.0, simpo_gamma=0.5)
    assert loss.item() == pytest.approx(-F.logsigmoid(torch.tensor(2.0 * (-2.0 + 4.5) - 0.5)).item())
    assert (rc.item(), rr.item()) == (-4.0, -9.0)


@pytest.mark.parametrize("kw,needle", [
    (dict(loss_type="cpo", simpo_gamma=0.5), "dpo.simpo_gamma is SimPO's margin"),
    (dict(loss_type="sigmoid", cpo_alpha=1.0), "dpo.cpo_alpha weighs the NLL of cpo and simpo"),
    (dict(loss_type="orpo", cpo_alpha=1.0), "ORPO's NLL has weight 1"),
    (dict(loss_type="cpo", cpo_alpha=-1.0), "dpo.cpo_alpha"),
    (dict(loss_type="simpo", ref_path="/models/ref"), "dpo.ref_path (/models/ref) has no use"),
    (dict(loss_type="orpo", precompute_ref=True), "dpo.precompute_ref (True) has no use"),
    (dict(loss_type="cpo", reference="copy"), "dpo.reference (copy) has no use"),
    (dict(loss_type="cpo", rpo_alpha=0.5), "use dpo.cpo_alpha"),
    (dict(loss_type="simpo", label_smoothing=0.1), "dpo.label_smoothing is not used"),
])
def test_plan_checks_refuse_in_one_line(kw, needle):
    with pytest.raises(ConfigError) as e:
        DPOSection(**kw)
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("loss_type", ["simpo", "cpo", "orpo"])
def test_no_reference_model_is_built(loss_type, tmp_path, tiny_hf, monkeypatch):
    """No Reference (no copy, no adapters-off pass), no table; before_step attaches nothing; the
    planner's memory model predicts no reference; and the step runs."""
    from tests.helpers.train import train_config, write_preference_data

    from megaswift.planner.memory_model import reference_mode
    from megaswift.train import reference
    from megaswift.train.build import build_trainer

    def refuse(*a, **k):
        raise AssertionError("a reference model was built")

    monkeypatch.setattr(reference.Reference, "__init__", refuse)
    cfg = train_config(tiny_hf["llama"], write_preference_data(str(tmp_path / "p.jsonl"), n=8), str(tmp_path),
                       dpo__loss_type=loss_type, train__global_batch_size=4, train__steps=1)
    assert reference_mode(cfg, "dpo") == "none"
    trainer = build_trainer(cfg, DPO())
    alg = trainer.alg
    assert alg.mode == "none" and alg.reference is None and alg.table is None
    m = trainer.train_step(trainer.data.next_global_batch())
    assert m["loss"] > 0 and 0 <= m["rewards/accuracies"] <= 1 and m["nll_loss"] > 0
    assert ("log_odds_ratio" in m) == (loss_type == "orpo")
