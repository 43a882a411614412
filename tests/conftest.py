"""Helpers shared by both tiers (tests/README.md): small models, checkpoints, synthetic images, a free port.

Nothing here starts a process or builds an engine: the fixtures that do (a real redis-server, the small ONNX
engine) are in tests/integration/conftest.py, and tests/unit/conftest.py forbids them in the unit tier.
"""

from __future__ import annotations

import socket
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


SMALL_SIZE = 64  # px: logic tests use small images and a width-8 U-Net


def tiny_unet(width: int = 8, seed: int = 0, bn_stats: bool = False):
    """An untrained U-Net with seeded weights, in eval mode.

    bn_stats: give every BatchNorm non-trivial running statistics and affine parameters, so that
    folding or dropping it would change the output.
    """
    import torch

    from engines.unet import UNet, UNetConfig

    torch.manual_seed(seed)
    model = UNet(UNetConfig(width=width))
    if bn_stats:
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.data.uniform_(0.5, 1.5)
                module.bias.data.uniform_(-0.1, 0.1)
    return model.eval()


def tiny_checkpoint(path: Path, size: int = SMALL_SIZE, max_batch: int = 4, model=None, seed: int = 0,
                    training: dict | None = None) -> Path:
    """Save `model` (default: tiny_unet(seed=seed)) as a checkpoint whose spec is size x size, batch 1..max_batch."""
    from engines.base import EngineSpec
    from engines.checkpoint import save_checkpoint

    spec = EngineSpec(height=size, width=size, max_batch=max_batch)
    return save_checkpoint(path, model if model is not None else tiny_unet(seed=seed), spec, training)


def write_synthetic_images(folder: Path, count: int, size: int = SMALL_SIZE, seed: int = 0) -> list[Path]:
    """Write `count` synthetic microscopy PNGs (and their masks under folder/../truth) and return the image paths."""
    from PIL import Image

    from toolchain.synth import generate

    folder.mkdir(parents=True, exist_ok=True)
    truth = folder.parent / f"{folder.name}_truth"
    truth.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, (image, mask) in enumerate(generate(count, size=size, seed=seed)):
        path = folder / f"img_{index:03d}.png"
        Image.fromarray(image).save(path)
        Image.fromarray(mask * 255).save(truth / path.name)
        paths.append(path)
    return paths
