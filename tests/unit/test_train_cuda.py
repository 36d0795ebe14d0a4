"""The CUDA training path (deselected without a GPU): fp32 master weights with bf16 autocast
train like fp32, packed documents through every attention backend, GRPO's bf16 rollouts."""
import numpy as np
import pytest

from tests.helpers.train import run_steps, write_chat_data


@pytest.fixture
def on_cuda(monkeypatch):
    monkeypatch.setenv("MEGASWIFT_FORCE_CPU", "0")


@pytest.mark.gpu
def test_bf16_autocast_tracks_fp32(on_cuda, tiny_hf, tmp_path):
    data = write_chat_data(str(tmp_path / "train.jsonl"))
    fp32 = run_steps(0, 1, tiny_hf["qwen3"], data, str(tmp_path / "a"))
    bf16 = run_steps(0, 1, tiny_hf["qwen3"], data, str(tmp_path / "b"), model__dtype="bfloat16")
    losses32, losses16 = (np.array([m["loss"] for m in r]) for r in (fp32, bf16))
    np.testing.assert_allclose(losses16, losses32, rtol=3e-2)  # bf16 rounding, same trajectory
    assert losses16[-1] < losses16[0]


@pytest.mark.gpu
def test_cuda_matches_cpu_in_fp32(on_cuda, tiny_hf, tmp_path, monkeypatch):
    data = write_chat_data(str(tmp_path / "train.jsonl"))
    gpu = run_steps(0, 1, tiny_hf["llama"], data, str(tmp_path / "a"))
    monkeypatch.setenv("MEGASWIFT_FORCE_CPU", "1")
    cpu = run_steps(0, 1, tiny_hf["llama"], data, str(tmp_path / "b"))
    # TF32 is off by default for matmuls in torch; differences are kernel summation order
    np.testing.assert_allclose([m["loss"] for m in gpu], [m["loss"] for m in cpu], rtol=1e-4)


@pytest.mark.gpu
def test_grpo_on_cuda_bf16_passes_its_sync_check(on_cuda, tiny_hf, tmp_path):
    """Rollouts on CUDA under bf16 autocast (the sampler moves only the last position's logits to
    the CPU) train, and the weight-sync check's default bf16 tolerance holds."""
    from tests.helpers.train import run_grpo_steps, write_prompt_data

    data = write_prompt_data(str(tmp_path / "prompts.jsonl"))
    steps = run_grpo_steps(0, 1, tiny_hf["qwen3"], data, str(tmp_path / "a"), model__dtype="bfloat16")
    assert all(m["rollout/logp_diff_mean"] < 5e-2 for m in steps)
    assert all(np.isfinite(m["grad_norm"]) and m["grad_norm"] > 0 for m in steps)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["sdpa", "flash_attn"])
def test_packed_bf16_on_cuda_tracks_fp32_cpu(on_cuda, backend, tiny_hf, tmp_path, monkeypatch):
    """Packed rows (documents: the memory-efficient kernel's mask, or flash-attn's varlen path
    with its cu_seqlens computed once per micro batch), llama's head dim 12 (off the kernels'
    alignment), under bf16 autocast: the losses of the fp32 CPU run within bf16 rounding."""
    from megaswift.kernels.attention_cuda import flash_attn_available

    if backend == "flash_attn" and not flash_attn_available():
        pytest.skip("flash-attn is not installed")
    data = write_chat_data(str(tmp_path / "train.jsonl"))
    gpu = run_steps(0, 1, tiny_hf["llama"], data, str(tmp_path / "a"), model__dtype="bfloat16",
                    model__attention_backend=backend, data__packing=True)
    monkeypatch.setenv("MEGASWIFT_FORCE_CPU", "1")
    cpu = run_steps(0, 1, tiny_hf["llama"], data, str(tmp_path / "b"), data__packing=True)
    np.testing.assert_allclose([m["loss"] for m in gpu], [m["loss"] for m in cpu], rtol=1e-2)
