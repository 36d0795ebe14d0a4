"""A model checkpoint saved under one tp loads under another: weights equal the HF source exactly.

Mistral's tiny checkpoint has one KV head, so at tp=2 and tp=4 every rank holds a replica of it:
this also proves the replicated pieces are written once and read back by every replica.
"""
import os

import pytest
import torch

from megaswift.checkpoint.model_state import load_model, read_meta, save_model
from megaswift.setup import hf_model_config
from megaswift.config import load_config
from megaswift.convert.hf_import import load_hf_into_model
from megaswift.models.decoder import GPTModel
from megaswift.parallel.layout import Layout
from megaswift.parallel.state import ParallelState
from megaswift.testing.dist import run_distributed


def _state(world, tp):
    return ParallelState.build(Layout(world_size=world, tp=tp)) if world > 1 else ParallelState.single()


def _save(rank, world, hf_dir, ckpt):
    mc = hf_model_config(hf_dir, load_config())
    model = GPTModel(mc, _state(world, world))
    load_hf_into_model(model, hf_dir)
    save_model(model, ckpt, {"family": mc.family, "model_config": mc.to_dict(), "dtype": "float32"})


def _load_and_compare(rank, world, hf_dir, ckpt):
    mc = hf_model_config(hf_dir, load_config())
    st = _state(world, world)
    want, got = GPTModel(mc, st), GPTModel(mc, st)
    load_hf_into_model(want, hf_dir)
    for p in got.parameters():
        torch.nn.init.constant_(p, float("nan"))
    load_model(got, ckpt)
    for (name, a), (_, b) in zip(want.named_parameters(), got.named_parameters()):
        # padded vocab rows are not in the checkpoint: compare the real rows only
        assert torch.equal(a.nan_to_num(0), b.nan_to_num(0)), name
    return True


@pytest.mark.parametrize("save_tp,load_tp", [(2, 4), (4, 1), (1, 2)])
def test_reshard_on_load(tiny_hf, tmp_path, save_tp, load_tp):
    hf_dir, ckpt = tiny_hf["mistral"], str(tmp_path / "ckpt")
    if save_tp == 1:
        _save(0, 1, hf_dir, ckpt)
    else:
        run_distributed(_save, save_tp, hf_dir, ckpt)
    assert read_meta(ckpt)["family"] == "mistral" and not os.path.exists(ckpt + ".tmp")
    if load_tp == 1:
        assert _load_and_compare(0, 1, hf_dir, ckpt)
    else:
        assert all(run_distributed(_load_and_compare, load_tp, hf_dir, ckpt))


def test_interrupted_save_keeps_previous_checkpoint(tiny_hf, tmp_path, monkeypatch):
    import megaswift.checkpoint.model_state as ms

    hf_dir, ckpt = tiny_hf["llama"], str(tmp_path / "ckpt")
    _save(0, 1, hf_dir, ckpt)
    before = sorted(os.listdir(ckpt))

    def boom(*a, **k):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(ms.dcp, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        _save(0, 1, hf_dir, ckpt)
    assert sorted(os.listdir(ckpt)) == before
    monkeypatch.undo()
    assert _load_and_compare(0, 1, hf_dir, ckpt)
