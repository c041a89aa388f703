"""A run's tokenizer as a standard Hugging Face fast tokenizer.

megatie trains a unigram SentencePiece model with byte fallback. The ``tokenizers`` pipeline is built
from the model's own normaliser settings (its precompiled character map, whitespace stripped and
collapsed, the "▁" word-boundary marker with or without a dummy prefix) around a unigram model with
byte fallback and a decoder that turns byte pieces back into text. Ids then equal SentencePiece's except
where two segmentations score exactly the same and the two libraries' float arithmetic breaks the tie
differently (seen only in long runs of one punctuation character); ``tokenizer.model`` is kept next to
``tokenizer.json`` for anyone who needs SentencePiece's exact ids, and megatie's own evaluation uses it.

In the ``text`` tokenization (``megatie.data.tokenizers``) a line break is the byte piece ``<0x0A>`` and
every line was normalised on its own. The fast tokenizer does the same: ``"\n"`` is an added token
(split off before normalisation, so each line is normalised alone) that owns the byte piece's id.
"""

from __future__ import annotations

import os
import shutil

from megatie.data.tokenizers import SP_NEWLINE, read_tokenization, write_tokenization
from megatie.errors import CheckpointError
from megatie.runtime.trusted_dirs import NO_REMOTE_CODE, refuse_remote_code

SP_FILE = "tokenizer.model"


def fast_from_sentencepiece(model_file: str, tokenization: str = "lines"):
    import sentencepiece as spm
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    try:
        sp = spm.SentencePieceProcessor(model_file=model_file)
    except (OSError, RuntimeError) as e:
        raise CheckpointError(f"{model_file} is not a SentencePiece model ({str(e).splitlines()[0][:120]}); "
                              "the run's tokenizer is damaged") from None
    backend = _backend(sp, model_file, text=tokenization == "text")
    piece = sp.id_to_piece
    specials = {"unk_token": piece(sp.unk_id())}
    for key, token_id in (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()), ("pad_token", sp.pad_id())):
        if token_id >= 0:
            specials[key] = piece(token_id)
    controls = [piece(i) for i in range(sp.get_piece_size()) if sp.is_control(i) and i not in
                (sp.bos_id(), sp.eos_id(), sp.pad_id())]
    # The masked-LM symbols every megatie SentencePiece model reserves, named so that transformers'
    # fill-mask pipeline finds them.
    for key, symbol in (("mask_token", "[MASK]"), ("cls_token", "[CLS]"), ("sep_token", "[SEP]")):
        if symbol in controls:
            specials[key] = symbol
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, additional_special_tokens=controls, **specials)
    if tokenization == "text":
        fast.add_tokens([AddedToken("\n", normalized=False, special=False)])
        if fast.convert_tokens_to_ids("\n") != sp.piece_to_id(SP_NEWLINE):
            raise CheckpointError(f"{model_file}: the line break did not keep its piece's id; cannot export")
    return fast


def _unigram(sp, rename: dict[int, str] | None = None):
    from tokenizers import models

    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    for i, piece in (rename or {}).items():
        vocab[i] = (piece, vocab[i][1])
    return models.Unigram(vocab, unk_id=sp.unk_id(), byte_fallback=True)


def _backend(sp, model_file: str, text: bool):
    """The fast pipeline, built from the model's own normaliser settings. In the ``text`` tokenization a
    line break is split off first (an added token, set by the caller), so each line is normalised alone -
    its characters mapped, its spaces stripped at both ends and collapsed - as SentencePiece normalised it
    in training. Models megatie trains have no dummy prefix, so a continuation decodes with the space it
    starts with; a model that has one (runs made before) gets it on every line and loses it on decoding."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from transformers.convert_slow_tokenizer import import_protobuf

    proto = import_protobuf().ModelProto()
    with open(model_file, "rb") as f:
        proto.ParseFromString(f.read())
    spec = proto.normalizer_spec
    steps = [normalizers.Precompiled(spec.precompiled_charsmap)] if spec.precompiled_charsmap else []
    if spec.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    backend = Tokenizer(_unigram(sp, {sp.piece_to_id(SP_NEWLINE): "\n"} if text else None))
    backend.normalizer = normalizers.Sequence(steps)
    # "always", not "first": "first" skips the prefix where normalising stripped the text's leading spaces.
    prefix = "always" if spec.add_dummy_prefix else "never"
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prefix, split=True)
    decode = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if spec.add_dummy_prefix:
        decode.append(decoders.Strip(content=" ", left=1, right=0))
        if text:
            decode.append(decoders.Replace("\n ", "\n"))
    backend.decoder = decoders.Sequence(decode)
    return backend


def export_tokenizer(tokenizer_dir: str, out_dir: str, context: int) -> dict[str, int]:
    """Write the run's tokenizer into ``out_dir``, for inputs of up to ``context`` tokens; returns the
    special ids for the model config."""
    from transformers import AutoTokenizer

    sp_model = os.path.join(tokenizer_dir, SP_FILE)
    tokenization = read_tokenization(tokenizer_dir)
    if os.path.isfile(sp_model):
        tokenizer = fast_from_sentencepiece(sp_model, tokenization)
        shutil.copyfile(sp_model, os.path.join(out_dir, SP_FILE))
    elif os.path.isdir(tokenizer_dir) and os.listdir(tokenizer_dir):
        refuse_remote_code(tokenizer_dir)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True, **NO_REMOTE_CODE)
    else:
        raise CheckpointError(f"{os.path.dirname(tokenizer_dir)!r} holds no tokenizer/ (runs save theirs there); "
                              "without it the model's ids have no text")
    tokenizer.model_max_length = context
    tokenizer.save_pretrained(out_dir)
    write_tokenization(out_dir, tokenization)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    return {k: v for k, v in ids.items() if v is not None}
