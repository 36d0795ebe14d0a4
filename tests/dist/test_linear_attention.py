"""Hybrid linear attention (issue 22, in progress): Qwen3-Next's Gated DeltaNet and gated
attention against transformers' Qwen3Next at the layouts that split them.

`verify` (fp32, reference attention, the torch form of the delta rule) within 1e-4 of
transformers at tp=2 with SP (the key heads, their value heads and the conv channels split),
ep=2 and pp=2; context parallelism is refused in one line.
"""
import pytest

from megaswift.errors import LayoutError
from megaswift.testing.dist import run_distributed
from tests.dist.test_latent_families import _verify

VERIFY = {
    "tp2_sp": (2, {"parallel.tp": 2, "parallel.sp": True}),
    "ep2": (2, {"parallel.ep": 2}),
    "pp2": (2, {"parallel.pp": 2}),
}


@pytest.mark.parametrize("layout", list(VERIFY))
def test_logits_match_transformers(linear_hf, layout):
    world, overrides = VERIFY[layout]
    results = run_distributed(_verify, world, linear_hf["qwen3_next"], overrides)
    assert all(r == results[0] for r in results)
    assert results[0]["max_abs_diff"] < 1e-4, results[0]


def test_packed_documents_equal_each_document_alone(linear_hf):
    """The conv and the delta rule's state restart at a document start: a packed row gives each
    document's logits as if it ran alone."""
    import torch

    from megaswift.config import load_config
    from megaswift.convert.hf_import import load_hf_into_model
    from megaswift.models.decoder import GPTModel
    from megaswift.setup import hf_model_config

    hf = linear_hf["qwen3_next"]
    model = GPTModel(hf_model_config(hf, load_config())).eval()
    load_hf_into_model(model, hf)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 1000, (1, 11), generator=g), torch.randint(0, 1000, (1, 20), generator=g)
    with torch.no_grad():
        packed = model(torch.cat([a, b], 1), position_ids=torch.cat([torch.arange(11), torch.arange(20)])[None],
                       document_ids=torch.tensor([[0] * 11 + [1] * 20]))
        alone = torch.cat([model(a), model(b)], 1)
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


def test_context_parallelism_is_refused_in_one_line(linear_hf):
    from megaswift.config import load_config
    from megaswift.setup import hf_model_config, plan_layout

    cfg = load_config(None, ["--parallel.cp=2"])
    with pytest.raises(LayoutError, match="context parallelism is not supported for Gated DeltaNet"):
        plan_layout(cfg, 2, hf_model_config(linear_hf["qwen3_next"], cfg))
