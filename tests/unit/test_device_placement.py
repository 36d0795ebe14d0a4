"""Every tensor a model holds or makes lives on the model's device (issue 17's first kind of bug).

No CUDA here, so the device that catches a stray CPU tensor is `meta`: a model built on it must
hold nothing elsewhere (a CPU buffer under a CUDA model fails every forward), and a forward on
meta inputs fails at the first tensor made on the CPU ("Tensor on device cpu is not on the
expected device meta"). Each case runs in one process standing as one rank of the layout on
torch's fake process group, so tp, pp stages, cp, ep x etp all build at their real shapes.

MoE routing is data-dependent (bincount, split sizes) and cannot run on meta; its forward runs
on real CPU data with torch's default device set to meta instead, which turns every tensor made
without an explicit device into a meta tensor that the next operation rejects.
"""
import pytest
import torch

from megaswift.testing.dist import run_as_rank

SEQ = 16


def _model_config(hf_dir, overrides):
    from tests.helpers.train import train_config
    from megaswift.setup import hf_model_config

    cfg = train_config(hf_dir, "unused.jsonl", "unused", **overrides)
    return cfg, hf_model_config(hf_dir, cfg)


def _off_device(model, dev: str) -> list[str]:
    named = list(model.named_parameters()) + [(n, b) for chunk in getattr(model, "chunks", [model])
                                              for n, b in chunk.named_buffers()]
    return [f"{n} on {t.device}" for n, t in named if t.device.type != dev]


def _batch(b: int, s: int, dev, packed: bool) -> dict:
    ids = torch.arange(b * s).view(b, s) % 97
    mb = {"input_ids": ids, "labels": ids, "position_ids": torch.arange(s).expand(b, s)}
    if packed:  # two documents per row, positions restarting at the second
        cut = s // 2 + 1
        mb["document_ids"] = (torch.arange(s) >= cut).long().expand(b, s)
        mb["position_ids"] = torch.cat([torch.arange(cut), torch.arange(s - cut)]).expand(b, s)
    return mb


def _to(mb: dict, dev) -> dict:
    return {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in mb.items()}


def _build_and_run_on_meta(rank, world, hf_dir, overrides, lora, packed, generate):
    """Build this rank's part of the model on meta, check placement, run forward and backward
    (and, for rollouts, a decode step through the KV cache) on meta inputs."""
    from megaswift.setup import build_model, plan_layout
    from megaswift.models.kv_cache import KVCache
    from megaswift.parallel.context_parallel import shard_batch
    from megaswift.parallel.state import ParallelState

    cfg, mc = _model_config(hf_dir, overrides)
    st = ParallelState.build(plan_layout(cfg, world, mc), torch.device("meta"))
    model = build_model(cfg, mc, st, torch.float32)  # the DPO/GRPO reference is built the same way
    if lora:
        model.add_lora(4, 8.0, 0.0, ["all-linear"])
    bad = _off_device(model, "meta")
    assert not bad, bad
    mb = _batch(2, SEQ, "cpu", packed)
    if st.cp_size > 1:
        mb = shard_batch(mb, st.cp_size, st.cp_rank, multiple=st.layout.seq_multiple(bool(mc.moe_layers)))
    mb = _to(mb, "meta")
    for out in _forward_stages(model, mb, mc, st):
        assert out.device.type == "meta"
        out.float().sum().backward()
    if lora:
        with model.adapters_disabled(), torch.no_grad():  # the DPO/GRPO reference under LoRA
            _forward_stages(model, mb, mc, st)
    if generate:
        _decode_two_steps(model, lambda: KVCache(2, 8, device="meta"), "meta")
    return True


def _forward_stages(model, mb, mc, st) -> list:
    """Each of this rank's stages (the whole model without pp) on the micro batch."""
    outs = []
    for chunk in getattr(model, "chunks", [model]):
        kwargs = {k: mb.get(k) for k in ("position_ids", "document_ids", "cp_index")}
        kwargs["labels"] = mb["labels"] if chunk.post_process else None
        if not chunk.pre_process:  # a later pipeline stage: the previous one's activations [b, s(/tp), h]
            s_local = mb["input_ids"].shape[1] // (st.tp_size if st.sp else 1)
            kwargs["hidden_states"] = torch.zeros(2, s_local, mc.hidden_size, device="meta", requires_grad=True)
        outs.append(chunk(mb["input_ids"], **kwargs))
    return outs


def _decode_two_steps(model, make_cache, dev):
    """The rollout path: a 3-token prefill and one decode step through the KV cache."""
    cache = make_cache()
    with torch.no_grad(), model.generation_mode():
        for ids, pos in ((torch.ones(2, 3, dtype=torch.long, device=dev), torch.arange(3, device=dev).expand(2, 3)),
                         (torch.ones(2, 1, dtype=torch.long, device=dev), torch.full((2, 1), 3, device=dev))):
            cache.begin(torch.ones(ids.shape, dtype=torch.bool, device=dev), pos)
            logits = model(ids, position_ids=pos, kv_cache=cache)
            cache.advance()
            assert logits.device.type == dev


# name -> (world, rank, overrides, lora, packed, generate)
DENSE_LAYOUTS = {
    "single_lora_kv": (1, 0, {}, True, True, True),
    "tp2_sp_kv": (2, 1, {"parallel__tp": 2, "parallel__sp": True}, False, False, True),
    "tp2_lora": (2, 0, {"parallel__tp": 2}, True, True, False),
    "pp2_first": (2, 0, {"parallel__pp": 2}, False, False, False),
    "pp2_last": (2, 1, {"parallel__pp": 2}, True, False, False),
    "cp2_ring_packed": (2, 1, {"parallel__cp": 2}, False, True, False),
    "tp2_cp2_ulysses": (4, 3, {"parallel__tp": 2, "parallel__cp": 2, "parallel__cp_comm": "ulysses"}, False, False,
                        False),
}


@pytest.mark.parametrize("layout", list(DENSE_LAYOUTS))
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_dense_model_lives_on_its_device(family, layout, tiny_hf):
    world, rank, overrides, lora, packed, generate = DENSE_LAYOUTS[layout]
    assert run_as_rank(_build_and_run_on_meta, rank, world, tiny_hf[family], overrides, lora, packed, generate)


def _moe_built_on_meta(rank, world, hf_dir, overrides):
    from megaswift.setup import build_model, plan_layout
    from megaswift.parallel.state import ParallelState

    cfg, mc = _model_config(hf_dir, overrides)
    st = ParallelState.build(plan_layout(cfg, world, mc), torch.device("meta"))
    model = build_model(cfg, mc, st, torch.float32)
    model.add_lora(4, 8.0, 0.0, ["all-linear"])  # routed-expert adapters too
    return _off_device(model, "meta")


MOE_LAYOUTS = {"ep2_etp2": (4, 3, {"parallel__ep": 2, "parallel__etp": 2}),
               "tp2_sp_ep2": (2, 1, {"parallel__tp": 2, "parallel__sp": True, "parallel__ep": 2}),
               "pp2_last_ep2": (4, 3, {"parallel__pp": 2, "parallel__ep": 2})}


@pytest.mark.parametrize("layout", list(MOE_LAYOUTS))
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "qwen2_moe"])
def test_moe_model_is_built_on_its_device(family, layout, moe_hf):
    world, rank, overrides = MOE_LAYOUTS[layout]
    assert run_as_rank(_moe_built_on_meta, rank, world, moe_hf[family], overrides) == []


def _moe_forward_makes_nothing_on_the_default_device(rank, world, hf_dir):
    from megaswift.models.decoder import GPTModel
    from megaswift.models.kv_cache import KVCache

    _, mc = _model_config(hf_dir, {})
    model = GPTModel(mc)
    model.reset_parameters()
    model.add_lora(4, 8.0, 0.0, ["all-linear"])
    mb = _batch(2, SEQ, "cpu", packed=True)
    mb["token_mask"] = torch.ones(2, SEQ, dtype=torch.bool)
    torch.set_default_device("meta")  # anything made without device= is now a meta tensor
    try:
        for backend in ("loop", "grouped"):
            model.set_moe_options(backend=backend, capacity_factor=1.0)
            loss = model(mb["input_ids"], position_ids=mb["position_ids"], document_ids=mb["document_ids"],
                         labels=mb["labels"], token_mask=mb["token_mask"])
            assert loss.device.type == "cpu"
            loss.sum().backward()
        _decode_two_steps(model, lambda: KVCache(2, 8, device="cpu"), "cpu")
    finally:
        torch.set_default_device(None)
    return True


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "qwen2_moe"])
def test_moe_forward_makes_its_tensors_on_the_input_device(family, moe_hf):
    assert run_as_rank(_moe_forward_makes_nothing_on_the_default_device, 0, 1, moe_hf[family])
