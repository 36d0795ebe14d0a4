"""Aux-loss-free balancing and the sequence-wise balance loss on one process: the expert-bias
update rule on hand-made counts, the per-row loss against a direct computation from router
outputs (padding included), and the one-line config errors. Layout parity: tests/dist/
test_moe_parallel.py; resume: tests/dist/test_train_resume.py."""
import pytest
import torch

from megaswift.errors import ConfigError
from megaswift.models.moe import layer_stats, seq_aux_loss_parts
from megaswift.models.routers import route
from megaswift.train.expert_bias import ExpertBias, bias_delta, check_config


def test_bias_moves_towards_balance_and_ties_stay():
    counts = torch.tensor([[3.0, 1.0, 2.0, 2.0],   # mean 2: over, under, at the mean twice
                           [5.0, 5.0, 5.0, 5.0],   # balanced: nothing moves
                           [0.0, 0.0, 0.0, 7.0]], dtype=torch.float64)
    delta = bias_delta(counts, 0.01)
    assert delta.tolist() == [[-0.01, 0.01, 0.0, 0.0], [0.0] * 4, [0.01, 0.01, 0.01, -0.01]]
    assert bias_delta(counts, 0.5)[0].tolist() == [-0.5, 0.5, 0.0, 0.0]
    # a mean that is no whole number: never mistaken for a tie
    assert bias_delta(torch.tensor([[1.0, 2.0, 2.0]]), 1.0).tolist() == [[1.0, -1.0, -1.0]]


def _group_cfg(**kw):
    from megaswift.models.config import ModelConfig

    base = dict(family="deepseek_v3", vocab_size=100, hidden_size=16, ffn_hidden_size=32, num_layers=3,
                num_attention_heads=4, num_query_groups=2, kv_channels=4, num_moe_experts=4, moe_ffn_hidden_size=8,
                moe_router_topk=2, moe_router="sigmoid_group", moe_router_num_groups=2, moe_router_group_topk=2,
                moe_router_expert_bias=True, moe_layer_ids=[1, 2])
    return ModelConfig(**{**base, **kw})


def test_model_biases_move_by_their_layer_counts_without_a_host_sync():
    from megaswift.models.decoder import GPTModel
    from tests.unit.test_host_syncs import CountHostSyncs

    model = GPTModel(_group_cfg())
    eb = ExpertBias(model, 0.25)
    assert [row for row, _ in eb.local] == [0, 1]  # layer 1 -> stats row 0, layer 2 -> row 1
    counts = torch.tensor([[4.0, 0.0, 2.0, 2.0], [1.0, 1.0, 1.0, 5.0]], dtype=torch.float64)
    with CountHostSyncs() as syncs:
        delta = eb.update(counts)
    assert syncs.calls == []
    assert model.get_parameter("decoder.layers.1.mlp.router.expert_bias").tolist() == [-0.25, 0.25, 0.0, 0.0]
    assert model.get_parameter("decoder.layers.2.mlp.router.expert_bias").tolist() == [0.25, 0.25, 0.25, -0.25]
    assert torch.equal(eb.gathered(torch.device("cpu")), delta)  # the biases started at 0


def _routed(E=6, k=2, rows=3, seq=8, layers=2, seed=0):
    """Router outputs of `layers` layers over rows x seq tokens, with leaf logits."""
    g = torch.Generator().manual_seed(seed)
    logits = [(torch.randn(rows * seq, E, generator=g) * 2).requires_grad_() for _ in range(layers)]
    return logits, [route(lg, k, norm_topk_prob=True) for lg in logits]


def _direct_seq_loss(logits, routed, mask, E, k):
    """DeepSeek-V3's formula written out: per layer and per row with T real tokens,
    sum_i (E / (k T) #{t: i in topk(t)}) (1/T sum_t p_it), mean over rows with a real token,
    summed over layers."""
    rows = mask.shape[0]
    total = 0.0
    for (probs, _, ids) in routed:
        per_row = []
        for r in range(rows):
            real = mask[r].bool()
            T = int(real.sum())
            if T == 0:
                continue
            p = probs.view(rows, -1, E)[r][real]
            chosen = ids.view(rows, -1, k)[r][real]
            f = torch.stack([(chosen == i).any(-1).sum() for i in range(E)]).float() * E / (k * T)
            per_row.append((f * p.mean(0)).sum())
        total = total + torch.stack(per_row).mean()
    return total


def test_seq_loss_equals_the_per_row_formula_with_padding():
    E, k, rows, seq = 6, 2, 3, 8
    logits, routed = _routed(E, k, rows, seq)
    mask = torch.ones(rows, seq)
    mask[0, 5:] = 0   # padding at the end of a row
    mask[2, :] = 0    # a row of padding only: not a sequence
    stats = torch.stack([layer_stats(lg, probs, ids, mask.reshape(-1), rows=rows)
                         for lg, (probs, _, ids) in zip(logits, routed)])
    assert stats.shape == (2, rows, 2 * E + 2)
    aux, z, values = seq_aux_loss_parts(stats, E, k, (), None)
    want = _direct_seq_loss(logits, routed, mask, E, k)
    torch.testing.assert_close(aux, want, rtol=1e-6, atol=0)
    torch.testing.assert_close(values["aux"], want.detach(), rtol=1e-6, atol=0)
    got_grads = torch.autograd.grad(aux, logits, retain_graph=True)
    want_grads = torch.autograd.grad(want, logits)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    # the per-row statistics summed over rows are the global mode's
    for lg, (probs, _, ids), per_row in zip(logits, routed, stats):
        torch.testing.assert_close(per_row.sum(0), layer_stats(lg, probs, ids, mask.reshape(-1)), rtol=1e-6, atol=1e-6)
    assert values["counts"].sum().item() == 2 * k * mask.sum().item()  # k per real token, 2 layers
    assert torch.equal(values["counts"], stats[:, :, E + 1: 2 * E + 1].sum(1))


def test_seq_loss_of_a_row_split_in_two_adds_up():
    """A row's tokens on two ranks (tp or cp): each part uses its own probability sums with the
    row's whole counts and token number; the two parts add up to the loss. Here the reduction
    over the row's ranks is done by hand."""
    E, k, rows, seq = 4, 2, 2, 6
    logits, routed = _routed(E, k, rows, seq, layers=1, seed=3)
    (lg,), ((probs, _, ids),) = logits, routed
    mask = torch.ones(rows, seq)
    mask[1, 4:] = 0
    whole = layer_stats(lg, probs, ids, mask.reshape(-1), rows=rows).unsqueeze(0)
    want, _, _ = seq_aux_loss_parts(whole, E, k, (), None)
    def half(t, h):  # the tokens of every row's first or second half, row-major
        return t.view(rows, seq, -1)[:, h * seq // 2: (h + 1) * seq // 2].reshape(rows * seq // 2, -1)

    halves = [layer_stats(half(lg, h), half(probs, h), half(ids, h), half(mask.reshape(-1, 1), h).reshape(-1),
                          rows=rows) for h in range(2)]
    full = (halves[0] + halves[1]).detach()  # what the all-reduce over the row's ranks gives
    parts = []
    for h in range(2):
        other = full - halves[h].detach()
        # this rank's statistics with the other rank's counts and tokens added (not its P sums)
        mine = torch.cat([halves[h][:, :E + 1], halves[h][:, E + 1:] + other[:, E + 1:]], dim=1).unsqueeze(0)
        parts.append(seq_aux_loss_parts(mine, E, k, (), None)[0])
    torch.testing.assert_close(parts[0] + parts[1], want, rtol=1e-6, atol=0)


def test_config_errors_are_one_line():
    from megaswift.config import load_config
    from tests.unit.test_moe import _cfg as softmax_cfg

    with pytest.raises(ConfigError, match=r"moe.bias_update_rate must be >= 0"):
        load_config(None, ["--moe.bias_update_rate", "-0.1"])
    with pytest.raises(ConfigError, match=r"moe.aux_loss_type"):
        load_config(None, ["--moe.aux_loss_type", "sequence"])
    cfg = load_config(None, ["--moe.bias_update_rate", "1e-3"])
    with pytest.raises(ConfigError, match=r"^moe.bias_update_rate=0.001 .* which qwen3_moe models do not have") as e:
        check_config(cfg, softmax_cfg())
    assert "\n" not in str(e.value)
    check_config(cfg, _group_cfg())
    check_config(load_config(None, ["--model.lora.rank", "4"]), _group_cfg())  # rate 0: fine with LoRA
    with pytest.raises(ConfigError, match=r"with LoRA \(model.lora.rank=4\)"):
        check_config(load_config(None, ["--moe.bias_update_rate", "1e-3", "--model.lora.rank", "4"]), _group_cfg())


def test_plan_refuses_bias_updates_for_a_model_without_bias(moe_hf, tmp_path):
    from megaswift.train.plan import plan_training
    from tests.helpers.train import train_config, write_chat_data

    data = write_chat_data(str(tmp_path / "d.jsonl"), n=4)
    cfg = train_config(moe_hf["mixtral"], data, str(tmp_path / "out"), moe__bias_update_rate=0.01)
    with pytest.raises(ConfigError, match="which mixtral models do not have"):
        plan_training(cfg, 1)


def test_a_skipped_step_leaves_the_bias(tmp_path):
    """train.on_nonfinite skip: the step whose loss is NaN moves no bias (its weights stay too);
    the steps around it move every layer's bias."""
    import math

    from megaswift.testing.tiny import make_tiny_hf
    from megaswift.train.build import build_trainer
    from megaswift.train.sft import SFT
    from tests.helpers.train import train_config, write_chat_data

    hf = make_tiny_hf("deepseek_v3", str(tmp_path / "hf"), seed=30, num_hidden_layers=3)
    data = write_chat_data(str(tmp_path / "d.jsonl"), n=16)
    trainer = build_trainer(train_config(hf, data, str(tmp_path / "out"), train__on_nonfinite="skip",
                                         moe__bias_update_rate=0.05, train__steps=3), SFT())
    plain = trainer.alg.loss_sum
    trainer.alg.loss_sum = lambda model, mb: ((lambda r: (r[0] * float("nan"), r[1]))(plain(model, mb))
                                              if trainer.step + 1 == 2 else plain(model, mb))
    biases = [p for p in trainer.model.parameters() if getattr(p, "expert_bias", False)]
    seen = [torch.cat([b.detach().clone() for b in biases])]
    rows = []
    for _ in range(3):
        rows.append(trainer.train_step(trainer.data.next_global_batch()))
        seen.append(torch.cat([b.detach().clone() for b in biases]))
    assert [r.get("skipped") for r in rows] == [None, 1, 0] and math.isnan(rows[1]["loss"])
    assert torch.equal(seen[2], seen[1])
    assert not torch.equal(seen[1], seen[0]) and not torch.equal(seen[3], seen[2])
    assert rows[1]["moe_expert_bias_absmax"] == rows[0]["moe_expert_bias_absmax"]
