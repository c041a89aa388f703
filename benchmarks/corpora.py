"""Corpora of different styles for comparing tying policies (``reproduce.py --corpora``).

A policy chosen on one corpus is a policy for that corpus; these give the comparison several, each
a real text with its own tokenizer (the launcher trains SentencePiece on each training text):

- ``pydoc``: the Python documentation's topic pages (``pydoc_data.topics``, shipped with every Python;
  reference prose about a programming language);
- ``vim-manual``: Vim's user manual (``usr_*.txt`` of the Vim runtime, where Vim is installed; a
  step-by-step tutorial);
- ``perldiag``: Perl's diagnostic messages explained (``perldiag.pod``, where Perl is installed;
  short explanations of error messages, POD markup);
- any text as ``NAME=TRAIN`` (its last tenth held out for validation) or ``NAME=TRAIN:VALID``, e.g.
  ``wikitext2=wikitext2-valid.txt:wikitext2-test.txt`` (encyclopedia articles).

Each corpus is written once, atomically, as ``<out>/corpora/<name>/{train,valid}.txt``; a held-out
part is the *end* of the text (whole lines), never a sample, so every row and seed sees the same split.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass

HELD_OUT = 0.1


@dataclass
class Corpus:
    name: str
    train: str
    valid: str
    source: str


def _pydoc_lines() -> tuple[list[str], str]:
    from pydoc_data.topics import topics

    return [line for key in sorted(topics) for line in topics[key].splitlines()], "pydoc_data.topics"


def _first_match(patterns: list[str], what: str) -> list[str]:
    for pattern in patterns:
        found = sorted(glob.glob(pattern))
        if found:
            return found
    raise SystemExit(f"error: corpus {what!r} needs {patterns[0]} (not found on this machine); "
                     f"give it as {what}=TRAIN[:VALID] instead")


def _file_lines(paths: list[str]) -> list[str]:
    lines = []
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines += f.read().splitlines()
    return lines


def _vim_lines() -> tuple[list[str], str]:
    paths = _first_match(["/usr/share/vim/vim*/doc/usr_[0-9]*.txt"], "vim-manual")
    # Vim's help tags (*name*, |link|) are markup, not prose: keep the words, drop the bars/stars.
    lines = [re.sub(r"[*|]([^\s*|]+)[*|]", r"\1", line) for line in _file_lines(paths)]
    return lines, f"Vim user manual ({len(paths)} usr_*.txt files of {os.path.basename(os.path.dirname(os.path.dirname(paths[0])))})"


def _perldiag_lines() -> tuple[list[str], str]:
    paths = _first_match(["/usr/share/perl/*/pod/perldiag.pod", "/usr/lib/perl5/*/pod/perldiag.pod"], "perldiag")
    return _file_lines(paths[:1]), f"perldiag.pod of Perl {os.path.basename(os.path.dirname(os.path.dirname(paths[0])))}"


BUILTIN = {"pydoc": _pydoc_lines, "vim-manual": _vim_lines, "perldiag": _perldiag_lines}


def _write(path: str, lines: list[str]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, path)


def split_tail(lines: list[str], held_out: float = HELD_OUT) -> tuple[list[str], list[str]]:
    """The text's end (``held_out`` of its non-empty lines, cut at a line) for validation, the rest for training."""
    text = [line.rstrip() for line in lines]
    kept = [i for i, line in enumerate(text) if line.strip()]
    if len(kept) < 20:
        raise SystemExit(f"error: a corpus needs at least 20 non-empty lines, got {len(kept)}")
    cut = kept[int(len(kept) * (1 - held_out))]
    return text[:cut], text[cut:]


def prepare(spec: str, out_dir: str) -> Corpus:
    """``spec``: a built-in name, ``NAME=TRAIN`` or ``NAME=TRAIN:VALID``."""
    name, _, files = spec.partition("=")
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise SystemExit(f"error: corpus name {name!r}: use letters, digits, '.', '_' or '-'")
    target = os.path.join(out_dir, "corpora", name)
    if files:
        train, _, valid = files.partition(":")
        for path in filter(None, (train, valid)):
            if not os.path.isfile(path):
                raise SystemExit(f"error: corpus {name!r}: no such file {path!r}")
        if valid:
            return Corpus(name, os.path.abspath(train), os.path.abspath(valid),
                          f"{os.path.basename(train)} / {os.path.basename(valid)}")  # no machine paths in reports
        lines, source = _file_lines([train]), os.path.basename(train)
    elif name in BUILTIN:
        lines, source = BUILTIN[name]()
    else:
        raise SystemExit(f"error: unknown corpus {name!r}; built in: {', '.join(BUILTIN)}, or NAME=TRAIN[:VALID]")
    paths = Corpus(name, os.path.join(target, "train.txt"), os.path.join(target, "valid.txt"), source)
    if not (os.path.isfile(paths.train) and os.path.isfile(paths.valid)):
        train_lines, valid_lines = split_tail(lines)
        _write(paths.train, train_lines)
        _write(paths.valid, valid_lines)
    return paths
