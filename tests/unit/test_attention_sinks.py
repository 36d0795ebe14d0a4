"""Attention sinks (gpt-oss): every single-process attention path against transformers' own
gpt-oss `eager_attention_forward`, which appends each head's sink logit to every row's scores
and drops its column after the softmax.

Tolerances (fp32): rtol 1e-5 / atol 5e-6 for out and the gradients of q, k, v and sinks, the
reference and the CPU sdpa kernel (out rescaled by sigmoid(lse - sink) after the kernel) alike;
measured max |diff| over these cases and 3 seeds: reference out 3.6e-7, grads 1.4e-6; sdpa out
4.2e-7, grads 2.4e-6. The KV-cache (rollout) path against the full forward, logits at
rtol 1e-5 / atol 1e-5. bf16 and the CUDA kernels get the bounds of tests/unit/test_attention.py.
"""
import dataclasses

import pytest
import torch
from torch import nn
from transformers.masking_utils import and_masks, causal_mask_function, sliding_window_overlay
from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

from megaswift.kernels.attention import apply_sinks, attention, merge_attention_blocks
from megaswift.kernels.attention_cuda import flash_attn_available

FP32 = dict(rtol=1e-5, atol=5e-6)
GPU_TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}

# b, s, hq, hkv, window, document lengths per row (None: one sequence per row)
CASES = {
    "causal_gqa": (2, 16, 4, 2, None, None),
    "window_gqa1": (2, 16, 4, 1, 5, None),
    "documents_window": (1, 16, 4, 4, 3, [[3, 5, 1, 7]]),
}


def make_case(name, dtype=torch.float32, device="cpu", seed=0, d=8):
    b, s, hq, hkv, window, lengths = CASES[name]
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, s, h, d, generator=g).to(device, dtype).requires_grad_() for h in (hq, hkv, hkv))
    # logits of either sign and large enough to matter: some heads sink most of their mass
    sinks = (2.0 * torch.randn(hq, generator=g)).to(device, dtype).requires_grad_()
    ids = None
    if lengths is not None:
        ids = torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in lengths]).to(device)
    return q, k, v, sinks, dict(causal=True, document_ids=ids, window=window)


def hf_eager(q, k, v, sinks, kw):
    """transformers' gpt-oss eager attention on our [b, s, h, d] tensors; its mask built by its
    own mask functions (causal, sliding window; documents as one more condition), additive with
    the dtype's min as transformers' eager path does."""
    b, s, hq, d = q.shape
    fns = [causal_mask_function]
    if kw["window"] is not None:
        fns.append(sliding_window_overlay(kw["window"]))
    fn = and_masks(*fns)
    i, j = torch.arange(s)[:, None], torch.arange(s)[None, :]
    visible = torch.stack([fn(r, 0, i, j).expand(s, s) for r in range(b)])
    if kw["document_ids"] is not None:
        ids = kw["document_ids"].cpu()
        visible = visible & (ids[:, :, None] == ids[:, None, :])
    mask = torch.zeros(b, 1, s, s, dtype=q.dtype).masked_fill(~visible[:, None], torch.finfo(q.dtype).min)
    module = nn.Module()
    module.sinks, module.num_key_value_groups = sinks, hq // k.shape[2]
    module.eval()
    out, _ = eager_attention_forward(module, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                     mask.to(q.device), scaling=d ** -0.5)
    return out  # [b, s, hq, d]


def grads(out, inputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    go = torch.randn(out.shape, generator=g).to(out.device, out.dtype)
    return torch.autograd.grad((out * go).sum(), inputs)


def check(actual, expected, what, **tol):
    torch.testing.assert_close(actual, expected.to(actual.dtype), msg=lambda m: f"{what}: {m}", **tol)


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@pytest.mark.parametrize("case", list(CASES))
def test_backend_with_sinks_matches_transformers_gpt_oss(case, backend):
    q, k, v, sinks, kw = make_case(case)
    out, lse = attention(q, k, v, backend=backend, sinks=sinks, **kw)
    want = hf_eager(q, k, v, sinks, kw)
    check(out, want, f"{backend} out", **FP32)
    for name, a, e in zip(("q", "k", "v", "sinks"), grads(out, (q, k, v, sinks)), grads(want, (q, k, v, sinks))):
        check(a, e, f"{backend} grad {name}", **FP32)
    # lse is the log of the whole denominator, the sink's term included
    plain, plain_lse = attention(q, k, v, backend="reference", **kw)
    check(lse, torch.logaddexp(plain_lse, sinks.float()[None, :, None]), "lse", **FP32)
    assert not torch.equal(out, plain)  # the sinks changed something


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_rows_without_keys_give_zero_and_the_sink_as_lse(backend):
    q, k, v, sinks, _ = make_case("causal_gqa")
    mask = torch.ones(q.shape[0], q.shape[1], k.shape[1], dtype=torch.bool).tril()
    mask[:, 3] = False  # row 3 sees no key
    out, lse = attention(q, k, v, causal=False, mask=mask, backend=backend, sinks=sinks)
    assert (out[:, 3] == 0).all()
    check(lse[:, :, 3], sinks.float()[None].expand(q.shape[0], -1), "lse of an empty row", **FP32)
    for name, g in zip(("q", "k", "v", "sinks"), grads(out, (q, k, v, sinks))):
        assert torch.isfinite(g).all(), name


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_sinks_applied_once_to_merged_blocks(backend):
    """Ring attention's order: blocks over disjoint keys merged without sinks, then the sinks
    once (apply_sinks), equals attention with sinks over all keys, gradients included."""
    q, k, v, sinks, kw = make_case("window_gqa1")
    out, lse = attention(q, k, v, backend=backend, sinks=sinks, **kw)
    b, s = q.shape[:2]
    i, j = torch.arange(s)[:, None], torch.arange(s)[None, :]
    visible = ((j <= i) & (i - j < kw["window"])).expand(b, s, s)
    half = s // 2
    blocks = [attention(q, k[:, sl], v[:, sl], causal=False, mask=visible[:, :, sl].contiguous(), backend=backend)
              for sl in (slice(0, half), slice(half, s))]
    m_out, m_lse = apply_sinks(*merge_attention_blocks(*blocks[0], *blocks[1]), sinks)
    check(m_out, out, "out", **FP32)
    check(m_lse, lse, "lse", **FP32)
    for name, a, e in zip(("q", "k", "v", "sinks"), grads(m_out, (q, k, v, sinks)), grads(out, (q, k, v, sinks))):
        check(a, e, f"grad {name}", **FP32)


def test_sinks_shape_is_checked():
    q, k, v, sinks, kw = make_case("causal_gqa")
    with pytest.raises(ValueError, match=r"one logit per query head, \[4\]"):
        attention(q, k, v, sinks=sinks[:2], **kw)


@pytest.mark.parametrize("case", ["causal_gqa", "documents_window"])
def test_sdpa_bf16_with_sinks_close_to_transformers(case):
    """transformers' eager softmax runs in bf16 here; ours in fp32: both near the fp32 truth."""
    q, k, v, sinks, kw = make_case(case, dtype=torch.bfloat16)
    out, _ = attention(q, k, v, backend="sdpa", sinks=sinks, **kw)
    leaves = [x.detach().float().requires_grad_() for x in (q, k, v, sinks)]
    want = hf_eager(*leaves, kw)
    check(out.float(), want, "out", **GPU_TOL[torch.bfloat16])
    for name, a, e in zip(("q", "k", "v", "sinks"), grads(out, (q, k, v, sinks)), grads(want, leaves)):
        check(a.float(), e, f"grad {name}", rtol=5e-2, atol=5e-2)


# --- the module: parameters, sharding, the KV-cache (rollout) path ---------------------------------

def _cfg(**changes):
    from megaswift.models.config import ModelConfig

    base = ModelConfig(family="llama", vocab_size=61, hidden_size=32, ffn_hidden_size=48, num_layers=2,
                       num_attention_heads=4, num_query_groups=2, kv_channels=8, make_vocab_size_divisible_by=8,
                       attention_sinks=True, sliding_window=3, layer_types=["sliding_attention", "full_attention"])
    return dataclasses.replace(base, **changes)


def test_sinks_parameter_is_split_by_head():
    from megaswift.models.decoder import GPTModel
    from megaswift.models.sharding import layer_param_names, shard_layout

    cfg = _cfg()
    names = [n for n in layer_param_names(cfg, 1) if n.endswith("sinks")]
    assert names == ["decoder.layers.1.self_attention.sinks"]
    assert [shard_layout(names[0], cfg, 2, r).ranges for r in range(2)] == [((0, 2),), ((2, 2),)]
    assert [shard_layout(names[0], cfg, 4, r).ranges for r in range(4)] == [((r, 1),) for r in range(4)]  # tp > kv heads
    assert shard_layout(names[0], cfg, 2, 1).canonical_shape == (4,)
    model = GPTModel(cfg)
    model.reset_parameters(0)
    params = dict(model.named_parameters())
    assert params[names[0]].shape == (4,) and params[names[0]].abs().sum() > 0  # normal(0, std), as HF's init
    assert not any(n.endswith("sinks") for n, _ in GPTModel(_cfg(attention_sinks=False)).named_parameters())


def test_kv_cache_with_sinks_equals_the_full_forward():
    """Prefill 5 tokens, then 3 single-token steps through the KV cache (a sliding layer of
    window 3 and a full layer, both with sinks, row 1 left-padded by 2): the logits equal the
    full forward's; and the training forward sends a gradient to every layer's sinks."""
    from megaswift.models.attention import SelfAttention
    from megaswift.models.decoder import GPTModel
    from megaswift.models.kv_cache import KVCache

    torch.manual_seed(0)
    model = GPTModel(_cfg())
    model.reset_parameters(0)
    attns = [m for m in model.modules() if isinstance(m, SelfAttention)]
    assert [a.window for a in attns] == [3, None]
    with torch.no_grad():
        for a in attns:
            a.sinks.copy_(2.0 * torch.randn(4))
    ids = torch.randint(0, 61, (2, 8))
    pad = 2  # row 1: two padding slots, then its tokens from position 0
    full = model(ids).detach()
    full1 = model(ids[1:, pad:]).detach()
    cache = KVCache(2, 8)
    got = []
    with torch.no_grad(), model.generation_mode():
        for start, end in ((0, 5), (5, 6), (6, 7), (7, 8)):
            valid = torch.ones(2, end - start, dtype=torch.bool)
            pos = torch.arange(start, end).expand(2, -1).clone()
            valid[1] = pos[1] >= pad
            pos[1] = (pos[1] - pad).clamp_min(0)
            cache.begin(valid, pos)
            got.append(model(ids[:, start:end], position_ids=pos, kv_cache=cache))
            cache.advance()
    got = torch.cat(got, dim=1)
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[0], full[0], **tol)
    torch.testing.assert_close(got[1, pad:], full1[0], **tol)
    loss = model(ids, labels=ids).sum()
    loss.backward()
    for a in attns:
        assert a.sinks.grad.abs().min() > 0


# --- CUDA: run by the gpu marker on a GPU machine -----------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["sdpa", "flash_attn"])
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_backends_with_sinks_match_reference(case, backend, dtype):
    """The rescale after the CUDA kernels (flash_attn's lse included) against the reference."""
    if backend == "flash_attn" and (dtype == torch.float32 or not flash_attn_available()):
        pytest.skip("flash-attn runs only in half precision, and only where the package is installed")
    q, k, v, sinks, kw = make_case(case, dtype=dtype, device="cuda")
    out, lse = attention(q, k, v, backend=backend, sinks=sinks, **kw)
    r_out, r_lse = attention(q, k, v, backend="reference", sinks=sinks, **kw)
    tol = GPU_TOL[dtype]
    check(out, r_out, "out", **tol)
    check(lse, r_lse, "lse", **tol)
    for name, a, e in zip(("q", "k", "v", "sinks"), grads(out, (q, k, v, sinks)), grads(r_out, (q, k, v, sinks))):
        check(a, e, f"grad {name}", **tol)
