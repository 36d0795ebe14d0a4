"""Expert parallelism on gloo, proven against transformers and the single-process run.

- logits: `verify` (what `megaswift verify` runs) at (ep=2), (tp=2, ep=2), (ep=2, etp=2) for
  qwen3_moe, mixtral and qwen2_moe (shared expert), within 1e-4 of transformers (measured: below
  1e-6);
- import: a rank reads only its own experts' HF tensors;
- training: 5 SFT steps at (ep=2), (tp=2, ep=2), (dp=2, ep=2, ZeRO-1), (ep=2, etp=2), (pp=2,
  tp=2, ep=2), (cp=2, ep=2) and, with a shared expert, (tp=2, sp, ep=2) give the single-process losses, gradient norms and load-balancing
  losses within relative 1e-5, with the load-balancing and z-losses in the gradient;
- checkpoints: a run saved at (ep=2, etp=2, ZeRO-1) resumes in one process and at (tp=2, ep=2);
- balancing (DeepSeek-V3's sequence-wise loss and expert-bias updates, train/expert_bias.py): 5
  SFT steps of 3-layer deepseek_v3 at (tp=2, sp), (dp=2, ep=2, ZeRO-1) and (pp=2, a biased
  layer on each stage), and glm4_moe at (cp=2, ep=2), give the single-process losses, gradient
  norms and losses within 1e-5, the tokens per expert exactly, and the same final expert
  biases (measured: bit for bit), identical on every replica.

The load-balancing loss is taken over each global micro batch (micro batch i of every dp rank),
so a layout matches the single-process run with the same global micro batches: with dp > 1 the
reference uses micro_batch_size x dp and one micro batch per step (as the layouts do).
"""
import os

import numpy as np
import pytest
import torch

from tests.helpers.train import run_steps, run_train, write_chat_data
from megaswift.testing.dist import run_distributed

RTOL = 1e-5
MOE = {"moe__z_loss_coef": 1e-3}  # the checkpoint turns the load-balancing loss on; add the z-loss too


def _model(world, hf_dir, overrides):
    """An empty model for this rank at the layout the `--key=value` overrides give."""
    import torch

    from megaswift.setup import build_model, hf_model_config, plan_layout
    from megaswift.config import load_config
    from megaswift.parallel.state import ParallelState

    cfg = load_config(None, [f"--{k}={v}" for k, v in overrides.items()])
    mc = hf_model_config(hf_dir, cfg)
    return build_model(cfg, mc, ParallelState.build(plan_layout(cfg, world, mc)), torch.float32)


def _verify(rank, world, hf_dir, overrides):
    import torch

    from megaswift.convert.verify import verify

    model = _model(world, hf_dir, overrides)
    return verify(hf_dir, model, torch.float32, seq_len=64, batch_size=2, attention_backend="reference")


VERIFY = {"ep2": (2, {"parallel.ep": 2}), "tp2_ep2": (2, {"parallel.tp": 2, "parallel.ep": 2}),
          "ep2_etp2": (4, {"parallel.ep": 2, "parallel.etp": 2}),
          "pp2_ep2": (4, {"parallel.pp": 2, "parallel.ep": 2})}


@pytest.mark.parametrize("layout", list(VERIFY))
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "qwen2_moe"])
def test_logits_match_transformers(moe_hf, family, layout):
    world, overrides = VERIFY[layout]
    results = run_distributed(_verify, world, moe_hf[family], overrides)
    assert all(r == results[0] for r in results)
    assert results[0]["max_abs_diff"] < 1e-4, results[0]


def _capacity_logits(rank, world, hf_dir, capacity_factor, force_balance=False):
    import torch

    from megaswift.convert.hf_import import load_hf_into_model
    from megaswift.convert.verify import megaswift_logits

    model = _model(world, hf_dir, {"parallel.ep": world})
    load_hf_into_model(model, hf_dir)
    model.set_moe_options(capacity_factor=capacity_factor, force_balance=force_balance)
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    return megaswift_logits(model, tokens)


def test_capacity_factor_drops_the_same_tokens_at_any_ep(moe_hf):
    """Every rank routes the same tokens here, so ep=2 with capacity 0.5 drops exactly what one
    process drops; and dropping changes the logits (it happened)."""
    import torch

    hf = moe_hf["mixtral"]
    one = _capacity_logits(0, 1, hf, 0.5)
    two = run_distributed(_capacity_logits, 2, hf, 0.5)
    torch.testing.assert_close(two[0], one, rtol=1e-5, atol=1e-6)
    assert (one - _capacity_logits(0, 1, hf, None)).abs().max() > 1e-3


def _reads(rank, world, hf_dir):
    """Import at (ep=2, etp=2) with the reader recording every tensor it opens."""
    from megaswift.convert.hf_import import load_hf_into_model
    from megaswift.convert.hf_io import HFReader

    model = _model(world, hf_dir, {"parallel.ep": 2, "parallel.etp": 2})
    reader = HFReader(hf_dir)
    seen = set()
    read = reader.read
    reader.read = lambda name, *a: (seen.add(name), read(name, *a))[1]
    load_hf_into_model(model, hf_dir, reader)
    return model.st.ep_rank, sorted(seen)


def test_import_reads_only_own_experts(moe_hf):
    E = 8  # qwen3_moe tiny: 8 experts, ep=2 -> 4 per rank
    for ep_rank, names in run_distributed(_reads, 4, moe_hf["qwen3_moe"]):
        experts = {int(n.split(".experts.")[1].split(".")[0]) for n in names if ".experts." in n}
        assert experts == set(range(ep_rank * E // 2, (ep_rank + 1) * E // 2)), (ep_rank, sorted(experts))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_chat_data(str(tmp_path_factory.mktemp("moe") / "train.jsonl"))


@pytest.fixture(scope="module")
def reference(moe_hf, data, tmp_path_factory):
    cache = {}

    def get(family, mbs):
        if (family, mbs) not in cache:
            cache[family, mbs] = run_steps(0, 1, moe_hf[family], data, str(tmp_path_factory.mktemp("ref")),
                                           train__micro_batch_size=mbs, **MOE)
        return cache[family, mbs]
    return get


# name -> (family, world, reference micro batch size, overrides)
LAYOUTS = {
    "ep2": ("qwen3_moe", 2, 8, {"parallel__ep": 2, "train__micro_batch_size": 4}),
    "tp2_ep2": ("mixtral", 2, 2, {"parallel__tp": 2, "parallel__ep": 2}),
    "tp2_sp_ep2": ("qwen3_moe", 2, 2, {"parallel__tp": 2, "parallel__sp": True, "parallel__ep": 2}),
    "dp2_tp2_ep2_zero1": ("qwen3_moe", 4, 8, {"parallel__tp": 2, "parallel__ep": 2, "optim__zero": 1,
                                              "train__micro_batch_size": 4}),
    "ep2_etp2": ("mixtral", 4, 8, {"parallel__ep": 2, "parallel__etp": 2}),
    "pp2_tp2_ep2": ("qwen3_moe", 4, 2, {"parallel__pp": 2, "parallel__tp": 2, "parallel__ep": 2}),
    "cp2_ep2": ("mixtral", 2, 2, {"parallel__cp": 2, "parallel__ep": 2}),
    "ep2_recompute_full": ("qwen3_moe", 2, 8, {"parallel__ep": 2, "train__micro_batch_size": 4,
                                               "train__recompute": "full"}),
    "shared_tp2_sp_ep2": ("qwen2_moe", 2, 2, {"parallel__tp": 2, "parallel__sp": True, "parallel__ep": 2}),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_training_matches_single_process(name, reference, moe_hf, data, tmp_path):
    family, world, ref_mbs, overrides = LAYOUTS[name]
    want = reference(family, ref_mbs)
    results = run_distributed(run_steps, world, moe_hf[family], data, str(tmp_path), **overrides, **MOE)
    for got in results:
        for key in ("loss", "grad_norm", "moe_aux_loss", "moe_z_loss"):
            np.testing.assert_allclose([m[key] for m in got], [m[key] for m in want], rtol=RTOL, err_msg=key)
        assert [m["moe_tokens_per_expert"] for m in got] == [m["moe_tokens_per_expert"] for m in want]
    first = want[0]
    assert set(first["moe_tokens_per_expert"]) == {str(i) for i in moe_hf_layers(family)}
    assert first["moe_max_load_ratio"] >= 1.0 and first["moe_aux_loss"] > 0


def moe_hf_layers(family):
    return [0] if family == "qwen3_moe" else [0, 1]  # the tiny qwen3_moe keeps layer 1 dense


def test_checkpoint_resumes_at_other_expert_layouts(moe_hf, data, tmp_path):
    """Saved at (ep=2, etp=2, ZeRO-1) after 3 steps; resumed in one process and at (tp=2, ep=2):
    steps 4-5 match a straight single-process run."""
    hf = moe_hf["mixtral"]
    common = dict(train__micro_batch_size=8, **MOE)
    want = run_train(0, 1, hf, data, str(tmp_path / "straight"), **common)
    first = str(tmp_path / "first")
    run_distributed(run_train, 4, hf, data, first, train__steps=3, parallel__ep=2, parallel__etp=2, optim__zero=1,
                    **{**common, "train__micro_batch_size": 2})
    step3 = os.path.join(first, "checkpoints", "step_3")
    one = run_train(0, 1, hf, data, str(tmp_path / "one"), checkpoint__load=step3, **common)
    two = run_distributed(run_train, 2, hf, data, str(tmp_path / "two"), checkpoint__load=step3, parallel__tp=2,
                          parallel__ep=2, **common)[0]
    for got in (one, two):
        assert [m["step"] for m in got] == [4, 5]
        for key in ("loss", "grad_norm", "moe_aux_loss"):
            np.testing.assert_allclose([m[key] for m in got], [m[key] for m in want[3:]], rtol=RTOL, err_msg=key)


def test_force_balanced_routing_is_the_same_at_any_ep(moe_hf):
    """moe.router_force_balance (dry runs, benchmarks): ep=2 gives the one-process logits, and
    the imposed routing changes them (the router's own top-k is really replaced)."""
    import torch

    hf = moe_hf["qwen3_moe"]
    one = _capacity_logits(0, 1, hf, None, True)
    two = run_distributed(_capacity_logits, 2, hf, None, True)
    torch.testing.assert_close(two[0], one, rtol=1e-5, atol=1e-6)
    assert (one - _capacity_logits(0, 1, hf, None)).abs().max() > 1e-3


# DeepSeek-V3 balancing: the sequence-wise loss in the gradient, and a bias rate large enough to
# change the routing within the run (DeepSeek-V3 uses 1e-3)
BALANCE = {"moe__aux_loss_coef": 0.01, "moe__aux_loss_type": "seq", "moe__bias_update_rate": 0.05,
           "moe__z_loss_coef": 1e-3}


@pytest.fixture(scope="module")
def bias_hf(tmp_path_factory):
    """3 layers, the first dense (first_k_dense_replace): pp=2 with pp_layers [2, 1] puts an MoE
    layer, and its expert bias, on each stage."""
    from megaswift.testing.tiny import make_tiny_hf

    root = tmp_path_factory.mktemp("bias_hf")
    return {f: make_tiny_hf(f, str(root / f), seed=30 + i, num_hidden_layers=3)
            for i, f in enumerate(("deepseek_v3", "glm4_moe"))}


def _steps_and_biases(rank, world, hf_dir, data, output_dir, **overrides):
    """run_steps, and this rank's expert biases before and after."""
    from tests.helpers.train import train_config
    from megaswift.train.build import build_trainer
    from megaswift.train.sft import SFT

    trainer = build_trainer(train_config(hf_dir, data, output_dir, **overrides), SFT())

    def biases():
        return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if getattr(p, "expert_bias", False)}
    before = biases()
    metrics = [trainer.train_step(trainer.data.next_global_batch()) for _ in range(trainer.cfg.train.steps)]
    return metrics, before, biases()


@pytest.fixture(scope="module")
def balance_reference(bias_hf, data, tmp_path_factory):
    cache = {}

    def get(family, mbs):
        if (family, mbs) not in cache:
            cache[family, mbs] = _steps_and_biases(0, 1, bias_hf[family], data, str(tmp_path_factory.mktemp("bref")),
                                                   train__micro_batch_size=mbs, **BALANCE)
        return cache[family, mbs]
    return get


# name -> (family, world, reference micro batch size, overrides)
BALANCE_LAYOUTS = {
    "tp2_sp": ("deepseek_v3", 2, 2, {"parallel__tp": 2, "parallel__sp": True}),
    "dp2_ep2_zero1": ("deepseek_v3", 2, 8, {"parallel__ep": 2, "optim__zero": 1, "train__micro_batch_size": 4}),
    "pp2": ("deepseek_v3", 2, 2, {"parallel__pp": 2, "parallel__pp_layers": "[2,1]"}),
    "cp2_ep2": ("glm4_moe", 2, 2, {"parallel__cp": 2, "parallel__ep": 2}),
}


@pytest.mark.parametrize("name", list(BALANCE_LAYOUTS))
def test_balancing_matches_single_process(name, balance_reference, bias_hf, data, tmp_path):
    family, world, ref_mbs, overrides = BALANCE_LAYOUTS[name]
    want, start, want_bias = balance_reference(family, ref_mbs)
    # the biases really moved, by whole steps of the rate, and the routing with them
    moved = torch.stack([(want_bias[n] - start[n]).abs().max() for n in start])
    assert len(start) == 2 and (moved >= 0.05 - 1e-6).all(), moved
    assert len({m["moe_expert_bias_absmax"] for m in want}) > 1
    results = run_distributed(_steps_and_biases, world, bias_hf[family], data, str(tmp_path), **overrides, **BALANCE)
    held: dict = {}
    for got, _, biases in results:
        for key in ("loss", "grad_norm", "moe_aux_loss", "moe_z_loss", "moe_expert_bias_absmax"):
            np.testing.assert_allclose([m[key] for m in got], [m[key] for m in want], rtol=RTOL, err_msg=key)
        assert [m["moe_tokens_per_expert"] for m in got] == [m["moe_tokens_per_expert"] for m in want]
        for n, b in biases.items():  # every replica of a layer's bias is the same, bit for bit
            assert n not in held or torch.equal(b, held[n]), n
            held[n] = b
    assert set(held) == set(want_bias)
    for n, b in held.items():
        torch.testing.assert_close(b, want_bias[n], rtol=RTOL, atol=0)
