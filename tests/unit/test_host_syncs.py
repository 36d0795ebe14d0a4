"""Host syncs in the forward and backward do not grow with the number of layers (issue 17).

On CUDA a read of a tensor's value on the host (`.item()`, `.tolist()`, `bool()`, `float()`,
`nonzero`) waits for every kernel queued before it, so one per layer (or per ring hop) takes the
overlap of host and device away. The CPU cannot show the cost, but it can count them: a
TorchFunctionMode sees every such call. A model twice as deep must make the same number, in the
layouts whose per-layer code once synced: ring attention's skip decision (cp) and the MoE
router's statistics.
"""
import pytest
import torch
from torch.overrides import TorchFunctionMode

from megaswift.testing.dist import run_as_rank

SYNCS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "nonzero"}


class CountHostSyncs(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNCS:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def depths(tmp_path_factory):
    """family -> {layers: HF dir}: the same tiny model at 2 and 4 layers."""
    from megaswift.testing.tiny import make_tiny_hf

    root = tmp_path_factory.mktemp("depth")
    return {f: {n: make_tiny_hf(f, str(root / f"{f}{n}"), seed=1, num_hidden_layers=n) for n in (2, 4)}
            for f in ("qwen3", "mistral")}


def _syncs_of_a_step(rank, world, hf_dir, overrides):
    """Host syncs of one forward + backward of this rank's model on a packed micro batch."""
    from tests.helpers.train import train_config
    from megaswift.setup import build_model, hf_model_config, plan_layout
    from megaswift.parallel.context_parallel import shard_batch
    from megaswift.parallel.state import ParallelState

    cfg = train_config(hf_dir, "unused.jsonl", "unused", **overrides)
    mc = hf_model_config(hf_dir, cfg)
    st = ParallelState.build(plan_layout(cfg, world, mc), torch.device("cpu"))
    model = build_model(cfg, mc, st, torch.float32)
    model.reset_parameters()
    s = 32
    ids = torch.arange(2 * s).view(2, s) % 97
    docs = (torch.arange(s) >= 13).long().expand(2, s)  # two documents per row
    mb = {"input_ids": ids, "labels": ids, "position_ids": torch.arange(s).expand(2, s), "document_ids": docs}
    if st.cp_size > 1:
        mb = shard_batch(mb, st.cp_size, st.cp_rank, multiple=st.layout.seq_multiple(False))
    with CountHostSyncs() as counter:
        loss = model(mb["input_ids"], position_ids=mb["position_ids"], document_ids=mb["document_ids"],
                     labels=mb["labels"], cp_index=mb.get("cp_index"))
        loss.sum().backward()
    return counter.calls


@pytest.mark.parametrize("layout", [{}, {"parallel__cp": 2}, {"parallel__cp": 2, "parallel__tp": 2}])
@pytest.mark.parametrize("family", ["qwen3", "mistral"])  # mistral: a sliding window on every layer
def test_host_syncs_do_not_grow_with_depth(family, layout, depths):
    world = layout.get("parallel__cp", 1) * layout.get("parallel__tp", 1)
    shallow, deep = (run_as_rank(_syncs_of_a_step, world - 1, world, depths[family][n], layout) for n in (2, 4))
    assert deep == shallow, f"2 layers: {shallow}; 4 layers: {deep}"


def test_router_statistics_stay_on_the_device(moe_hf):
    """The load-balancing and z-loss values of a forward are tensors; the engine reads them once
    per step, not once per micro batch."""
    from megaswift.setup import hf_model_config
    from megaswift.config import load_config
    from megaswift.models.decoder import GPTModel

    hf_dir = moe_hf["qwen3_moe"]
    mc = hf_model_config(hf_dir, load_config(None, [], base={"model": {"hf_path": hf_dir}}))
    model = GPTModel(mc)
    model.reset_parameters()
    ids = torch.arange(32).view(2, 16) % 97
    with CountHostSyncs() as counter:
        model(ids, labels=ids)
        stats = model.pop_moe_stats()
    assert all(isinstance(stats[k], torch.Tensor) for k in ("aux", "z", "counts"))
    assert "__float__" not in counter.calls, counter.calls
