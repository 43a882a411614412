"""The engine runtime the worker loads: the U-Net, its checkpoints, and one adapter per runtime.

`engines.base` is the interface (EngineSpec, Engine, InFlight, infer, check_batch); `load_engine`
in `engines.loader` opens any engine file by its extension. This package imports nothing from
`toolchain`, `producer`, `worker` or `report`; the tools that make engine files live in `toolchain`.
The small demo model that ships with the package lives at DEMO_CHECKPOINT (torch) and DEMO_ONNX
(ONNX Runtime, 512x512, batch 1..8).
"""

from __future__ import annotations

from pathlib import Path

DEMO_DIR: Path = Path(__file__).resolve().parent / "demo"
#: width-16 U-Net checkpoint (segqueue-unet/1), spec 512x512, batch 1..8
DEMO_CHECKPOINT: Path = DEMO_DIR / "unet_w16.pt"
#: the same model exported to FP32 ONNX (512x512, dynamic batch 1..8), metadata beside it
DEMO_ONNX: Path = DEMO_DIR / "unet_w16.onnx"

