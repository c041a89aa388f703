"""Corpus sources: the embedded default corpus, local text files, and Hugging Face datasets.

A source is described by a ``Corpus``: named *streams* of text lines (read in batches so
nothing ever holds a whole corpus) and a *carve* plan that cuts each stream's token
sequence into splits by fraction. Carving happens on tokens after preparation, which keeps
"the end of the training text is held out" exact and free of a second pass over the text.
"""
from __future__ import annotations

import codecs
import glob
import gzip
import hashlib
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from megatie.errors import DataError

BATCH_LINES = 8192   # datasets' per-batch overhead dominates below a few thousand lines

# name -> (hub repo, config, {our split: hub split}, streaming)
HUB_DATASETS = {
    "wikitext-2": ("Salesforce/wikitext", "wikitext-2-raw-v1",
                   {"train": "train", "valid": "validation", "test": "test"}, False),
    "wikitext-103": ("Salesforce/wikitext", "wikitext-103-raw-v1",
                     {"train": "train", "valid": "validation", "test": "test"}, True),
    "lambada": ("cimec/lambada", None,
                {"train": "train", "valid": "validation", "test": "test"}, True),
    # lm1b ships train and test only; its test split doubles as validation.
    "lm1b": ("dvruette/lm1b", None, {"train": "train", "valid": "test"}, True),  # local copy: lm1b_corpus
}
HUB_ALIASES = {"wikitext-2-raw-v1": "wikitext-2", "wikitext-103-raw-v1": "wikitext-103",
               "wikitext2": "wikitext-2", "wikitext103": "wikitext-103"}
LOCAL_HINT = "pass local text with --train-file/--valid-file (.txt, .jsonl with a \"text\" field, .gz)"


@dataclass
class Corpus:
    streams: dict[str, Callable[[], Iterator[list[str]]]]
    carve: dict[str, list[tuple[str, float]]]
    identity: dict
    sample_stream: str = "train"
    required: tuple[str, ...] = ("train", "valid")
    description: str = ""
    size_bytes: int | None = None   # None when unknown (hub streams)

    @property
    def key(self) -> str:
        return hashlib.sha256(repr(sorted(self.identity.items())).encode()).hexdigest()


def _lines_of(texts) -> list[str]:
    """The lines of ``texts`` as written, blank ones and indentation included, without their line breaks
    (universal newlines, as Python and ``datasets`` read text): the ``text`` tokenization sees the text
    itself, and the ``lines`` one strips and skips what it never saw (``tokenizers._stripped_lines``)."""
    out = []
    for t in texts:
        if t is None:
            continue
        parts = t.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        if t.endswith(("\n", "\r")):
            parts.pop()  # the break ends the last line; it starts no new one
        out.extend(parts)
    return out


# ----------------------------------------------------------------------------- default corpus
def default_corpus_text() -> list[str]:
    """The embedded corpus: Python's own documentation topics, in sorted-key order."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def default_corpus() -> Corpus:
    def stream():
        lines = _lines_of(default_corpus_text())
        for i in range(0, len(lines), BATCH_LINES):
            yield lines[i:i + BATCH_LINES]

    digest = hashlib.sha256("\x00".join(default_corpus_text()).encode()).hexdigest()
    return Corpus(
        streams={"all": stream},
        carve={"all": [("train", 0.90), ("valid", 0.05), ("test", 0.05)]},
        identity={"source": "pydoc_data.topics", "sha256": digest,
                  "python": f"{sys.version_info[0]}.{sys.version_info[1]}"},
        sample_stream="all",
        description="embedded default corpus (pydoc_data.topics)",
        size_bytes=sum(len(t) for t in default_corpus_text()),
    )


# ----------------------------------------------------------------------------- local files
def _kind(path: str) -> str:
    name = path[:-3] if path.endswith(".gz") else path
    return "json" if name.endswith((".jsonl", ".json")) else "text"


def resolve_files(patterns: list[str] | str) -> list[str]:
    """Expand paths and globs, in order, failing on anything missing or unreadable."""
    if isinstance(patterns, str):
        patterns = [patterns]
    files: list[str] = []
    for pat in patterns:
        pat = os.path.expanduser(str(pat))
        matches = sorted(glob.glob(pat)) if glob.has_magic(pat) else [pat]
        if not matches:
            raise DataError(f"no file matches {pat!r}; check the path or glob")
        for m in matches:
            if os.path.isdir(m):
                raise DataError(f"{m} is a directory; pass the text files inside it (a glob works)")
            if not os.path.exists(m):
                raise DataError(f"file not found: {m}; check the path")
            if not os.path.isfile(m):  # a FIFO or a device would block a read, or never end
                raise DataError(f"{m} is not a regular file (a pipe, socket or device); pass a file on disk")
            if not os.access(m, os.R_OK):
                raise DataError(f"cannot read {m} (permission denied); fix its permissions")
            files.append(os.path.abspath(m))
    return files


def check_text_file(path: str, probe: int = 1 << 16) -> None:
    """Reject binary and non-UTF-8 files up front, before any tokenizer sees them."""
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            head = f.read(probe)
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read {path} ({exc.__class__.__name__}: {exc}); "
                        "pass a readable UTF-8 text file") from None
    if b"\x00" in head:
        raise DataError(f"{path} looks binary (it contains NUL bytes); pass UTF-8 text files")
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text (bad byte at offset {exc.start}); "
                        "convert it to UTF-8 first") from None


def sources_identity(files: list[str]) -> list[dict]:
    """Content hashes of the inputs: a changed file changes the cache key, a touched one does not."""
    return [{"path": f, "size": os.path.getsize(f), "sha256": _cached_sha(f)} for f in files]


_SHA_MEMO: dict[tuple, str] = {}


def _cached_sha(path: str) -> str:
    from megatie.data.tokenizers import file_sha256

    st = os.stat(path)
    key = (path, st.st_size, st.st_mtime_ns)
    if key not in _SHA_MEMO:
        _SHA_MEMO[key] = file_sha256(path)
    return _SHA_MEMO[key]


def file_line_stream(files: list[str]) -> Callable[[], Iterator[list[str]]]:
    """Batches of lines read through ``datasets``' text/json builders, streamed (``_lines_of``)."""

    def stream():
        import datasets

        for path in files:
            kind = _kind(path)
            try:
                ds = datasets.load_dataset(kind, data_files=[path], split="train", streaming=True)
                for batch in ds.iter(batch_size=BATCH_LINES):
                    if kind == "json" and "text" not in batch:
                        raise DataError(f"{path} has no \"text\" field; JSON lines need "
                                        "{\"text\": ...} records")
                    lines = _lines_of(batch["text"])
                    if lines:
                        yield lines
            except DataError:
                raise
            except Exception as exc:  # decoding/parsing errors surface from deep inside datasets
                chain, e = [], exc
                while e is not None and len(chain) < 8:
                    chain.append(e)
                    e = e.__cause__ or e.__context__
                if any(isinstance(c, UnicodeDecodeError) for c in chain):
                    raise DataError(f"{path} is not UTF-8 text; convert it to UTF-8 first") from None
                raise DataError(f"cannot parse {path} as {'JSON lines' if kind == 'json' else 'text'} "
                                f"({exc.__class__.__name__}); check the file format") from None

    # Uncompressed text can also be cut into byte ranges that tokenizer workers read
    # themselves (see shards.py); the line semantics are those of ``read_range``.
    if all(_kind(p) == "text" and not p.endswith(".gz") for p in files):
        stream.plain_files = list(files)
    return stream


def byte_ranges(files: list[str], size: int = 4 << 20):
    """(path, start, end) pieces of ~``size`` bytes, each ending just after a newline."""
    for path in files:
        total = os.path.getsize(path)
        with open(path, "rb") as f:
            start = 0
            while start < total:
                f.seek(min(total, start + size))
                f.readline()
                end = min(total, f.tell())
                yield path, start, end
                start = end


def read_range(path: str, start: int, end: int) -> list[str]:
    """The lines of a byte range, exactly as the datasets path yields them (``_lines_of``)."""
    with open(path, "rb") as f:
        f.seek(start)
        raw = f.read(end - start)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text (bad byte at offset {start + exc.start}); "
                        "convert it to UTF-8 first") from None
    return _lines_of([text])


def file_corpus(train_files, valid_files=None, holdout_fraction: float = 0.05) -> Corpus:
    train = resolve_files(train_files)
    valid = resolve_files(valid_files) if valid_files else []
    for f in train + valid:
        check_text_file(f)
    ident = {"train": sources_identity(train), "valid": sources_identity(valid)}
    size = sum(os.path.getsize(f) * (4 if f.endswith(".gz") else 1) for f in train + valid)
    if valid:
        return Corpus(streams={"train": file_line_stream(train), "valid": file_line_stream(valid)},
                      carve={"train": [("train", 1.0)], "valid": [("valid", 1.0)]},
                      identity=ident, description=f"{len(train)} train / {len(valid)} valid files",
                      size_bytes=size)
    if not 0.0 < holdout_fraction < 1.0:
        raise DataError(f"holdout fraction must be in (0, 1), got {holdout_fraction}; "
                        "or pass --valid-file")
    ident["holdout"] = holdout_fraction
    return Corpus(streams={"train": file_line_stream(train)},
                  carve={"train": [("train", 1.0 - holdout_fraction), ("valid", holdout_fraction)]},
                  identity=ident, description=f"{len(train)} train files, last "
                  f"{holdout_fraction:.0%} held out", size_bytes=size)


# ----------------------------------------------------------------------------- hub datasets
def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False") or \
            os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _hub_cached(repo: str) -> bool:
    """Whether the datasets cache plausibly holds ``repo`` (so offline loading can work)."""
    home = Path(os.environ.get("HF_DATASETS_CACHE") or
                Path(os.environ.get("HF_HOME", "~/.cache/huggingface")).expanduser() / "datasets")
    hub = Path(os.environ.get("HF_HUB_CACHE") or
               Path(os.environ.get("HF_HOME", "~/.cache/huggingface")).expanduser() / "hub")
    flat = repo.replace("/", "___")
    return any(p.exists() for p in (home / flat, hub / ("datasets--" + repo.replace("/", "--"))))


def hub_corpus(name: str) -> Corpus:
    key = HUB_ALIASES.get(name, name)
    if key not in HUB_DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of "
                        f"{', '.join(sorted(HUB_DATASETS))} or {LOCAL_HINT}")
    repo, config, splits, streaming = HUB_DATASETS[key]
    if not _hub_cached(repo) and not _hub_reachable():
        raise DataError(f"dataset {name!r} needs the Hugging Face hub, which is unreachable "
                        f"(offline) and it is not cached locally; {LOCAL_HINT}")

    def make(hub_split):
        def stream():
            import datasets

            try:
                ds = datasets.load_dataset(repo, config, split=hub_split, streaming=streaming)
                for batch in ds.iter(batch_size=BATCH_LINES):
                    lines = _lines_of(batch["text"])
                    if lines:
                        yield lines
            except Exception as exc:
                raise DataError(f"cannot load dataset {name!r} split {hub_split!r} "
                                f"({exc.__class__.__name__}); check the network or {LOCAL_HINT}") from None
        return stream

    return Corpus(streams={ours: make(theirs) for ours, theirs in splits.items()},
                  carve={ours: [(ours, 1.0)] for ours in splits},
                  identity={"hub": repo, "config": config, "splits": sorted(splits.items())},
                  description=f"hub dataset {repo} {config or ''}".strip())


# ----------------------------------------------------------------------------- One Billion Word, local
LM1B_TRAIN = "training-monolingual.tokenized.shuffled"
LM1B_HELDOUT = "heldout-monolingual.tokenized.shuffled"
LM1B_HINT = "pass the extracted 1-billion-word-language-modeling-benchmark-r13output directory"


def lm1b_corpus(dataset_dir) -> Corpus:
    """The One Billion Word Benchmark as its release lays it out: one sentence per line in
    ``training-monolingual.tokenized.shuffled/news.en-000NN-of-00100`` (training) and the first held-out
    file, ``heldout-monolingual.tokenized.shuffled/news.en.heldout-00000-of-00050``, as validation (as is
    usual; the other 49 held-out files are left for testing)."""
    root = Path(os.path.expanduser(str(dataset_dir))).absolute()
    if not root.is_dir():
        raise DataError(f"--dataset-dir {root} is not a directory; {LM1B_HINT}")
    train = sorted(glob.glob(str(root / LM1B_TRAIN / "news.en-[0-9][0-9][0-9][0-9][0-9]-of-00100")))
    if not train:
        raise DataError(f"{root} holds no training text ({LM1B_TRAIN}/news.en-000NN-of-00100); {LM1B_HINT}")
    valid = root / LM1B_HELDOUT / "news.en.heldout-00000-of-00050"
    if not valid.is_file():
        raise DataError(f"{root} has no {LM1B_HELDOUT}/{valid.name} (the validation file); {LM1B_HINT}")
    corpus = file_corpus(train, [str(valid)])
    corpus.description = f"One Billion Word Benchmark at {root}: {len(train)} training files, heldout-00000 as valid"
    return corpus


def make_corpus(train_files=None, valid_files=None, dataset=None,
                holdout_fraction: float = 0.05, dataset_dir=None) -> Corpus:
    if dataset and train_files:
        raise DataError("pass either --dataset or --train-file, not both")
    if valid_files and not train_files:
        raise DataError("--valid-file needs --train-file")
    if dataset_dir is not None:
        if HUB_ALIASES.get(dataset, dataset) != "lm1b":
            raise DataError("--dataset-dir reads the One Billion Word Benchmark's own layout: use it with "
                            "--dataset lm1b (other local text: --train-file)")
        return lm1b_corpus(dataset_dir)
    if dataset:
        return hub_corpus(dataset)
    if train_files:
        return file_corpus(train_files, valid_files, holdout_fraction)
    return default_corpus()


def sample_lines(corpus: Corpus, max_bytes: int = 8 << 20) -> list[str]:
    """The first ``max_bytes`` of the sampled stream: the SentencePiece training sample."""
    out, n = [], 0
    stream = corpus.streams[corpus.sample_stream]
    files = getattr(stream, "plain_files", None)
    # Same lines either way; direct reads skip datasets' start-up cost on the cache-hit path.
    batches = (read_range(*r) for r in byte_ranges(files, 1 << 20)) if files else stream()
    for batch in batches:
        for line in batch:
            line = line.strip()  # the tokenizer normalises whitespace: blank lines teach it nothing
            if not line:
                continue
            out.append(line)
            n += len(line) + 1
            if n >= max_bytes:
                return out
    return out
