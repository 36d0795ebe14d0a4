"""Packing changes the batch shape, not the maths: one packed row of three documents must give
the loss and every gradient of the same three documents as separate padded rows, on the real
model. This is what lets `data.packing` be switched on without changing a run's numbers."""
import pytest
import torch

from megaswift.data import IGNORE_INDEX, SFTLoader
from megaswift.models.config import ModelConfig
from megaswift.models.decoder import GPTModel

TOL = dict(rtol=1e-5, atol=1e-6)
LENGTHS = (5, 7, 4)
SEQ_LEN = sum(LENGTHS)  # the three documents fill the packed row exactly


def samples() -> list:
    g = torch.Generator().manual_seed(0)
    out = []
    for n in LENGTHS:
        ids = torch.randint(1, 101, (n,), generator=g).tolist()
        labels = torch.randint(0, 101, (n,), generator=g).tolist()
        labels[:2] = [IGNORE_INDEX] * 2  # a prompt: no loss on the first positions
        out.append((ids, labels))
    return out


def only_batch(packing: bool) -> dict:
    n = 1 if packing else len(LENGTHS)
    loader = SFTLoader(samples(), seq_len=SEQ_LEN, packing=packing, micro_batch_size=n, global_batch_size=n,
                       dp_rank=0, dp_size=1, seed=0, pad_id=0)
    assert loader.items_per_epoch == n
    (batch,) = loader.next_global_batch()
    return batch


def model_for(backend: str) -> GPTModel:
    cfg = ModelConfig(family="llama", vocab_size=101, hidden_size=32, ffn_hidden_size=64, num_layers=2,
                      num_attention_heads=4, num_query_groups=2, kv_channels=8, max_position_embeddings=64)
    model = GPTModel(cfg)
    model.reset_parameters(seed=0)
    model.set_attention_backend(backend)
    return model


def loss_and_grads(backend: str, batch: dict, use_documents: bool = True):
    model = model_for(backend)
    loss = model(batch["input_ids"], position_ids=batch["position_ids"],
                 document_ids=batch["document_ids"] if use_documents else None, labels=batch["labels"]).sum()
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_packed_row_matches_separate_rows(backend):
    packed, separate = only_batch(packing=True), only_batch(packing=False)
    assert sorted(torch.bincount(packed["document_ids"][0]).tolist()) == sorted(LENGTHS)  # no padding
    assert separate["document_ids"] is None and separate["input_ids"].shape == (3, SEQ_LEN)
    loss_p, grads_p = loss_and_grads(backend, packed)
    loss_s, grads_s = loss_and_grads(backend, separate)
    torch.testing.assert_close(loss_p, loss_s, rtol=1e-5, atol=0)
    assert grads_p.keys() == grads_s.keys()
    for name in grads_p:
        torch.testing.assert_close(grads_p[name], grads_s[name], **TOL, msg=lambda m, name=name: f"{name}: {m}")

    # Without document ids the later documents attend to the earlier ones: the test can fail.
    loss_leaky, _ = loss_and_grads(backend, packed, use_documents=False)
    assert not torch.allclose(loss_leaky, loss_s, rtol=1e-3)
