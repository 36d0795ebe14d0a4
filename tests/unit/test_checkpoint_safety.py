"""Loading a checkpoint runs nothing stored in it (design principle 7), and `checkpoint.load latest`
steps past a damaged newest checkpoint. One real training checkpoint (tiny llama, two SFT steps,
a checkpoint after each) is built once and copied before each test damages it."""
import os
import pickle
import shutil

import pytest
import torch
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, MetadataIndex

from tests.helpers.train import run_train, write_chat_data
from megaswift.checkpoint.canonical_shards import CanonicalLoadPlanner
from megaswift.checkpoint.model_state import read_canonical
from megaswift.checkpoint.train_state import resolve_load
from megaswift.errors import CheckpointError

EMBED = "embedding.word_embeddings.weight"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """output_dir of a finished run with checkpoints/step_1 and step_2 (each with model/ and optim/)."""
    from megaswift.testing.tiny import make_tiny_hf

    root = tmp_path_factory.mktemp("safety")
    hf = make_tiny_hf("llama", str(root / "hf"), seed=0)
    data = write_chat_data(str(root / "data" / "train.jsonl"), n=16)
    run_train(0, 1, hf, data, str(root / "run"), train__steps=2, checkpoint__every=1)
    return str(root / "run")


@pytest.fixture
def run_copy(run_dir, tmp_path):
    return str(shutil.copytree(run_dir, tmp_path / "run"))


def _step(run: str, n: int) -> str:
    return os.path.join(run, "checkpoints", f"step_{n}")


class _RunsCommand:
    """Unpickling this calls os.system: what a crafted `.metadata` does to plain pickle.load."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _craft(path: str, marker) -> None:
    with open(path, "wb") as f:
        pickle.dump(_RunsCommand(f"touch {marker}"), f)


def _globals_of(path: str) -> set:
    """The (module, name) pairs a pickle file resolves, recorded by plain pickle (trusted file)."""
    found = set()

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            found.add((module, name))
            return super().find_class(module, name)

    with open(path, "rb") as f:
        Recorder(f).load()
    return found


@pytest.mark.parametrize("part", ["model", "optim"])
def test_allow_list_reads_a_real_checkpoints_metadata(run_dir, part):
    from megaswift.checkpoint.safe_load import ALLOWED_GLOBALS, read_dcp_metadata

    dcp_dir = os.path.join(_step(run_dir, 2), part)
    path = os.path.join(dcp_dir, ".metadata")
    with open(path, "rb") as f:
        trusted = pickle.load(f)  # our own fresh file: plain pickle gives the reference
    md = read_dcp_metadata(dcp_dir)
    assert md.state_dict_metadata == trusted.state_dict_metadata
    assert md.storage_data == trusted.storage_data
    # every global of a real file is allowed, apart from dtypes (admitted by name)
    assert {g for g in _globals_of(path) if g[0] != "torch" or g[1] == "Size"} <= ALLOWED_GLOBALS
    if part == "model":  # and the tensors load through the guarded reader and planner
        out = read_canonical(_step(run_dir, 2), {EMBED: (1001, 64)}, torch.float32)
        assert torch.isfinite(out[EMBED]).all() and out[EMBED].abs().sum() > 0


@pytest.mark.parametrize("part", ["model", "optim"])
def test_crafted_metadata_is_refused_without_running(run_copy, tmp_path, part):
    marker = tmp_path / "MARKER"
    ckpt = _step(run_copy, 2)
    _craft(os.path.join(ckpt, part, ".metadata"), marker)
    with pytest.raises(CheckpointError) as e:
        resolve_load(ckpt, run_copy)
    msg = str(e.value)
    assert f"{os.system.__module__}.system" in msg and "disallowed object" in msg, msg
    assert os.path.join(ckpt, part, ".metadata") in msg and "\n" not in msg
    if part == "model":  # export reads model/ directly, without resolve_load
        with pytest.raises(CheckpointError, match="disallowed object"):
            read_canonical(ckpt, {EMBED: (1001, 64)}, torch.float32)
    assert not marker.exists()


def _rewrite_metadata(path: str, change) -> None:
    with open(path, "rb") as f:
        md = pickle.load(f)
    change(md)
    with open(path, "wb") as f:
        pickle.dump(md, f)


def _bytes_entry(md: Metadata) -> None:
    md.state_dict_metadata[EMBED] = BytesStorageMetadata()


def _outside_path(md: Metadata) -> None:
    index = next(i for i in md.storage_data if i.fqn == EMBED)
    md.storage_data[index].relative_path = "../../../../etc/passwd"


@pytest.mark.parametrize("change, expect", [(_bytes_entry, "disallowed object torch.distributed.checkpoint.metadata"
                                                           ".BytesStorageMetadata"),
                                            (_outside_path, "not a file of this directory")])
def test_metadata_that_would_unpickle_or_escape_is_refused(run_copy, change, expect):
    ckpt = _step(run_copy, 2)
    _rewrite_metadata(os.path.join(ckpt, "model", ".metadata"), change)
    with pytest.raises(CheckpointError, match=expect):
        read_canonical(ckpt, {EMBED: (1001, 64)}, torch.float32)


def test_load_planner_refuses_bytes_entries():
    """DCP sends an entry its metadata calls bytes to load_bytes, which DefaultLoadPlanner reads
    with torch.load(weights_only=False), even when the state dict holds a tensor under that key."""
    md = Metadata(state_dict_metadata={"w": BytesStorageMetadata()}, storage_data={})
    planner = CanonicalLoadPlanner()
    planner.set_up_planner({"w": torch.zeros(2)}, md)
    with pytest.raises(CheckpointError, match="'w' as pickled bytes"):
        planner.create_local_plan()
    item = type("Item", (), {"dest_index": MetadataIndex("w")})()
    with pytest.raises(CheckpointError, match="will not unpickle"):
        planner.load_bytes(item, None)


def _truncate(path, keep=0.5):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:int(len(data) * keep)])


DAMAGE = {
    "metadata truncated": (lambda c: _truncate(os.path.join(c, "model", ".metadata")), "model/.metadata is truncated"),
    "distcp missing": (lambda c: os.remove(os.path.join(c, "optim", "__0_0.distcp")), "optim/__0_0.distcp is missing"),
    "distcp truncated": (lambda c: _truncate(os.path.join(c, "model", "__0_0.distcp"), 0.9),
                         "model/__0_0.distcp is truncated"),
    "meta json unreadable": (lambda c: _truncate(os.path.join(c, "megaswift.json")), "megaswift.json cannot be read"),
    "metadata crafted": (lambda c: _craft(os.path.join(c, "optim", ".metadata"), os.path.join(c, "MARKER")),
                         "disallowed object"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_latest_falls_back_past_a_damaged_newest_checkpoint(run_copy, capsys, kind):
    damage, reason = DAMAGE[kind]
    newest = _step(run_copy, 2)
    damage(newest)
    assert resolve_load("latest", run_copy) == _step(run_copy, 1)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("checkpoint step_2 is damaged (") and lines[0].endswith("; resuming from step_1")
    assert reason in lines[0], lines[0]
    assert not os.path.exists(os.path.join(newest, "MARKER"))


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_an_explicit_damaged_checkpoint_is_a_one_line_error(run_copy, kind):
    damage, reason = DAMAGE[kind]
    ckpt = _step(run_copy, 2)
    damage(ckpt)
    with pytest.raises(CheckpointError) as e:
        resolve_load(ckpt, run_copy)
    assert reason in str(e.value) and str(e.value).startswith(ckpt) and "\n" not in str(e.value), str(e.value)


def test_latest_with_no_intact_checkpoint_is_an_error(run_copy):
    """A fresh start would bury checkpoints that might be repaired: say so instead."""
    for step in (1, 2):
        _truncate(os.path.join(_step(run_copy, step), "model", ".metadata"))
    with pytest.raises(CheckpointError, match="latest: no intact checkpoint .* step_2"):
        resolve_load("latest", run_copy)
    assert resolve_load("latest", str(os.path.join(run_copy, "fresh"))) is None  # nothing saved yet: start


def test_rng_file_is_read_weights_only(run_copy, tmp_path):
    from megaswift.checkpoint.safe_load import load_weights_only

    marker = tmp_path / "MARKER"
    rng = os.path.join(_step(run_copy, 2), "rng", "rank_0.pt")
    assert isinstance(load_weights_only(rng), dict)
    torch.save({"cpu": _RunsCommand(f"touch {marker}")}, rng)
    with pytest.raises(CheckpointError, match=f"refuses .*{os.system.__module__}.system") as e:
        load_weights_only(rng)
    assert "\n" not in str(e.value) and not marker.exists()


def test_lora_export_reads_the_adapter_names_through_the_allow_list(run_copy, tmp_path):
    """The PEFT export lists the adapters from the DCP metadata; it once used DCP's own reader."""
    from megaswift.convert.lora_export import adapter_tensors

    marker = tmp_path / "MARKER"
    ckpt = _step(run_copy, 2)
    _craft(os.path.join(ckpt, "model", ".metadata"), marker)
    with pytest.raises(CheckpointError, match=r"disallowed object posix.system"):
        adapter_tensors(ckpt, {"lora": {"rank": 4}}, None, torch.float32)
    assert not marker.exists()
