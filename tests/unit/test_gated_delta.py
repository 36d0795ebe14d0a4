"""kernels/gated_delta.py against transformers' Qwen3-Next reference functions and against itself.

Tolerances (fp32): outputs and states within 2e-6 absolute of transformers' chunked and recurrent
functions (measured max |diff| about 6e-7 on values of order 1); gradients of q, k, v, g, beta
and the initial state within 1e-5 (measured 2.6e-7 relative to the largest gradient). Self-consistency checks (documents,
chaining, the decoding step, context-parallel pieces) use the same 2e-6 / 1e-5 bounds.
"""
import pytest
import torch
import torch.nn.functional as F
from transformers.models.qwen3_next.modeling_qwen3_next import (
    torch_chunk_gated_delta_rule,
    torch_recurrent_gated_delta_rule,
)

from megaswift.kernels.gated_delta import (
    choose_backend,
    combine_pieces,
    fla_available,
    gated_delta_piece,
    gated_delta_rule,
    gated_delta_step,
)

B, S, HK, HV, DK, DV = 2, 37, 2, 4, 8, 6
OUT_TOL = dict(rtol=0, atol=2e-6)
GRAD_TOL = dict(rtol=1e-5, atol=1e-5)


def make_inputs(seed=0, b=B, s=S, hk=HK, hv=HV, dk=DK, dv=DV, dtype=torch.float32, device="cpu"):
    """Random inputs shaped like Qwen3-Next's: g = -exp(A_log) * softplus(a + dt_bias), beta =
    sigmoid(b), q/k of arbitrary norm (the kernel l2-normalises them)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, s, hk, dk, generator=gen)
    k = torch.randn(b, s, hk, dk, generator=gen)
    v = torch.randn(b, s, hv, dv, generator=gen)
    a_log = torch.empty(hv).uniform_(-1.0, 1.0, generator=gen)
    g = -a_log.exp() * F.softplus(torch.randn(b, s, hv, generator=gen) + 0.5)
    beta = torch.randn(b, s, hv, generator=gen).sigmoid()
    h0 = 0.5 * torch.randn(b, hv, dk, dv, generator=gen)
    # g stays float32 (the model computes it in float32, as transformers does); the state is float32
    q, k, v, beta = (x.to(device=device, dtype=dtype) for x in (q, k, v, beta))
    return [q, k, v, g.to(device), beta, h0.to(device)]


def document_ids_of(lengths_per_row, s=S):
    ids = torch.empty(len(lengths_per_row), s, dtype=torch.long)
    for row, lengths in enumerate(lengths_per_row):
        assert sum(lengths) == s
        ids[row] = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    return ids


def leaves(tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def loss_of(out, final, seed=1):
    """A loss that weighs every output and state element differently, so each gradient is checked."""
    gen = torch.Generator().manual_seed(seed)
    return (out * torch.randn(out.shape, generator=gen)).sum() + (final * torch.randn(final.shape, generator=gen)).sum()


def grads(loss, inputs):
    return torch.autograd.grad(loss, inputs)


# --- against transformers ------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [4, 16])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("heads", [(HK, HV), (3, 3)], ids=["grouped", "equal"])
def test_matches_transformers(chunk_size, with_state, heads):
    q, k, v, g, beta, h0 = make_inputs(hk=heads[0], hv=heads[1])
    h0 = h0 if with_state else None
    out, final = gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True, chunk_size=chunk_size,
                                  backend="torch")
    ref_out, ref_final = torch_chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=chunk_size, initial_state=h0,
                                                      output_final_state=True, use_qk_l2norm_in_kernel=True)
    rec_out, rec_final = torch_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                                          use_qk_l2norm_in_kernel=True)
    assert out.shape == (B, S, heads[1], DV) and final.shape == (B, heads[1], DK, DV) and final.dtype == torch.float32
    for want_out, want_final in ((ref_out, ref_final), (rec_out, rec_final)):
        torch.testing.assert_close(out, want_out, **OUT_TOL)
        torch.testing.assert_close(final, want_final, **OUT_TOL)


@pytest.mark.parametrize("chunk_size", [4, 16])
def test_gradients_match_transformers(chunk_size):
    inputs = make_inputs(seed=3)
    ours, theirs = leaves(inputs), leaves(inputs)
    out, final = gated_delta_rule(*ours[:5], initial_state=ours[5], output_final_state=True, chunk_size=chunk_size,
                                  backend="torch")
    ref_out, ref_final = torch_chunk_gated_delta_rule(*theirs[:5], chunk_size=chunk_size, initial_state=theirs[5],
                                                      output_final_state=True, use_qk_l2norm_in_kernel=True)
    for name, a, b in zip("q k v g beta h0".split(), grads(loss_of(out, final), ours),
                          grads(loss_of(ref_out, ref_final), theirs)):
        torch.testing.assert_close(a, b, **GRAD_TOL, msg=lambda m, name=name: f"d{name}: {m}")


def test_without_l2norm_and_final_state_flag():
    q, k, v, g, beta, _ = make_inputs(seed=4)
    out, final = gated_delta_rule(q, k, v, g, beta, use_qk_l2norm=False, chunk_size=8)
    ref, _ = torch_recurrent_gated_delta_rule(q, k, v, g, beta, use_qk_l2norm_in_kernel=False)
    assert final is None
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)  # unnormalised q/k: values of order 10


def test_half_precision_keeps_v_dtype():
    q, k, v, g, beta, h0 = make_inputs(seed=5, dtype=torch.bfloat16)
    out, final = gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True, chunk_size=16)
    ref, _ = gated_delta_rule(q.float(), k.float(), v.float(), g, beta.float(), initial_state=h0, chunk_size=16)
    assert out.dtype == torch.bfloat16 and final.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=2e-2)  # one bf16 rounding of the output


# --- documents, chaining, decoding -----------------------------------------------------------------

# documents of each row: a start on a chunk edge (16, 32), a one-token document, one document per row
LAYOUTS = [[[5, 11, 1, 15, 5], [37]], [[16, 16, 5], [1, 1, 35]]]


@pytest.mark.parametrize("chunk_size", [4, 16])
@pytest.mark.parametrize("layout", LAYOUTS, ids=["mixed", "edges"])
def test_documents_equal_separate_runs(chunk_size, layout):
    """Packed documents = each document run alone (the row's first one from the initial state,
    the others from zero); the final state is the last document's. Gradients too."""
    inputs = make_inputs(seed=6)
    ids = document_ids_of(layout)
    packed, alone = leaves(inputs), leaves(inputs)
    out, final = gated_delta_rule(*packed[:5], document_ids=ids, initial_state=packed[5], output_final_state=True,
                                  chunk_size=chunk_size, backend="torch")
    q, k, v, g, beta, h0 = alone
    rows, finals = [], []
    for row, lengths in enumerate(layout):
        pieces, start, state = [], 0, None
        for i, n in enumerate(lengths):
            sl = slice(start, start + n)
            o, state = gated_delta_rule(q[row:row + 1, sl], k[row:row + 1, sl], v[row:row + 1, sl],
                                        g[row:row + 1, sl], beta[row:row + 1, sl],
                                        initial_state=h0[row:row + 1] if i == 0 else None, output_final_state=True,
                                        chunk_size=chunk_size, backend="torch")
            pieces.append(o)
            start += n
        rows.append(torch.cat(pieces, dim=1))
        finals.append(state)
    want_out, want_final = torch.cat(rows), torch.cat(finals)
    torch.testing.assert_close(out, want_out, **OUT_TOL)
    torch.testing.assert_close(final, want_final, **OUT_TOL)
    for name, a, b in zip("q k v g beta h0".split(), grads(loss_of(out, final), packed),
                          grads(loss_of(want_out, want_final), alone)):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, **GRAD_TOL, msg=lambda m, name=name: f"d{name}: {m}")


def test_halves_chain_through_state():
    q, k, v, g, beta, h0 = make_inputs(seed=7)
    whole, final = gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True, chunk_size=16)
    cut = 20  # neither half a multiple of the chunk size
    first, mid = gated_delta_rule(*(x[:, :cut] for x in (q, k, v, g, beta)), initial_state=h0,
                                  output_final_state=True, chunk_size=16)
    second, last = gated_delta_rule(*(x[:, cut:] for x in (q, k, v, g, beta)), initial_state=mid,
                                    output_final_state=True, chunk_size=16)
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole, **OUT_TOL)
    torch.testing.assert_close(last, final, **OUT_TOL)


def test_step_matches_chunked():
    q, k, v, g, beta, h0 = make_inputs(seed=8)
    whole, final = gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True, chunk_size=16)
    state, outs = h0, []
    for t in range(S):
        o, state = gated_delta_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], state)
        outs.append(o)
    torch.testing.assert_close(torch.stack(outs, dim=1), whole, **OUT_TOL)
    torch.testing.assert_close(state, final, **OUT_TOL)
    o, _ = gated_delta_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0])  # no state: starts from zero
    torch.testing.assert_close(o, gated_delta_rule(q[:, :1], k[:, :1], v[:, :1], g[:, :1], beta[:, :1])[0][:, 0],
                               **OUT_TOL)


# --- context parallelism ---------------------------------------------------------------------------


@pytest.mark.parametrize("cuts,layout", [
    ([19], None),
    ([12, 25], None),
    ([12, 25], [[5, 11, 1, 15, 5], [12, 13, 12]]),  # row 1: both cuts fall on document starts
], ids=["2_pieces", "3_pieces", "3_pieces_documents"])
def test_pieces_combine_to_whole(cuts, layout):
    """Pieces computed independently (no incoming state), then combined by passing states along,
    equal the whole sequence: outputs, final state, and the gradients of every input."""
    inputs = make_inputs(seed=9)
    ids = None if layout is None else document_ids_of(layout)
    whole_in, piece_in = leaves(inputs), leaves(inputs)
    out, final = gated_delta_rule(*whole_in[:5], document_ids=ids, initial_state=whole_in[5], output_final_state=True,
                                  chunk_size=4, backend="torch")
    bounds = [0, *cuts, S]
    spans = [slice(a, b) for a, b in zip(bounds, bounds[1:])]
    pieces = [gated_delta_piece(*(x[:, sl] for x in piece_in[:5]), document_ids=None if ids is None else ids[:, sl],
                                chunk_size=4, backend="torch") for sl in spans]
    got_out, got_final = combine_pieces(pieces, initial_state=piece_in[5],
                                        document_ids=None if ids is None else [ids[:, sl] for sl in spans])
    torch.testing.assert_close(got_out, out, **OUT_TOL)
    torch.testing.assert_close(got_final, final, **OUT_TOL)
    for name, a, b in zip("q k v g beta h0".split(), grads(loss_of(got_out, got_final), piece_in),
                          grads(loss_of(out, final), whole_in)):
        torch.testing.assert_close(a, b, **GRAD_TOL, msg=lambda m, name=name: f"d{name}: {m}")


def test_piece_is_affine_in_its_state():
    """The piece's summary applied to a state equals running the piece from that state."""
    q, k, v, g, beta, h0 = make_inputs(seed=10)
    piece = gated_delta_piece(q, k, v, g, beta, chunk_size=16)
    assert piece.transition.shape == (B, HV, DK, DK) and piece.state_query.shape == (B, S, HV, DK)
    direct, direct_final = gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    torch.testing.assert_close(piece.out + torch.einsum("bshk,bhkv->bshv", piece.state_query, h0), direct, **OUT_TOL)
    torch.testing.assert_close(piece.transition @ h0 + piece.state, direct_final, **OUT_TOL)


# --- backends and checks ---------------------------------------------------------------------------


def test_backend_choice_and_errors():
    assert choose_backend("auto", "cpu") == "torch"
    with pytest.raises(ValueError, match="unknown gated delta backend"):
        choose_backend("triton", "cpu")
    q, k, v, g, beta, _ = make_inputs()
    with pytest.raises((ValueError, ImportError), match="fla"):
        gated_delta_rule(q, k, v, g, beta, backend="fla")  # CPU tensors: never fla
    with pytest.raises(ValueError, match="multiple of key heads"):
        gated_delta_rule(q, k, v[:, :, :3], g[:, :, :3], beta[:, :, :3])
    with pytest.raises(ValueError, match="document_ids"):
        gated_delta_rule(q, k, v, g, beta, document_ids=torch.zeros(B, S - 1, dtype=torch.long))
    with pytest.raises(ValueError, match="initial_state"):
        gated_delta_rule(q, k, v, g, beta, initial_state=torch.zeros(B, HV, DV, DK))


def rel_rms(got, want):
    """flash-linear-attention's own test metric: rms(got - want) / rms(want)."""
    got, want = got.double(), want.double()
    return ((got - want).pow(2).mean().sqrt() / want.pow(2).mean().sqrt().clamp_min(1e-12)).item()


@pytest.mark.gpu
@pytest.mark.skipif(not fla_available(), reason="flash-linear-attention is not importable")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fla_matches_torch(dtype):
    """flash-linear-attention against the torch chunked form on CUDA: packed documents across rows
    (cu_seqlens), an initial state, grouped value heads, the final state and every gradient; then
    a context-parallel piece (one pass over dv + dk value columns from the state [0 | I]).
    Bounds in fla's own metric (relative rms error): what fla's tests allow in fp16 (0.005 outputs,
    0.008-0.02 gradients), widened for bf16's shorter mantissa; fp32 runs TF32 matmuls in fla."""
    b, s, hk, hv, dk, dv = 2, 300, 2, 4, 64, 128
    inputs = make_inputs(seed=11, b=b, s=s, hk=hk, hv=hv, dk=dk, dv=dv, dtype=dtype, device="cuda")
    ids = document_ids_of([[100, 37, 1, 162], [64, 236]], s=s).cuda()
    bound_out, bound_grad = (0.02, 0.05) if dtype == torch.bfloat16 else (0.005, 0.01)
    results = {}
    for backend in ("fla", "torch"):
        x = leaves(inputs)
        out, final = gated_delta_rule(*x[:5], document_ids=ids, initial_state=x[5], output_final_state=True,
                                      backend=backend)
        assert out.dtype == dtype and final.dtype == torch.float32
        gen = torch.Generator(device="cuda").manual_seed(1)
        loss = (out.float() * torch.randn(out.shape, device="cuda", generator=gen)).sum() + \
            (final * torch.randn(final.shape, device="cuda", generator=gen)).sum()
        # a piece without documents, so that its transition is not zeroed by a document start
        piece = gated_delta_piece(*(t.detach() for t in x[:5]), backend=backend)
        results[backend] = (out, final, torch.autograd.grad(loss, x), piece)
    assert choose_backend("auto", "cuda") == "fla"
    (fo, ff, fg, fp), (to, tf, tg, tp) = results["fla"], results["torch"]
    errors = {"out": rel_rms(fo, to), "final": rel_rms(ff, tf)}
    errors.update({f"d{name}": rel_rms(a, b) for name, a, b in zip("q k v g beta h0".split(), fg, tg)})
    errors.update({f"piece.{f}": rel_rms(getattr(fp, f), getattr(tp, f))
                   for f in ("out", "state_query", "transition", "state")})
    bad = {name: err for name, err in errors.items() if err > (bound_grad if name.startswith("d") else bound_out)}
    assert not bad, f"relative rms errors over bounds {bound_out}/{bound_grad}: {bad} (all: {errors})"
