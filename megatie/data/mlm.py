"""BERT-style masking for encoder models: 15% of tokens chosen, of which 80% become
[MASK], 10% a random token and 10% stay unchanged; labels are -100 everywhere else."""
from __future__ import annotations

import torch

from megatie.errors import DataError


class MLMCollator:
    def __init__(self, tokenizer_or_mask_id, vocab_size: int | None = None,
                 mlm_probability: float = 0.15, special_ids=(), generator: torch.Generator | None = None):
        if isinstance(tokenizer_or_mask_id, int):
            mask_id = tokenizer_or_mask_id
        else:
            tok = tokenizer_or_mask_id
            mask_id = getattr(tok, "mask_id", None)
            vocab_size = vocab_size or tok.vocab_size
            special_ids = tuple(special_ids) or tuple(getattr(tok, "special_ids", ()))
        if mask_id is None:
            raise DataError("this tokenizer has no mask token; use --tokenizer sentencepiece for "
                            "masked-LM training")
        if vocab_size is None:
            raise DataError("MLMCollator needs vocab_size when given a mask id")
        if not 0.0 < mlm_probability < 1.0:
            raise DataError(f"mlm probability must be in (0, 1), got {mlm_probability}")
        self.mask_id, self.vocab_size, self.p = int(mask_id), int(vocab_size), mlm_probability
        self.special_ids = torch.tensor(sorted(set(int(i) for i in special_ids) | {self.mask_id}),
                                        dtype=torch.long)
        self.generator = generator
        # Random replacements avoid special ids so the model never learns to emit them.
        allowed = torch.ones(self.vocab_size, dtype=torch.bool)
        allowed[self.special_ids[self.special_ids < self.vocab_size]] = False
        self.replacement_ids = allowed.nonzero().squeeze(1)

    def __call__(self, input_ids: torch.Tensor):
        g = self.generator
        labels = input_ids.clone()
        prob = torch.full(input_ids.shape, self.p)
        prob[torch.isin(input_ids, self.special_ids)] = 0.0
        chosen = torch.bernoulli(prob, generator=g).bool()
        labels[~chosen] = -100
        inputs = input_ids.clone()
        to_mask = torch.bernoulli(torch.full(input_ids.shape, 0.8), generator=g).bool() & chosen
        inputs[to_mask] = self.mask_id
        to_rand = (torch.bernoulli(torch.full(input_ids.shape, 0.5), generator=g).bool()
                   & chosen & ~to_mask)
        pick = torch.randint(len(self.replacement_ids), input_ids.shape, generator=g)
        inputs[to_rand] = self.replacement_ids[pick][to_rand]
        return inputs, labels
