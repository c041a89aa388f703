"""Labelled images for ViT: scikit-learn's handwritten digits (the offline default), a class-per-directory
folder, or a Hugging Face image dataset; held in memory as uint8 tensors and served by the same exactly
resumable loader as the token shards (``TokenBatchLoader``).

Augmentation and normalisation happen later, per batch, in ``megatie.models.objectives`` (seeded by the step,
so a resumed run sees the same images).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megatie.data.loader import TokenBatchLoader, eval_batches, random_batch
from megatie.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
FOLDER_IMAGE_SIZE = 32  # the default side for folders and datasets whose images differ in size
HOLDOUT = 0.2           # validation share per class when a source has no validation split
_SPLIT_SEED = 0          # the split never depends on the run's --seed: every run is scored on the same images


@dataclass
class LabelledImages:
    images: torch.Tensor   # uint8 [N, C, H, W]
    labels: torch.Tensor   # int64 [N]


class ImageSplit:
    """A split as the loaders see it: ``num_sequences`` examples, ``batch(indices)`` -> (images, labels)."""

    def __init__(self, name: str, data: LabelledImages, tokens: int):
        self.name, self.data, self.seq_len = name, data, tokens
        self.num_sequences = len(data.labels)

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return self.data.images[idx], self.data.labels[idx]


class ImageData:
    """Train/valid image splits, their classes and the statistics used to normalise them."""

    def __init__(self, splits: dict[str, LabelledImages], class_names: list[str], source: str, patch_size: int):
        self.class_names, self.source = class_names, source
        train = splits["train"]
        self.num_classes, self.num_channels = len(class_names), int(train.images.shape[1])
        self.image_size = int(train.images.shape[-1])
        self.patch_size = patch_size
        self.tokens_per_example = (self.image_size // patch_size) ** 2 + 1
        # Per-channel statistics of the training images (what ViTImageProcessor's mean/std are for).
        pixels = train.images.float().div_(255).transpose(0, 1).reshape(self.num_channels, -1)
        self.mean, self.std = pixels.mean(1).tolist(), pixels.std(1).clamp_min(1e-3).tolist()
        self._splits = {n: ImageSplit(n, d, self.tokens_per_example) for n, d in splits.items()}
        self.splits = [n for n in ("train", "valid", "test") if n in self._splits]
        self.vocab_size = None
        # The usual augmentation of small natural images (random crops, mirroring) is not usual for the
        # 8x8 digits - and measured, a one-pixel shift alone cost a 4-block ViT most of its accuracy
        # after 150 steps (0.22 vs 0.66 without) - so digits are used as they are.
        self.augment = source != "digits"

    def _split(self, split: str) -> ImageSplit:
        if split not in self._splits:
            raise DataError(f"no {split!r} split in {self.source}; available: {', '.join(self.splits)}")
        return self._splits[split]

    def num_sequences(self, split: str) -> int:
        return self._split(split).num_sequences

    def train_loader(self, micro_batch: int, seed: int, rank: int = 0, world_size: int = 1) -> TokenBatchLoader:
        return TokenBatchLoader(self._split("train"), micro_batch, seed, rank, world_size)

    def random_batch(self, split: str, batch_size: int, generator: torch.Generator):
        return random_batch(self._split(split), batch_size, generator)

    def eval_batches(self, split: str, batch_size: int, max_batches: int | None = None):
        return eval_batches(self._split(split), batch_size, max_batches)

    def majority_accuracy(self, split: str = "valid") -> float:
        """The trivial baseline: always answer the training set's most frequent class."""
        top = int(torch.bincount(self._splits["train"].data.labels).argmax())
        return float((self._split(split).data.labels == top).float().mean())

    def save(self, directory: str) -> None:
        """The run's image processor (size, normalisation) and class names, as transformers reads them."""
        import json

        try:  # the processor that needs no torchvision (transformers >= 5 names it apart)
            from transformers import ViTImageProcessorPil as Processor
        except ImportError:
            from transformers import ViTImageProcessor as Processor

        Processor(size={"height": self.image_size, "width": self.image_size}, image_mean=self.mean,
                  image_std=self.std, do_resize=True, do_rescale=True, do_normalize=True, do_convert_rgb=True,
                  ).save_pretrained(directory)
        with open(os.path.join(directory, "classes.json"), "w") as f:
            json.dump({"class_names": self.class_names, "num_channels": self.num_channels}, f)


# ---------------------------------------------------------------------- sources
def load_image_data(image_dir: str | None, dataset: str | None, image_size: int | None,
                    patch_size: int | None) -> ImageData:
    if image_dir:
        (splits, names), source = _folder(image_dir, image_size or FOLDER_IMAGE_SIZE), "folder"
    elif dataset and dataset != "digits":
        (splits, names), source = _hf_dataset(dataset, image_size or FOLDER_IMAGE_SIZE), dataset
    else:
        (splits, names), source = _digits(image_size), "digits"
    side = int(splits["train"].images.shape[-1])
    patch = patch_size or max(1, side // 4)
    if side % patch:
        raise DataError(f"--patch-size ({patch}) must divide the image size ({side})")
    return ImageData(splits, names, source, patch)


def _digits(image_size: int | None):
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("the default image set needs scikit-learn (pip install scikit-learn), or give "
                        "--image-dir DIR") from None
    digits = load_digits()
    gray = torch.from_numpy(np.round(digits.images * (255 / 16)).astype(np.uint8))  # 0..16 -> 0..255
    # As RGB, like every other source: the exported image processor then takes any picture a user has.
    images = gray[:, None].expand(-1, 3, -1, -1).contiguous()
    images = _resize(images, image_size) if image_size and image_size != 8 else images
    labels = torch.from_numpy(digits.target.astype(np.int64))
    return _holdout(LabelledImages(images, labels)), [str(i) for i in range(10)]


def _resize(images: torch.Tensor, side: int) -> torch.Tensor:
    out = torch.nn.functional.interpolate(images.float(), size=(side, side), mode="bilinear", antialias=True,
                                          align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def _holdout(data: LabelledImages) -> dict[str, LabelledImages]:
    """HOLDOUT of every class for validation, chosen by a fixed seed (so every class is in both)."""
    rng = np.random.default_rng(_SPLIT_SEED)
    valid = []
    for c in torch.unique(data.labels).tolist():
        members = np.flatnonzero(data.labels.numpy() == c)
        if len(members) < 2:
            raise DataError(f"class {c} has {len(members)} image; every class needs at least 2 "
                            "(one to train on, one to validate)")
        take = max(1, int(round(len(members) * HOLDOUT)))
        valid.extend(rng.permutation(members)[:take].tolist())
    mask = np.zeros(len(data.labels), dtype=bool)
    mask[valid] = True
    keep = torch.from_numpy(~mask)
    return {"train": LabelledImages(data.images[keep], data.labels[keep]),
            "valid": LabelledImages(data.images[~keep], data.labels[~keep])}


def _folder(root: str, side: int):
    """DIR/<class>/<image>: every class a sub-directory; RGB, resized to side x side."""
    path = Path(os.path.expanduser(root))
    if not path.is_dir():
        raise DataError(f"--image-dir {root} is not a directory")
    classes = sorted(d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    files = {c: sorted(f for f in (path / c).rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES) for c in classes}
    found = {c: fs for c, fs in files.items() if fs}
    if not found:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in class sub-directories of {root}; "
                        "expected DIR/<class name>/<image>")
    if len(found) < 2:
        raise DataError(f"{root} has images of one class only ({next(iter(found))!r}); a classifier needs "
                        "at least 2 class directories")
    images, labels = [], []
    for label, name in enumerate(sorted(found)):
        for f in found[name]:
            images.append(_read_image(f, side))
            labels.append(label)
    data = LabelledImages(torch.stack(images), torch.tensor(labels, dtype=torch.int64))
    return _holdout(data), sorted(found)


def _read_image(path: Path, side: int) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("RGB").resize((side, side), Image.BILINEAR)
            return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"cannot read image {path}: {e}") from None


def _hf_dataset(name: str, side: int):
    """A Hugging Face image dataset (an ``image``/``img`` column and a ``label``/``labels`` column)."""
    import datasets

    try:
        ds = datasets.load_dataset(name)
    except Exception as e:  # offline, a typo, a gated set: the library's own message, on one line
        raise DataError(f"cannot load the image dataset {name!r} ({str(e).splitlines()[0] if str(e) else e}); "
                        "use --image-dir DIR for local images") from None
    train = ds["train"]
    image_col = next((c for c in ("image", "img") if c in train.column_names), None)
    label_col = next((c for c in ("label", "labels") if c in train.column_names), None)
    if image_col is None or label_col is None:
        raise DataError(f"{name} has columns {train.column_names}; an image column ('image'/'img') and a "
                        "label column ('label'/'labels') are needed")
    names = getattr(train.features[label_col], "names", None)

    def convert(split):
        imgs = [torch.from_numpy(np.asarray(im.convert("RGB").resize((side, side)), dtype=np.uint8).copy())
                .permute(2, 0, 1) for im in split[image_col]]
        return LabelledImages(torch.stack(imgs), torch.tensor(split[label_col], dtype=torch.int64))

    held = next((s for s in ("validation", "valid", "test") if s in ds), None)
    splits = {"train": convert(train), "valid": convert(ds[held])} if held else _holdout(convert(train))
    count = int(splits["train"].labels.max()) + 1
    return splits, list(names) if names else [str(i) for i in range(count)]
