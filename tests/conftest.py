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
