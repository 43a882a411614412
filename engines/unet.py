"""The classic U-Net (Ronneberger et al. 2015), written so it exports to ONNX without Pad nodes.

Double 3x3 conv (padding 1, no bias) + BatchNorm + ReLU at each level, 4 downsamplings by 2x2 max
pooling, 4 upsamplings by 2x2 stride-2 transposed convolutions with skip concatenation, and a 1x1
head. Because every level halves exactly, input height and width must be multiples of 16; the model
refuses other sizes instead of padding, so its ONNX graph has no dynamic Pad.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

DEPTH = 4  #: number of downsamplings
MULTIPLE = 2**DEPTH  #: input height and width must be multiples of this (16)


@dataclass(frozen=True)
class UNetConfig:
    """U-Net hyper-parameters.

    width: channels of the first level (64 in the study, 16 for the CPU demo, 8 in tests); level k
    has width * 2**k channels. in_channels: input image channels (1, grayscale). classes: output
    classes (2: background, foreground).
    """

    width: int = 16
    in_channels: int = 1
    classes: int = 2

    def to_dict(self) -> dict[str, int]:
        """Plain dict (what a checkpoint stores)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> UNetConfig:
        """Inverse of `to_dict`; unknown keys are ignored."""
        return cls(**{k: int(v) for k, v in data.items() if k in cls.__dataclass_fields__})


class DoubleConv(nn.Sequential):
    """(3x3 conv, padding 1, no bias -> BatchNorm -> ReLU) twice; keeps H and W."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class Up(nn.Module):
    """2x2 stride-2 transposed conv (halves channels, doubles H and W), concat the skip, DoubleConv."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cin // 2, kernel_size=2, stride=2)
        self.conv = DoubleConv(cin // 2 + cout, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class UNet(nn.Module):
    """U-Net: float32 (N, in_channels, H, W) normalized input -> logits (N, classes, H, W).

    H and W must be multiples of 16 (ValueError otherwise). Parameters: about 1.9M at width 16,
    31M at width 64.
    """

    def __init__(self, config: UNetConfig | None = None) -> None:
        super().__init__()
        self.config = config or UNetConfig()
        w = self.config.width
        widths = [w * 2**k for k in range(DEPTH + 1)]  # e.g. 16, 32, 64, 128, 256
        self.inc = DoubleConv(self.config.in_channels, widths[0])
        self.pool = nn.MaxPool2d(2)
        self.downs = nn.ModuleList(DoubleConv(widths[k], widths[k + 1]) for k in range(DEPTH))
        self.ups = nn.ModuleList(Up(widths[k + 1], widths[k]) for k in reversed(range(DEPTH)))
        self.head = nn.Conv2d(widths[0], self.config.classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_size(int(x.shape[-2]), int(x.shape[-1]))
        x = self.inc(x)
        skips = [x]
        for down in self.downs:
            x = down(self.pool(x))
            skips.append(x)
        skips.pop()  # the bottleneck is not a skip
        for up in self.ups:
            x = up(x, skips.pop())
        return self.head(x)


def check_size(height: int, width: int) -> None:
    """Raise ValueError unless height and width (pixels) are positive multiples of 16."""
    if height <= 0 or width <= 0 or height % MULTIPLE or width % MULTIPLE:
        raise ValueError(
            f"U-Net input must be a multiple of {MULTIPLE} in height and width, got {height}x{width}"
        )


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
