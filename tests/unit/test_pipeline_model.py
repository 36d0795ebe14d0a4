"""GPTModel as pipeline stages: the stages run one after another equal the whole model (loss and
every gradient), including tied embeddings, whose two copies' gradients add up to the whole
model's. No communication here; the pipeline schedule is tested on gloo separately."""
import pytest
import torch

from tests.helpers.model import batch
from megaswift.setup import hf_model_config
from megaswift.config import load_config
from megaswift.convert.hf_import import load_hf_into_model
from megaswift.models.decoder import GPTModel


def _stages(cfg, splits):
    last = len(splits) - 1
    return [GPTModel(cfg, layer_ids=ids, pre_process=i == 0, post_process=i == last) for i, ids in enumerate(splits)]


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2 ties the embeddings
def test_stages_compose_to_the_whole_model(family, tiny_hf):
    cfg = hf_model_config(tiny_hf[family], load_config())
    whole = GPTModel(cfg)
    load_hf_into_model(whole, tiny_hf[family])
    stages = _stages(cfg, [[0], [1]])
    for st in stages:
        load_hf_into_model(st, tiny_hf[family])
    tokens, labels, pos, docs = batch(cfg.vocab_size)
    kw = dict(position_ids=pos, document_ids=docs)

    want = whole(tokens, labels=labels, **kw).sum()
    want.backward()
    h = stages[0](tokens, **kw)
    got = stages[1](tokens, labels=labels, hidden_states=h, **kw).sum()
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)

    grads: dict[str, torch.Tensor] = {}
    for st in stages:
        for name, p in st.named_parameters():
            grads[name] = grads[name] + p.grad if name in grads else p.grad  # tied copies add up
    whole_grads = {n: p.grad for n, p in whole.named_parameters()}
    assert grads.keys() == whole_grads.keys()
    for name, g in whole_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-6, msg=name)
    if cfg.tie_word_embeddings:
        assert stages[1].embedding is not None and stages[1].output_layer is None
    assert stages[0].output_layer is None and stages[0].decoder.final_layernorm is None


def test_stage_holds_only_its_layers(tiny_hf):
    cfg = hf_model_config(tiny_hf["llama"], load_config())
    mid = GPTModel(cfg, layer_ids=[1], pre_process=False, post_process=False)
    names = [n for n, _ in mid.named_parameters()]
    assert names and all(n.startswith("decoder.layers.1.") for n in names)


def test_stage_loads_its_layers_from_a_whole_model_checkpoint(tiny_hf, tmp_path):
    """Checkpoints use global layer names, so a stage reads exactly its part of any checkpoint."""
    from megaswift.checkpoint.model_state import load_model, save_model

    cfg = hf_model_config(tiny_hf["qwen2"], load_config())
    whole = GPTModel(cfg)
    load_hf_into_model(whole, tiny_hf["qwen2"])
    save_model(whole, str(tmp_path / "ckpt"), {"family": cfg.family, "model_config": cfg.to_dict()})
    last = GPTModel(cfg, layer_ids=[1], pre_process=False, post_process=True)
    load_model(last, str(tmp_path / "ckpt"))
    ref = dict(whole.named_parameters())
    for name, p in last.named_parameters():
        assert torch.equal(p, ref[name]), name
