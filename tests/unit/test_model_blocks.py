"""Model composition by name (models/blocks.py, models/routers.py) and the model protocol
(models/protocol.py), on one process with tiny configs: today's families get today's modules; a
new token mixer, MLP or router is a class and a registry entry, picked by the config, with no
change to GPTModel or TransformerLayer; configs saved before the names existed still load."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from megaswift.convert.families import FAMILIES
from megaswift.errors import ConfigError
from megaswift.models import blocks, routers
from megaswift.models.attention import SelfAttention
from megaswift.models.config import ModelConfig
from megaswift.models.decoder import GPTModel
from megaswift.models.mlp import MLP
from megaswift.models.moe import MoELayer
from megaswift.models.pipeline_model import PipelineModel
from megaswift.models.protocol import Model
from megaswift.models.deltanet import GatedDeltaNet
from megaswift.models.mla import MultiLatentAttention
from megaswift.models.routers import GroupLimitedRouter, TopKRouter, route
from megaswift.parallel.grads import finalize_grads
from megaswift.parallel.state import ParallelState

_BASE_HF = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
_MOE_HF = dict(num_experts=4, num_local_experts=4, moe_intermediate_size=16, num_experts_per_tok=2,
               shared_expert_intermediate_size=24, mlp_only_layers=[1], n_routed_experts=4, n_group=2, topk_group=1,
               n_shared_experts=1, first_k_dense_replace=1)
_MLA_HF = dict(q_lora_rank=None, kv_lora_rank=8, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5)
_LINEAR_HF = dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=4, linear_value_head_dim=3,
                  layer_types=["linear_attention", "full_attention"])


def _hf(family: str) -> dict:
    hf = dict(_BASE_HF, model_type=FAMILIES[family].model_types[0])
    if FAMILIES[family].moe is not None:
        hf.update(_MOE_HF)
    if FAMILIES[family].token_mixer == "mla":
        hf.update(_MLA_HF)
    if "linear_num_key_heads" in FAMILIES[family].flags:
        hf.update(_LINEAR_HF)
    if FAMILIES[family].text_config:  # a multimodal config.json: the language model's keys nested
        hf = {"model_type": hf.pop("model_type"), FAMILIES[family].text_config: hf}
    return hf


def _cfg(family: str = "llama", **changes) -> ModelConfig:
    cfg = FAMILIES[family].model_config(_hf(family), make_vocab_size_divisible_by=8)
    return dataclasses.replace(cfg, **changes)


def _model(cfg: ModelConfig, seed: int = 0) -> GPTModel:
    model = GPTModel(cfg)
    model.reset_parameters(seed)
    return model


def _batch(cfg: ModelConfig, b: int = 2, s: int = 12):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (b, s), generator=g)
    labels = torch.roll(tokens, -1, dims=1)
    labels[:, -1] = -100
    return tokens, labels


@pytest.fixture
def registries():
    """Restore the registries after a test registers its toy blocks."""
    saved = dict(blocks.TOKEN_MIXERS), dict(blocks.MLPS), dict(routers.ROUTERS)
    yield
    for table, old in zip((blocks.TOKEN_MIXERS, blocks.MLPS, routers.ROUTERS), saved):
        table.clear()
        table.update(old)


# -- today's families -------------------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_todays_families_get_todays_modules(family):
    cfg = _cfg(family)
    mixer, router = {"deepseek_v3": ("mla", "sigmoid_group"), "glm4_moe": ("gqa", "sigmoid_group")}.get(
        family, ("gqa", "softmax_topk"))
    assert (cfg.token_mixer, cfg.dense_mlp, cfg.moe_mlp, cfg.moe_router) == (mixer, "swiglu", "moe", router)
    model = GPTModel(cfg)
    moe_layers = cfg.moe_layers
    assert bool(moe_layers) == (FAMILIES[family].moe is not None)
    for i, layer in model.decoder.layers.items():
        kind = cfg.token_mixer_for_layer(int(i))
        assert type(layer.self_attention) is {"gqa": SelfAttention, "mla": MultiLatentAttention,
                                              "gated_deltanet": GatedDeltaNet}[kind]
        hybrid = "linear_num_key_heads" in FAMILIES[family].flags
        assert kind == ("gated_deltanet" if hybrid and i == "0" else mixer)
        if int(i) in moe_layers:
            assert type(layer.mlp) is MoELayer
            assert type(layer.mlp.router) is {"softmax_topk": TopKRouter, "sigmoid_group": GroupLimitedRouter}[router]
        else:
            assert type(layer.mlp) is MLP


def test_registry_tables_name_todays_modules():
    assert blocks.TOKEN_MIXERS["gqa"] is SelfAttention and blocks.TOKEN_MIXERS["mla"] is MultiLatentAttention
    assert blocks.TOKEN_MIXERS["gated_deltanet"] is GatedDeltaNet
    assert blocks.MLPS["swiglu"] is MLP and blocks.MLPS["moe"] is MoELayer
    assert routers.ROUTERS["softmax_topk"] is TopKRouter and routers.ROUTERS["sigmoid_group"] is GroupLimitedRouter


def test_config_saved_before_the_block_names_loads_as_todays_model():
    cfg = _cfg("qwen3_moe")
    old = cfg.to_dict()
    for key in ("token_mixer", "dense_mlp", "moe_mlp", "moe_router"):
        del old[key]
    assert ModelConfig.from_dict(old) == cfg
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_an_unknown_block_name_is_a_one_line_error():
    with pytest.raises(ConfigError, match=r"unknown token_mixer 'latent'; known: gated_deltanet, gqa, mla"):
        GPTModel(_cfg(token_mixer="latent"))
    with pytest.raises(ConfigError, match=r"unknown moe_router 'sigmoid_grouped'; known: sigmoid_group, softmax_topk"):
        GPTModel(_cfg("mixtral", moe_router="sigmoid_grouped"))


# -- new blocks, registered from outside the model -------------------------------------------------
class NoPositionAttention(SelfAttention):
    """A toy token mixer: GQA without rotary embeddings (cos 1, sin 0)."""
    calls = 0

    def forward(self, x, cos, sin, document_ids=None, cp_index=None, kv_cache=None):
        type(self).calls += 1
        return super().forward(x, torch.ones_like(cos), torch.zeros_like(sin), document_ids, cp_index, kv_cache)


class ReluSquaredMLP(MLP):
    """A toy MLP block: the gated MLP with relu^2 instead of SiLU (same parameters)."""
    calls = 0

    def forward(self, x, token_mask=None, moe_stats=None):
        type(self).calls += 1
        gate, up = self.linear_fc1(x).chunk(2, dim=-1)
        return self.linear_fc2(F.relu(gate).square() * up), moe_stats


class SigmoidTopKRouter(TopKRouter):
    """A toy router: sigmoid scores, top-k, renormalised (DeepSeek-V3 style, without groups)."""

    def forward(self, x):
        logits = F.linear(x, self.weight)
        scores = torch.sigmoid(logits.float())
        weights, ids = torch.topk(scores, self.topk, dim=-1)
        return logits, scores / scores.sum(-1, keepdim=True), weights / weights.sum(-1, keepdim=True), ids


def test_a_registered_token_mixer_and_mlp_are_used_by_every_layer(registries):
    blocks.register_token_mixer("toy_nope", NoPositionAttention)
    blocks.register_mlp("toy_relu2", ReluSquaredMLP)
    base = _model(_cfg())
    toy = GPTModel(_cfg(token_mixer="toy_nope", dense_mlp="toy_relu2"))
    toy.load_state_dict(base.state_dict())  # the same parameters under the same names
    assert [n for n, _ in toy.named_parameters()] == [n for n, _ in base.named_parameters()]
    assert all(type(layer.self_attention) is NoPositionAttention and type(layer.mlp) is ReluSquaredMLP
               for layer in toy.decoder.layers.values())

    tokens, labels = _batch(toy.cfg)
    NoPositionAttention.calls = ReluSquaredMLP.calls = 0
    loss = toy(tokens, labels=labels)
    assert NoPositionAttention.calls == ReluSquaredMLP.calls == toy.cfg.num_layers
    loss.sum().backward()
    assert all(p.grad is not None for p in toy.parameters())
    assert not torch.allclose(toy(tokens), base(tokens))  # the toy blocks changed the maths

    # the model's switches reach the new mixer through the contract's attributes
    toy.set_attention_backend("reference")
    toy.set_recompute("selective")
    assert all(layer.self_attention.backend == "reference" and layer.self_attention.recompute_core
               for layer in toy.decoder.layers.values())


def test_a_registered_router_is_used_by_the_moe_layers(registries):
    routers.register_router("toy_sigmoid", SigmoidTopKRouter)
    cfg = _cfg("qwen3_moe", moe_router="toy_sigmoid")
    base, toy = _model(_cfg("qwen3_moe")), GPTModel(cfg)
    toy.load_state_dict(base.state_dict())
    moe = [layer.mlp for layer in toy.decoder.layers.values() if isinstance(layer.mlp, MoELayer)]
    assert moe and all(type(m.router) is SigmoidTopKRouter for m in moe)
    tokens, labels = _batch(cfg)
    toy.set_moe_options(aux_loss_coef=0.01)
    toy(tokens, labels=labels).sum().backward()
    stats = toy.pop_moe_stats()
    assert stats["counts"].shape == (len(cfg.moe_layers), cfg.num_moe_experts)
    assert stats["counts"].sum() == tokens.numel() * cfg.moe_router_topk * len(cfg.moe_layers)
    assert moe[0].router.weight.grad is not None
    assert not torch.allclose(toy(tokens), base(tokens))


def test_the_softmax_router_is_transformers_rule():
    cfg = _cfg("mixtral")
    router = TopKRouter(cfg)
    torch.nn.init.normal_(router.weight, generator=torch.Generator().manual_seed(0))
    x = torch.randn(5, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    logits, probs, weights, ids = router(x)
    want = route(x @ router.weight.T, cfg.moe_router_topk, cfg.moe_norm_topk_prob)
    for got, exp in zip((probs, weights, ids), want):
        assert torch.equal(got, exp)


# -- the protocol -------------------------------------------------------------------------------------
def test_whole_and_pipeline_models_satisfy_the_protocol():
    cfg = _cfg("qwen2")  # tied embeddings
    whole = _model(cfg)
    stages = PipelineModel(cfg, ParallelState.single(), schedule="1f1b")
    for chunk in stages.chunks:
        chunk.load_state_dict({k: v for k, v in whole.state_dict().items() if k in chunk.state_dict()})
    assert isinstance(whole, Model) and isinstance(stages, Model)
    assert (whole.is_pipeline, stages.is_pipeline) == (False, True)
    assert whole.chunks == [whole] and whole.num_stages == 1 and whole.owner(0) == 0
    assert whole.lora_meta is None and stages.lora_meta is None

    tokens, labels = _batch(cfg)
    want = whole.forward_without_schedule(input_ids=tokens)
    assert torch.equal(want, whole(tokens))
    torch.testing.assert_close(stages.forward_without_schedule(input_ids=tokens), want, rtol=0, atol=0)
    loss = whole.forward_without_schedule(input_ids=tokens, labels=labels)
    assert loss.requires_grad  # a whole model's forward keeps its gradients
    loss.sum().backward()
    grads = {n: p.grad.clone() for n, p in whole.named_parameters()}
    finalize_grads(whole)  # one process: nothing to sum
    assert all(torch.equal(p.grad, grads[n]) for n, p in whole.named_parameters())
