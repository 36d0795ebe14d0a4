"""export-hf into a directory that already holds something (issue 18, item 2): refused unless
--overwrite; with it, the previous HF file set is replaced whole, so transformers and megaswift
read the same, new weights; the checkpoint's own source directory is refused whatever is passed."""
import hashlib
import os
import shutil

import pytest
import torch

from megaswift.convert import hf_export
from tests.helpers.cli import megaswift, megaswift_many, one_line_error
from tests.helpers.hf import tensors


def _digest(d) -> dict:
    return {n: hashlib.sha256(open(os.path.join(d, n), "rb").read()).hexdigest() for n in sorted(os.listdir(d))}


@pytest.fixture(scope="module")
def ckpts(tiny_hf, tmp_path_factory):
    """Two megaswift checkpoints of the same llama shapes with different weights: the tiny
    fixture's and one from another seed."""
    from megaswift.testing.tiny import make_tiny_hf

    root = tmp_path_factory.mktemp("export_overwrite")
    other = make_tiny_hf("llama", str(root / "other_hf"), seed=7)
    out = {"old": str(root / "old"), "new": str(root / "new")}
    megaswift_many(("import-hf", tiny_hf["llama"], out["old"]), ("import-hf", other, out["new"]))
    out["new_hf"] = other
    return out


def test_non_empty_directory_is_refused(ckpts, tmp_path):
    out = tmp_path / "export"
    megaswift("export-hf", ckpts["old"], str(out), "--max-shard-size", "100KB")
    before = _digest(out)
    one_line_error(megaswift("export-hf", ckpts["new"], str(out), check=False),
                   f"export directory {out} exists and is not empty", "--overwrite")
    assert _digest(out) == before  # not one file touched


def test_overwrite_replaces_the_whole_file_set(ckpts, tmp_path):
    """The old export is sharded (index + 5 shards), the new one a single model.safetensors. Left
    beside it, the old index is what megaswift reads while transformers takes model.safetensors."""
    from transformers import AutoModelForCausalLM

    from megaswift.convert.hf_io import HFReader

    out, fresh = tmp_path / "export", tmp_path / "fresh"
    megaswift("export-hf", ckpts["old"], str(out), "--max-shard-size", "100KB")
    assert (out / "model.safetensors.index.json").is_file()
    (out / "NOTES.md").write_text("mine")
    (out / "eval").mkdir()
    proc, _ = megaswift_many(("export-hf", ckpts["new"], str(out), "--overwrite"), ("export-hf", ckpts["new"], str(fresh)))
    assert "not part of an HF checkpoint): NOTES.md, eval" in proc.stdout, proc.stdout
    # exactly a fresh export's files, plus what the user put there; no staging left beside it
    assert sorted(os.listdir(out)) == sorted(os.listdir(fresh) + ["NOTES.md", "eval"])
    assert (out / "NOTES.md").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "fresh"]
    new = tensors(ckpts["new_hf"])
    hf = AutoModelForCausalLM.from_pretrained(out).state_dict()
    reader = HFReader(str(out))
    assert reader.names() == set(new)
    for name, t in new.items():
        ours = reader.read(name, 0, 0, reader.shape(name)[0])
        assert torch.equal(ours, t) and torch.equal(hf[name], t), name
    assert "PASS" in megaswift("verify", str(out)).stdout


def test_source_directory_is_refused_even_with_overwrite(tiny_hf, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_hf["llama"], src)
    ckpt = str(tmp_path / "ckpt")
    megaswift("import-hf", str(src), ckpt)
    before = _digest(src)
    *sources, inside = megaswift_many(
        *[("export-hf", ckpt, target, "--overwrite")
          for target in (str(src), os.path.relpath(src) + "/")],  # the same directory, spelled another way
        ("export-hf", ckpt, os.path.join(ckpt, "hf"), "--overwrite"), check=False)
    for proc in sources:
        one_line_error(proc, "is the source of the weights being exported", "even if you pass --overwrite")
    one_line_error(inside, "inside the checkpoint being exported")
    assert _digest(src) == before


def test_sources_of_a_checkpoint():
    meta = {"source": "run/ckpt/hf", "lora": {"base": "/m/base"},
            "train": {"config": {"model": {"hf_path": "/m/base"}, "dpo": {"ref_path": "/m/ref"}, "grpo": {}}}}
    assert hf_export.export_sources(meta) == ["run/ckpt/hf", "/m/base", "/m/base", "/m/ref"]
    assert hf_export.export_sources({"source": None}) == []


def test_failed_export_leaves_the_directory_as_it_was(ckpts, tmp_path, monkeypatch):
    out = tmp_path / "export"
    megaswift("export-hf", ckpts["old"], str(out))
    before = _digest(out)

    def broken(ckpt_dir, hf_dir):
        raise OSError("disk full")

    monkeypatch.setattr(hf_export, "copy_side", broken)  # after the weights are written
    with pytest.raises(OSError, match="disk full"):
        hf_export.export_hf(ckpts["new"], str(out), overwrite=True)
    assert _digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
