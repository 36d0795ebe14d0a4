import os

import pytest
import torch

# Tests are fp32 on CPU and must not depend on a GPU being present.
os.environ.setdefault("MEGASWIFT_FORCE_CPU", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA; deselected on CPU-only machines")
    config.addinivalue_line("markers", "slow: takes more than ~30 s")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    deselected = [i for i in items if "gpu" in i.keywords]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [i for i in items if "gpu" not in i.keywords]


FAMILIES = ("llama", "qwen2", "qwen3", "mistral")


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """family -> directory of a tiny random-weight HF checkpoint with awkward sizes (see testing/tiny.py)."""
    from megaswift.testing.tiny import make_tiny_hf

    root = tmp_path_factory.mktemp("tiny_hf")
    return {f: make_tiny_hf(f, str(root / f), seed=i) for i, f in enumerate(FAMILIES)}


@pytest.fixture(scope="session")
def deep_hf(tmp_path_factory):
    """8-layer tiny checkpoints (llama; qwen2 with tied embeddings) so pipelines of up to 8 stages
    (pp=4, pp=2 x vpp=2, zbv) and uneven splits have layers to cut."""
    from megaswift.testing.tiny import make_tiny_hf

    root = tmp_path_factory.mktemp("deep_hf")
    return {f: make_tiny_hf(f, str(root / f), seed=10 + i, num_hidden_layers=8)
            for i, f in enumerate(("llama", "qwen2"))}


MOE_FAMILIES = ("qwen3_moe", "mixtral", "qwen2_moe")


@pytest.fixture(scope="session")
def moe_hf(tmp_path_factory):
    """family -> tiny MoE checkpoint: qwen3_moe (8 experts, top-2 unnormalised, layer 1 dense,
    load-balancing loss on), mixtral (4 experts, top-2 normalised, every layer MoE) and qwen2_moe
    (4 experts beside a gated shared expert, QKV bias)."""
    from megaswift.testing.tiny import make_tiny_hf

    root = tmp_path_factory.mktemp("moe_hf")
    return {f: make_tiny_hf(f, str(root / f), seed=20 + i) for i, f in enumerate(MOE_FAMILIES)}


@pytest.fixture(scope="session")
def latent_hf(tmp_path_factory):
    """The DeepSeek-V3 architecture and its relatives (issue 21), tiny:
    - deepseek_v3: multi-latent attention with a query down-projection, YaRN with mscale,
      interleaved RoPE; 8 experts in 4 groups (top-3 of 2 groups), expert bias, a shared
      expert, the first layer dense (megaswift/testing/tiny.py);
    - deepseek_v3_noq: the same with q_lora_rank null (a plain query projection, as
      DeepSeek-V2-Lite), plain RoPE order, no YaRN;
    - kimi_k2: deepseek_v3's tensors under Kimi-K2's config.json (model_type kimi_k2 over
      DeepseekV3ForCausalLM, an auto_map megaswift never runs), one expert group;
    - glm4_moe: GQA with partial RoPE, QKV bias, q/k norms, DeepSeek's router."""
    from megaswift.testing.tiny import make_kimi_k2_style, make_tiny_hf

    root = tmp_path_factory.mktemp("latent_hf")
    out = {"deepseek_v3": make_tiny_hf("deepseek_v3", str(root / "deepseek_v3"), seed=30),
           "deepseek_v3_noq": make_tiny_hf("deepseek_v3", str(root / "deepseek_v3_noq"), seed=31, q_lora_rank=None,
                                           rope_interleave=False,
                                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
           "glm4_moe": make_tiny_hf("glm4_moe", str(root / "glm4_moe"), seed=32)}
    out["kimi_k2"] = make_kimi_k2_style(str(root / "kimi_k2"), seed=33)
    return out


@pytest.fixture(scope="session")
def linear_hf(tmp_path_factory):
    """Hybrid linear attention (issue 22), tiny (megaswift/testing/tiny.py), each with an MTP block
    (`mtp.*`, passed through): qwen3_next with Gated DeltaNet in layers 0-2 and gated full
    attention in layer 3; multimodal qwen3_5 and qwen3_5_moe (a one-block vision tower, DeltaNet
    in layers 0 and 2 around full attention); qwen3_5_moe_fused, the MoE one with its experts
    stored fused as Qwen3.5-MoE is published."""
    from megaswift.testing.tiny import add_qwen_mtp, fuse_experts, make_tiny_hf

    root = tmp_path_factory.mktemp("linear_hf")
    out = {f: make_tiny_hf(f, str(root / f), seed=40 + i) for i, f in enumerate(("qwen3_next", "qwen3_5", "qwen3_5_moe"))}
    for i, d in enumerate(out.values()):
        add_qwen_mtp(d, seed=50 + i)
    out["qwen3_5_moe_fused"] = fuse_experts(out["qwen3_5_moe"], str(root / "qwen3_5_moe_fused"))
    return out
