import dataclasses
import re

import pytest
import yaml

from megaswift.config import (
    Config,
    LoraSection,
    OptimSection,
    ParallelSection,
    config_from_dict,
    load_config,
)
from megaswift.errors import ConfigError


def exact(message):
    """A pytest.raises `match` pattern for exactly this message."""
    return "^" + re.escape(message) + "$"


def write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_defaults():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.model.hf_path is None and cfg.model.dtype == "float32"
    assert cfg.model.attention_backend == "auto" and cfg.model.make_vocab_size_divisible_by == 128
    assert cfg.model.lora == LoraSection(rank=0, alpha=16.0, dropout=0.0, targets=["all-linear"])
    p = cfg.parallel
    assert (p.tp, p.pp, p.vpp, p.cp, p.ulysses, p.ep, p.etp) == (1, 1, 1, 1, 1, 1, 1)
    assert p.pp_schedule == "1f1b" and p.cp_comm == "ring" and p.sp is False and p.pp_layers is None
    assert p.timeout_s == 600
    assert cfg.data.seq_len == 2048 and cfg.data.packing is False
    assert cfg.train.steps == 100 and cfg.train.global_batch_size is None
    assert cfg.train.seed == 1234 and cfg.train.output_dir == "outputs/run"
    assert cfg.train.recompute == "none"
    assert cfg.optim.lr == 1e-5 and cfg.optim.schedule == "cosine" and cfg.optim.zero == 0
    assert cfg.optim.adam_beta2 == 0.95 and cfg.optim.clip_grad == 1.0
    assert cfg.checkpoint.every == 0 and cfg.checkpoint.keep is None
    assert cfg.log.every == 1 and cfg.log.wandb is False


def test_default_lists_are_not_shared():
    a, b = Config(), Config()
    a.model.lora.targets.append("linear_qkv")
    assert b.model.lora.targets == ["all-linear"]


def test_section_names_match_config_fields():
    # error messages use _section; a mismatch with Config's field name would mislabel every key
    for f in dataclasses.fields(Config):
        assert f.default_factory._section == f.name
    assert LoraSection._section == "model.lora"


def test_yaml_then_overrides_precedence(tmp_path):
    path = write(
        tmp_path,
        "parallel:\n  tp: 4\n  pp: 2\ntrain:\n  steps: 50\n  seed: 7\nmodel:\n  lora:\n    rank: 4\n",
    )
    cfg = load_config(path, ["--parallel.tp", "2", "--train.steps=10"])
    assert cfg.parallel.tp == 2  # override beats file
    assert cfg.parallel.pp == 2  # file beats default, sibling key kept
    assert cfg.train.steps == 10 and cfg.train.seed == 7
    assert cfg.model.lora.rank == 4 and cfg.model.lora.alpha == 16.0


def test_base_then_file_then_overrides(tmp_path):
    base = Config(train=dataclasses.replace(Config().train, steps=3, seed=1)).to_dict()
    path = write(tmp_path, "train:\n  seed: 2\n")
    cfg = load_config(path, ["--train.micro_batch_size", "4"], base=base)
    assert (cfg.train.steps, cfg.train.seed, cfg.train.micro_batch_size) == (3, 2, 4)
    assert base["train"]["seed"] == 1  # the caller's dict is not mutated
    # an empty section in the file keeps base's values; an explicit null still overrides a key
    path = write(tmp_path, "train:\ncheckpoint:\n  keep: null\n", "empty.yaml")
    base["checkpoint"]["keep"] = 2
    cfg = load_config(path, base=base)
    assert cfg.train.steps == 3 and cfg.checkpoint.keep is None


def test_later_override_wins():
    assert load_config(overrides=["--parallel.tp", "2", "--parallel.tp=4"]).parallel.tp == 4


def test_empty_file_and_empty_section(tmp_path):
    assert load_config(write(tmp_path, "")) == Config()
    assert load_config(write(tmp_path, "log:\n", "b.yaml")) == Config()


@pytest.mark.parametrize(
    "override, get, expected",
    [
        (["--train.steps", "12"], lambda c: c.train.steps, 12),
        (["--optim.lr", "3e-4"], lambda c: c.optim.lr, 3e-4),
        (["--optim.lr", "1"], lambda c: c.optim.lr, 1.0),
        (["--optim.min_lr=0"], lambda c: c.optim.min_lr, 0.0),
        (["--train.output_dir", "out/x"], lambda c: c.train.output_dir, "out/x"),
        (["--train.output_dir", "none"], lambda c: c.train.output_dir, "none"),  # plain str
        (["--model.hf_path", "/ckpt"], lambda c: c.model.hf_path, "/ckpt"),
        (["--model.hf_path", "None"], lambda c: c.model.hf_path, None),
        (["--checkpoint.keep", "3"], lambda c: c.checkpoint.keep, 3),
        (["--checkpoint.keep", "null"], lambda c: c.checkpoint.keep, None),
        (["--parallel.pp_layers", "[3, 5]"], lambda c: c.parallel.pp_layers, [3, 5]),
        (["--parallel.pp_layers", "3,5"], lambda c: c.parallel.pp_layers, [3, 5]),
        (["--parallel.pp_layers", "none"], lambda c: c.parallel.pp_layers, None),
        (["--model.lora.targets", "linear_qkv,linear_proj"],
         lambda c: c.model.lora.targets, ["linear_qkv", "linear_proj"]),
        (["--model.lora.targets", "['linear_fc1']"], lambda c: c.model.lora.targets, ["linear_fc1"]),
        (["--model.lora.targets", "[]"], lambda c: c.model.lora.targets, []),
        (["--parallel.cp_comm", "ulysses"], lambda c: c.parallel.cp_comm, "ulysses"),
        (["--optim.zero", "1"], lambda c: c.optim.zero, 1),
        (["--model.lora.rank", "8"], lambda c: c.model.lora.rank, 8),
        (["--model.lora.alpha=32"], lambda c: c.model.lora.alpha, 32.0),
        (["--optim.warmup_steps", "-0"], lambda c: c.optim.warmup_steps, 0),
        (["--train.seed", "-5"], lambda c: c.train.seed, -5),  # a negative value is not a flag
    ],
)
def test_override_conversion(override, get, expected):
    value = get(load_config(overrides=override))
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    "text, expected",
    [("true", True), ("True", True), ("1", True), ("yes", True),
     ("false", False), ("FALSE", False), ("0", False), ("no", False)],
)
def test_override_bool(text, expected):
    assert load_config(overrides=["--parallel.sp", text]).parallel.sp is expected
    assert load_config(overrides=[f"--log.wandb={text}"]).log.wandb is expected


def test_bare_bool_flag():
    cfg = load_config(overrides=["--parallel.sp", "--parallel.tp", "2", "--log.wandb"])
    assert cfg.parallel.sp is True and cfg.parallel.tp == 2 and cfg.log.wandb is True


def test_yaml_types(tmp_path):
    path = write(
        tmp_path,
        "optim:\n  lr: 1e-4\n  min_lr: 0\n  zero: 1\n"  # 1e-4 is a str to PyYAML (YAML 1.1)
        "parallel:\n  pp_layers: [2, 3]\n  sp: true\n"
        "model:\n  lora:\n    targets: [linear_qkv]\n    dropout: 0.1\n",
    )
    cfg = load_config(path)
    assert cfg.optim.lr == 1e-4 and type(cfg.optim.lr) is float
    assert cfg.optim.min_lr == 0.0 and type(cfg.optim.min_lr) is float
    assert cfg.optim.zero == 1 and cfg.parallel.pp_layers == [2, 3] and cfg.parallel.sp is True
    assert cfg.model.lora.targets == ["linear_qkv"] and cfg.model.lora.dropout == 0.1


@pytest.mark.parametrize(
    "d, match",
    [
        ({"train": {"steps": True}}, r"^config key 'train\.steps' expects int, got True$"),
        ({"train": {"steps": 1.5}}, r"^config key 'train\.steps' expects int, got 1\.5$"),
        ({"optim": {"lr": True}}, r"^config key 'optim\.lr' expects float, got True$"),
        ({"optim": {"lr": "fast"}}, r"^config key 'optim\.lr' expects float, got 'fast'$"),
        ({"parallel": {"sp": "true"}}, r"^config key 'parallel\.sp' expects bool, got 'true'$"),
        ({"parallel": {"sp": 1}}, r"^config key 'parallel\.sp' expects bool, got 1$"),
        ({"model": {"hf_path": 3}}, r"^config key 'model\.hf_path' expects str or None, got 3$"),
        ({"parallel": {"pp_layers": [1, "a"]}},
         r"^config key 'parallel\.pp_layers' expects list\[int\] or None, got \[1, 'a'\]$"),
        ({"parallel": {"pp_layers": 4}}, r"expects list\[int\] or None, got 4$"),
        ({"model": {"lora": {"targets": "all-linear"}}},
         r"^config key 'model\.lora\.targets' expects list\[str\], got 'all-linear'$"),
        ({"optim": {"zero": True}}, r"^optim\.zero must be one of 0, 1; got True$"),
        ({"parallel": "tp=2"}, r"^config section 'parallel' expects a mapping, got 'tp=2'$"),
        ({"model": {"lora": 8}}, r"^config section 'model\.lora' expects a mapping, got 8$"),
    ],
)
def test_dict_type_errors(d, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict(d)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["--train.steps", "ten"], r"^config key 'train\.steps' expects int, got 'ten'$"),
        (["--train.steps", "2.5"], r"^config key 'train\.steps' expects int, got '2\.5'$"),
        (["--optim.lr", "fast"], r"^config key 'optim\.lr' expects float, got 'fast'$"),
        (["--parallel.sp", "maybe"], r"^config key 'parallel\.sp' expects bool, got 'maybe'$"),
        (["--checkpoint.keep", "all"], r"^config key 'checkpoint\.keep' expects int or None, got 'all'$"),
        (["--parallel.pp_layers", "1,x"],
         r"^config key 'parallel\.pp_layers' expects list\[int\] or None, got '1,x'$"),
        (["--optim.zero", "one"], r"^config key 'optim\.zero' expects int, got 'one'$"),
    ],
)
def test_override_type_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(overrides=overrides)


@pytest.mark.parametrize(
    "key, bad, got, choices",
    [
        ("parallel.cp_comm", "rng", "'rng'", "ring, ulysses, hybrid"),
        ("parallel.pp_schedule", "1F1B", "'1F1B'", "1f1b, interleaved, zbv, gpipe"),
        ("model.dtype", "fp16", "'fp16'", "float32, bfloat16, float16"),
        ("model.attention_backend", "flash", "'flash'", "auto, reference, sdpa, flash_attn"),
        ("train.recompute", "some", "'some'", "none, selective, full"),
        ("optim.schedule", "wsd", "'wsd'", "cosine, linear, constant"),
        ("optim.zero", "2", "2", "0, 1"),
    ],
)
def test_choice_errors(key, bad, got, choices):
    with pytest.raises(ConfigError, match=exact(f"{key} must be one of {choices}; got {got}")):
        load_config(overrides=[f"--{key}", bad])


@pytest.mark.parametrize(
    "key", ["parallel.tp", "parallel.pp", "parallel.vpp", "parallel.cp", "parallel.ulysses",
            "parallel.ep", "parallel.etp", "train.steps", "train.micro_batch_size"],
)
@pytest.mark.parametrize("bad", [0, -2])
def test_degrees_must_be_positive(key, bad):
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)} must be >= 1; got {bad}$"):
        load_config(overrides=[f"--{key}", str(bad)])
    section, name = key.split(".")
    with pytest.raises(ConfigError, match=r"must be >= 1"):
        config_from_dict({section: {name: bad}})


def test_other_bounds():
    with pytest.raises(ConfigError, match=r"^model\.lora\.rank must be >= 0; got -1$"):
        load_config(overrides=["--model.lora.rank", "-1"])
    with pytest.raises(ConfigError, match=r"^optim\.lr must be >= 0\.0; got -0\.1$"):
        load_config(overrides=["--optim.lr", "-0.1"])
    with pytest.raises(ConfigError, match=r"^checkpoint\.keep must be >= 1; got 0$"):
        load_config(overrides=["--checkpoint.keep", "0"])


def test_direct_construction_is_checked():
    with pytest.raises(ConfigError, match=r"^parallel\.tp must be >= 1; got 0$"):
        ParallelSection(tp=0)
    with pytest.raises(ConfigError, match=r"^config key 'optim\.lr' expects float, got '1e-3x'$"):
        OptimSection(lr="1e-3x")
    with pytest.raises(ConfigError, match=r"^config key 'parallel' expects a ParallelSection, got 2$"):
        Config(parallel=2)
    assert OptimSection(lr=1).lr == 1.0


@pytest.mark.parametrize(
    "key, message",
    [
        ("parallel.tpp", "unknown config key 'parallel.tpp'; did you mean 'parallel.tp'?"),
        ("paralel.tp", "unknown config key 'paralel.tp'; did you mean 'parallel.tp'?"),
        ("model.lora.rnk", "unknown config key 'model.lora.rnk'; did you mean 'model.lora.rank'?"),
        ("train.zzz", "unknown config key 'train.zzz'; valid keys: train.steps, "
                      "train.micro_batch_size, train.global_batch_size, train.seed, "
                      "train.output_dir, train.recompute, train.on_nonfinite, train.max_skipped_steps"),
        ("parallel.tp.x", "unknown config key 'parallel.tp.x'; 'parallel.tp' has no sub-keys"),
        ("parallel", "config key 'parallel' is a section; set one of its keys, e.g. --parallel.tp"),
    ],
)
def test_unknown_override_keys(key, message):
    with pytest.raises(ConfigError, match=exact(message)):
        load_config(overrides=[f"--{key}", "2"])


def test_unknown_keys_in_file(tmp_path):
    message = "unknown config key 'parallel.tpp'; did you mean 'parallel.tp'?"
    with pytest.raises(ConfigError, match=exact(message)):
        load_config(write(tmp_path, "parallel:\n  tpp: 2\n"))
    with pytest.raises(ConfigError, match=exact("unknown config key 'traing'; did you mean 'train'?")):
        load_config(write(tmp_path, "traing:\n  steps: 2\n", "b.yaml"))
    message = "unknown config key 'model.lora.alfa'; did you mean 'model.lora.alpha'?"
    with pytest.raises(ConfigError, match=exact(message)):
        config_from_dict({"model": {"lora": {"alfa": 1.0}}})


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["--train.steps"], r"^override '--train\.steps' is missing its value$"),
        (["--train.steps", "--parallel.tp", "2"], r"^override '--train\.steps' is missing its value$"),
        (["steps=3"], r"^unexpected argument 'steps=3'; overrides look like --section\.key value$"),
        (["--"], r"^unexpected argument '--'"),
        (["--train.steps", "3", "4"], r"^unexpected argument '4'"),
    ],
)
def test_malformed_overrides(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(overrides=overrides)


def test_file_errors(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=exact(f"config file '{missing}' does not exist")):
        load_config(missing)
    path = write(tmp_path, "- tp: 2\n", "list.yaml")
    message = f"config file '{path}' must be a mapping of sections (model, parallel, ...), got list"
    with pytest.raises(ConfigError, match=exact(message)):
        load_config(path)
    with pytest.raises(ConfigError, match=r"^config file '.*bad\.yaml' is not valid YAML: [^\n]*$"):
        load_config(write(tmp_path, "parallel: [1,\n", "bad.yaml"))
    with pytest.raises(ConfigError, match=r"^config expects a mapping, got 3$"):
        config_from_dict(3)


def test_to_dict_round_trip(tmp_path):
    cfg = load_config(overrides=[
        "--model.lora.rank", "8", "--model.lora.targets", "linear_qkv,linear_fc1",
        "--parallel.pp_layers", "2,2", "--parallel.sp", "--optim.lr", "3e-4",
        "--checkpoint.load", "latest", "--optim.zero", "1",
    ])
    d = cfg.to_dict()
    assert type(d) is dict and type(d["model"]["lora"]) is dict
    assert d["model"]["lora"] == {"rank": 8, "alpha": 16.0, "dropout": 0.0,
                                  "targets": ["linear_qkv", "linear_fc1"]}
    assert config_from_dict(d) == cfg
    assert load_config(base=d) == cfg
    path = write(tmp_path, yaml.safe_dump(d))
    assert load_config(path) == cfg
    d["parallel"]["pp_layers"].append(9)  # to_dict copies, so the config is not aliased
    assert cfg.parallel.pp_layers == [2, 2]


def test_shipped_configs_load():
    """Every example in configs/ parses with the current keys and types."""
    import glob
    import os

    root = os.path.join(os.path.dirname(__file__), "..", "..", "configs")
    paths = sorted(glob.glob(os.path.join(root, "*.yaml")))
    assert paths
    for path in paths:
        load_config(path)


@pytest.mark.parametrize(
    "override, message",
    [
        (["--optim.adam_eps", "0"], "optim.adam_eps must be > 0 (e.g. 1e-8); got 0"),
        (["--optim.adam_eps", "-1e-8"], "optim.adam_eps must be > 0 (e.g. 1e-8); got -1e-08"),
        (["--optim.adam_beta1", "1"], "optim.adam_beta1 must be in [0, 1); got 1"),
        (["--optim.adam_beta1", "-0.1"], "optim.adam_beta1 must be in [0, 1); got -0.1"),
        (["--optim.adam_beta2", "1.5"], "optim.adam_beta2 must be in [0, 1); got 1.5"),
        (["--optim.lr", "1e-4", "--optim.min_lr", "2e-4"],
         "optim.min_lr=0.0002 is above optim.lr=0.0001: the schedule would raise the learning rate as it "
         "decays; set min_lr <= lr"),
    ],
)
def test_optimizer_ranges(override, message):
    """Each was torch's own ValueError traceback (betas) or NaN weights after one step (eps 0)."""
    with pytest.raises(ConfigError, match=exact(message)):
        load_config(overrides=override)


def test_optimizer_range_edges_are_accepted():
    o = OptimSection(adam_beta1=0.0, adam_beta2=0.0, adam_eps=1e-30, lr=1e-4, min_lr=1e-4)
    assert (o.adam_beta1, o.adam_beta2, o.min_lr) == (0.0, 0.0, 1e-4)
    assert load_config().checkpoint.export_overwrite is False


def test_schedule_warnings_state_the_last_lr():
    from megaswift.train.optim import lr_at, schedule_warnings

    assert schedule_warnings(OptimSection(lr=1e-3, warmup_steps=2), 10) == []
    o = OptimSection(lr=1e-3, warmup_steps=8, min_lr=1e-4)
    (line,) = schedule_warnings(o, 4)
    assert lr_at(3, o, 4) == pytest.approx(5e-4)  # steps 0..3 of an 8-step warmup
    assert line == ("optim.warmup_steps=8 >= train.steps=4: the run never leaves warmup: its last step trains "
                    "at lr 0.0005 of optim.lr=0.001 and no cosine decay to min_lr; lower warmup_steps below "
                    "train.steps")
    (line,) = schedule_warnings(OptimSection(lr=1e-3, warmup_steps=4, schedule="constant"), 4)
    assert "its last step trains at lr 0.001 of optim.lr=0.001;" in line  # equal: warmup ends on the last step
    assert schedule_warnings(OptimSection(lr=0.0), 10) == [
        "optim.lr=0: AdamW's updates are scaled by the learning rate, so the weights never change"]


@pytest.mark.parametrize("key", ["model.preset", "model.trust_remote_code"])
def test_removed_settings_say_so(key, tmp_path):
    """Settings that were never read are gone; setting one says why, in one line."""
    section, name = key.split(".")
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text(f"{section}:\n  {name}: true\n")
    for args in ((str(yaml_file), []), (None, [f"--{key}", "x"])):
        with pytest.raises(ConfigError, match=rf"^{key} was removed") as e:
            load_config(*args)
        assert "\n" not in str(e.value)
