"""Tokenizers: SentencePiece trained on a corpus sample, GPT-2 byte-level BPE, or a local one.

Every tokenizer exposes the same small surface (``encode``, ``decode``, ``encode_lines``,
``vocab_size``, ``name`` and special ids) so the shard writer and the loaders never care
which kind they hold. ``spec()`` returns a picklable description that worker processes use
to rebuild the tokenizer, because SentencePiece processors and fast tokenizers are cheaper
to reload than to ship through a pipe.

How text becomes ids is one of two *tokenizations*, recorded with every prepared directory, run and
export (``tokenization.json``; a directory without one is ``lines``):

- ``text`` (every new run): the text as written, blank lines and indentation included, with each line
  break a token the tokenizer itself emits - SentencePiece's byte piece ``<0x0A>`` (each line is
  normalised on its own, as the exported fast tokenizer does between line breaks), byte-level BPE's own
  newline tokens (a batch of lines is encoded as one text). ``AutoTokenizer`` on an export therefore
  gives the ids training saw, and ``</s>`` stays free to mean the end of a document.
- ``lines`` (runs made before): each stripped, non-empty line encoded alone and followed by EOS
  (SentencePiece) or the newline token (BPE). Kept so that old runs evaluate and export as they trained.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

from megatie.errors import DataError
from megatie.runtime.trusted_dirs import NO_REMOTE_CODE, refuse_remote_code

# Reserved in every SentencePiece model we train, so the same model serves causal and
# masked LM and an MLM run never has to retrain the tokenizer.
SP_CONTROL_SYMBOLS = ("[MASK]", "[CLS]", "[SEP]")
TOKENIZATIONS = ("text", "lines")
TOKENIZATION_FILE = "tokenization.json"
SP_NEWLINE = "<0x0A>"  # the byte-fallback piece of "\n" (every SentencePiece model megatie trains has it)
GPT2_MISSING = ("GPT-2's tokenizer is not in the local cache; pass --tokenizer sentencepiece "
                "or a local path")


def _stripped_lines(lines: list[str]) -> list[str]:
    """The ``lines`` tokenization's view of raw lines: split as str.splitlines, stripped, blanks dropped."""
    return [part.strip() for line in lines for part in line.splitlines() if part.strip()]


def write_tokenization(directory: str | os.PathLike, tokenization: str) -> None:
    with open(os.path.join(directory, TOKENIZATION_FILE), "w") as f:
        json.dump({"tokenization": tokenization}, f)


def read_tokenization(directory: str | os.PathLike) -> str:
    """The tokenization a run, export or prepared tokenizer directory records (``lines`` if none: older)."""
    path = os.path.join(directory, TOKENIZATION_FILE)
    if not os.path.isfile(path):
        return "lines"
    try:
        with open(path) as f:
            value = json.loads(f.read(4096)).get("tokenization")
    except (OSError, ValueError, AttributeError):
        value = None
    if value not in TOKENIZATIONS:
        raise DataError(f"{path} is damaged: it names no tokenization of {TOKENIZATIONS}")
    return value


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


class SentencePieceTokenizer:
    kind = "sentencepiece"

    def __init__(self, model_file: str | os.PathLike, tokenization: str = "text"):
        import sentencepiece as spm

        self.model_file = str(model_file)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=self.model_file)
        except (OSError, RuntimeError) as exc:
            raise DataError(f"cannot load SentencePiece model {self.model_file} ({exc}); "
                            "pass a valid .model file or --tokenizer sentencepiece") from None
        self.vocab_size = int(self.sp.get_piece_size())
        self.sha256 = file_sha256(self.model_file)
        self.name = f"sentencepiece-{self.vocab_size}-{self.sha256[:16]}"
        self.eos_id = int(self.sp.eos_id())
        self.bos_id = int(self.sp.bos_id())
        self.pad_id = int(self.sp.pad_id())
        self.unk_id = int(self.sp.unk_id())
        ids = {s: int(self.sp.piece_to_id(s)) for s in SP_CONTROL_SYMBOLS}
        # piece_to_id returns unk for pieces a foreign model lacks.
        ids = {s: (i if i != self.unk_id else None) for s, i in ids.items()}
        self.mask_id, self.cls_id, self.sep_id = ids["[MASK]"], ids["[CLS]"], ids["[SEP]"]
        # SentencePiece's whitespace normalisation erases line breaks, so each line is encoded alone and
        # followed by a line-end id: the newline's byte piece (text), or EOS in runs made before (lines).
        # A foreign model without byte pieces can only be used the old way.
        newline = int(self.sp.piece_to_id(SP_NEWLINE))
        self.newline_id = newline if newline != self.unk_id and self.sp.is_byte(newline) else None
        self.tokenization = tokenization if self.newline_id is not None else "lines"
        if self.tokenization == "text":
            self.line_end_ids = [self.newline_id]
        else:
            self.line_end_ids = [self.eos_id] if self.eos_id >= 0 else []
        # Written in a text, a special piece ("</s>", "<unk>", "[MASK]") is that token, as in every
        # transformers tokenizer (the export's included), and the text on either side is normalised alone.
        self.special_pieces = {self.sp.id_to_piece(i): i for i in range(self.vocab_size)
                               if self.sp.is_control(i) or self.sp.is_unknown(i)}
        self._specials = (re.compile("|".join(re.escape(p) for p in sorted(self.special_pieces, key=len, reverse=True)))
                          if self.special_pieces else None)

    def encode(self, text: str) -> list[int]:
        if self.tokenization == "text":  # as the exported tokenizer: line by line
            return [i for row in self.encode_lines(text.split("\n")) for i in row][:-1]
        return self.sp.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        if self.tokenization != "text":
            return self.sp.decode(ids)
        # Each line was normalised alone: decoded alone, as the exported tokenizer decodes, without its
        # special tokens (as transformers' text-generation pipeline shows them).
        special = set(self.special_pieces.values())
        lines, line = [], []
        for i in ids:
            if i == self.newline_id:
                lines.append(self.sp.decode(line))
                line = []
            elif i not in special:
                line.append(i)
        return "\n".join(lines + [self.sp.decode(line)])

    def encode_lines(self, lines: list[str], num_threads: int | None = None) -> list[list[int]]:
        """Ids of raw lines (without their line breaks), each followed by the line end."""
        if self.tokenization == "lines":
            lines = _stripped_lines(lines)
        # Worker processes pass num_threads=1: the parallelism is already one process per core.
        out = self.sp.encode(lines) if num_threads is None else self.sp.encode(lines, num_threads=num_threads)
        if self.tokenization == "text" and self._specials is not None:
            for k, line in enumerate(lines):
                if self._specials.search(line):  # rare: such lines again, cut at their special pieces
                    out[k] = self._encode_around_specials(line)
        end = self.line_end_ids
        for ids in out:
            ids.extend(end)
        return out

    def _encode_around_specials(self, line: str) -> list[int]:
        ids, start = [], 0
        for match in self._specials.finditer(line):
            ids += self.sp.encode(line[start:match.start()])
            ids.append(self.special_pieces[match.group()])
            start = match.end()
        return ids + self.sp.encode(line[start:])

    @property
    def special_ids(self) -> list[int]:
        ids = [self.eos_id, self.bos_id, self.pad_id, self.unk_id,
               self.mask_id, self.cls_id, self.sep_id]
        return sorted({i for i in ids if i is not None and i >= 0})

    def spec(self) -> dict:
        return {"kind": self.kind, "path": self.model_file, "tokenization": self.tokenization}

    def save(self, directory: str | os.PathLike) -> None:
        shutil.copyfile(self.model_file, os.path.join(directory, "tokenizer.model"))
        write_tokenization(directory, self.tokenization)


class HFTokenizer:
    """A transformers tokenizer loaded strictly from local files (GPT-2 or a local dir)."""

    kind = "hf"

    def __init__(self, name_or_path: str, tokenization: str = "text"):
        from transformers import AutoTokenizer

        self.name_or_path, self.tokenization = name_or_path, tokenization
        if os.path.isdir(name_or_path):
            refuse_remote_code(name_or_path)
        try:
            self.tok = AutoTokenizer.from_pretrained(name_or_path, local_files_only=True, **NO_REMOTE_CODE)
        except Exception:  # OSError, ValueError, EnvironmentError depending on the version
            if name_or_path == "gpt2":
                raise DataError(GPT2_MISSING) from None
            raise DataError(f"cannot load a tokenizer from {name_or_path}; pass a directory "
                            "with tokenizer.json / vocab files, a .model file, or "
                            "--tokenizer sentencepiece") from None
        self.vocab_size = int(len(self.tok))
        self.eos_id = self.tok.eos_token_id
        self.bos_id = self.tok.bos_token_id
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos_id
        self.unk_id = self.tok.unk_token_id
        self.mask_id = self.tok.mask_token_id
        self.cls_id = self.tok.cls_token_id
        self.sep_id = self.tok.sep_token_id
        if name_or_path == "gpt2":
            self.name = f"gpt2-{self.vocab_size}"
        else:
            h = hashlib.sha256()
            for f in sorted(Path(name_or_path).glob("*")):
                if f.is_file() and f.suffix in (".json", ".txt", ".model", ".merges") and f.name != TOKENIZATION_FILE:
                    h.update(f.name.encode())
                    h.update(file_sha256(f).encode())
            self.name = f"hf-{Path(name_or_path).name}-{self.vocab_size}-{h.hexdigest()[:16]}"
        # (lines) Byte-level BPE keeps the newline itself, which is the faithful line break.
        nl = self.tok.encode("\n", add_special_tokens=False)
        self.line_end_ids = nl if len(nl) == 1 else ([self.eos_id] if self.eos_id is not None else [])

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([int(i) for i in ids])

    def encode_lines(self, lines: list[str], num_threads: int | None = None) -> list[list[int]]:
        """Ids of raw lines (without their line breaks), each followed by the line end."""
        if self.tokenization == "text":
            # One text, so that runs of blank lines and spaces merge as they do in any document the
            # tokenizer is given (encoding lines one by one would split them).
            return [self.encode("".join(f"{line}\n" for line in lines))]
        out = self.tok(_stripped_lines(lines), add_special_tokens=False)["input_ids"]
        end = self.line_end_ids
        for ids in out:
            ids.extend(end)
        return out

    @property
    def special_ids(self) -> list[int]:
        return sorted(set(int(i) for i in self.tok.all_special_ids))

    def spec(self) -> dict:
        return {"kind": self.kind, "path": self.name_or_path, "tokenization": self.tokenization}

    def save(self, directory: str | os.PathLike) -> None:
        self.tok.save_pretrained(str(directory))
        write_tokenization(directory, self.tokenization)


def load_tokenizer(spec: dict):
    """Rebuild a tokenizer from ``spec()`` (used by worker processes and prepared dirs)."""
    tokenization = spec.get("tokenization", "lines")  # prepared before tokenizations were recorded
    if tokenization not in TOKENIZATIONS:
        raise DataError(f"unknown tokenization {tokenization!r} for {spec['path']}; expected one of {TOKENIZATIONS}")
    if spec["kind"] == "sentencepiece":
        return SentencePieceTokenizer(spec["path"], tokenization)
    return HFTokenizer(spec["path"], tokenization)


def resolve_tokenizer(name: str):
    """A ready tokenizer for 'gpt2' or a local path; None for 'sentencepiece' (needs training)."""
    if name == "sentencepiece":
        return None
    if name == "gpt2":
        return HFTokenizer("gpt2")
    p = Path(os.path.expanduser(name))
    if p.is_file() and p.suffix == ".model":
        return SentencePieceTokenizer(p)
    if p.is_dir():
        models = sorted(p.glob("*.model"))
        if not any((p / f).exists() for f in ("tokenizer.json", "vocab.json", "tokenizer_config.json")) and models:
            return SentencePieceTokenizer(models[0])
        return HFTokenizer(str(p))
    raise DataError(f"unknown tokenizer {name!r}; use 'sentencepiece', 'gpt2', a local tokenizer "
                    "directory or a SentencePiece .model file")


SP_MAX_SENTENCE_BYTES = 4192  # SentencePiece's max_sentence_length: a longer sentence is left out of training
_CUT_CHARS = SP_MAX_SENTENCE_BYTES // 4  # at most 4 bytes a character in UTF-8


def _sentences(lines):
    """Lines as SentencePiece can train on them: longer ones cut at spaces into pieces it keeps (a corpus
    of one long line - a file without line breaks - would otherwise leave it nothing to learn from)."""
    for line in lines:
        if len(line.encode("utf-8")) <= SP_MAX_SENTENCE_BYTES:
            yield line
            continue
        piece = ""
        for word in line.split(" "):
            while len(word) > _CUT_CHARS:  # a "word" longer than a piece: cut it as it comes
                if piece:
                    yield piece
                    piece = ""
                yield word[:_CUT_CHARS]
                word = word[_CUT_CHARS:]
            if piece and len(piece) + 1 + len(word) > _CUT_CHARS:
                yield piece
                piece = word
            else:
                piece = f"{piece} {word}" if piece else word
        if piece:
            yield piece


def _verify_trained(model: Path, vocab_size: int) -> None:
    """A model enters the cache only if it loads whole: SentencePiece does not report a failed write (a
    full disk, a file-size limit), and a truncated model in the cache would break every later run."""
    import sentencepiece as spm

    try:
        pieces = spm.SentencePieceProcessor(model_file=str(model)).get_piece_size()
    except (OSError, RuntimeError):
        pieces = None
    if pieces != vocab_size:
        raise DataError(f"the trained tokenizer could not be written whole to {model.parent.parent} (is the disk "
                        "full, or a file-size limit set?); nothing was cached") from None


def train_sentencepiece(sample_lines: list[str], vocab_size: int, cache_dir: str | os.PathLike,
                        num_threads: int | None = None) -> SentencePieceTokenizer:
    """Train (or fetch from cache) a unigram SentencePiece model on ``sample_lines``.

    The cache key is the sample's content hash and the vocabulary size, so an unchanged
    corpus never retrains. The model is trained in a temporary directory and renamed into
    place, so a killed run never leaves a truncated model that looks usable.
    """
    import sentencepiece as spm

    h, long_lines = hashlib.sha256(), False
    for line in sample_lines:
        data = line.encode("utf-8")
        h.update(data)
        h.update(b"\n")
        long_lines = long_lines or len(data) > SP_MAX_SENTENCE_BYTES
    # Lines SentencePiece would drop are cut for it; their models get a key of their own.
    key = f"sp-{vocab_size}-{h.hexdigest()[:24]}" + ("-cut" if long_lines else "") + "-noprefix"
    if long_lines:
        sample_lines = list(_sentences(sample_lines))
    root = Path(os.path.expanduser(cache_dir)) / "tokenizers"
    final = root / key
    model = final / "spm.model"
    if model.is_file():
        return SentencePieceTokenizer(model)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=root))
    try:
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(sample_lines),
                model_prefix=str(tmp / "spm"),
                vocab_size=vocab_size,
                model_type="unigram",
                character_coverage=0.9995,
                # Sampling bounds training time on large corpora; the unigram EM cost grows
                # with the sentence count, not with the corpus we later encode.
                input_sentence_size=300_000,
                shuffle_input_sentence=True,
                num_threads=num_threads or max(1, os.cpu_count() or 1),
                unk_id=0, bos_id=1, eos_id=2, pad_id=3,
                control_symbols=list(SP_CONTROL_SYMBOLS),
                byte_fallback=True,
                # No "▁" before a line's first word: a text's pieces then do not depend on where a call to
                # the tokenizer starts, so a continuation decodes with its leading space (and a line's
                # first word is spelt as in a document, where the line break is a token of its own).
                add_dummy_prefix=False,
                minloglevel=2,
            )
        except RuntimeError as exc:
            text = str(exc)
            m = re.search(r"Vocabulary size is smaller than required_chars\. \d+ vs (\d+)", text)
            if m:  # byte fallback alone needs 256 pieces, plus every distinct character
                raise DataError(f"--vocab-size {vocab_size} is too small for this corpus: SentencePiece needs at "
                                f"least {m.group(1)} pieces") from None
            msg = text.splitlines()[-1][:200] if text else "training failed"
            raise DataError(f"SentencePiece could not train a {vocab_size}-piece vocabulary on this "
                            f"corpus ({msg}); pass a smaller --vocab-size or more text") from None
        _verify_trained(tmp / "spm.model", vocab_size)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process won the race; its model is as good as ours.
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return SentencePieceTokenizer(model)
