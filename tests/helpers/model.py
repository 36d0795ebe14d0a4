"""Shared by the model parity tests: run the megaswift model on one rank and return plain tensors."""
import torch

from megaswift.setup import hf_model_config
from megaswift.config import load_config
from megaswift.convert.hf_import import load_hf_into_model
from megaswift.models.decoder import GPTModel
from megaswift.parallel.grads import finalize_grads
from megaswift.parallel.layout import Layout
from megaswift.parallel.state import ParallelState
from megaswift.parallel.tp_comm import gather_from_tp_region


def batch(vocab: int, b: int = 2, s: int = 32, seed: int = 0):
    """Tokens, labels (some ignored) and a packed layout for row 1: documents of 5, 11, 16 tokens."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (b, s), generator=g)
    labels = torch.roll(tokens, -1, dims=1)
    labels[:, -1] = -100
    labels[0, :3] = -100
    docs = torch.zeros(b, s, dtype=torch.long)
    pos = torch.arange(s).repeat(b, 1)
    start = 0
    for d, n in enumerate((5, 11, 16)):
        docs[1, start:start + n] = d
        pos[1, start:start + n] = torch.arange(n)
        start += n
    return tokens, labels, pos, docs


def run_model(hf_dir: str, tp: int, sp: bool, world: int, backend: str = "reference", packed: bool = False):
    """Forward + backward of the summed token loss. Returns full logits and canonical-piece grads."""
    cfg = load_config()
    mc = hf_model_config(hf_dir, cfg)
    st = ParallelState.build(Layout(world_size=world, tp=tp, sp=sp)) if world > 1 else ParallelState.single()
    model = GPTModel(mc, st)
    model.set_attention_backend(backend)
    load_hf_into_model(model, hf_dir)
    tokens, labels, pos, docs = batch(mc.vocab_size)
    kwargs = dict(position_ids=pos, document_ids=docs) if packed else {}
    logits = model(tokens, **kwargs)
    full = gather_from_tp_region(logits, st.tp_group, dim=-1)[..., : mc.vocab_size].detach()
    loss = model(tokens, labels=labels, **kwargs).sum()
    loss.backward()
    finalize_grads(model)
    layouts = model.shard_layouts()
    grads = {}
    for name, p in model.named_parameters():
        lay = layouts[name]
        off, pieces = 0, []
        for start, n in lay.ranges:
            pieces.append((start, p.grad.narrow(lay.dim, off, n).clone()))
            off += n
        grads[name] = (lay.dim, lay.canonical_shape, pieces)
    return {"logits": full, "loss": loss.detach(), "grads": grads}


def assemble(results: list[dict], name: str) -> torch.Tensor:
    """Canonical gradient of `name` from every rank's pieces; replicas must agree exactly."""
    dim, shape, _ = results[0]["grads"][name]
    out = torch.full(shape, float("nan"))
    for r in results:
        for start, piece in r["grads"][name][2]:
            dst = out.narrow(dim, start, piece.shape[dim])
            if not torch.isnan(dst).all():
                torch.testing.assert_close(piece, dst, rtol=1e-6, atol=1e-7, msg=f"replicas of {name} disagree")
            dst.copy_(piece)
    assert not torch.isnan(out).any(), f"{name}: some canonical rows are held by no rank"
    return out
