"""kernels/attention.py: every backend against an independent float64 implementation.

Tolerances (fp32 inputs): reference vs the float64 naive version rtol 1e-5 / atol 1e-6; the CPU
sdpa kernel vs the reference rtol 1e-5 / atol 5e-6 (measured max |diff| about 1.4e-6, grads of
q/k/v with the lse term included). bf16 and the CUDA kernels get the looser bounds stated below.
v's head dim may differ from q/k's (multi-latent attention): the same bounds hold at 20/12 and
12/20 (measured max |diff| about 2.3e-6 for the CPU kernel, which runs them zero-padded).
"""
import math

import pytest
import torch

from megaswift.kernels.attention import BACKENDS, attention, merge_attention_blocks
from megaswift.kernels.attention_cuda import flash_attn_available

S, D = 16, 8
FP32_REF = dict(rtol=1e-5, atol=1e-6)  # reference vs float64 truth
FP32_SDPA = dict(rtol=1e-5, atol=5e-6)  # CPU fused kernel vs reference

# b, hq, hkv, causal, document lengths per row (None: one sequence), window
CASES = {
    "causal": (1, 2, 2, True, None, None),
    "bidirectional": (1, 2, 2, False, None, None),
    "documents": (1, 2, 2, True, [[3, 5, 1, 7]], None),
    "bidirectional_documents": (1, 2, 2, False, [[3, 5, 1, 7]], None),
    "window": (1, 2, 2, True, None, 4),
    "documents_window": (1, 2, 2, True, [[3, 5, 1, 7]], 3),
    "gqa_hkv2": (1, 4, 2, True, [[3, 5, 1, 7]], None),
    "gqa_hkv1": (1, 4, 1, True, None, None),
    "batch2_layouts": (2, 4, 2, True, [[3, 5, 1, 7], [9, 2, 5]], None),
    "batch2_layouts_window": (2, 4, 1, True, [[1, 15], [6, 6, 4]], 5),
}


# q/k head dim, v head dim: multi-latent attention (DeepSeek-V3: 192 and 128) at odd sizes, v
# narrower and wider than q/k
HEAD_DIMS = {"dv_lt_d": (20, 12), "dv_gt_d": (12, 20)}


def make_case(name, dtype=torch.float32, device="cpu", seed=0, s=S, spec=None, d=D, dv=None):
    b, hq, hkv, causal, lengths, window = spec or CASES[name]
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, s, hq, d, generator=g).to(device, dtype).requires_grad_()
    k = torch.randn(b, s, hkv, d, generator=g).to(device, dtype).requires_grad_()
    v = torch.randn(b, s, hkv, dv or d, generator=g).to(device, dtype).requires_grad_()
    ids = None
    if lengths is not None:
        ids = torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in lengths]).to(device)
    return q, k, v, dict(causal=causal, document_ids=ids, window=window)


def naive_mask(b, s, causal, document_ids, window):
    """[b, s, s] bool from the definitions, one pair at a time."""
    m = torch.zeros(b, s, s, dtype=torch.bool)
    for r in range(b):
        for i in range(s):
            for j in range(s):
                ok = (not causal or j <= i) and (window is None or i - j < window)
                if document_ids is not None:
                    ok = ok and bool(document_ids[r, i] == document_ids[r, j])
                m[r, i, j] = ok
    return m


def naive_attention(q, k, v, mask):
    """float64, softmax and logsumexp from torch, kv head of query head h = h // (hq / hkv)."""
    hq, hkv = q.shape[2], k.shape[2]
    heads = torch.tensor([h // (hq // hkv) for h in range(hq)])
    q, k, v = q.double(), k.double().index_select(2, heads), v.double().index_select(2, heads)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~mask[:, None].to(q.device), -math.inf)
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores, -1), v), torch.logsumexp(scores, -1)


def loss_grads(out, lse, inputs, seed=1):
    """Gradients of a random linear function of out and lse, so both paths are exercised."""
    g = torch.Generator().manual_seed(seed)
    go = torch.randn(out.shape, generator=g).to(out.device, out.dtype)
    gl = torch.randn(lse.shape, generator=g).to(lse.device)
    gl = torch.where(torch.isfinite(lse), gl, 0.0)
    loss = (out * go).sum() + (torch.where(torch.isfinite(lse), lse, 0.0) * gl).sum()
    return torch.autograd.grad(loss, inputs)


def assert_close(actual, expected, what, **tol):
    torch.testing.assert_close(actual, expected.to(actual.dtype), msg=lambda m: f"{what}: {m}", **tol)


@pytest.mark.parametrize("case", list(CASES))
def test_reference_matches_naive(case):
    q, k, v, kw = make_case(case)
    out, lse = attention(q, k, v, backend="reference", **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (q.shape[0], q.shape[2], S) and lse.dtype == torch.float32
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    n_out, n_lse = naive_attention(*leaves, naive_mask(q.shape[0], S, **kw))
    assert_close(out, n_out, "out", **FP32_REF)
    assert_close(lse, n_lse, "lse", **FP32_REF)
    for name, a, e in zip("qkv", loss_grads(out, lse, (q, k, v)), loss_grads(n_out, n_lse, leaves)):
        assert_close(a, e, f"grad {name}", **FP32_REF)


@pytest.mark.parametrize("case", list(CASES))
def test_sdpa_matches_reference(case):
    q, k, v, kw = make_case(case)
    out, lse = attention(q, k, v, backend="sdpa", **kw)
    r_out, r_lse = attention(q, k, v, backend="reference", **kw)
    assert out.shape == q.shape and lse.dtype == torch.float32
    assert_close(out, r_out, "out", **FP32_SDPA)
    assert_close(lse, r_lse, "lse", **FP32_SDPA)
    for name, a, e in zip("qkv", loss_grads(out, lse, (q, k, v)), loss_grads(r_out, r_lse, (q, k, v))):
        assert_close(a, e, f"grad {name}", **FP32_SDPA)


@pytest.mark.parametrize("dims", list(HEAD_DIMS))
@pytest.mark.parametrize("case", ["causal", "bidirectional", "documents_window", "gqa_hkv2", "batch2_layouts_window"])
def test_v_head_dim_other_than_q_k(case, dims):
    """out [b, s, hq, dv], lse and the q/k/v gradients (lse term included) of both CPU backends,
    the reference against float64 and sdpa (which runs dv != d zero-padded) against the reference."""
    d, dv = HEAD_DIMS[dims]
    q, k, v, kw = make_case(case, d=d, dv=dv)
    out, lse = attention(q, k, v, backend="reference", **kw)
    assert out.shape == (*q.shape[:3], dv) and lse.shape == (q.shape[0], q.shape[2], S)
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    n_out, n_lse = naive_attention(*leaves, naive_mask(q.shape[0], S, **kw))
    assert_close(out, n_out, "reference out", **FP32_REF)
    assert_close(lse, n_lse, "reference lse", **FP32_REF)
    ref_grads = loss_grads(out, lse, (q, k, v))
    for name, a, e in zip("qkv", ref_grads, loss_grads(n_out, n_lse, leaves)):
        assert_close(a, e, f"reference grad {name}", **FP32_REF)
    s_out, s_lse = attention(q, k, v, backend="sdpa", **kw)
    assert s_out.shape == out.shape
    assert_close(s_out, out, "sdpa out", **FP32_SDPA)
    assert_close(s_lse, lse, "sdpa lse", **FP32_SDPA)
    for name, a, e in zip("qkv", loss_grads(s_out, s_lse, (q, k, v)), ref_grads):
        assert a.shape == e.shape
        assert_close(a, e, f"sdpa grad {name}", **FP32_SDPA)


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@pytest.mark.parametrize("dims", list(HEAD_DIMS))
def test_merge_blocks_with_v_head_dim_other_than_q_k(dims, backend):
    """Ring attention's path at dv != d: blocks with explicit masks over fewer keys than queries,
    merged through their lse, equal full attention, gradients included."""
    d, dv = HEAD_DIMS[dims]
    q, k, v, kw = make_case("batch2_layouts_window", d=d, dv=dv)
    out, lse = attention(q, k, v, backend=backend, **kw)
    (out_a, lse_a), (out_b, lse_b) = _blocks(q, k, v, naive_mask(q.shape[0], S, **kw), "halves", backend)
    m_out, m_lse = merge_attention_blocks(out_a, lse_a, out_b, lse_b)
    assert_close(m_out, out, "out", **FP32_SDPA)
    assert_close(m_lse, lse, "lse", **FP32_SDPA)
    for name, a, e in zip("qkv", loss_grads(m_out, m_lse, (q, k, v)), loss_grads(out, lse, (q, k, v))):
        assert_close(a, e, f"grad {name}", **FP32_SDPA)


@pytest.mark.parametrize("case", ["documents", "gqa_hkv2", "batch2_layouts_window"])
def test_sdpa_bf16_close_to_reference(case):
    q, k, v, kw = make_case(case, dtype=torch.bfloat16)
    out, lse = attention(q, k, v, backend="sdpa", **kw)
    r_out, r_lse = attention(q, k, v, backend="reference", **kw)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert_close(out, r_out, "out", rtol=2e-2, atol=2e-2)
    assert_close(lse, r_lse, "lse", rtol=1e-2, atol=1e-2)
    for name, a, e in zip("qkv", loss_grads(out, lse, (q, k, v)), loss_grads(r_out, r_lse, (q, k, v))):
        assert_close(a, e, f"grad {name}", rtol=5e-2, atol=5e-2)


def test_auto_is_sdpa_on_cpu():
    q, k, v, kw = make_case("batch2_layouts")
    for a, b in zip(attention(q, k, v, **kw), attention(q, k, v, backend="sdpa", **kw)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@pytest.mark.parametrize("case", ["documents", "gqa_hkv2", "batch2_layouts", "batch2_layouts_window"])
def test_packed_documents_equal_separate_runs(backend, case):
    """The packing property: a packed row gives each document what it gets on its own."""
    q, k, v, kw = make_case(case)
    ids = kw.pop("document_ids")
    out, lse = attention(q, k, v, document_ids=ids, backend=backend, **kw)
    outs, lses = torch.empty_like(out), torch.empty_like(lse)
    for r in range(q.shape[0]):
        for doc in ids[r].unique():
            pos = (ids[r] == doc).nonzero().flatten()
            a, e = int(pos[0]), int(pos[-1]) + 1
            o, l = attention(q[r:r + 1, a:e], k[r:r + 1, a:e], v[r:r + 1, a:e], backend=backend, **kw)
            outs[r:r + 1, a:e], lses[r:r + 1, :, a:e] = o, l
    assert_close(out, outs, "out", **FP32_SDPA)
    assert_close(lse, lses, "lse", **FP32_SDPA)
    for name, a, e in zip("qkv", loss_grads(out, lse, (q, k, v)), loss_grads(outs, lses, (q, k, v))):
        assert_close(a, e, f"grad {name}", **FP32_SDPA)


def _blocks(q, k, v, visible, split, backend):
    """Attention over two disjoint key sets whose union is every key, one (out, lse) each."""
    if split == "halves":  # key blocks of their own length; early queries see nothing in the second
        h = k.shape[1] // 2
        return [attention(q, k[:, sl], v[:, sl], causal=False, mask=visible[:, :, sl], backend=backend)
                for sl in (slice(0, h), slice(h, None))]
    # interleaved: a random key subset, expressed as masks over all keys
    in_a = (torch.rand(k.shape[1], generator=torch.Generator().manual_seed(3)) < 0.5).to(visible.device)
    in_a[0] = True  # query 0 sees only key 0, so it sees nothing in block b
    return [attention(q, k, v, causal=False, mask=visible & m, backend=backend) for m in (in_a, ~in_a)]


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@pytest.mark.parametrize("split", ["halves", "interleaved"])
@pytest.mark.parametrize("case", ["documents", "gqa_hkv2", "batch2_layouts_window"])
def test_merge_blocks_equals_full_attention(backend, split, case):
    q, k, v, kw = make_case(case)
    out, lse = attention(q, k, v, backend=backend, **kw)
    visible = naive_mask(q.shape[0], S, **kw)
    (out_a, lse_a), (out_b, lse_b) = _blocks(q, k, v, visible, split, backend)
    assert torch.isinf(lse_b).any(), "the split should leave some queries without keys in one block"
    assert not out_b.isnan().any() and (out_b[torch.isinf(lse_b).transpose(1, 2)] == 0).all()
    m_out, m_lse = merge_attention_blocks(out_a, lse_a, out_b, lse_b)
    assert_close(m_out, out, "out", **FP32_SDPA)
    assert_close(m_lse, lse, "lse", **FP32_SDPA)
    # gradients through the merge need each block's lse gradient: this is ring attention's path
    for name, a, e in zip("qkv", loss_grads(m_out, m_lse, (q, k, v)), loss_grads(out, lse, (q, k, v))):
        assert_close(a, e, f"grad {name}", **FP32_SDPA)


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_rows_without_keys_give_zero_and_minus_inf(backend):
    q, k, v, _ = make_case("gqa_hkv2")
    mask = torch.ones(1, S, S, dtype=torch.bool).tril()
    mask[:, 2] = False
    mask[:, 9] = False
    out, lse = attention(q, k, v, causal=False, mask=mask, backend=backend)
    assert (out[:, [2, 9]] == 0).all() and torch.isneginf(lse[:, :, [2, 9]]).all()
    assert torch.isfinite(lse[:, :, [0, 1, 3]]).all()
    r_out, r_lse = attention(q, k, v, causal=False, mask=mask, backend="reference")
    assert_close(out, r_out, "out", **FP32_SDPA)
    grads = loss_grads(out, lse, (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)
    for name, a, e in zip("qkv", grads, loss_grads(r_out, r_lse, (q, k, v))):
        assert_close(a, e, f"grad {name}", **FP32_SDPA)


def test_merge_rows_empty_in_both_blocks():
    g = torch.Generator().manual_seed(0)
    out_a, out_b = (torch.randn(1, 4, 2, 8, generator=g).requires_grad_() for _ in range(2))
    lse_a, lse_b = (torch.randn(1, 2, 4, generator=g) for _ in range(2))
    lse_a[:, :, 1], lse_b[:, :, 1] = -math.inf, -math.inf  # position 1: no key anywhere
    lse_b[:, :, 2] = -math.inf  # position 2: only block a
    lse_a.requires_grad_(), lse_b.requires_grad_()
    out, lse = merge_attention_blocks(out_a, lse_a, out_b, lse_b)
    assert (out[:, 1] == 0).all() and torch.isneginf(lse[:, :, 1]).all()
    torch.testing.assert_close(out[:, 2], out_a[:, 2])
    torch.testing.assert_close(lse[:, :, 2], lse_a[:, :, 2])
    expect = torch.logaddexp(lse_a[:, :, 0], lse_b[:, :, 0])
    torch.testing.assert_close(lse[:, :, 0], expect)
    grads = torch.autograd.grad(out.sum() + torch.where(torch.isfinite(lse), lse, 0.0).sum(),
                                (out_a, lse_a, out_b, lse_b))
    assert all(torch.isfinite(x).all() for x in grads)


def test_unknown_backend_lists_valid_names():
    q, k, v, kw = make_case("causal")
    with pytest.raises(ValueError, match="unknown attention backend 'flash'.*reference.*sdpa.*flash_attn"):
        attention(q, k, v, backend="flash", **kw)
    assert BACKENDS == ("auto", "reference", "sdpa", "flash_attn")


@pytest.mark.skipif(flash_attn_available(), reason="flash-attn is installed")
def test_flash_attn_missing_says_how_to_install():
    q, k, v, kw = make_case("causal")
    with pytest.raises(ImportError, match=r"megaswift\[gpu\]"):
        attention(q, k, v, backend="flash_attn", **kw)


def test_bad_inputs_name_the_values():
    q, k, v, _ = make_case("gqa_hkv2")
    with pytest.raises(ValueError, match=r"query heads \(4\) must be a multiple of kv heads \(3\)"):
        attention(q, k.repeat(1, 1, 2, 1)[:, :, :3], v.repeat(1, 1, 2, 1)[:, :, :3])
    with pytest.raises(ValueError, match="pass causal=False"):
        attention(q, k, v, mask=torch.ones(1, S, S, dtype=torch.bool))
    with pytest.raises(ValueError, match="explicit mask"):
        attention(q, k[:, :8], v[:, :8])
    with pytest.raises(ValueError, match="window must be >= 1"):
        attention(q, k, v, window=0)
    # v's head dim is free; its batch, positions and heads are k's
    with pytest.raises(ValueError, match="k and v alike but for head_dim"):
        attention(q, k, v[:, :8])
    with pytest.raises(ValueError, match="k and v alike but for head_dim"):
        attention(q, k, v[:, :, :1, :5])


# --- CUDA: run by the gpu marker on a GPU machine -----------------------------------------------

GPU_TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}


def _assert_matches_reference(q, k, v, kw, backend, tol):
    """out, lse and the q/k/v gradients of `backend` against the reference backend."""
    out, lse = attention(q, k, v, backend=backend, **kw)
    r_out, r_lse = attention(q, k, v, backend="reference", **kw)
    assert_close(out, r_out, "out", **tol)
    assert_close(lse, r_lse, "lse", **tol)
    for name, a, e in zip("qkv", loss_grads(out, lse, (q, k, v)), loss_grads(r_out, r_lse, (q, k, v))):
        assert_close(a, e, f"grad {name}", **tol)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["sdpa", "flash_attn"])
@pytest.mark.parametrize("case", ["causal", "bidirectional", "documents_window", "gqa_hkv2", "batch2_layouts"])
@pytest.mark.parametrize("s", [16, 300])
def test_cuda_backends_match_reference(case, backend, dtype, s):
    if backend == "flash_attn" and not flash_attn_available():
        pytest.skip("flash-attn is not installed")
    if backend == "flash_attn" and dtype == torch.float32:
        pytest.skip("flash-attn runs in half precision only")
    b, hq, hkv, causal, lengths, window = CASES[case]
    if lengths is not None and s != S:  # stretch the layouts to s positions, odd lengths kept
        lengths = [[n * s // S for n in r[:-1]] + [s - sum(n * s // S for n in r[:-1])] for r in lengths]
    spec = (b, hq, hkv, causal, lengths, window)
    q, k, v, kw = make_case(case, dtype=dtype, device="cuda", s=s, spec=spec)
    _assert_matches_reference(q, k, v, kw, backend, GPU_TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_sdpa_merge_with_empty_rows(dtype):
    q, k, v, kw = make_case("gqa_hkv2", dtype=dtype, device="cuda")
    out, lse = attention(q, k, v, backend="reference", **kw)
    visible = naive_mask(q.shape[0], S, **kw).cuda()
    (out_a, lse_a), (out_b, lse_b) = _blocks(q, k, v, visible, "halves", "sdpa")
    assert torch.isneginf(lse_b).any() and not out_b.isnan().any()
    m_out, m_lse = merge_attention_blocks(out_a, lse_a, out_b, lse_b)
    tol = GPU_TOL[dtype]
    assert_close(m_out, out, "out", **tol)
    assert_close(m_lse, lse, "lse", **tol)
    for name, a, e in zip("qkv", loss_grads(m_out, m_lse, (q, k, v)), loss_grads(out, lse, (q, k, v))):
        assert_close(a, e, f"grad {name}", **tol)


# --- CUDA paths checked on the CPU (issue 17) --------------------------------------------------------

def test_q_k_v_of_different_dtypes_are_refused_at_the_kernel_entry():
    """A bf16 v beside fp32 q/k (what RoPE under autocast produced) would be read as fp32 by aten's
    memory-efficient CUDA kernel, which does not check; the entry check names the dtypes."""
    q, k, v, kw = make_case("causal")
    with pytest.raises(ValueError, match=r"share one dtype; got torch.float32, torch.float32, torch.bfloat16"):
        attention(q, k, v.bfloat16(), **kw)


@pytest.fixture
def flash_attn_package(tmp_path, monkeypatch):
    """Install a stand-in `flash_attn` package on sys.path: `make(source)` writes its __init__."""
    import sys

    from megaswift.kernels import attention_cuda

    def make(source: str):
        pkg = tmp_path / "flash_attn"
        pkg.mkdir(exist_ok=True)
        (pkg / "__init__.py").write_text(source)
        monkeypatch.syspath_prepend(str(tmp_path))
        monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
        attention_cuda.flash_attn_status.cache_clear()

    yield make
    sys.modules.pop("flash_attn", None)
    attention_cuda.flash_attn_status.cache_clear()


def test_a_flash_attn_that_cannot_load_is_not_chosen(flash_attn_package):
    """A wheel built for another torch is found by importlib but fails to import: auto must take
    sdpa, and asking for flash_attn by name says why in one line."""
    import importlib.util

    from megaswift.kernels.attention import choose_backend

    flash_attn_package("raise ImportError('flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda9SetDevicei')\n")
    assert importlib.util.find_spec("flash_attn") is not None  # present, as the old check saw it
    assert not flash_attn_available()
    assert choose_backend("auto", "cuda", torch.bfloat16, 64, False) == "sdpa"
    q, k, v, kw = make_case("causal")
    with pytest.raises(ImportError, match=r"importing it failed \(ImportError: flash_attn_2_cuda.so: undefined symbol"):
        attention(q, k, v, backend="flash_attn", **kw)


def test_auto_takes_flash_attn_only_where_its_kernels_apply(flash_attn_package):
    from megaswift.kernels.attention import choose_backend

    flash_attn_package("def flash_attn_varlen_func(*args, **kwargs):\n    raise NotImplementedError\n")
    assert flash_attn_available()
    assert choose_backend("auto", "cuda", torch.bfloat16, 128, False) == "flash_attn"
    assert choose_backend("auto", "cuda", torch.float16, 12, False) == "flash_attn"  # the package pads to 8
    assert choose_backend("auto", "cuda", torch.float32, 128, False) == "sdpa"  # half precision only
    assert choose_backend("auto", "cuda", torch.bfloat16, 128, True) == "sdpa"  # no explicit masks
    assert choose_backend("auto", "cuda", torch.bfloat16, 320, False) == "sdpa"  # head dim past 256
    # v's head dim counts as well: flash-attn runs both at the larger one
    assert choose_backend("auto", "cuda", torch.bfloat16, 192, False, v_head_dim=128) == "flash_attn"  # MLA
    assert choose_backend("auto", "cuda", torch.bfloat16, 128, False, v_head_dim=320) == "sdpa"
    assert choose_backend("auto", "cuda", torch.bfloat16, 320, False, v_head_dim=128) == "sdpa"
    assert choose_backend("auto", "cpu", torch.bfloat16, 128, False) == "sdpa"


@pytest.mark.parametrize("dtype, d, masked, kernel, padded", [
    (torch.bfloat16, 12, False, "flash", 16), (torch.bfloat16, 12, True, "efficient", 16),
    (torch.float16, 64, False, "flash", 64), (torch.bfloat16, 264, False, "efficient", 264),
    (torch.float32, 6, False, "efficient", 8), (torch.float32, 16, True, "efficient", 16)])
def test_sdpa_kernel_choice_and_head_dim_padding(dtype, d, masked, kernel, padded):
    from megaswift.kernels.attention_cuda import sdpa_kernel

    assert sdpa_kernel(dtype, d, masked) == (kernel, padded, padded)


@pytest.mark.parametrize("dtype, d, dv, masked, expect", [
    (torch.bfloat16, 192, 128, False, ("flash", 192, 192)),  # flash: one head dim, v padded to q/k's
    (torch.bfloat16, 12, 20, False, ("flash", 24, 24)),  # q/k padded to v's (aligned)
    (torch.bfloat16, 192, 128, True, ("efficient", 192, 128)),  # memory-efficient: dv native
    (torch.bfloat16, 20, 12, True, ("efficient", 24, 16)),  # each aligned on its own
    (torch.float32, 20, 12, False, ("efficient", 20, 12)),
    (torch.bfloat16, 128, 264, False, ("efficient", 128, 264))])  # past flash's 256
def test_sdpa_kernel_head_dims_of_v_other_than_q_k(dtype, d, dv, masked, expect):
    from megaswift.kernels.attention_cuda import sdpa_kernel

    assert sdpa_kernel(dtype, d, masked, v_head_dim=dv) == expect


class _StandInCudaKernels:
    """aten's two fused CUDA attention kernels as their contracts read, computed on the CPU: one
    dtype for q/k/v, [b, h, s, d] with the head dim aligned (the memory-efficient kernel has no
    unaligned bf16/fp16 variant: "cutlassF: no kernel found to launch"), lse [b, h, s_q] float32,
    padded to a multiple of 32 positions by the memory-efficient one."""

    def __init__(self):
        self.ran = []

    @staticmethod
    def _math(q, k, v, bias, causal, scale):
        scores = (q.float() @ k.float().transpose(-1, -2)) * scale
        if bias is not None:
            scores = scores + bias.float()
        if causal:
            s_q, s_k = scores.shape[-2:]
            scores = scores.masked_fill(torch.ones(s_q, s_k, dtype=torch.bool).triu(1), -math.inf)
        lse = torch.logsumexp(scores, -1)
        return (torch.softmax(scores, -1) @ v.float()).to(q.dtype), lse

    def _check(self, q, k, v):
        assert q.dtype == k.dtype == v.dtype, (q.dtype, k.dtype, v.dtype)
        assert q.shape[1] == k.shape[1], "no GQA in the aten kernels"
        assert q.shape[-1] == k.shape[-1], "q and k share one head dim"
        align = 8 if q.dtype in (torch.float16, torch.bfloat16) else 4
        if q.shape[-1] % align or v.shape[-1] % align:  # v's own head dim is aligned on its own
            raise RuntimeError("cutlassF: no kernel found to launch!")

    def _scaled_dot_product_flash_attention(self, q, k, v, dropout_p, is_causal, return_debug_mask, scale=None):
        self._check(q, k, v)
        if v.shape[-1] != q.shape[-1]:  # sdp_utils' check_head_dim_size_flash: one head dim for all three
            raise RuntimeError("flash attention requires q, k, v to have the same last dimension")
        assert q.dtype in (torch.float16, torch.bfloat16), "flash: half precision only"
        self.ran.append("flash")
        out, lse = self._math(q, k, v, None, is_causal, scale)
        return out, lse, None, None, q.shape[2], k.shape[2], None, None, None

    def _scaled_dot_product_efficient_attention(self, q, k, v, bias, compute_log_sumexp, dropout_p, is_causal,
                                                scale=None):
        self._check(q, k, v)
        self.ran.append("efficient")
        out, lse = self._math(q, k, v, bias, is_causal, scale)
        pad = -lse.shape[-1] % 32
        return out, torch.cat([lse, torch.full((*lse.shape[:-1], pad), math.nan)], -1), None, None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", ["causal", "documents_window", "gqa_hkv2"])
@pytest.mark.parametrize("d, dv", [(6, 6), (20, 12), (6, 10)])
def test_cuda_sdpa_runs_odd_head_dims(d, dv, case, dtype, monkeypatch):
    """attention_cuda.sdpa against stand-ins of aten's CUDA kernels, with head dims of 6 and 10
    (off both alignments) and v's head dim other than q/k's: the padding to the kernels'
    alignment (and, for flash, to one head dim) must give the reference's out, lse and
    gradients."""
    from megaswift.kernels import attention_cuda

    kernels = _StandInCudaKernels()
    monkeypatch.setattr(attention_cuda, "aten", kernels)
    b, hq, hkv, causal, lengths, window = CASES[case]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, S, h, n, generator=g).to(dtype).requires_grad_()
               for h, n in ((hq, d), (hkv, d), (hkv, dv)))
    _, _, _, kw = make_case(case)
    visible = None if lengths is None and window is None else naive_mask(b, S, **kw)
    out, lse = attention_cuda.sdpa(q, k, v, visible=visible, causal=causal and visible is None, scale=d ** -0.5)
    want_out, want_lse = attention(q, k, v, backend="reference", **kw)
    tol = GPU_TOL[dtype]
    assert out.shape == (*q.shape[:3], dv) and lse.shape == (b, hq, S)
    assert_close(out, want_out, "out", **tol)
    assert_close(lse, want_lse, "lse", **tol)
    grads = torch.autograd.grad((out.float() ** 2).sum(), (q, k, v))
    want = torch.autograd.grad((want_out.float() ** 2).sum(), (q, k, v))
    for name, a, e in zip("qkv", grads, want):
        assert_close(a, e, f"grad {name}", **tol)
    half_unmasked = dtype == torch.bfloat16 and visible is None
    assert kernels.ran == ["flash" if half_unmasked else "efficient"]


def test_varlen_layout_is_computed_once_per_document_ids_tensor():
    """flash-attn's cu_seqlens and longest document cost host syncs; every layer of a micro batch
    passes the same document_ids, so only the first pays."""
    from megaswift.kernels.attention_cuda import varlen_layout

    docs = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2], [0, 1, 1, 1, 1, 1, 2, 2]])
    cu, longest = varlen_layout(docs, 2, 8, "cpu")
    assert cu.tolist() == [0, 3, 5, 8, 9, 14, 16] and longest == 5
    assert varlen_layout(docs, 2, 8, "cpu")[0] is cu  # cached on the tensor
    docs[1, 1:6] = 1  # an in-place change is seen: recomputed
    docs[1, 6:] = 3
    assert varlen_layout(docs, 2, 8, "cpu")[0] is not cu
    fresh = torch.zeros(2, 8, dtype=torch.long)
    assert varlen_layout(fresh, 2, 8, "cpu")[0].tolist() == [0, 8, 16]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["sdpa", "flash_attn"])
@pytest.mark.parametrize("case", ["causal", "documents_window", "gqa_hkv2"])
@pytest.mark.parametrize("d, dv", [(6, 6), (12, 12), (20, 12), (12, 20), (192, 128)])
def test_cuda_odd_head_dims_match_reference(d, dv, case, backend, dtype):
    """The real CUDA kernels at head dims off their alignment, and with v's head dim other than
    q/k's (multi-latent attention, 192/128 as DeepSeek-V3): the stand-in test above checks the
    padding on the CPU; this one that the kernels take it (the memory-efficient kernel with dv
    native, the flash kernels padded to one head dim)."""
    if backend == "flash_attn" and (not flash_attn_available() or dtype == torch.float32):
        pytest.skip("flash-attn is not installed" if not flash_attn_available() else "flash-attn: half precision only")
    b, hq, hkv, causal, lengths, window = CASES[case]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, S, h, n, generator=g).to("cuda", dtype).requires_grad_()
               for h, n in ((hq, d), (hkv, d), (hkv, dv)))
    _, _, _, kw = make_case(case, device="cuda")
    _assert_matches_reference(q, k, v, kw, backend, GPU_TOL[dtype])
