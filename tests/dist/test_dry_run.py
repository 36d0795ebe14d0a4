"""The dry run (megaswift/planner/dry_run.py) against a real run on gloo, measured by the same
StepAccountant: for every rank of each layout, the second training step of a real run (real
tensors, real collectives, `Trainer.train_step`, torch's own pipeline schedule) and the dry run
of that rank position (one process on the fake process group, fake tensors, the engine's parts,
the simulated schedule) hold the same parameter, gradient and AdamW-state bytes exactly, peak
within 5% of each other, and send the same bytes per collective class over tp, cp, ep and the
pipeline's point-to-point (the real step's scalar metric reductions aside).

Layouts, 4 ranks each at most: tp=2 with SP x pp=2 (1F1B, 2 micro batches) with full
recompute; cp=2 (ring) x dp=2 with ZeRO-1 and 2 micro batches; DPO at tp=2 with a frozen copy
as the reference (its weights count as parameters); an MoE at tp=2 x ep=2 with ZeRO-1 and
selective recompute; deepseek_v3 (multi-latent attention, a dense first layer, a shared expert,
the group-limited router with its expert bias) at tp=2 with SP x ep=2 with ZeRO-1; glm4_moe
(partial RoPE, QKV bias, q/k norms) at pp=2 x ep=2. fp32 on CPU, as the real run computes.
"""
import pytest

from megaswift.testing.dist import run_distributed

PEAK_RTOL = 0.05

LAYOUTS = {
    "tp2_sp_pp2_recompute": ("qwen3", 4, {"parallel.tp": 2, "parallel.sp": True, "parallel.pp": 2,
                                          "train.recompute": "full", "train.global_batch_size": 2}),
    "cp2_dp2_zero1": ("llama", 4, {"parallel.cp": 2, "optim.zero": 1, "train.global_batch_size": 4}),
    # the loop expert backend: torch's fake grouped GEMM takes bf16 only, as CUDA's does
    "dpo_tp2_copy_reference": ("qwen3", 2, {"parallel.tp": 2, "train.global_batch_size": 2}, "dpo"),
    "moe_tp2_ep2_zero1": ("qwen3_moe", 2, {"parallel.tp": 2, "parallel.ep": 2, "optim.zero": 1,
                                           "train.recompute": "selective", "train.global_batch_size": 2,
                                           "moe.expert_backend": "loop"}),
    "mla_tp2_sp_ep2_zero1": ("deepseek_v3", 4, {"parallel.tp": 2, "parallel.sp": True, "parallel.ep": 2,
                                                "optim.zero": 1, "train.global_batch_size": 2,
                                                "moe.expert_backend": "loop"}),
    # the load-balancing loss on: see latent_hf
    "glm4_moe_pp2_ep2": ("glm4_moe", 4, {"parallel.pp": 2, "parallel.ep": 2, "train.global_batch_size": 4,
                                         "moe.expert_backend": "loop", "moe.aux_loss_coef": 0.01}),
}


@pytest.fixture(scope="module")
def latent_hf(tmp_path_factory):
    """The families with the sigmoid group-limited router (testing/tiny.py): deepseek_v3, glm4_moe."""
    from megaswift.testing.tiny import make_tiny_hf

    root = tmp_path_factory.mktemp("latent_hf")
    # glm4_moe with experts on both layers (and the pp case with a load-balancing loss): the dry
    # run's stand-in neighbours (parallel/pipeline.py run_with_fake_neighbours) receive a gradient
    # for every stage output and send only the input gradients that are not None, where torch's
    # stages exchange one for every tensor that requires a gradient: the router statistics' from
    # the first MoE layer on, used by a loss or not (planner/comm.py counts the real exchange)
    return {"deepseek_v3": make_tiny_hf("deepseek_v3", str(root / "deepseek_v3"), seed=30),
            "glm4_moe": make_tiny_hf("glm4_moe", str(root / "glm4_moe"), seed=31, first_k_dense_replace=0)}


def _config(hf_dir, overrides):
    from megaswift.config import load_config

    base = {"model.hf_path": hf_dir, "data.seq_len": 32, "train.micro_batch_size": 1,
            "model.attention_backend": "sdpa"}
    return load_config(None, [f"--{k}={v}" for k, v in {**base, **overrides}.items()])


def _real(rank, world, hf_dir, overrides, algorithm):
    from megaswift.planner.dry_run import measure_step
    from megaswift.parallel.state import ParallelState
    from megaswift.setup import hf_model_config, plan_layout

    cfg = _config(hf_dir, overrides)
    mc = hf_model_config(hf_dir, cfg)
    st = ParallelState.build(plan_layout(cfg, world, mc))
    return measure_step(cfg, mc, st, algorithm, fake=False, weights=hf_dir).to_dict()


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_dry_run_matches_a_real_run(name, tiny_hf, moe_hf, latent_hf):
    from megaswift.planner.dry_run import dry_run_position
    from megaswift.setup import hf_model_config

    family, world, overrides, *algorithm = LAYOUTS[name]
    algorithm = algorithm[0] if algorithm else "sft"
    hf_dir = {**tiny_hf, **moe_hf, **latent_hf}[family]
    real = run_distributed(_real, world, hf_dir, overrides, algorithm)
    cfg = _config(hf_dir, overrides)
    mc = hf_model_config(hf_dir, cfg)
    for rank, measured in enumerate(real):
        dry = dry_run_position(cfg, mc, world, rank, algorithm, cuda_optimizer=False).to_dict()
        assert dry["params"] == measured["params"], (rank, dry["params"], measured["params"])
        assert dry["state_bytes"] == measured["state_bytes"], (rank, dry["state_bytes"], measured["state_bytes"])
        assert abs(dry["peak_bytes"] - measured["peak_bytes"]) <= PEAK_RTOL * measured["peak_bytes"], (rank, dry["peak_bytes"], measured["peak_bytes"], dry["peak_by_category"], measured["peak_by_category"])
        for cls in ("tp", "cp", "ep", "etp"):
            assert dry["comm_bytes"].get(cls, 0) == measured["comm_bytes"].get(cls, 0), (rank, cls, dry["comm_detail"], measured["comm_detail"])
        for kind in ("pp send", "pp recv"):
            assert dry["comm_detail"].get(kind) == measured["comm_detail"].get(kind), (rank, kind, dry["comm_detail"], measured["comm_detail"])
