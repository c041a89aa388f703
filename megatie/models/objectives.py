"""What a model family learns from: the data it reads, how a raw batch becomes model inputs, its loss and
its validation metrics. One objective per ``ModelSpec.objective``:

- ``causal``: next-token prediction (GPT-2, Llama); perplexity.
- ``masked``: masked-LM (BERT) on sequences cut from the same token shards; perplexity over the masked
  tokens and masked-token accuracy.
- ``image``: classification (ViT); top-1 accuracy, with the perplexity of the label as the loss' scale.

Whatever is random in making inputs (which tokens are masked, how an image is shifted) is drawn from a
generator seeded by (seed, step, micro-batch, rank): a resumed run makes exactly the inputs an unbroken
one would, and every policy of a comparison sees the same ones. Validation inputs are fixed per batch.
"""
from __future__ import annotations

import math

import numpy as np
import torch

_EVAL_STREAM = 104_729  # validation masks: the same for every run, step and policy


def input_generator(*key: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in key])
                                             .generate_state(1, dtype=np.uint64)[0] >> 1))


def model_inputs_on(inputs: dict, model, device) -> dict:
    """``inputs`` on ``device``; floating ones (pixels) in the model's precision, as a bf16/fp16 engine
    holds its weights (token ids and labels stay integers)."""
    dtype = next(model.parameters()).dtype
    return {k: v.to(device, dtype=dtype if v.is_floating_point() else v.dtype, non_blocking=True)
            for k, v in inputs.items()}


class CausalLM:
    name, has_accuracy = "causal", False

    def __init__(self, cfg):
        self.cfg = cfg

    def build_data(self, rank: int, world_size: int, barrier):
        from megatie.data import build_lm_data

        cfg = self.cfg
        data = cfg.data
        self.data = build_lm_data(
            train_files=data.train_files or None, valid_files=data.valid_files or None, dataset=data.dataset,
            dataset_dir=data.dataset_dir, tokenizer=data.tokenizer, vocab_size=cfg.model.vocab_size,
            seq_len=cfg.model.seq_len, cache_dir=data.cache_dir, data_dir=data.data_dir, rank=rank,
            world_size=world_size, barrier=barrier, progress=cfg.run.progress)
        return self.data

    def learnt(self) -> dict:
        """What the data decided (``megatie.config.RunFacts``): the tokenizer's real vocabulary (GPT-2's is
        50257 whatever --vocab-size says)."""
        return {"vocab_size": self.data.vocab_size, "seq_len": self.cfg.model.seq_len,
                "tokenization": self.data.tokenizer.tokenization}

    def save(self, directory: str) -> None:
        self.data.tokenizer.save(directory)

    def train_inputs(self, raw: torch.Tensor, step: int, micro: int, rank: int) -> dict:
        return {"input_ids": raw, "labels": raw}

    def eval_inputs(self, raw: torch.Tensor, index: int) -> dict:
        return {"input_ids": raw, "labels": raw}

    def _predicted(self, inputs: dict) -> int:
        ids = inputs["input_ids"]
        return ids.numel() - ids.shape[0]  # every position but the first

    def _correct(self, logits, inputs) -> int:
        return 0

    @torch.no_grad()
    def evaluate(self, model, batches, device) -> dict:
        """Token-weighted loss over ``batches`` (raw), its perplexity, and accuracy where it applies."""
        total, count, correct = 0.0, 0, 0
        for index, raw in enumerate(batches):
            inputs = model_inputs_on(self.eval_inputs(raw, index), model, device)
            out = model(**inputs)
            n = self._predicted(inputs)
            total += float(out.loss) * n
            count += n
            correct += self._correct(out.logits, inputs)
        loss = total / max(count, 1)
        metrics = {"loss": loss, "ppl": math.exp(min(loss, 80.0))}
        if self.has_accuracy:
            metrics["accuracy"] = correct / max(count, 1)
        return metrics


class MaskedLM(CausalLM):
    name, has_accuracy = "masked", True

    def build_data(self, rank, world_size, barrier):
        data = super().build_data(rank, world_size, barrier)
        self.collator = data.mlm_collator(self.cfg.data.mask_prob)  # refuses a tokenizer without [MASK]
        return data

    def _masked(self, raw, generator) -> dict:
        self.collator.generator = generator
        inputs, labels = self.collator(raw)
        return {"input_ids": inputs, "labels": labels}

    def train_inputs(self, raw, step, micro, rank):
        return self._masked(raw, input_generator(self.cfg.run.seed, step, micro, rank))

    def eval_inputs(self, raw, index):
        return self._masked(raw, input_generator(_EVAL_STREAM, index))

    def _predicted(self, inputs):
        return int((inputs["labels"] != -100).sum())

    def _correct(self, logits, inputs):
        chosen = inputs["labels"] != -100
        return int((logits.argmax(-1)[chosen] == inputs["labels"][chosen]).sum())


class ImageClassification(CausalLM):
    name, has_accuracy = "image", True

    def build_data(self, rank, world_size, barrier):
        from megatie.data.images import load_image_data

        cfg = self.cfg
        # Small enough to hold in memory: every rank reads it itself, no preparation step to share.
        self.data = data = load_image_data(cfg.data.image_dir, cfg.data.dataset, cfg.model.image_size,
                                           cfg.model.patch_size)
        self.mean = torch.tensor(data.mean).view(1, -1, 1, 1)
        self.std = torch.tensor(data.std).view(1, -1, 1, 1)
        return data

    def learnt(self) -> dict:
        """The images' classes, channels and shape; a sequence is the patches + [CLS] (what throughput and
        FLOPs count)."""
        d = self.data
        return {"num_classes": d.num_classes, "num_channels": d.num_channels, "image_size": d.image_size,
                "patch_size": d.patch_size, "seq_len": d.tokens_per_example}

    def save(self, directory: str) -> None:
        self.data.save(directory)

    def _normalised(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() / 255 - self.mean) / self.std

    def train_inputs(self, raw, step, micro, rank):
        images, labels = raw
        if self.data.augment:
            images = augment(images, input_generator(self.cfg.run.seed, step, micro, rank))
        return {"pixel_values": self._normalised(images), "labels": labels}

    def eval_inputs(self, raw, index):
        images, labels = raw
        return {"pixel_values": self._normalised(images), "labels": labels}

    def _predicted(self, inputs):
        return len(inputs["labels"])

    def _correct(self, logits, inputs):
        return int((logits.argmax(-1) == inputs["labels"]).sum())


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The usual augmentation of small natural images: a random crop of the image padded by 1/8 of its
    side (as CIFAR's 4 of 32) and a horizontal flip half of the time."""
    n, _, h, w = images.shape
    pad = max(1, h // 8)
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    flip = torch.rand(n, generator=generator) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


OBJECTIVES = {"causal": CausalLM, "masked": MaskedLM, "image": ImageClassification}


def objective_for(spec, cfg):
    return OBJECTIVES[spec.objective](cfg)
