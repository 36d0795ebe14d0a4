"""The SFT data path: reading and row errors, chat loss masks, samples, packing and the sampler."""
import json

import pytest
import torch

from megaswift.data import IGNORE_INDEX, SFTDataset, SFTLoader, make_sample, read_rows, tokenize_chat
from megaswift.errors import ConfigError, DataError

WORDS = ["kalo", "mi", "nesa", "to", "vize", "qu", "anel", "ru", "zeka"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    from megaswift.testing.tiny import save_tiny_tokenizer

    d = tmp_path_factory.mktemp("tok")
    save_tiny_tokenizer(str(d))
    return AutoTokenizer.from_pretrained(str(d))


def text(i: int, n: int) -> str:
    return " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(n))


def conv(i: int, turns: int = 1) -> dict:
    msgs = [{"role": "system", "content": text(i, 2)}]
    for t in range(turns):
        msgs += [{"role": "user", "content": text(i + t, 1 + (i + t) % 4)},
                 {"role": "assistant", "content": text(i + t + 1, 1 + (i * 5 + t) % 6)}]
    return {"messages": msgs}


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


# -- reading ---------------------------------------------------------------------------------
def test_jsonl_where_counts_physical_lines_past_blank_ones(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", [conv(0), "", conv(1), "   ", conv(2)])
    rows = read_rows(f)
    assert [w for w, _ in rows] == [f"{f}:1", f"{f}:3", f"{f}:5"]
    assert rows[1][1] == conv(1)


def test_malformed_json_line_is_reported_with_file_and_line(tmp_path):
    f = write_jsonl(tmp_path / "train.jsonl", [conv(0), conv(1), '{"messages": [{"role": "user" "content": "x"}]}'])
    with pytest.raises(DataError, match=rf"^{f}:3: invalid JSON: Expecting ',' delimiter"):
        read_rows(f)


def test_jsonl_is_read_without_the_datasets_package(tmp_path, monkeypatch):
    """A bare GPU image (torch and transformers, no datasets) still reads JSON Lines; Parquet
    then names the package it needs."""
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets now raises ImportError
    f = write_jsonl(tmp_path / "a.jsonl", [conv(0), "", conv(1)])
    assert read_rows(f) == [(f"{f}:1", conv(0)), (f"{f}:3", conv(1))]
    (tmp_path / "b.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataError, match=r"b.parquet: reading .json arrays and Parquet needs the datasets package"):
        read_rows(str(tmp_path / "b.parquet"))


def test_missing_path_and_empty_data(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl"):
        read_rows(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="no rows"):
        read_rows(write_jsonl(tmp_path / "empty.jsonl", []))
    (tmp_path / "d").mkdir()
    with pytest.raises(DataError, match="no .jsonl"):
        read_rows(str(tmp_path / "d"))


def test_parquet_rows_and_directory_order(tmp_path):
    import pandas as pd

    d = tmp_path / "data"
    d.mkdir()
    pd.DataFrame({"messages": [conv(5)["messages"], conv(6)["messages"]]}).to_parquet(d / "b.parquet")
    write_jsonl(d / "a.jsonl", [conv(3), conv(4)])
    (d / "notes.txt").write_text("ignored")
    rows = read_rows(str(d))
    assert [w for w, _ in rows] == [f"{d}/a.jsonl:1", f"{d}/a.jsonl:2", f"{d}/b.parquet:row 0", f"{d}/b.parquet:row 1"]
    assert [r for _, r in rows] == [conv(i) for i in (3, 4, 5, 6)]


def test_json_array_file_is_read_with_row_numbers(tmp_path):
    f = tmp_path / "a.json"
    f.write_text(json.dumps([conv(0), conv(1)], indent=1))
    assert read_rows(str(f)) == [(f"{f}:row 0", conv(0)), (f"{f}:row 1", conv(1))]


def test_absent_fields_are_not_filled_with_none(tmp_path):
    # Arrow unions struct keys across rows; a chat template must not see name=None on other rows.
    other = {"messages": [{"role": "user", "content": "a", "name": "bob"}, {"role": "assistant", "content": "b"}]}
    rows = read_rows(write_jsonl(tmp_path / "a.jsonl", [conv(0), other]))
    assert rows[0][1] == conv(0) and rows[1][1] == other


@pytest.mark.parametrize("row, message", [
    ({"text": "hi"}, "expected a row"),
    ({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}, "role 'robot'"),
    ({"messages": [{"role": "user", "content": "x"}]}, "no assistant message"),
    ({"messages": "hello"}, "non-empty list"),
])
def test_bad_rows_name_file_and_line(tmp_path, tok, row, message):
    f = write_jsonl(tmp_path / "rows.jsonl", [conv(0), "", row])
    where, bad = read_rows(f)[1]
    with pytest.raises(DataError, match=rf"^{f}:3: .*{message}"):
        tokenize_chat(bad, tok, where)
    with pytest.raises(DataError, match=rf"^{f}:3: "):
        SFTDataset(f, tok, seq_len=64)


# -- chat masks and samples ------------------------------------------------------------------
def test_assistant_mask_is_exactly_the_assistant_turns(tok):
    row = conv(3, turns=3)
    row["messages"][-1]["content"] = "ru zeka\nmi"  # a newline inside the content stays trained
    ids, flags = tokenize_chat(row, tok, "x:1")
    assert tok.decode(ids) == tok.apply_chat_template(row["messages"], tokenize=False)
    runs, run = [], []
    for i, f in zip(ids, flags):
        if f:
            run.append(i)
        elif run:
            runs, run = runs + [tok.decode(run)], []
    runs += [tok.decode(run)] if run else []
    assert runs == [m["content"] + "<|im_end|>" for m in row["messages"] if m["role"] == "assistant"]


def test_labels_shift_and_truncate():
    tokens = [10, 11, 12, 13, 14, 15]
    flags = [False, False, True, True, False, True]
    assert make_sample(tokens, flags, seq_len=8) == ([10, 11, 12, 13, 14], [-100, 12, 13, -100, 15])
    assert make_sample(tokens, flags, seq_len=3) == ([10, 11, 12], [-100, 12, 13])
    assert make_sample(tokens, flags, seq_len=1) is None  # only token 11 is left as a target


def test_dataset_truncates_and_counts_dropped(tmp_path, tok):
    long_prompt = {"messages": [{"role": "user", "content": text(0, 60)}, {"role": "assistant", "content": "mi"}]}
    f = write_jsonl(tmp_path / "a.jsonl", [conv(0, turns=3), long_prompt, conv(1)])
    ds = SFTDataset(f, tok, seq_len=40)
    assert len(ds) == 2 and ds.dropped == 1
    assert all(len(ids) == len(labels) <= 40 for ids, labels in (ds[0], ds[1]))
    assert len(ds[0][0]) == 40  # the three-turn conversation is longer than 40 tokens
    assert ds.num_loss_tokens == sum(lab != IGNORE_INDEX for i in range(2) for lab in ds[i][1]) > 0
    loader = SFTLoader(ds, seq_len=40, packing=False, micro_batch_size=1, global_batch_size=1,
                       dp_rank=0, dp_size=1, seed=0, pad_id=0)
    assert loader.dropped == 1
    with pytest.raises(DataError, match="all 1 rows were dropped"):
        SFTDataset(write_jsonl(tmp_path / "b.jsonl", [long_prompt]), tok, seq_len=40)


# -- packing and the sampler -------------------------------------------------------------------
def toy(n: int = 11, seed: int = 0) -> list:
    """Samples with distinct lengths 3..; sample i's tokens are 100*i + position, so any token
    tells which sample and position it came from."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 3 + int(torch.randint(0, 10, (1,), generator=g))
        ids = [100 * i + p for p in range(length)]
        out.append((ids, [IGNORE_INDEX] + ids[1:]))
    return out


def loader(data, *, dp=1, rank=0, mb=4, gbs=8, packing=True, seed=1, seq_len=16):
    return SFTLoader(data, seq_len=seq_len, packing=packing, micro_batch_size=mb, global_batch_size=gbs,
                     dp_rank=rank, dp_size=dp, seed=seed, pad_id=-1)


def global_batch(data, dp, mb, steps=1, state=None, **kw):
    """The next global batch after `steps - 1`, gathered from every rank in rank order."""
    ranks = [loader(data, dp=dp, rank=r, mb=mb, **kw) for r in range(dp)]
    for ld in ranks:
        if state is not None:
            ld.load_state_dict(state)
        for _ in range(steps - 1):
            ld.next_global_batch()
    micro = [m for ld in ranks for m in ld.next_global_batch()]
    out = {k: torch.cat([m[k] for m in micro]) if micro[0][k] is not None else None
           for k in micro[0] if k != "num_tokens"}
    out["num_tokens"] = torch.tensor(sum(m["num_tokens"] for m in micro))
    return out


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all((a[k] is b[k] is None) or torch.equal(a[k], b[k]) for k in a)


def test_packed_rows_hold_whole_documents_with_restarting_ids():
    data = toy()
    ld = loader(data, mb=1, gbs=1)
    assert ld.items_per_epoch < len(data)  # rows do hold several documents
    seen = []
    for _ in range(ld.items_per_epoch):
        for m in ld.next_global_batch():
            assert m["input_ids"].shape == (1, 16)
            for ids, pos, doc, lab in zip(m["input_ids"], m["position_ids"], m["document_ids"], m["labels"]):
                for d in doc.unique().tolist():
                    sel = doc == d
                    where = sel.nonzero().flatten().tolist()
                    assert where == list(range(where[0], where[-1] + 1))  # one contiguous run
                    assert pos[sel].tolist() == list(range(int(sel.sum())))
                    if ids[sel][0] != -1:  # a real document: exactly one sample, whole
                        i = ids[sel][0].item() // 100
                        assert ids[sel].tolist() == data[i][0] and lab[sel].tolist() == data[i][1]
                        seen.append(i)
                    else:  # padding is the last document and carries no loss
                        assert d == doc.max() and (lab[sel] == IGNORE_INDEX).all()
    assert sorted(seen) == list(range(len(data)))  # an epoch packs every sample exactly once


def test_unpacked_rows_pad_after_the_sample():
    data = toy()
    m = loader(data, mb=1, gbs=1, packing=False).next_global_batch()[0]
    n = (m["input_ids"] != -1).sum().item()
    assert m["document_ids"] is None and m["input_ids"][0, :n].tolist() == data[m["input_ids"][0, 0] // 100][0]
    assert m["position_ids"][0].tolist() == list(range(n)) + list(range(16 - n))


@pytest.mark.parametrize("packing", [False, True])
def test_global_batch_does_not_depend_on_layout(packing):
    data = toy(23)
    for step in (1, 3):
        ref = global_batch(data, dp=1, mb=4, steps=step, packing=packing)
        for dp, mb in ((2, 2), (4, 1), (2, 4)):
            assert same(global_batch(data, dp=dp, mb=mb, steps=step, packing=packing), ref)


def test_stream_is_deterministic_and_seeded():
    data = toy()
    assert same(global_batch(data, 1, 4), global_batch(data, 1, 4))
    assert not same(global_batch(data, 1, 4), global_batch(data, 1, 4, seed=2))


def test_epochs_wrap_around_with_a_new_order():
    data = toy(5)
    ld = loader(data, mb=2, gbs=2, packing=False)
    assert ld.items_per_epoch == 5
    firsts = [m["input_ids"][:, 0].div(100, rounding_mode="floor").tolist()
              for _ in range(5) for m in ld.next_global_batch()]
    order = sum(firsts, [])
    assert sorted(order[:5]) == sorted(order[5:]) == list(range(5))
    assert order[:5] != order[5:] and ld.epoch == 2


@pytest.mark.parametrize("packing", [False, True])
def test_resume_gives_the_next_batch_under_any_layout(packing):
    data = toy(13)
    ld = loader(data, packing=packing)
    for _ in range(3):
        ld.next_global_batch()
    state = ld.state_dict()
    assert state["consumed_items"] == 24
    expected = global_batch(data, dp=1, mb=4, steps=4, packing=packing)
    assert same(global_batch(data, dp=1, mb=4, state=state, packing=packing), expected)
    assert same(global_batch(data, dp=2, mb=1, state=state, packing=packing), expected)


def test_loss_tokens_of_the_global_batch():
    data = toy()
    ld = loader(data, dp=2, rank=1, mb=2)
    ld.next_global_batch()
    everything = global_batch(data, dp=2, mb=2)
    assert ld.last_loss_tokens == (everything["labels"] != IGNORE_INDEX).sum().item()


def test_bad_layout_and_mismatched_state_are_config_errors():
    with pytest.raises(ConfigError, match=r"global_batch_size \(6\).*micro_batch_size \(2\).*dp \(2\)"):
        loader(toy(), dp=2, mb=2, gbs=6)
    with pytest.raises(ConfigError, match="seed"):
        loader(toy(), seed=3).load_state_dict(loader(toy(), seed=4).state_dict())


def test_invalid_utf8_names_the_file_and_line(tmp_path):
    """Once replaced silently by U+FFFD, changing the text that trains."""
    good = json.dumps(conv(0)).encode()
    bad = json.dumps(conv(1)).encode().replace(b"mi", b"m\xff", 1)
    f = tmp_path / "a.jsonl"
    f.write_bytes(good + b"\n\n" + bad + b"\n")
    with pytest.raises(DataError, match=rf"^{f}:3: not valid UTF-8 \(byte b'\\xff'\); save the file as UTF-8$"):
        read_rows(str(f))
    f.write_bytes(good + b"\n" + "é".encode()[:1])  # cut inside a two-byte character
    with pytest.raises(DataError, match=rf"^{f}:2: not valid UTF-8 \(the file ends inside a character\)"):
        read_rows(str(f))


def test_files_of_other_types_in_a_data_directory_are_listed(tmp_path, capsys):
    d = tmp_path / "data"
    d.mkdir()
    write_jsonl(d / "a.jsonl", [conv(0)])
    (d / "notes.txt").write_text("x")
    (d / "b.csv").write_text("x")
    (d / ".hidden").write_text("x")
    assert len(read_rows(str(d))) == 1
    assert (f"megaswift: warning: data.path {d}: 2 file(s) of other types not read: b.csv, notes.txt "
            f"(megaswift reads .jsonl, .json and .parquet)") in capsys.readouterr().err
