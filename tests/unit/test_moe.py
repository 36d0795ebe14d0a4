"""MoE pieces on one process: routing and the load-balancing loss against transformers, the
grouped-GEMM expert path against the loop reference, token dropping, and layout errors."""
import pytest
import torch

from megaswift.errors import LayoutError
from megaswift.models.moe import layer_stats, load_balancing_loss
from megaswift.models.routers import route
from megaswift.parallel.experts import capacity_keep, dispatch_combine, expert_swiglu
from megaswift.parallel.layout import Layout


def _hf_aux(logits_per_layer, E, k, mask=None):
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    return load_balancing_loss_func(tuple(logits_per_layer), E, k, mask)


@pytest.mark.parametrize("masked", [False, True])
def test_load_balancing_loss_equals_transformers(masked):
    """Three layers' router logits over 2 x 10 tokens: our statistics rows summed over layers give
    transformers' load_balancing_loss_func exactly, padding excluded the same way."""
    g = torch.Generator().manual_seed(0)
    E, k, layers = 6, 2, 3
    logits = [torch.randn(20, E, generator=g) * 2 for _ in range(layers)]
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 7:] = 0
    rows = []
    for lg in logits:
        probs, _, ids = route(lg, k, norm_topk_prob=False)
        rows.append(layer_stats(lg, probs, ids, mask.reshape(-1) if masked else None))
    stats = torch.stack(rows)
    ours = load_balancing_loss(stats[:, E + 1: 2 * E + 1].sum(0), stats[:, :E].sum(0), stats[:, -1].sum(), E)
    want = _hf_aux(logits, E, k, mask if masked else None)
    torch.testing.assert_close(ours, want, rtol=1e-6, atol=0)


def _experts(E=4, f=8, H=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    w1 = (torch.randn(E, 2 * f, H, generator=g) * 0.2).requires_grad_()
    w2 = (torch.randn(E, H, f, generator=g) * 0.2).requires_grad_()
    return w1, w2


def test_grouped_gemm_equals_loop_forward_and_backward():
    w1, w2 = _experts()
    x = torch.randn(13, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
    counts = [5, 0, 6, 2]  # an expert with no tokens included
    outs = {}
    for backend in ("loop", "grouped"):
        for t in (x, w1, w2):
            t.grad = None
        y = expert_swiglu(x, counts, w1, w2, backend)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs[backend] = [y.detach(), x.grad.clone(), w1.grad.clone(), w2.grad.clone()]
    for a, b in zip(outs["loop"], outs["grouped"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_dispatch_equals_dense_reference():
    """One process: dispatch_combine is sum_j w_tj * expert_{e_tj}(x_t), written out per token."""
    w1, w2 = _experts()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(9, 16, generator=g)
    probs, weights, ids = route(torch.randn(9, 4, generator=g), 2, norm_topk_prob=True)
    out = dispatch_combine(x, ids, weights, 4, w1, w2, backend="loop")
    want = torch.zeros_like(x)
    for t in range(9):
        for j in range(2):
            e = int(ids[t, j])
            gate, up = (w1[e] @ x[t]).chunk(2)
            want[t] += weights[t, j] * (w2[e] @ (torch.nn.functional.silu(gate) * up))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


def test_capacity_keeps_the_highest_weights_per_expert():
    ids = torch.tensor([[0, 1], [0, 1], [0, 2], [0, 3]])
    weights = torch.tensor([[0.6, 0.4], [0.9, 0.1], [0.3, 0.7], [0.5, 0.5]])
    # capacity = ceil(1.0 * 4 tokens * 2 / 4 experts) = 2 per expert: expert 0 keeps 0.9 and 0.6
    keep = capacity_keep(ids, weights, 4, 1.0)
    assert keep.tolist() == [[True, True], [True, True], [False, True], [False, True]]
    assert capacity_keep(ids, weights, 4, 2.0).all()
    # dropped assignments contribute nothing: the output equals dispatching only the kept ones
    w1, w2 = _experts(H=16)
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(3))
    dropped = dispatch_combine(x, ids, weights, 4, w1, w2, keep=keep, backend="loop")
    zeroed = dispatch_combine(x, ids, weights * keep, 4, w1, w2, backend="loop")
    torch.testing.assert_close(dropped, zeroed)


def test_model_aux_loss_and_router_grads_equal_transformers(moe_hf):
    """The whole qwen3_moe model: transformers' aux_loss on the same tokens, and the gradient of
    transformers' loss (mean token loss + router_aux_loss_coef x aux) on the router and an expert
    equals ours (per-token loss / tokens, with the load-balancing loss attached)."""
    from transformers import AutoModelForCausalLM

    from megaswift.setup import hf_model_config
    from megaswift.config import load_config
    from megaswift.convert.hf_import import load_hf_into_model
    from megaswift.models.decoder import GPTModel

    hf_dir = moe_hf["qwen3_moe"]
    mc = hf_model_config(hf_dir, load_config())
    tokens = torch.randint(0, mc.vocab_size, (2, 24), generator=torch.Generator().manual_seed(4))
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    out = hf(tokens, labels=tokens)
    out.loss.backward()
    ours = GPTModel(mc)
    load_hf_into_model(ours, hf_dir)
    ours.set_attention_backend("reference")
    ours.set_moe_options(backend="loop")  # aux coefficient from the checkpoint: output_router_logits is on
    labels = torch.roll(tokens, -1, 1)
    labels[:, -1] = -100
    per_token = ours(tokens, labels=labels)
    (per_token.sum() / (labels != -100).sum()).backward()
    stats = ours.pop_moe_stats()
    torch.testing.assert_close(stats["aux"], out.aux_loss.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(per_token.sum() / (labels != -100).sum() + mc.moe_aux_loss_coef * stats["aux"],
                               out.loss.detach(), rtol=1e-5, atol=0)
    router = ours.get_parameter("decoder.layers.0.mlp.router.weight").grad
    torch.testing.assert_close(router, hf.model.layers[0].mlp.gate.weight.grad, rtol=1e-4, atol=1e-7)
    fc2 = ours.get_parameter("decoder.layers.0.mlp.experts.linear_fc2.weight").grad
    torch.testing.assert_close(fc2, hf.model.layers[0].mlp.experts.down_proj.grad, rtol=1e-4, atol=1e-7)


def _cfg(**kw):
    from megaswift.models.config import ModelConfig

    base = dict(family="qwen3_moe", vocab_size=100, hidden_size=16, ffn_hidden_size=32, num_layers=2,
                num_attention_heads=4, num_query_groups=2, kv_channels=4, num_moe_experts=6, moe_ffn_hidden_size=12,
                moe_router_topk=2)
    return ModelConfig(**{**base, **kw})


def test_layout_errors_name_the_numbers():
    with pytest.raises(LayoutError, match=r"number of experts \(6\) is not divisible by ep \(4\)"):
        Layout(world_size=4, ep=4).check_model(_cfg())
    with pytest.raises(LayoutError, match=r"world size 6 is not divisible by ep\(2\) \* etp\(2\) = 4"):
        Layout(world_size=6, ep=2, etp=2)
    with pytest.raises(LayoutError, match=r"moe_intermediate_size \(12\) is not divisible by etp \(8\)"):
        Layout(world_size=8, etp=8).check_model(_cfg())
    with pytest.raises(LayoutError, match=r"parallel.ep=2 .* has none"):
        Layout(world_size=2, ep=2).check_model(_cfg(num_moe_experts=0))
    with pytest.raises(LayoutError, match=r"sequence length 30 is not divisible by tp \(4\) = 4 \(MoE"):
        Layout(world_size=4, tp=4).check_seq_len(30, moe=True)
    Layout(world_size=4, ep=2, etp=2).check_model(_cfg())


@pytest.mark.gpu
def test_grouped_gemm_on_cuda_under_bf16_autocast():
    """On CUDA the grouped path casts to the autocast dtype by hand (torch._grouped_mm is not an
    autocast op); it must agree with the loop (which autocasts through F.linear) to bf16
    precision, and the fp32 master weights must receive gradients."""
    w1, w2 = (t.detach().cuda().requires_grad_() for t in _experts(E=4, f=64, H=128))
    x = torch.randn(50, 128, device="cuda", requires_grad=True)
    counts = [20, 0, 25, 5]
    outs = {}
    for backend in ("loop", "grouped"):
        for t in (x, w1, w2):
            t.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = expert_swiglu(x, counts, w1, w2, backend)
        assert y.dtype == torch.bfloat16
        y.float().pow(2).sum().backward()
        outs[backend] = [y.float(), x.grad.clone(), w1.grad.clone(), w2.grad.clone()]
    assert w1.grad.dtype == torch.float32
    for a, b in zip(outs["loop"], outs["grouped"]):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_force_balanced_routing_spreads_evenly_and_needs_no_data_dependent_shape():
    """moe.router_force_balance: ids (t k + j) mod E, counts known without reading them; the
    dispatch given those counts equals the one that counts, and runs under FakeTensorMode."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from megaswift.models.routers import balanced_ids
    from megaswift.parallel.experts import balanced_counts

    ids = balanced_ids(9, 2, 4)
    assert torch.bincount(ids.reshape(-1), minlength=4).tolist() == balanced_counts(18, 4) == [5, 5, 4, 4]
    assert all(len(set(row.tolist())) == 2 for row in ids)  # a token's experts are distinct
    w1, w2 = _experts()
    x = torch.randn(9, 16, generator=torch.Generator().manual_seed(3))
    weights = torch.rand(9, 2, generator=torch.Generator().manual_seed(4))
    counted = dispatch_combine(x, ids, weights, 4, w1, w2, backend="loop")
    given = dispatch_combine(x, ids, weights, 4, w1, w2, backend="loop", uniform_counts=balanced_counts(18, 4))
    assert torch.equal(counted, given)
    with FakeTensorMode(allow_non_fake_inputs=True):  # grouped: the meta kernel wants bf16, as CUDA's
        fx = torch.empty(9, 16, dtype=torch.bfloat16)
        out = dispatch_combine(fx, balanced_ids(9, 2, 4), torch.empty(9, 2), 4, torch.empty_like(w1, dtype=fx.dtype),
                               torch.empty_like(w2, dtype=fx.dtype), uniform_counts=balanced_counts(18, 4),
                               backend="grouped")
        assert out.shape == (9, 16)
