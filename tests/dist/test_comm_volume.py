"""The planner's communication arithmetic (megaswift/planner/comm.py) against real gloo steps.

Each layout runs two steps (SFT unless it says DPO) of a tiny random model; the second runs
inside the planner's StepAccountant, which counts every collective's bytes by process-group
class and kind, and the count must equal `predict_comm` exactly, byte for byte, class by class
and kind by kind, on every rank. fp32 (no autocast) except tp2_ep2_zero1_bf16, which checks the
bf16 autocast dtypes.

deepseek_v3 (multi-latent attention with a q latent, a dense first layer, a shared expert, 8
experts in 4 groups) and glm4_moe (partial RoPE, QKV bias, q/k norms), both with the sigmoid
group-limited router and its expert bias: MLA under SP gathers the latents and the rope key, not
the hidden states, and sums the replicated down-projections' partial gradients; without SP the
latents' gradients are summed; with ring attention the K/V blocks are concatenated (v heads
narrower than q/k), Ulysses moves q, k and v at their own widths; the expert bias stays out of
the dp buckets and travels with the step's MoE statistics over pp, whose gradient crosses a stage
boundary only after an MoE layer.

qwen3_next (Gated DeltaNet in layers 0-2, gated attention in layer 3) under SP: each DeltaNet
layer's in_proj_qkvz and in_proj_ba gather the hidden states and reduce-scatter their gradients
separately, out_proj sums as linear_proj does, and finalize_grads sums the gated norm's per-head
weight (not q/k norms) over tp.

Not here (checked once by hand the same way, all exact): LoRA on linear_qkv alone (tp2), on
linear_proj alone (tp2 sp), under ZeRO-1 (dp2) and pp2; DPO under tp2 sp, pp2 with LoRA (the
adapters-off reference and its forward_stages sends), Ulysses cp2 with a precomputed reference,
tp2 LoRA with a copy reference. Nor: hybrid cp, etp, interleaved and zbv pipelines, a gated
shared expert, LoRA on multi-latent attention; unbalanced MoE routing is data-dependent (the
prediction is then the ranks' mean of the all-to-all bytes, not each rank's).
"""
import pytest

from megaswift.testing.dist import run_distributed
from tests.helpers.comm import measure_step
from tests.helpers.train import write_chat_data, write_preference_data


@pytest.fixture(scope="module")
def latent_hf(tmp_path_factory):
    """The families with the sigmoid group-limited router (testing/tiny.py): deepseek_v3, glm4_moe."""
    from megaswift.testing.tiny import make_tiny_hf

    root = tmp_path_factory.mktemp("latent_hf")
    return {f: make_tiny_hf(f, str(root / f), seed=30 + i) for i, f in enumerate(("deepseek_v3", "glm4_moe"))}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("comm")
    return {"sft": write_chat_data(str(root / "train.jsonl")), "dpo": write_preference_data(str(root / "pairs.jsonl"))}


# (checkpoint fixture, family, world, overrides); global batch 8 of micro batches of 2 rows of 64
LAYOUTS = {
    # one KV head: replicated KV rows at tp=2 (their gradient sum), 4 micro batches
    "tp2": ("tiny_hf", "mistral", 2, {"parallel__tp": 2}),
    # ZeRO-1 over several padded buckets, 2 micro batches accumulated
    "dp2_zero1": ("tiny_hf", "llama", 2, {"optim__zero": 1, "parallel__ddp_bucket_size": 30000}),
    # tied embeddings: their gradient crosses the pipeline's embedding group; 4 micro batches
    "pp2_1f1b": ("tiny_hf", "qwen2", 2, {"parallel__pp": 2, "parallel__pp_schedule": "1f1b"}),
    "cp2_ring": ("tiny_hf", "qwen3", 2, {"parallel__cp": 2, "parallel__cp_comm": "ring"}),
    # recompute reruns forward collectives, except those whose output nothing saves (torch's
    # checkpoint stops early): Ulysses' output all-to-all, a dense layer's linear_fc2 sum
    "cp2_ulysses_selective": ("tiny_hf", "qwen3", 2, {"parallel__cp": 2, "parallel__cp_comm": "ulysses",
                                                      "train__recompute": "selective"}),
    "tp2_sp_full_recompute": ("tiny_hf", "qwen3", 2, {"parallel__tp": 2, "parallel__sp": True,
                                                      "train__recompute": "full"}),
    # experts on layer 0 (8 experts, top-2), force-balanced so the dispatch is data-independent
    "ep2_moe": ("moe_hf", "qwen3_moe", 2, {"parallel__ep": 2, "moe__router_force_balance": True}),
    # the GPU case: bf16 autocast, where activations cross in bf16 but the residual stream, the
    # norms' outputs and their gradients in fp32; tp without sp splits the MoE tokens over tp;
    # expert-dp (edp=2) and dp under ZeRO-1
    "tp2_ep2_zero1_bf16": ("moe_hf", "qwen3_moe", 4, {
        "parallel__tp": 2, "parallel__ep": 2, "optim__zero": 1, "moe__router_force_balance": True,
        "model__dtype": "bfloat16", "model__cpu_autocast": True}),
    # LoRA: the frozen base sends no weight gradients and, before the first adapter, no input
    # gradients; the row-parallel adapters' rank-wide sums (reduce-scattered under sp); dp
    # reduces the adapters alone; the tp-partial A (column) and B (row, sp) and B's replicated
    # KV rows (one KV head at tp=2); sequence parallelism without LoRA: tp2_sp_full_recompute
    "tp2_sp_lora": ("tiny_hf", "mistral", 2, {"parallel__tp": 2, "parallel__sp": True, "model__lora__rank": 4,
                                              "model__lora__targets": "[all-linear]"}),
    # DPO: 2 rows a pair, the frozen copy's forward (ring attention, the embedding, the loss)
    # before the step, sequence_logps' sums over cp, the six metric sums
    "cp2_ring_dpo": ("tiny_hf", "qwen3", 2, {"parallel__cp": 2, "parallel__cp_comm": "ring"}, "dpo"),
    # multi-latent attention under SP with full recompute (the latents' gathers rerun), the
    # latent norms' and down-projections' partial gradients, ungated shared expert
    "mla_tp2_sp_full_recompute": ("latent_hf", "deepseek_v3", 2, {
        "parallel__tp": 2, "parallel__sp": True, "train__recompute": "full", "moe__router_force_balance": True}),
    # MLA without SP (the latents' and rope key's gradients all-reduced) in bf16, tokens split
    # over tp for the experts, ZeRO-1 with the expert bias outside the buckets
    "mla_tp2_ep2_zero1_bf16": ("latent_hf", "deepseek_v3", 4, {
        "parallel__tp": 2, "parallel__ep": 2, "optim__zero": 1, "moe__router_force_balance": True,
        "model__dtype": "bfloat16", "model__cpu_autocast": True}),
    # MLA's K/V blocks concatenated along the head dim (v heads narrower than q/k), ring and Ulysses
    "mla_cp2_ring": ("latent_hf", "deepseek_v3", 2, {"parallel__cp": 2, "parallel__cp_comm": "ring",
                                                     "moe__router_force_balance": True}),
    "mla_cp2_ulysses": ("latent_hf", "deepseek_v3", 2, {"parallel__cp": 2, "parallel__cp_comm": "ulysses",
                                                        "moe__router_force_balance": True}),
    # glm4_moe under pp x ep: the MoE statistics cross the stage boundary, the step's counts and
    # expert biases are summed over pp
    "glm4_moe_pp2_ep2": ("latent_hf", "glm4_moe", 4, {
        "parallel__pp": 2, "parallel__ep": 2, "moe__router_force_balance": True}),
    # linear attention: two column-parallel inputs per DeltaNet layer, the gated norm's partial grads
    "qwen3_next_tp2_sp": ("linear_hf", "qwen3_next", 2, {
        "parallel__tp": 2, "parallel__sp": True, "moe__router_force_balance": True}),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_predicted_bytes_equal_measured(name, request, data, tmp_path):
    fixture, family, world, overrides, *algorithm = LAYOUTS[name]
    algorithm = algorithm[0] if algorithm else "sft"
    hf = request.getfixturevalue(fixture)[family]
    for rank, (measured, predicted) in enumerate(run_distributed(measure_step, world, hf, data[algorithm],
                                                                 str(tmp_path), algorithm=algorithm, **overrides)):
        assert measured == predicted, f"rank {rank}:\nmeasured  {measured}\npredicted {predicted}"
