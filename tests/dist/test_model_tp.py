"""The TP (and SP) model equals the single-process model and transformers: logits, loss, every gradient.

Tolerances (fp32): logits atol 2e-5 against transformers, and rtol 1e-5 / atol 1e-6 (relative to
each gradient's scale) against the single-process run.
"""
import pytest
import torch

from tests.helpers.model import assemble, batch, run_model
from megaswift.convert.verify import hf_logits
from megaswift.testing.dist import run_distributed

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")


def _ranks(rank, world, dirs, tp, packed):
    return {(f, sp): run_model(dirs[f], tp, sp, world, packed=packed) for f in FAMILIES for sp in (False, True)}


def _check(results, ref, family):
    ours = results[0]
    torch.testing.assert_close(ours["loss"], ref["loss"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours["logits"], ref["logits"], rtol=1e-5, atol=2e-5)
    for name in ref["grads"]:
        want = assemble([ref], name)
        got = assemble(results, name)
        scale = want.abs().max().item()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * max(scale, 1.0), msg=f"{family} {name}")


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_matches_single_process_and_transformers(tiny_hf, tp):
    per_rank = run_distributed(_ranks, tp, tiny_hf, tp, False)
    for family in FAMILIES:
        ref = run_model(tiny_hf[family], 1, False, 1)
        tokens = batch(1001)[0]
        hf = hf_logits(tiny_hf[family], torch.float32, tokens)
        for sp in (False, True):
            results = [r[(family, sp)] for r in per_rank]
            for r in results:  # every rank gathers the same full logits
                torch.testing.assert_close(r["logits"], results[0]["logits"], rtol=0, atol=0)
            err = (results[0]["logits"] - hf).abs().max().item()
            assert err <= 2e-5, f"{family} tp={tp} sp={sp}: max |logits - transformers| = {err:.2e}"
            _check(results, ref, f"{family} tp={tp} sp={sp}")


def test_tp_packed_documents_match_single_process(tiny_hf):
    per_rank = run_distributed(_ranks, 2, tiny_hf, 2, True)
    for family in FAMILIES:
        ref = run_model(tiny_hf[family], 1, False, 1, packed=True)
        for sp in (False, True):
            _check([r[(family, sp)] for r in per_rank], ref, f"{family} packed sp={sp}")


def test_single_process_logits_match_transformers(tiny_hf):
    for family in FAMILIES:
        ours = run_model(tiny_hf[family], 1, False, 1)
        hf = hf_logits(tiny_hf[family], torch.float32, batch(1001)[0])
        err = (ours["logits"] - hf).abs().max().item()
        assert err <= 2e-5, f"{family}: max |logits - transformers| = {err:.2e}"
