"""Small real models and adapter helpers shared by the model-API tests (timm is a test dependency)."""

from __future__ import annotations

import torch

import lora_fused as lf


def tiny_vit(seed: int = 0, depth: int = 2):
    """timm's ViT, tiny and random: 16 px images, 8 px patches, width 24, ``depth`` blocks, 3 classes; eval mode."""
    import timm

    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, embed_dim=24,
                             depth=depth, num_heads=2, num_classes=3).eval()


def randomize_adapters(model, adapter=None, seed: int = 1, std: float = 0.3) -> None:
    """Fill the active (or named) adapter's parameters with N(0, std²) draws (a fresh B is zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lf.lora_parameters(model, adapter):
            p.copy_(torch.randn(p.shape, generator=g) * std)


def trainable(model):
    """Names of the parameters that require grad."""
    return {n for n, p in model.named_parameters() if p.requires_grad}
