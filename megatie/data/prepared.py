"""Reading a prepared directory: its meta.json checked key by key, its shards checked for size and
for token ids outside the vocabulary, memory-mapped without copying."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from megatie.data.tokenizers import load_tokenizer
from megatie.errors import DataError

FORMAT = "megatie-tokens/1"
HEAD_TOKENS = 1 << 16   # ids of every shard checked when it is opened (128 KiB); the rest as batches read them


def check_token_ids(path, ids: np.ndarray, vocab_size: int, start: int = 0) -> None:
    """Raise DataError if any id in ``ids`` (tokens of shard ``path`` from position ``start``) is
    ``>= vocab_size``: a shard overwritten or mixed up with another corpus would otherwise surface as
    an index error inside the embedding or, on a GPU, as a device-side assert that names nothing."""
    if len(ids) and int(ids.max()) >= vocab_size:
        at = int(np.argmax(ids >= vocab_size))
        raise DataError(f"shard {path} holds token id {int(ids[at])} at position {start + at}, not below the "
                        f"vocabulary size {vocab_size}; the shard is corrupt: delete its directory and "
                        "prepare again")


def segment_sources(meta: dict, out_dir) -> dict[str, list[tuple[str, int]]]:
    """Per split, ``(shard path, first token)`` of each segment, in ``open_tokens``' order."""
    return {name: [(str(Path(out_dir) / g["file"]), g["offset"]) for g in sp["segments"]]
            for name, sp in meta["splits"].items()}


def read_meta(out_dir: Path) -> dict | None:
    path = Path(out_dir) / "meta.json"
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        raise DataError(f"{path} is unreadable or corrupt; delete {out_dir} and prepare again") from None
    if not isinstance(meta, dict) or "format" not in meta:
        raise DataError(f"{out_dir} is damaged: its meta.json has no 'format'; delete it and prepare again")
    if meta["format"] != FORMAT:
        raise DataError(f"{out_dir} was prepared by an incompatible version ({meta['format']}); "
                        "prepare it again into a new directory")
    _check_meta(meta, out_dir)
    return meta


def _check_meta(meta: dict, out_dir) -> None:
    """Every entry that loading reads, present and of the right type, so a damaged meta.json ends in
    one DataError naming the directory and the key instead of a KeyError deep in the loader."""
    def damaged(what: str) -> DataError:
        return DataError(f"{out_dir} is damaged: its meta.json {what}; delete it and prepare again")

    def need(obj: dict, key: str, kind, where: str = ""):
        if key not in obj:
            raise damaged(f"has no {key!r}{where}")
        value = obj[key]
        ok = (isinstance(value, int) and not isinstance(value, bool) and value >= 0) if kind is int \
            else isinstance(value, kind)
        if not ok:
            name = "a non-negative integer" if kind is int else f"a {kind.__name__}"
            raise damaged(f"has {key!r}{where} = {value!r}, not {name}")
        return value

    if need(meta, "dtype", str) not in ("uint16", "uint32"):
        raise damaged(f"has 'dtype' = {meta['dtype']!r}, not uint16 or uint32")
    need(meta, "vocab_size", int)
    need(meta, "num_tokens", int)
    tok = need(meta, "tokenizer", dict)
    for key in ("kind", "file", "name"):
        need(tok, key, str, " in 'tokenizer'")
    lengths = {}
    for i, shard in enumerate(need(meta, "shards", list)):
        where = f" in shards[{i}]"
        if not isinstance(shard, dict):
            raise damaged(f"has shards[{i}] = {shard!r}, not an object")
        lengths[need(shard, "file", str, where)] = need(shard, "num_tokens", int, where)
    for name, split in need(meta, "splits", dict).items():
        if not isinstance(split, dict):
            raise damaged(f"has splits[{name!r}] = {split!r}, not an object")
        need(split, "num_tokens", int, f" in splits[{name!r}]")
        for j, seg in enumerate(need(split, "segments", list, f" in splits[{name!r}]")):
            where = f" in splits[{name!r}].segments[{j}]"
            if not isinstance(seg, dict):
                raise damaged(f"has {where[4:]} = {seg!r}, not an object")
            file = need(seg, "file", str, where)
            end = need(seg, "offset", int, where) + need(seg, "length", int, where)
            if file not in lengths:
                raise damaged(f"names shard {file!r}{where}, which is not among its shards")
            if end > lengths[file]:
                raise damaged(f"has {where[4:]} ending at token {end}, past the {lengths[file]} tokens "
                              f"of {file}")


def open_tokens(out_dir) -> tuple[dict, object, dict[str, list[np.ndarray]]]:
    """Load a prepared directory: (meta, tokenizer, split -> list of zero-copy memmap views)."""
    out_dir = Path(os.path.expanduser(str(out_dir)))
    meta = read_meta(out_dir)
    if meta is None:
        hint = " (an interrupted preparation leaves no meta.json)" if out_dir.exists() else ""
        raise DataError(f"{out_dir} is not a prepared data directory{hint}; "
                        "run launchers/prepare_data.py --out-dir on it or pass the text instead")
    dtype = np.dtype(meta["dtype"])
    maps = {}
    for s in meta["shards"]:
        path = out_dir / s["file"]
        want = s["num_tokens"] * dtype.itemsize
        try:
            size = path.stat().st_size
        except OSError:
            raise DataError(f"shard {path} is missing; delete {out_dir} and prepare again") from None
        if size != want:
            raise DataError(f"shard {path} has {size} bytes but meta.json says {want}; "
                            f"delete {out_dir} and prepare again")
        maps[s["file"]] = (np.memmap(path, dtype=dtype, mode="r") if want
                           else np.zeros(0, dtype=dtype))
        # The head of each shard now (a shard overwritten from its start fails at once, in constant time
        # per shard); the rest batch by batch as training reads it (SplitTokens), so start-up does not
        # grow with the corpus.
        check_token_ids(path, maps[s["file"]][:HEAD_TOKENS], meta["vocab_size"])
    splits = {name: [maps[g["file"]][g["offset"]:g["offset"] + g["length"]] for g in sp["segments"]]
              for name, sp in meta["splits"].items()}
    t = meta["tokenizer"]
    spec = {"kind": "sentencepiece" if t["kind"] == "sentencepiece" else "hf", "path": str(out_dir / t["file"]),
            "tokenization": t.get("tokenization", "lines")}  # absent: prepared before it was recorded
    tok = load_tokenizer(spec)
    tok.name = t["name"]   # the identity it was prepared with, not the copy's path
    return meta, tok, splits
