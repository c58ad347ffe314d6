"""Training data: tokenize, pack into fixed-length rows, and batch them.

DataConfig.dataset picks the source: "shakespeare" (shipped in assets/, offline),
a local .txt (one document) or .json/.jsonl file, or a HF hub name such as
"allenai/c4" (streamed, needs network). Finite sources are tokenized once and
cached as a .npy token array whose last eval_fraction is held out; streams are
packed on the fly. "synthetic" is uniformly random tokens (for memory and speed runs, which do
not depend on token content). make_batches gives deterministic, resumable, rank-sliced batches.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset

from ..config import ConfigError

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"  # package data of blockllm_scale
SHIPPED_CORPUS = ASSETS_DIR / "shakespeare.txt"
SHIPPED_TOKENIZER = ASSETS_DIR / "tokenizer"
# tools/build_corpus.py separates plays with two blank lines (never used inside a play).
DOCUMENT_SEPARATOR = "\n\n\n"
DEFAULT_CACHE_DIR = Path(os.environ.get("BLOCKLLM_SCALE_CACHE", "~/.cache/blockllm_scale")).expanduser()
# Part of every cache key: bump it when tokenization or joining changes, so stale arrays are never reused.
CACHE_FORMAT = "tokens-v1"
# Rows of the "synthetic" dataset: more than any benchmark run draws, and a cheap permutation per epoch.
SYNTHETIC_ROWS = 1 << 16
TEXT_SUFFIXES = {".txt", ".text"}
JSON_SUFFIXES = {".json", ".jsonl"}
# Pre-tokenized flat token arrays (.npy, or raw uint16 .bin), made with the tokenizer named by --tokenizer.
TOKEN_SUFFIXES = {".npy", ".bin"}


@dataclass
class DataConfig:
    dataset: str = "shakespeare"
    tokenizer: str = "shipped"
    seq_len: int = 256
    eval_fraction: float = 0.05
    text_field: str = "text"
    # 0: the tokenizer's size. GaLore's configs use 32000; any size >= the tokenizer's works with text data.
    vocab_size: int = 0
    # Held-out token array for a pre-tokenized dataset (held-out documents); "": the tail eval_fraction of it.
    eval_dataset: str = ""

    def __post_init__(self) -> None:
        for name in ("dataset", "tokenizer", "text_field"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise ValueError(f"DataConfig.{name} must be a non-empty string, got {getattr(self, name)!r}")
        local = Path(self.dataset).expanduser()
        if local.suffix in TEXT_SUFFIXES | JSON_SUFFIXES | TOKEN_SUFFIXES and not local.is_file():
            raise ValueError(f"DataConfig.dataset looks like a local file but does not exist: {self.dataset!r}")
        if self.eval_dataset:
            if local.suffix not in TOKEN_SUFFIXES:
                raise ValueError(f"DataConfig.eval_dataset needs a pre-tokenized dataset (.npy/.bin), got {self.dataset!r}")
            if Path(self.eval_dataset).suffix not in TOKEN_SUFFIXES or not Path(self.eval_dataset).expanduser().is_file():
                raise ValueError(f"DataConfig.eval_dataset must be an existing .npy/.bin file, got {self.eval_dataset!r}")
        if isinstance(self.seq_len, bool) or not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise ValueError(f"DataConfig.seq_len must be an integer >= 2, got {self.seq_len!r}")
        if not isinstance(self.eval_fraction, (int, float)) or not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"DataConfig.eval_fraction must be in (0, 1), got {self.eval_fraction!r}")
        if isinstance(self.vocab_size, bool) or not isinstance(self.vocab_size, int) or self.vocab_size < 0:
            raise ValueError(f"DataConfig.vocab_size must be an integer >= 0, got {self.vocab_size!r}")


def load_tokenizer(name: str = "shipped"):
    """The shipped 8192-token BPE for "shipped", otherwise any AutoTokenizer name or path."""
    from transformers import AutoTokenizer  # deferred: importing transformers is slow

    tokenizer = AutoTokenizer.from_pretrained(str(SHIPPED_TOKENIZER) if name == "shipped" else name)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {name!r} has no eos token, which is needed to join documents")
    return tokenizer


class TokenArrayDataset(Dataset):
    """Consecutive seq_len rows of a flat token array (array, .npy, or raw uint16 file).

    Files are memory-mapped so all ranks share the page cache instead of each
    holding a copy of a multi-GB corpus. A trailing partial row is dropped.
    """

    def __init__(self, tokens: np.ndarray | str | os.PathLike, seq_len: int):
        if isinstance(tokens, (str, os.PathLike)):
            path = Path(tokens)
            tokens = np.load(path, mmap_mode="r") if path.suffix == ".npy" else np.memmap(path, np.uint16, mode="r")
        if tokens.ndim != 1:
            raise ValueError(f"token array must be 1-D, got shape {tokens.shape}")
        self.tokens, self.seq_len = tokens, seq_len

    def __len__(self) -> int:
        return len(self.tokens) // self.seq_len

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} out of range for {len(self)} rows")
        start = index * self.seq_len
        row = torch.from_numpy(self.tokens[start : start + self.seq_len].astype(np.int64))
        # The model shifts labels itself, so labels are the inputs, unshifted.
        return {"input_ids": row, "labels": row.clone()}


class SyntheticTokens(Dataset):
    """rows x seq_len uniformly random tokens in [0, vocab_size); row i depends only on (seed, i).

    Nothing is stored, so any number of rows costs no memory.
    """

    def __init__(self, rows: int, seq_len: int, vocab_size: int, seed: int):
        self.rows, self.seq_len, self.vocab_size, self.seed = rows, seq_len, vocab_size, seed

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.rows:
            raise IndexError(f"row {index} out of range for {self.rows} rows")
        row = torch.from_numpy(np.random.default_rng([self.seed, index]).integers(0, self.vocab_size, self.seq_len))
        return {"input_ids": row, "labels": row.clone()}


def model_vocab_size(cfg: DataConfig, tokenizer) -> int:
    """The model's vocabulary: cfg.vocab_size, or the tokenizer's size when it is 0."""
    if cfg.vocab_size and cfg.vocab_size < len(tokenizer) and cfg.dataset != "synthetic":
        raise ConfigError(f"--vocab_size {cfg.vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens")
    return cfg.vocab_size or len(tokenizer)


class PackedStream(IterableDataset):
    """Packs {text_field: str} records into seq_len rows as it reads, joined with eos like the cached path."""

    def __init__(self, records: Iterable[dict], tokenizer, seq_len: int, text_field: str = "text"):
        self.records, self.tokenizer, self.seq_len, self.text_field = records, tokenizer, seq_len, text_field

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        eos = self.tokenizer.eos_token_id
        pending: list[int] = []
        records = iter(self.records)
        # Tokenizing a batch of documents lets fast tokenizers use several threads.
        while chunk := list(itertools.islice(records, 64)):
            for ids in encode_documents(self.tokenizer, [record[self.text_field] for record in chunk]):
                pending.extend(ids)
                pending.append(eos)
            n_full = len(pending) // self.seq_len
            for row in torch.tensor(pending[: n_full * self.seq_len], dtype=torch.long).view(n_full, -1):
                yield {"input_ids": row, "labels": row.clone()}
            del pending[: n_full * self.seq_len]


def encode_documents(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens, no truncation (rows are packed later)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # Same ids as tokenizer(texts), ~2.5x faster: skips offsets and per-text Python objects.
        return [encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=False)]
    # verbose=False: whole documents exceed model_max_length by design.
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


def tokenize_documents(documents: list[str], tokenizer) -> np.ndarray:
    """One flat array: every document followed by eos; uint16 when the vocab fits."""
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.int32
    pieces = []
    for start in range(0, len(documents), 256):  # bounded batches keep peak memory flat
        for ids in encode_documents(tokenizer, documents[start : start + 256]):
            pieces.append(np.asarray([*ids, tokenizer.eos_token_id], dtype=dtype))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)


def cached_token_array(documents: list[str], tokenizer, cache_dir: Path) -> np.ndarray:
    """Tokenize once per (text, tokenizer); later calls memory-map the saved .npy."""
    backend = getattr(tokenizer, "backend_tokenizer", None)  # absent on sentencepiece-only tokenizers
    fingerprint = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    digest = hashlib.sha256(f"{CACHE_FORMAT}\0{fingerprint}".encode())
    for document in documents:
        digest.update(len(document).to_bytes(8, "little") + document.encode("utf-8"))
    path = cache_dir / f"{CACHE_FORMAT}-{digest.hexdigest()[:20]}.npy"
    if not path.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        tokens = tokenize_documents(documents, tokenizer)
        # Write-then-rename: ranks racing on a shared cache never read a half-written file.
        with tempfile.NamedTemporaryFile(dir=cache_dir, suffix=".tmp", delete=False) as tmp:
            np.save(tmp, tokens)
        os.replace(tmp.name, path)
    return np.load(path, mmap_mode="r")


def _read_local_documents(cfg: DataConfig) -> list[str]:
    import datasets  # deferred: only local-file and streaming paths need it

    path = str(Path(cfg.dataset).expanduser())
    if not _has_content(Path(path)):  # datasets' readers fail on an empty file with no message of their own
        raise ConfigError(f"{cfg.dataset} is empty")
    if Path(path).suffix in JSON_SUFFIXES:
        table = datasets.load_dataset("json", data_files=path, split="train")
        if cfg.text_field not in table.column_names:
            raise ValueError(f"DataConfig.text_field {cfg.text_field!r} is not a column of {path} "
                             f"(columns: {table.column_names})")
        return list(table[cfg.text_field])
    # A plain text file is one document: splitting on lines would scatter eos tokens through prose.
    return list(datasets.load_dataset("text", data_files=path, split="train", sample_by="document")["text"])


def _has_content(path: Path) -> bool:
    """Whether the file holds anything but whitespace (read until the first such byte)."""
    with path.open("rb") as f:
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return True
    return False


def _tokens_needed(cfg: DataConfig) -> int:
    """The fewest tokens that give one train row and one held-out row of seq_len."""
    return math.ceil(cfg.seq_len / min(cfg.eval_fraction, 1 - cfg.eval_fraction))


def _streamed_splits(cfg: DataConfig, tokenizer) -> tuple[PackedStream, PackedStream]:
    import datasets

    # "en" is C4's English configuration, the one GaLore-style pre-training uses.
    return tuple(PackedStream(datasets.load_dataset(cfg.dataset, "en", split=split, streaming=True),
                              tokenizer, cfg.seq_len, cfg.text_field) for split in ("train", "validation"))


def _pretokenized_splits(cfg: DataConfig, vocab_size: int) -> tuple[TokenArrayDataset, TokenArrayDataset]:
    """Train rows from the token array cfg.dataset; eval rows from cfg.eval_dataset, else from its tail."""
    for path in filter(None, (cfg.dataset, cfg.eval_dataset)):
        if Path(path).expanduser().stat().st_size == 0:  # numpy cannot even map an empty file
            raise ConfigError(f"{path} is empty")
    train = TokenArrayDataset(Path(cfg.dataset).expanduser(), cfg.seq_len)
    if cfg.eval_dataset:
        held_out = TokenArrayDataset(Path(cfg.eval_dataset).expanduser(), cfg.seq_len)
    else:
        n_eval = int(round(len(train.tokens) * cfg.eval_fraction))
        held_out = TokenArrayDataset(train.tokens[len(train.tokens) - n_eval:], cfg.seq_len)
        train = TokenArrayDataset(train.tokens[: len(train.tokens) - n_eval], cfg.seq_len)
    for name, split in (("dataset", train), ("eval split", held_out)):
        if len(split) == 0:
            raise ConfigError(f"{cfg.dataset}: the {name} has fewer than seq_len={cfg.seq_len} tokens")
        # An array made with another tokenizer would index past the embedding (a CUDA assert, far from here).
        top = int(split.tokens.max())
        if top >= vocab_size:
            raise ValueError(f"{cfg.dataset}: the {name} holds token id {top}, outside the model's vocabulary of "
                             f"{vocab_size}: was it tokenized with --tokenizer {cfg.tokenizer}?")
    return train, held_out


def build_datasets(cfg: DataConfig, cache_dir: str | os.PathLike | None = None):
    """(train, eval) for cfg: TokenArrayDatasets for finite sources, PackedStreams for hub datasets."""
    tokenizer = load_tokenizer(cfg.tokenizer)
    if cfg.dataset == "synthetic":
        vocab = model_vocab_size(cfg, tokenizer)
        # Separate seeds: no eval row repeats a train row.
        return (SyntheticTokens(SYNTHETIC_ROWS, cfg.seq_len, vocab, seed=0),
                SyntheticTokens(SYNTHETIC_ROWS // 64, cfg.seq_len, vocab, seed=1))
    if Path(cfg.dataset).suffix in TOKEN_SUFFIXES:
        return _pretokenized_splits(cfg, model_vocab_size(cfg, tokenizer))
    if cfg.dataset != "shakespeare" and not Path(cfg.dataset).expanduser().is_file():
        return _streamed_splits(cfg, tokenizer)
    if cfg.dataset == "shakespeare":
        documents = SHIPPED_CORPUS.read_text(encoding="utf-8").rstrip("\n").split(DOCUMENT_SEPARATOR)
    else:
        documents = _read_local_documents(cfg)
    if not any(document.strip() for document in documents):
        raise ConfigError(f"{cfg.dataset} holds no text")
    tokens = cached_token_array(documents, tokenizer, Path(cache_dir) if cache_dir else DEFAULT_CACHE_DIR)
    # Eval is the tail of the token stream, so no eval token can appear in a train row.
    n_eval = int(round(len(tokens) * cfg.eval_fraction))
    n_train = len(tokens) - n_eval
    if n_eval < cfg.seq_len or n_train < cfg.seq_len:
        raise ConfigError(f"{cfg.dataset}: {len(tokens)} tokens are too few for seq_len={cfg.seq_len} with "
                          f"eval_fraction={cfg.eval_fraction} (it needs about {_tokens_needed(cfg):,})")
    return TokenArrayDataset(tokens[:n_train], cfg.seq_len), TokenArrayDataset(tokens[n_train:], cfg.seq_len)


def make_batches(dataset, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 start_step: int = 0) -> Iterator[torch.Tensor]:
    """Endless [batch_size, seq_len] LongTensors of input_ids for this rank.

    Step s draws one global batch of batch_size * world_size rows and rank r keeps rows
    r::world_size, so N ranks see exactly what one rank sees with N times the batch size.
    start_step=k resumes at step k.
    """
    for name, value, low in (("batch_size", batch_size, 1), ("world_size", world_size, 1),
                             ("seed", seed, 0), ("start_step", start_step, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if not (isinstance(rank, int) and 0 <= rank < world_size):
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank!r}")
    if isinstance(dataset, IterableDataset):
        return _streamed_batches(dataset, batch_size, rank, world_size, start_step)
    require_rows(dataset, batch_size * world_size, "the dataset")
    return _shuffled_batches(dataset, batch_size, seed, rank, world_size, start_step)


def require_rows(dataset, rows: int, what: str) -> None:
    """A one-line ConfigError when a finite dataset holds fewer than ``rows`` rows (one global batch)."""
    if not isinstance(dataset, IterableDataset) and len(dataset) < rows:
        raise ConfigError(f"{what} has {len(dataset)} rows of seq_len tokens, fewer than one global batch of {rows}: "
                          "use a smaller --batch_size or --seq_len, or more data")


def _shuffled_batches(dataset, batch_size, seed, rank, world_size, start_step) -> Iterator[torch.Tensor]:
    global_batch = batch_size * world_size
    # Whole global batches only, so step -> (epoch, position) is plain arithmetic
    # and resuming needs no replay. Leftover rows differ per epoch, so none is lost for good.
    steps_per_epoch = len(dataset) // global_batch
    order_epoch, order = -1, None
    for step in itertools.count(start_step):
        epoch, position = divmod(step, steps_per_epoch)
        if epoch != order_epoch:
            # A private generator seeded by (seed, epoch): the order depends on nothing
            # else (no global RNG state), and (seed, epoch) pairs never collide the way seed + epoch would.
            order_epoch, order = epoch, np.random.default_rng([seed, epoch]).permutation(len(dataset))
        rows = order[position * global_batch : (position + 1) * global_batch][rank::world_size]
        yield torch.stack([dataset[int(i)]["input_ids"] for i in rows])


def _streamed_batches(stream, batch_size, rank, world_size, start_step) -> Iterator[torch.Tensor]:
    # A stream keeps its source order (C4's shards are already shuffled) and cannot
    # seek: resuming re-reads and discards the rows of the first start_step steps.
    global_batch = batch_size * world_size
    rows = itertools.islice(_cycle(stream), start_step * global_batch, None)
    while True:
        batch = [row["input_ids"] for row in itertools.islice(rows, global_batch)]
        yield torch.stack(batch[rank::world_size])


def _cycle(stream: Iterable[dict]) -> Iterator[dict]:
    """Repeat a re-iterable stream forever (one pass = one epoch)."""
    while True:
        produced = False
        for produced, row in enumerate(stream, start=1):
            yield row
        if not produced:
            raise ConfigError("the stream produced no rows: documents shorter than one seq_len in total?")
