"""Data sources: .txt, folders, JSONL, saved datasets; packing; deterministic split; bad input."""
from __future__ import annotations

import json

import pytest
import torch

from lte_convert.converter.data import load_blocks, read_documents
from lte_convert.errors import UserError


class CharTokenizer:
    """One token per character (ord % 100), EOS = 0: packing is checkable by hand."""

    eos_token_id = 0
    sep_token_id = None

    def __call__(self, docs, add_special_tokens=False, verbose=True):
        return {"input_ids": [[1 + ord(c) % 99 for c in d] for d in docs]}


def test_txt_file_packs_into_blocks_with_eos_between_documents(tmp_path):
    (tmp_path / "a.txt").write_text("abcdefghij")          # 10 chars + EOS
    b = load_blocks(CharTokenizer(), tmp_path / "a.txt", block_size=4, heldout_fraction=0.3)
    flat = [1 + ord(c) % 99 for c in "abcdefghij"] + [0]
    assert torch.equal(torch.cat([b.train, b.heldout]).flatten(), torch.tensor(flat[:8]))
    assert b.train.shape == (1, 4) and b.heldout.shape == (1, 4)


def test_folder_jsonl_and_dataset_give_the_same_documents(tmp_path):
    docs = ["first document.", "second one\nwith two lines", "third"]
    folder = tmp_path / "txt"
    folder.mkdir()
    for i, d in enumerate(docs):
        (folder / f"{i}.txt").write_text(d)
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"body": d, "n": 1}) for d in docs))
    import datasets
    datasets.Dataset.from_dict({"body": docs}).save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": docs})}).save_to_disk(
        str(tmp_path / "dd"))
    assert read_documents(folder) == docs
    assert read_documents(tmp_path / "d.jsonl", text_field="body") == docs
    assert read_documents(tmp_path / "ds", text_field="body") == docs
    assert read_documents(tmp_path / "dd", text_field="body") == docs
    assert read_documents([folder / "0.txt", tmp_path / "d.jsonl"], "body") == docs[:1] + docs


def test_split_is_deterministic_tail_and_separate_heldout_source(tmp_path):
    (tmp_path / "t.txt").write_text("x" * 1000)
    (tmp_path / "h.txt").write_text("y" * 100)
    a = load_blocks(CharTokenizer(), tmp_path / "t.txt", 10, heldout_fraction=0.1)
    b = load_blocks(CharTokenizer(), tmp_path / "t.txt", 10, heldout_fraction=0.1)
    assert torch.equal(a.train, b.train) and torch.equal(a.heldout, b.heldout)
    assert a.train.shape == (90, 10) and a.heldout.shape == (10, 10)
    c = load_blocks(CharTokenizer(), tmp_path / "t.txt", 10, heldout=tmp_path / "h.txt")
    assert c.train.shape == (100, 10) and c.heldout.shape == (10, 10)


@pytest.mark.parametrize("content, needle", [
    (b"", "empty"), (b"   \n\n", "empty"), (b"\x7fELF\x00\x00\x01", "binary"),
    (b"\xff\xfe\xfa bad", "not UTF-8")])
def test_bad_text_files_are_user_errors(tmp_path, content, needle):
    p = tmp_path / "bad.txt"
    p.write_bytes(content)
    with pytest.raises(UserError, match=needle):
        read_documents(p)


def test_bad_sources_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_documents(tmp_path / "nope.txt")
    with pytest.raises(UserError, match="no .txt files"):
        read_documents(tmp_path)
    (tmp_path / "d.jsonl").write_text('{"text": "ok"}\n{"content": "x"}\n')
    with pytest.raises(UserError, match="Line 2 .* no string field 'text'"):
        read_documents(tmp_path / "d.jsonl")
    (tmp_path / "short.txt").write_text("abc")
    with pytest.raises(UserError, match="at least 2 are needed"):
        load_blocks(CharTokenizer(), tmp_path / "short.txt", 16)
