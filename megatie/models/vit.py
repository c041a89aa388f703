"""ViT (`ViTForImageClassification`): an image cut into patches, one token per patch plus [CLS],
pre-LayerNorm blocks, a linear classifier on the final [CLS]. Built from a config: no weights downloaded.

The shape settings are GPT-2's (blocks, width, heads); the image decides the sequence: ``seq_len`` is
(image_size / patch_size)^2 + 1 and the number of classes comes from the data.
"""

from __future__ import annotations

from megatie.models.spec import ModelSpec, quiet_build


def tokens_per_image(image_size: int, patch_size: int) -> int:
    return (image_size // patch_size) ** 2 + 1


def build_vit(n_layer: int, n_embd: int, n_head: int, seq_len: int, num_classes: int,
              dropout: float = 0.0, seed: int | None = None, device="cpu", *,
              image_size: int, patch_size: int, num_channels: int):
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        num_hidden_layers=n_layer, hidden_size=n_embd, num_attention_heads=n_head,
        intermediate_size=4 * n_embd, image_size=image_size, patch_size=patch_size,
        num_channels=num_channels, num_labels=num_classes,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )
    return quiet_build(ViTForImageClassification, config, seed, device, loss_type=None)


# A classifier learns from one label per image, so the tiny preset takes 32 images (544 tokens) a step.
# At the shared 6e-4 and at 1e-3 a 12-block ViT did not learn the digits in 300 steps (18% at 1e-3); at
# 3e-4 it reached 89% (RESULTS.md, the ViT table).
SPEC = ModelSpec(name="vit", build=build_vit, block_path="vit.layers", hf_class="ViTForImageClassification",
                 objective="image", presets={"tiny": {"batch_size": 32, "lr": 3e-4}},
                 extra_settings=("image_size", "patch_size", "num_channels"))
