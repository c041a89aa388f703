"""A run's tokenizer as a standard Hugging Face fast tokenizer.

megatie trains a unigram SentencePiece model with byte fallback. transformers' converter builds the
matching ``tokenizers`` pipeline (SentencePiece's precompiled normaliser, the "▁" word-boundary
marker) but drops byte fallback, so characters the vocabulary lacks would become ``<unk>`` instead of
their UTF-8 bytes; the unigram model is therefore rebuilt with ``byte_fallback=True`` and a decoder
that turns byte pieces back into text. Ids then equal SentencePiece's except where two segmentations
score exactly the same and the two libraries' float arithmetic breaks the tie differently (seen only
in long runs of one punctuation character); ``tokenizer.model`` is kept next to ``tokenizer.json``
for anyone who needs SentencePiece's exact ids, and megatie's own evaluation uses it.
"""

from __future__ import annotations

import os
import shutil

from megatie.errors import CheckpointError
from megatie.runtime.trusted_dirs import NO_REMOTE_CODE, refuse_remote_code

SP_FILE = "tokenizer.model"


def fast_from_sentencepiece(model_file: str):
    import warnings

    import sentencepiece as spm
    from tokenizers import decoders, models
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SpmConverter

    try:
        sp = spm.SentencePieceProcessor(model_file=model_file)
    except (OSError, RuntimeError) as e:
        raise CheckpointError(f"{model_file} is not a SentencePiece model ({str(e).splitlines()[0][:120]}); "
                              "the run's tokenizer is damaged") from None

    class _Source:  # what the converter reads from a slow tokenizer
        vocab_file = model_file
        legacy = False
        add_prefix_space = True

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the byte-fallback warning: handled below
        backend = SpmConverter(_Source()).converted()
    backend.model = models.Unigram([(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())],
                                   unk_id=sp.unk_id(), byte_fallback=True)
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(content=" ", left=1, right=0)])
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
    return PreTrainedTokenizerFast(tokenizer_object=backend, additional_special_tokens=controls, **specials)


def export_tokenizer(tokenizer_dir: str, out_dir: str) -> dict[str, int]:
    """Write the run's tokenizer into ``out_dir``; returns the special ids for the model config."""
    from transformers import AutoTokenizer

    sp_model = os.path.join(tokenizer_dir, SP_FILE)
    if os.path.isfile(sp_model):
        tokenizer = fast_from_sentencepiece(sp_model)
        shutil.copyfile(sp_model, os.path.join(out_dir, SP_FILE))
    elif os.path.isdir(tokenizer_dir) and os.listdir(tokenizer_dir):
        refuse_remote_code(tokenizer_dir)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True, **NO_REMOTE_CODE)
    else:
        raise CheckpointError(f"{os.path.dirname(tokenizer_dir)!r} holds no tokenizer/ (runs save theirs there); "
                              "without it the model's ids have no text")
    tokenizer.save_pretrained(out_dir)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    return {k: v for k, v in ids.items() if v is not None}
