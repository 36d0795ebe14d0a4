"""The CLI as a user runs it: launch -> import-hf (tp=2) -> export-hf, verify at tp=2, error paths."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers.cli import megaswift, megaswift_many, one_line_error
from tests.helpers.hf import tensors

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")


@pytest.mark.parametrize("family", FAMILIES)
def test_import_tp2_export_is_bitwise_and_loads_in_transformers(tiny_hf, tmp_path, family):
    from transformers import AutoModelForCausalLM

    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "export")
    megaswift("launch", "--nproc-per-node", "2", "--", "import-hf", tiny_hf[family], ckpt, "--parallel.tp", "2")
    megaswift("export-hf", ckpt, out, "--max-shard-size", "100KB")
    src, dst = tensors(tiny_hf[family]), tensors(out)
    assert set(src) == set(dst)
    for k in src:
        assert src[k].dtype == dst[k].dtype and torch.equal(src[k], dst[k]), k
    assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))
    _, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info


def test_import_pp2_export_is_bitwise(tiny_hf, tmp_path):
    """Two pipeline stages each save their layers; qwen2 ties the embeddings, which both the first
    and the last stage carry and the checkpoint must hold once."""
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "export")
    megaswift("launch", "--nproc-per-node", "2", "--", "import-hf", tiny_hf["qwen2"], ckpt, "--parallel.pp", "2")
    megaswift("export-hf", ckpt, out)
    src, dst = tensors(tiny_hf["qwen2"]), tensors(out)
    assert set(src) == set(dst)
    for k in src:
        assert torch.equal(src[k], dst[k]), k


VERIFY_LAYOUTS = {"tp2_sp": (2, ["--parallel.tp", "2", "--parallel.sp", "true"]),
                  "tp2_pp2": (4, ["--parallel.tp", "2", "--parallel.pp", "2"])}


@pytest.mark.parametrize("layout", list(VERIFY_LAYOUTS))
@pytest.mark.parametrize("family", FAMILIES)
def test_verify_passes(tiny_hf, family, layout):
    nproc, flags = VERIFY_LAYOUTS[layout]
    proc = megaswift("launch", "--nproc-per-node", str(nproc), "--", "verify", tiny_hf[family], *flags)
    assert "PASS" in proc.stdout, proc.stdout
    assert f"pp={2 if 'pp2' in layout else 1}" in proc.stdout


def test_verify_fails_with_exit_1_on_wrong_weights(tiny_hf, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_hf["llama"], bad)
    # swap two layers' MLP weights: shapes stay valid, numbers do not
    idx = json.load(open(bad / "model.safetensors.index.json"))["weight_map"]
    a, b = "model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"
    ta, tb = load_file(str(bad / idx[a])), load_file(str(bad / idx[b]))
    ta[a], tb[b] = tb[b].clone() * 3, ta[a].clone()
    save_file(ta, str(bad / idx[a]), metadata={"format": "pt"})
    if idx[a] != idx[b]:
        save_file(tb, str(bad / idx[b]), metadata={"format": "pt"})
    # verify compares against transformers loading the same files, so corrupt only what megaswift reads:
    # point it at a config whose rope_theta differs -> different maths, same tensors
    cfg = json.load(open(bad / "config.json"))
    cfg["rope_parameters"]["rope_theta"] = 10.0
    json.dump(cfg, open(bad / "config.json", "w"))
    good, proc = megaswift_many(("verify", tiny_hf["llama"]), ("verify", str(bad), "--tolerance", "1e-12"), check=False)
    assert good.returncode == 0
    assert proc.returncode == 1 and "FAIL" in proc.stdout


def test_layout_errors_name_the_numbers(tiny_hf):
    world, heads, key = megaswift_many(
        ("launch", "--nproc-per-node", "3", "--", "verify", tiny_hf["llama"], "--parallel.tp", "2"),
        # qwen3 tiny: 8 heads, tp=3 does not divide them
        ("launch", "--nproc-per-node", "3", "--", "verify", tiny_hf["qwen3"], "--parallel.tp", "3"),
        ("verify", tiny_hf["llama"], "--parallel.tpp", "2"), check=False)
    one_line_error(world, "world size 3", "tp(2)")
    one_line_error(heads, "num_attention_heads (8)", "tp (3)")
    one_line_error(key, "parallel.tpp")


def test_bad_checkpoints_name_the_tensor_or_type(tiny_hf, tmp_path):
    src = tiny_hf["qwen2"]
    idx_name = "model.safetensors.index.json"

    unknown = tmp_path / "unknown"
    shutil.copytree(src, unknown)
    cfg = json.load(open(unknown / "config.json"))
    cfg["model_type"] = "gpt_bigcode"
    json.dump(cfg, open(unknown / "config.json", "w"))

    missing = tmp_path / "missing"
    shutil.copytree(src, missing)
    idx = json.load(open(missing / idx_name))
    name = "model.layers.1.self_attn.k_proj.bias"
    t = load_file(str(missing / idx["weight_map"][name]))
    del t[name]
    save_file(t, str(missing / idx["weight_map"][name]), metadata={"format": "pt"})
    del idx["weight_map"][name]
    json.dump(idx, open(missing / idx_name, "w"))
    missing_name = name

    shaped = tmp_path / "shaped"
    shutil.copytree(src, shaped)
    idx = json.load(open(shaped / idx_name))
    name = "model.layers.0.mlp.up_proj.weight"
    t = load_file(str(shaped / idx["weight_map"][name]))
    t[name] = t[name][:-1].contiguous()
    save_file(t, str(shaped / idx["weight_map"][name]), metadata={"format": "pt"})

    procs = megaswift_many(*[("import-hf", str(d), str(tmp_path / out))
                             for d, out in ((unknown, "o1"), (missing, "o2"), (shaped, "o3"))], check=False)
    one_line_error(procs[0], "gpt_bigcode", "llama")
    one_line_error(procs[1], missing_name)
    one_line_error(procs[2], name, "[87, 64]")


def test_import_refuses_to_overwrite(tiny_hf, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "keep.txt").write_text("precious")
    one_line_error(megaswift("import-hf", tiny_hf["llama"], str(ckpt), check=False), "--overwrite")
    assert (ckpt / "keep.txt").read_text() == "precious"


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "qwen2_moe"])
def test_moe_import_ep_etp_export_is_bitwise_and_loads_in_transformers(moe_hf, tmp_path, family):
    """Imported at (ep=2, etp=2): each rank holds half the experts, half of each expert's width."""
    from transformers import AutoModelForCausalLM

    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "export")
    megaswift("launch", "--nproc-per-node", "4", "--", "import-hf", moe_hf[family], ckpt, "--parallel.ep", "2",
              "--parallel.etp", "2")
    megaswift("export-hf", ckpt, out)
    src, dst = tensors(moe_hf[family]), tensors(out)
    assert set(src) == set(dst)
    for k in src:
        assert src[k].dtype == dst[k].dtype and torch.equal(src[k], dst[k]), k
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(moe_hf[family], "config.json")) as f:
        source = json.load(f)
    for key in ("num_experts_per_tok", "router_aux_loss_coef", "output_router_logits", "mlp_only_layers"):
        assert config.get(key) == source.get(key), key
    _, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info


def test_moe_verify_and_layout_errors(moe_hf):
    proc, experts, world = megaswift_many(
        ("launch", "--nproc-per-node", "2", "--", "verify", moe_hf["qwen3_moe"], "--parallel.tp", "2",
         "--parallel.ep", "2"),
        # mixtral tiny: 4 experts
        ("launch", "--nproc-per-node", "3", "--", "verify", moe_hf["mixtral"], "--parallel.ep", "3"),
        ("launch", "--nproc-per-node", "2", "--", "verify", moe_hf["mixtral"], "--parallel.ep", "2",
         "--parallel.etp", "2"), check=False)
    assert proc.returncode == 0 and "PASS" in proc.stdout and "ep=2" in proc.stdout, proc.stdout + proc.stderr
    one_line_error(experts, "number of experts (4)", "ep (3)")
    one_line_error(world, "world size 2", "ep(2) * etp(2) = 4")


def test_damaged_checkpoint_files_are_named(tiny_hf, tmp_path):
    """Each was a traceback from safetensors, json or a KeyError, without the file's name."""
    src = tiny_hf["llama"]
    weight_map = json.load(open(os.path.join(src, "model.safetensors.index.json")))["weight_map"]
    name = "model.layers.0.mlp.up_proj.weight"
    shard = weight_map[name]

    def truncate(d):
        with open(d / shard, "r+b") as f:
            f.truncate(os.path.getsize(d / shard) // 2)

    def drop_tensor(d):
        t = load_file(str(d / shard))
        del t[name]
        save_file(t, str(d / shard), metadata={"format": "pt"})

    def drop_key(d):
        cfg = json.load(open(d / "config.json"))
        del cfg["hidden_size"]
        json.dump(cfg, open(d / "config.json", "w"))

    damages = {"truncated": truncate, "lacks": drop_tensor,
               "notjson": lambda d: (d / "config.json").write_text('{"hidden_size": 64,\n'), "nokey": drop_key}
    for label, damage in damages.items():
        shutil.copytree(src, tmp_path / label)
        damage(tmp_path / label)
    procs = dict(zip(damages, megaswift_many(*[("import-hf", str(tmp_path / label), str(tmp_path / f"{label}_ckpt"))
                                                for label in damages], check=False)))

    one_line_error(procs["truncated"], f"{tmp_path / 'truncated' / shard} is not a readable safetensors", "truncated")
    one_line_error(procs["lacks"], f"{tmp_path / 'lacks' / shard} does not hold tensor {name!r}",
                   "model.safetensors.index.json lists")
    one_line_error(procs["notjson"], f"{tmp_path / 'notjson' / 'config.json'} is not valid JSON", "line 2")
    one_line_error(procs["nokey"], f"{tmp_path / 'nokey' / 'config.json'} lacks hidden_size")
