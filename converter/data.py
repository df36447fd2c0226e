"""Training and held-out text: read, tokenise, pack into fixed blocks, split deterministically.

Accepted sources (`--data`):
- a `.txt` file, or a folder of them (every `*.txt` below it, sorted by path);
- a JSONL file (`.jsonl` / `.json` with one object per line) with a text field (`--text-field`,
  default "text");
- a folder written by `datasets.Dataset.save_to_disk` (a DatasetDict uses its "train" split);
- a list of any of these (the embedded default passes the Shakespeare play files).

Documents are tokenised without special tokens, joined with the tokenizer's EOS token (when it
has one) and cut into `block_size`-token blocks; the tail shorter than a block is dropped.

Held-out split: when no separate held-out source is given, the LAST `heldout_fraction` of the
blocks (at least one) is held out. A contiguous tail rather than a random sample, so that no
held-out block has its neighbouring text in training; it depends only on the data and the
block size, never on a seed.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from lte_convert.errors import UserError

DataSource = str | os.PathLike | list


@dataclass
class Blocks:
    train: torch.Tensor      # [N_train, T] int64
    heldout: torch.Tensor    # [N_heldout, T] int64

    @property
    def block_size(self) -> int:
        return self.train.shape[1]


# ---------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------
def _read_text_file(path: Path) -> str:
    raw = path.read_bytes()
    if b"\x00" in raw[:65536]:
        raise UserError(f"The data file {path} looks binary (it contains NUL bytes), not text. "
                        "Pass a UTF-8 .txt file, a folder of them, a JSONL file or a saved "
                        "`datasets` folder.")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"The data file {path} is not UTF-8 text ({e.reason} at byte {e.start}). "
                        "Convert it to UTF-8 (for example `iconv -t utf-8`) or pass another "
                        "file.") from None
    if not text.strip():
        raise UserError(f"The data file {path} is empty (no text in {len(raw)} bytes). "
                        "Pass a file with training text.")
    return text


def _read_jsonl(path: Path, text_field: str) -> list[str]:
    docs = []
    for i, line in enumerate(_read_text_file(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"Line {i} of {path} is not valid JSON ({e.msg}). A JSONL data file "
                            "needs one JSON object per line.") from None
        if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
            keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise UserError(f"Line {i} of {path} has no string field {text_field!r} (found: "
                            f"{keys}). Name the field holding the text with --text-field.")
        docs.append(obj[text_field])
    if not any(d.strip() for d in docs):
        raise UserError(f"The JSONL file {path} holds no text in field {text_field!r}.")
    return docs


def _is_saved_dataset(path: Path) -> bool:
    return any((path / n).is_file() for n in ("dataset_info.json", "state.json",
                                              "dataset_dict.json"))


def _read_saved_dataset(path: Path, text_field: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise UserError(f"{path} is a saved `datasets` folder, but the `datasets` package is "
                        "not installed. Install it with `pip install datasets`.") from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        split = "train" if "train" in ds else sorted(ds)[0]
        ds = ds[split]
    if text_field not in ds.column_names:
        raise UserError(f"The dataset at {path} has no column {text_field!r} (columns: "
                        f"{ds.column_names}). Name the text column with --text-field.")
    docs = [t for t in ds[text_field] if isinstance(t, str)]
    if not any(d.strip() for d in docs):
        raise UserError(f"The dataset at {path} holds no text in column {text_field!r}.")
    return docs


def read_documents(source: DataSource, text_field: str = "text") -> list[str]:
    """The documents (strings) of a data source, in a deterministic order."""
    if isinstance(source, (list, tuple)):
        return [d for s in source for d in read_documents(s, text_field)]
    path = Path(source)
    if not path.exists():
        raise UserError(f"The data path {path} does not exist. Pass a .txt file, a folder of "
                        ".txt files, a JSONL file or a saved `datasets` folder.")
    if path.is_dir():
        if _is_saved_dataset(path):
            return _read_saved_dataset(path, text_field)
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise UserError(f"The data folder {path} contains no .txt files and is not a saved "
                            "`datasets` folder. Put UTF-8 .txt files in it.")
        return [_read_text_file(p) for p in files]
    if path.suffix in (".jsonl", ".json"):
        return _read_jsonl(path, text_field)
    return [_read_text_file(path)]


# ---------------------------------------------------------------------------------------
# tokenising and packing
# ---------------------------------------------------------------------------------------
def pack(tokenizer, docs: list[str], block_size: int) -> torch.Tensor:
    """[N, block_size] int64: the documents' tokens joined by EOS, cut into blocks."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    ids: list[int] = []
    # verbose=False: a document longer than the model's context is expected here (it is cut
    # into blocks), so the tokenizer's "sequence length is longer" warning is noise
    enc = tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]
    for d in enc:
        ids.extend(d)
        if eos is not None:
            ids.append(eos)
    n = len(ids) // block_size
    return torch.tensor(ids[: n * block_size], dtype=torch.long).view(n, block_size)


def load_blocks(tokenizer, data: DataSource, block_size: int, *, heldout: DataSource | None = None,
                heldout_fraction: float = 0.05, text_field: str = "text") -> Blocks:
    """Tokenised, packed train and held-out blocks (see the module docstring for the split)."""
    held = None if heldout is None else read_documents(heldout, text_field)
    return make_blocks(tokenizer, read_documents(data, text_field), block_size, held,
                       heldout_fraction)


def make_blocks(tokenizer, docs: list[str], block_size: int, heldout_docs: list[str] | None = None,
                heldout_fraction: float = 0.05) -> Blocks:
    """Blocks from documents already read (read_documents), so bad files fail before a model
    is loaded."""
    if block_size < 2:
        raise UserError(f"--block-size must be at least 2 tokens, got {block_size}.")
    train = pack(tokenizer, docs, block_size)
    if heldout_docs is not None:
        held = pack(tokenizer, heldout_docs, block_size)
        if len(held) == 0:
            raise UserError(f"The held-out data has fewer than {block_size} tokens: give more "
                            "text or a smaller --block-size.")
    else:
        if len(train) < 2:
            raise UserError(f"The data gives {len(train)} block(s) of {block_size} tokens; at "
                            "least 2 are needed (one to train on, one held out). Give more "
                            "text or a smaller --block-size.")
        n_held = max(1, round(len(train) * heldout_fraction))
        train, held = train[:-n_held], train[-n_held:]
    if len(train) == 0:
        raise UserError(f"The training data has fewer than {block_size} tokens: give more text "
                        "or a smaller --block-size.")
    return Blocks(train=train, heldout=held)


class BlockDataset(torch.utils.data.Dataset):
    """Blocks as Trainer examples: {"input_ids"} (labels are made by the collator)."""

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, i):
        return {"input_ids": self.blocks[i]}


def spread(blocks: torch.Tensor, k: int) -> torch.Tensor:
    """k blocks evenly spaced over `blocks` (all of them when there are at most k): a sample
    of the whole held-out text rather than its beginning (a play's cast list, say)."""
    if len(blocks) <= k:
        return blocks
    return blocks[torch.linspace(0, len(blocks) - 1, k).round().long()]


def heldout_blocks(tokenizer, data: DataSource | None, block_size: int, k: int, *,
                   text_field: str = "text", purpose: str = "evaluation") -> torch.Tensor:
    """k blocks spread over held-out text (default: the embedded Shakespeare held-out plays)."""
    if data is None:
        from lte_convert.default import shakespeare_texts
        data = shakespeare_texts()[1]
    blocks = spread(pack(tokenizer, read_documents(data, text_field), block_size), k)
    if len(blocks) == 0:
        raise UserError(f"The {purpose} data has fewer than {block_size} tokens; give more "
                        "text or a smaller --block-size.")
    return blocks
