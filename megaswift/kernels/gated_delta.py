"""The gated delta rule: the token mixer of Gated DeltaNet (Qwen3-Next / Qwen3.5 linear attention).

The recurrence
--------------
Each value head keeps a state S [dk, dv] (a fast-weight memory mapping keys to values). For token
t with key k_t, query q_t (both l2-normalised when use_qk_l2norm; q_t then scaled by dk^-0.5),
value v_t, log-decay g_t <= 0 and write strength beta_t in (0, 1):

    S'_t = exp(g_t) S_{t-1}                      forget a little of everything
    u_t  = beta_t (v_t - S'_t^T k_t)             the part of v_t the memory does not yet predict
    S_t  = S'_t + k_t u_t^T                      = (I - beta_t k_t k_t^T) exp(g_t) S_{t-1} + beta_t k_t v_t^T
    o_t  = S_t^T q_t

This is the orientation of transformers' `torch_*_gated_delta_rule` and of flash-linear-attention
(state [dk, dv], keys index rows). Grouped value heads: there are hk query/key heads and hv = r * hk
value heads, key head i serving value heads i*r .. i*r + r-1 (each with its own g, beta and state).

The chunked form (WY / UT representation)
-----------------------------------------
Split the sequence into chunks of C tokens and let G_i = g_1 + ... + g_i be the cumulative
log-decay inside a chunk entered with state S_0. Unrolling the recurrence,

    S_i = e^{G_i} S_0 + sum_{j<=i} e^{G_i - G_j} k_j u_j^T

and substituting it into u_i = beta_i (v_i - e^{g_i} S_{i-1}^T k_i) gives a unit lower-triangular
system for the C rows u_j of U:

    (I + L) U = diag(beta) V - diag(beta e^G) K S_0,    L_ij = beta_i e^{G_i - G_j} k_i.k_j  (j < i)

so with T = (I + L)^{-1} (the "UT transform": one triangular solve per chunk, against the
identity, since forming T and multiplying costs less than solving for dv + dk columns):

    U = U0 - W S_0,    U0 = T diag(beta) V,    W = T diag(beta e^G) K
    O = diag(e^G) Q S_0 + (Q K^T o D) U,           D_ij = e^{G_i - G_j} (j <= i), else 0
    S_C = e^{G_C} S_0 + (diag(e^{G_C - G}) K)^T U

Everything but the carried state is computed for all chunks at once (batched matmuls and one
solve); only U = U0 - W S_0 and S_C, two small matmuls per chunk, run in a loop over chunks,
and the outputs are formed after the loop from the stacked chunk states, in one batched product.

Packed documents
----------------
`document_ids` [b, s] marks documents, each a contiguous run; the state resets to zero where a
document starts (flash-linear-attention's cu_seqlens). A reset is a decay of -inf at that token,
but e^{-inf} would turn the differences G_i - G_j into NaN, so the chunked form masks instead:
inside a chunk, a token's segment is the number of document starts at or before it. Pairs (i, j)
of different segments drop out of L and D; only tokens of segment 0 (the document carried in
from the previous chunk) read S_0; only tokens of the last segment write S_C; and a chunk that
contains a start passes no part of S_0 on (e^{G_C} S_0 drops out). Differences of G are only
ever taken inside one segment, so no -inf appears and nothing loops over tokens. The first
document of each row continues `initial_state` (so a row can be the continuation of the previous
rank's piece in context parallelism), and the final state is that of the row's last document.

Affine in the state (context parallelism)
-----------------------------------------
For fixed q, k, g, beta the rule is linear in (v, S_0) jointly: S_t = P_t S_0 + B_t and
o_t = o0_t + S_0^T P_t^T q_t, where P_t [dk, dk] is the product of the per-token transforms
e^{g} (I - beta k k^T) (zeroed by a document start) and B_t, o0_t are the state and outputs
with S_0 = 0. One run of the same kernel gets them all: append dk zero columns to v and start
from [0 | I]; column block :dv is then (o0_t, B_t) and block dv: is (P_t^T q_t, P_t). A context
parallel rank computes its piece like this with no incoming state, learns its incoming state
S_in from the (P_end, B_end) of the ranks before it (`incoming_states`), and adds
(P_t^T q_t) S_in to its outputs (`apply_incoming_state`). The extra cost is dk more value
columns in one pass; the messages are [dk, dk] + [dk, dv] per head.

Backends
--------
  torch  the chunked form above in float32, differentiable by autograd; the CPU path and the
         reference of tests (equal to transformers' chunked and recurrent functions).
  fla    flash-linear-attention's Triton `chunk_gated_delta_rule` (CUDA); documents run as
         variable-length sequences (cu_seqlens over the flattened rows). Verified only by the
         `gpu` test in tests/unit/test_gated_delta.py. It picks its own chunk size.
  auto   fla on CUDA when `fla.ops.gated_delta_rule` imports, torch otherwise.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

BACKENDS = ("auto", "torch", "fla")
L2NORM_EPS = 1e-6  # transformers' and flash-linear-attention's l2norm: x / sqrt(sum x^2 + eps)


def gated_delta_rule(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, *, document_ids: Tensor | None = None,
                     initial_state: Tensor | None = None, output_final_state: bool = False, use_qk_l2norm: bool = True,
                     chunk_size: int = 64, backend: str = "auto") -> tuple[Tensor, Tensor | None]:
    """q, k [b, s, hk, dk], v [b, s, hv, dv] (hv a multiple of hk), g (log-decay, <= 0) and beta
    [b, s, hv]. Returns out [b, s, hv, dv] in v's dtype and, when output_final_state, the state
    after the last token [b, hv, dk, dv] float32 (else None).

    document_ids [b, s]: packed documents, each one contiguous run; the state resets at each
    document start except the row's first, which continues initial_state [b, hv, dk, dv] (zero
    when None). chunk_size is the torch backend's (a speed knob; the result does not depend on
    it beyond rounding).
    """
    _check_inputs(q, k, v, g, beta, document_ids, initial_state, chunk_size)
    backend = choose_backend(backend, q.device.type)
    if backend == "fla":
        out, final = _fla_chunk(q, k, v, g, beta, document_ids, initial_state, output_final_state, use_qk_l2norm)
    else:
        out, final = _torch_chunk(q, k, v, g, beta, document_ids, initial_state, use_qk_l2norm, chunk_size)
    return out.to(v.dtype), (final if output_final_state else None)


def gated_delta_step(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, state: Tensor | None = None, *,
                     use_qk_l2norm: bool = True) -> tuple[Tensor, Tensor]:
    """One token per row (decoding): q, k [b, hk, dk], v [b, hv, dv], g, beta [b, hv], state
    [b, hv, dk, dv] (zero when None). Returns out [b, hv, dv] in v's dtype and the new state
    float32. Token by token it equals gated_delta_rule (the recurrence of the module docstring)."""
    b, hk, dk = q.shape
    hv, dv = v.shape[1:]
    if k.shape != q.shape or v.shape[0] != b or hv % hk or g.shape != (b, hv) or beta.shape != (b, hv):
        raise ValueError(f"gated_delta_step takes q, k [b, hk, dk], v [b, hv, dv] (hv % hk == 0), g, beta [b, hv]; "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, g {tuple(g.shape)}, "
                         f"beta {tuple(beta.shape)}")
    r, dtype = hv // hk, v.dtype
    q, k = _prepare_qk(q.float(), k.float(), use_qk_l2norm)
    q, k = q[:, :, None, None], k[:, :, None, None]  # [b, hk, 1, 1, dk]: one key head for its r value heads
    v = v.float().reshape(b, hk, r, 1, dv)
    g, beta = g.float().reshape(b, hk, r, 1, 1), beta.float().reshape(b, hk, r, 1, 1)
    state = v.new_zeros(b, hk, r, dk, dv) if state is None else state.float().reshape(b, hk, r, dk, dv)
    state = state * g.exp()
    u = beta * (v - k @ state)  # the write: what S'^T k misses of v, [b, hk, r, 1, dv]
    state = state + k.transpose(-1, -2) @ u
    out = q @ state
    return out.reshape(b, hv, dv).to(dtype), state.reshape(b, hv, dk, dv)


# --- context parallelism: a piece of the sequence as an affine function of its incoming state ---


@dataclass
class DeltaPiece:
    """A contiguous piece of a sequence computed without its incoming state S_in (module docstring,
    "Affine in the state"). All float32; b rows, s_p tokens of the piece.

    out          [b, s_p, hv, dv]  the outputs for S_in = 0
    state_query  [b, s_p, hv, dk]  P_t^T q_t: adding state_query @ S_in (per head) to out gives the
                                   outputs for S_in
    transition   [b, hv, dk, dk]   P_end: the state after the piece is transition @ S_in + state
    state        [b, hv, dk, dv]   the state after the piece for S_in = 0
    """

    out: Tensor
    state_query: Tensor
    transition: Tensor
    state: Tensor


def gated_delta_piece(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, *, document_ids: Tensor | None = None,
                      use_qk_l2norm: bool = True, chunk_size: int = 64, backend: str = "auto") -> DeltaPiece:
    """A piece of the sequence (a context-parallel rank's tokens), shapes as gated_delta_rule,
    summarised so that it can be combined with the state that reaches it later. document_ids:
    the piece's own ids; its first document is the one S_in continues (pass resets to
    incoming_states where a piece starts a new document). Differentiable."""
    _check_inputs(q, k, v, g, beta, document_ids, None, chunk_size)
    b, _, hv, dv = v.shape
    dk = k.shape[-1]
    # one pass over dv + dk value columns: zero values from the identity give (P_t^T q_t, P_t)
    v_ext = torch.cat([v, v.new_zeros(*v.shape[:3], dk)], dim=-1)
    s0 = torch.zeros(b, hv, dk, dv + dk, dtype=torch.float32, device=v.device)
    s0[..., dv:] = torch.eye(dk, dtype=torch.float32, device=v.device)
    if choose_backend(backend, q.device.type) == "fla":
        out, final = _fla_chunk(q, k, v_ext, g, beta, document_ids, s0, True, use_qk_l2norm)
    else:  # float32 straight from the chunked form, not rounded to v's dtype
        out, final = _torch_chunk(q, k, v_ext, g, beta, document_ids, s0, use_qk_l2norm, chunk_size)
    out, final = out.float(), final.float()
    return DeltaPiece(out[..., :dv], out[..., dv:], final[..., dv:], final[..., :dv])


def incoming_states(transitions: list[Tensor], states: list[Tensor], initial_state: Tensor | None = None,
                    resets: list[Tensor | None] | None = None) -> list[Tensor]:
    """The state entering each of consecutive pieces, from their (transition, state) in order:
    S_in_0 = initial_state (zero when None), S_in_{i+1} = transition_i @ S_in_i + state_i.
    resets[i] (bool [b], or None): rows where piece i begins a new document, whose incoming state
    is then zero. A cp rank gathers every rank's pair and keeps the entry of its own index.
    Differentiable (float32)."""
    state = torch.zeros_like(states[0]) if initial_state is None else initial_state.float()
    result = []
    for i, (transition, piece_state) in enumerate(zip(transitions, states)):
        if resets is not None and resets[i] is not None:
            state = torch.where(resets[i].to(state.device)[:, None, None, None], 0.0, state)
        result.append(state)
        state = transition @ state + piece_state
    return result


def apply_incoming_state(piece: DeltaPiece, state_in: Tensor | None) -> tuple[Tensor, Tensor]:
    """(out [b, s_p, hv, dv], state after the piece [b, hv, dk, dv]) of a piece entered with
    state_in [b, hv, dk, dv] (float32; None = zero)."""
    if state_in is None:
        return piece.out, piece.state
    state_in = state_in.float()
    correction = torch.einsum("bshk,bhkv->bshv", piece.state_query, state_in)
    return piece.out + correction, piece.transition @ state_in + piece.state


def combine_pieces(pieces: list[DeltaPiece], initial_state: Tensor | None = None,
                   document_ids: list[Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Consecutive pieces of one sequence, passing the state along on one process: (out of the
    whole sequence [b, s, hv, dv] float32, final state). document_ids: each piece's ids, to find
    the pieces that begin a new document."""
    resets = None
    if document_ids is not None:
        resets = [None] + [cur[:, 0] != prev[:, -1] for prev, cur in zip(document_ids, document_ids[1:])]
    entering = incoming_states([p.transition for p in pieces], [p.state for p in pieces], initial_state, resets)
    outs, final = [], None
    for piece, state_in in zip(pieces, entering):
        out, final = apply_incoming_state(piece, state_in)
        outs.append(out)
    return torch.cat(outs, dim=1), final


# --- backends --------------------------------------------------------------------------------------


def choose_backend(backend: str, device_type: str) -> str:
    """The backend `auto` stands for on this device (others are returned as given, once checked)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown gated delta backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    return "fla" if device_type == "cuda" and fla_available() else "torch"


def _prepare_qk(q: Tensor, k: Tensor, use_qk_l2norm: bool) -> tuple[Tensor, Tensor]:
    """float32 q, k -> (q scaled by dk^-0.5, k), l2-normalised first when asked (the scale comes
    after the norm, as in transformers and fla)."""
    scale = q.shape[-1] ** -0.5
    if not use_qk_l2norm:
        return q * scale, k
    # the factors are computed on the reduced [..., 1] tensors, so each of q and k costs one
    # full-size multiply (the dk^-0.5 rides on q's factor)
    q_norm = torch.linalg.vector_norm(q, dim=-1, keepdim=True)
    k_norm = torch.linalg.vector_norm(k, dim=-1, keepdim=True)
    return q * (scale * torch.rsqrt(q_norm.square() + L2NORM_EPS)), k * torch.rsqrt(k_norm.square() + L2NORM_EPS)


def _torch_chunk(q, k, v, g, beta, document_ids, initial_state, use_qk_l2norm, chunk_size):
    """The chunked form of the module docstring. Returns out [b, s, hv, dv] and the final state
    [b, hv, dk, dv], both float32.

    Layout: [b, hk, r, n, C, ...] for value-head tensors and [b, hk, 1, n, C, dk] for q and k, so
    the key-key and query-key products are computed once per key head and broadcast over its r
    value heads instead of repeating q and k r times."""
    b, s, hk, dk = q.shape
    hv, dv = v.shape[2:]
    r, c = hv // hk, chunk_size
    n = -(-s // c)
    pad = n * c - s

    q, k = _prepare_qk(q.float(), k.float(), use_qk_l2norm)

    # padded tokens get beta = 0 and g = 0: they write nothing and decay nothing, so neither the
    # outputs of real tokens nor the final state see them
    def key_side(x):  # [b, s, hk, d] -> [b, hk, 1, n, C, d]
        x = F.pad(x, (0, 0, 0, 0, 0, pad)) if pad else x
        return x.view(b, n, c, hk, -1).permute(0, 3, 1, 2, 4).unsqueeze(2).contiguous()

    def value_side(x):  # [b, s, hv(, d)] -> [b, hk, r, n, C(, d)]
        x = x.float()
        if pad:
            x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))
        if x.dim() == 3:
            return x.view(b, n, c, hk, r).permute(0, 3, 4, 1, 2).contiguous()
        return x.view(b, n, c, hk, r, -1).permute(0, 3, 4, 1, 2, 5).contiguous()

    q, k = key_side(q), key_side(k)
    v, g, beta = value_side(v), value_side(g), value_side(beta)

    cum = g.cumsum(-1)  # G_i inside each chunk
    causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    if document_ids is None:
        pair_mask = causal
        carried = written = passed = None
    else:
        seg = _segments(document_ids.to(q.device), n, c, pad)  # [b, 1, 1, n, C]
        pair_mask = causal & (seg[..., :, None] == seg[..., None, :])
        carried = seg == 0  # tokens of the document that the incoming state belongs to
        written = seg == seg[..., -1:]  # tokens of the document the outgoing state belongs to
        passed = carried[..., -1]  # no document starts in the chunk: S_0 reaches its end

    # D_ij = e^{G_i - G_j} on visible pairs; masked before exp so that no e^{+large} overflows
    decay = (cum[..., :, None] - cum[..., None, :]).masked_fill(~pair_mask, -math.inf).exp()
    read = cum.exp()  # e^{G_i}: how much of S_0 token i sees
    if carried is not None:
        read = read * carried
    # the UT transform T = (I + L)^{-1}, formed explicitly: one solve against the identity (C
    # columns) and two batched matmuls cost about half of a solve against [beta V | beta e^G K]
    # (dv + dk columns), forward and backward (measured on the CPU at C = 64, dk = dv = 128)
    system = (k @ k.transpose(-1, -2)) * decay * beta[..., :, None]  # only its strict lower part is read
    eye = torch.eye(c, dtype=system.dtype, device=system.device).expand(system.shape)
    transform = torch.linalg.solve_triangular(system, eye, upper=False, unitriangular=True)
    u0 = transform @ (v * beta[..., None])
    w = transform @ (k * (beta * read)[..., None])

    tail = (cum[..., -1:] - cum).exp()  # e^{G_C - G_j}: weight of token j's write in the chunk's end state
    keep = cum[..., -1].exp()  # e^{G_C}: what is left of S_0 at the chunk's end
    if written is not None:
        tail, keep = tail * written, keep * passed
    k_write = k * tail[..., None]

    state = q.new_zeros(b, hk, r, dk, dv) if initial_state is None else initial_state.float().reshape(b, hk, r, dk, dv)
    # unbind once: indexing chunk i of a saved tensor inside the loop would make backward build
    # a full-size zero gradient per chunk
    entering, writes = [], []
    for u0_i, w_i, k_i, keep_i in zip(u0.unbind(3), w.unbind(3), k_write.unbind(3), keep.unbind(3)):
        entering.append(state)
        u_i = u0_i - w_i @ state  # the chunk's writes given its incoming state
        writes.append(u_i)
        state = keep_i[..., None, None] * state + k_i.transpose(-1, -2) @ u_i
    entering, writes = torch.stack(entering, dim=3), torch.stack(writes, dim=3)

    # all chunks at once: the read of the incoming state plus the intra-chunk attention over writes
    out = (q * read[..., None]) @ entering + ((q @ k.transpose(-1, -2)) * decay) @ writes  # [b, hk, r, n, C, dv]
    out = out.permute(0, 3, 4, 1, 2, 5).reshape(b, n * c, hv, dv)[:, :s]
    return out, state.reshape(b, hv, dk, dv)


def _segments(document_ids: Tensor, n: int, c: int, pad: int) -> Tensor:
    """[b, 1, 1, n, C] int: the number of document starts in each chunk up to and including each
    token. A row's first token is no start (its document continues the initial state); padding
    tokens join the last document."""
    starts = torch.zeros(document_ids.shape, dtype=torch.int32, device=document_ids.device)
    starts[:, 1:] = (document_ids[:, 1:] != document_ids[:, :-1]).int()
    starts = F.pad(starts, (0, pad))
    return starts.view(-1, 1, 1, n, c).cumsum(-1)


@functools.cache
def fla_status() -> tuple[bool, str]:
    """(usable, why not). Imported, not merely found: a wheel built against another torch or
    triton is found by importlib and fails on import, and `auto` must then fall back to torch."""
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule  # noqa: F401
    except Exception as e:  # noqa: BLE001 - ImportError, OSError, triton errors all mean "not usable"
        first = (str(e).strip().splitlines() or [""])[0]
        return False, f"{type(e).__name__}: {first}"
    return True, ""


def fla_available() -> bool:
    return fla_status()[0]


@functools.cache
def _fla_native_grouped_values() -> bool:
    """flash-linear-attention takes hv > hk itself from 0.5.0 (fla-org/flash-linear-attention
    #799/#812); earlier versions need q and k repeated to the value heads."""
    import fla

    try:
        major, minor = (int(x) for x in fla.__version__.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (0, 5)


def _fla_chunk(q, k, v, g, beta, document_ids, initial_state, output_final_state, use_qk_l2norm):
    """flash-linear-attention's chunk_gated_delta_rule (written from its source, fla 0.4-0.5:
    q, k [B, T, H, K], v [B, T, HV, V], g, beta [B, T, HV], initial_state [N, HV, K, V];
    cu_seqlens requires B = 1, one initial/final state per sequence). Documents: the rows are
    flattened into one sequence and cut at every document start and row start; each row's first
    document gets the row's initial state and the row's final state is its last document's."""
    usable, why = fla_status()
    if not usable:
        raise ImportError(f"gated delta backend 'fla' needs a working flash-linear-attention package (CUDA), and "
                          f"importing it failed ({why}): pip install flash-linear-attention, or use backend='torch'")
    if not q.is_cuda:
        raise ValueError(f"gated delta backend 'fla' runs on CUDA only, got {q.device}; use backend='torch'")
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    b, s, hk, _ = q.shape
    hv = v.shape[2]
    if hv != hk and not _fla_native_grouped_values():
        q, k = q.repeat_interleave(hv // hk, dim=2), k.repeat_interleave(hv // hk, dim=2)
    g = g.float()  # the decay is summed over chunks: keep it in float32 (as transformers passes it)
    if document_ids is None:
        return chunk_gated_delta_rule(q, k, v, g, beta, initial_state=initial_state,
                                      output_final_state=output_final_state, use_qk_l2norm_in_kernel=use_qk_l2norm)
    cu_seqlens, first_doc, last_doc = _fla_varlen_layout(document_ids)
    h0 = None
    if initial_state is not None:
        h0 = initial_state.new_zeros(len(cu_seqlens) - 1, *initial_state.shape[1:])
        h0 = h0.index_copy(0, first_doc, initial_state.float())
    flat = [x.reshape(1, b * s, *x.shape[2:]) for x in (q, k, v, g, beta)]
    out, final = chunk_gated_delta_rule(*flat, initial_state=h0, output_final_state=output_final_state,
                                        use_qk_l2norm_in_kernel=use_qk_l2norm, cu_seqlens=cu_seqlens)
    out = out.view(b, s, *out.shape[2:])
    return out, (final.index_select(0, last_doc) if final is not None else None)


def _fla_varlen_layout(document_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(cu_seqlens int64 [n_docs + 1] over the flattened rows, index of each row's first document,
    index of each row's last document). Costs a host sync (nonzero), so the result rides on the
    document_ids tensor: the layers of one micro batch share the tensor and pay it once."""
    version = 0 if document_ids.is_inference() else document_ids._version
    cached = getattr(document_ids, "_megaswift_gdn_varlen", None)
    if cached is not None and cached[0] == version:
        return cached[1]
    b, s = document_ids.shape
    starts = torch.ones(b, s, dtype=torch.bool, device=document_ids.device)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    flat = starts.flatten()
    end = torch.tensor([b * s], device=document_ids.device)
    cu_seqlens = torch.cat([flat.nonzero().flatten(), end]).long()
    doc_of_token = flat.long().cumsum(0) - 1
    rows = torch.arange(b, device=document_ids.device) * s
    layout = (cu_seqlens, doc_of_token[rows], doc_of_token[rows + s - 1])
    document_ids._megaswift_gdn_varlen = (version, layout)
    return layout


def _check_inputs(q, k, v, g, beta, document_ids, initial_state, chunk_size) -> None:
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"gated delta rule takes q, k [b, s, hk, dk] and v [b, s, hv, dv]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    b, s, hk, dk = q.shape
    hv, dv = v.shape[2:]
    if hv % hk:
        raise ValueError(f"value heads ({hv}) must be a multiple of key heads ({hk})")
    if g.shape != (b, s, hv) or beta.shape != (b, s, hv):
        raise ValueError(f"g and beta must be [b, s, hv] = [{b}, {s}, {hv}], got {tuple(g.shape)}, {tuple(beta.shape)}")
    if document_ids is not None and tuple(document_ids.shape) != (b, s):
        raise ValueError(f"document_ids must be [b, s] = [{b}, {s}], got {tuple(document_ids.shape)}")
    if initial_state is not None and tuple(initial_state.shape) != (b, hv, dk, dv):
        raise ValueError(f"initial_state must be [b, hv, dk, dv] = [{b}, {hv}, {dk}, {dv}], "
                         f"got {tuple(initial_state.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
