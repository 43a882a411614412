"""Train the U-Net on synthetic microscopy-like images (toolchain.synth) and save a checkpoint.

Data: a pool of full-size synthetic images (generated on the fly from `seed`, a few replaced every
step, or read once from a directory written by `engines synth`); each step draws random crops with
random flips and 90-degree rotations. Loss: cross-entropy plus `dice_weight` x soft Dice of the
foreground. Optimizer: Adam with linear warm-up and cosine decay. At the end the model is scored
on `eval_n` held-out full-size images from a different seed, and the mean Dice, the exact command
and the settings are stored in the checkpoint's "training" dict.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from common.metrics import dice
from engines.base import EngineSpec, Normalization
from engines.checkpoint import save_checkpoint
from engines.unet import UNet, UNetConfig, check_size
from engines.versions import built_with
from toolchain.synth import TRUTH_DIR, generate, read_mask

EVAL_SEED_OFFSET = 1_000_003  #: default held-out seed = seed + this


@dataclass
class TrainConfig:
    """Training settings. Sizes in pixels; lr per Adam step; steps = optimizer steps.

    size: full synthetic image size (and the checkpoint spec's height/width). crop: training crop
    size (multiple of 16, <= size). batch: crops per step. pool: images kept in memory; refresh:
    pool images replaced by new ones per step (on-the-fly data only). data_dir: read images/ and
    truth/ from an `engines synth` directory instead of generating. eval_seed: None -> seed +
    1,000,003. max_batch: the spec's largest batch. threads: torch CPU threads (None: default).
    """

    out: Path = Path("unet.pt")
    width: int = 16
    size: int = 512
    crop: int = 128
    steps: int = 1500
    batch: int = 12
    lr: float = 3e-3
    warmup: int = 50
    dice_weight: float = 0.5
    seed: int = 0
    pool: int = 48
    refresh: int = 1
    data_dir: Path | None = None
    eval_n: int = 32
    eval_seed: int | None = None
    max_batch: int = 8
    threads: int | None = None
    progress: bool = True
    command: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainResult:
    """Outcome: checkpoint path, held-out mean Dice, final smoothed loss, wall time in seconds."""

    checkpoint: Path
    heldout_dice: float
    final_loss: float
    wall_s: float


class CropSampler:
    """Random augmented crops from a pool of (image uint8 (S, S), mask uint8 (S, S)) pairs."""

    def __init__(self, cfg: TrainConfig, rng: np.random.Generator) -> None:
        self.cfg = cfg
        self.rng = rng
        self._next_index = 0
        if cfg.data_dir is not None:
            self.images, self.masks = _read_dir(Path(cfg.data_dir))
            self.fresh = False
        else:
            pairs = list(generate(cfg.pool, cfg.size, cfg.seed))
            self._next_index = cfg.pool
            self.images = [p[0] for p in pairs]
            self.masks = [p[1] for p in pairs]
            self.fresh = True

    def _refresh(self) -> None:
        for _ in range(self.cfg.refresh):
            slot = int(self.rng.integers(len(self.images)))
            image, mask = next(iter(_one(self.cfg.size, self.cfg.seed, self._next_index)))
            self._next_index += 1
            self.images[slot], self.masks[slot] = image, mask

    def batch(self) -> tuple[np.ndarray, np.ndarray]:
        """(images uint8 (B, C, C), masks int64 (B, C, C)) with C = cfg.crop."""
        if self.fresh:
            self._refresh()
        c, b = self.cfg.crop, self.cfg.batch
        xs = np.empty((b, c, c), np.uint8)
        ys = np.empty((b, c, c), np.int64)
        for i in range(b):
            k = int(self.rng.integers(len(self.images)))
            image, mask = self.images[k], self.masks[k]
            y0 = int(self.rng.integers(image.shape[0] - c + 1))
            x0 = int(self.rng.integers(image.shape[1] - c + 1))
            xi, yi = image[y0 : y0 + c, x0 : x0 + c], mask[y0 : y0 + c, x0 : x0 + c]
            rot = int(self.rng.integers(4))
            xi, yi = np.rot90(xi, rot), np.rot90(yi, rot)
            if self.rng.random() < 0.5:
                xi, yi = xi[:, ::-1], yi[:, ::-1]
            xs[i], ys[i] = xi, yi
        return xs, ys


def _one(size: int, seed: int, index: int):
    """Image `index` of the synthetic stream `seed` (without generating the ones before it)."""
    from toolchain.synth import render

    yield render(np.random.default_rng([seed, index]), size)


def _read_dir(data_dir: Path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    from PIL import Image

    names = sorted(p.name for p in (data_dir / "images").glob("*.png"))
    if not names:
        raise FileNotFoundError(f"{data_dir}/images has no PNG files")
    images = [np.asarray(Image.open(data_dir / "images" / n).convert("L")) for n in names]
    masks = [read_mask(data_dir / TRUTH_DIR / n) for n in names]
    return images, masks


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - soft Dice of the foreground: logits (B, 2, H, W), target int64 (B, H, W)."""
    prob = logits.softmax(dim=1)[:, 1]
    tgt = target.float()
    inter = (prob * tgt).sum(dim=(1, 2))
    denom = prob.sum(dim=(1, 2)) + tgt.sum(dim=(1, 2))
    return (1.0 - (2.0 * inter + 1.0) / (denom + 1.0)).mean()


def predict(model: UNet, images: np.ndarray, norm: Normalization = Normalization(), batch: int = 4) -> np.ndarray:
    """Masks uint8 (N, H, W) from uint8 images (N, H, W) with a CPU model in eval mode."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch])).float().unsqueeze(1)
            x = (x * norm.scale - norm.mean) / norm.std
            out.append(model(x).argmax(dim=1).to(torch.uint8).numpy())
    return np.concatenate(out)


def evaluate(model: UNet, n: int, size: int, seed: int, norm: Normalization = Normalization()) -> float:
    """Mean per-image Dice of `model` on n synthetic (size x size) images from `seed`."""
    model.eval()
    scores = []
    for image, mask in generate(n, size, seed):
        scores.append(dice(predict(model, image[None], norm)[0], mask))
    return float(np.mean(scores))


def train(cfg: TrainConfig) -> TrainResult:
    """Train per `cfg`, evaluate on held-out images, save the checkpoint to cfg.out; see TrainConfig."""
    from tqdm import tqdm

    check_size(cfg.crop, cfg.crop)
    check_size(cfg.size, cfg.size)
    if cfg.crop > cfg.size:
        raise ValueError(f"crop {cfg.crop} is larger than the image size {cfg.size}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    eval_seed = cfg.seed + EVAL_SEED_OFFSET if cfg.eval_seed is None else cfg.eval_seed
    if eval_seed == cfg.seed:
        raise ValueError("eval_seed must differ from the training seed")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng([cfg.seed, 7])
    norm = Normalization()
    start = time.perf_counter()

    model = UNet(UNetConfig(width=cfg.width))
    sampler = CropSampler(cfg, rng)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * t)))

    model.train()
    smooth = float("nan")
    bar = tqdm(range(cfg.steps), desc="train", unit="step", disable=not cfg.progress)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        xs, ys = sampler.batch()
        x = torch.from_numpy(xs).float().unsqueeze(1) * norm.scale
        y = torch.from_numpy(ys)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        if cfg.dice_weight:
            loss = loss + cfg.dice_weight * soft_dice_loss(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        value = float(loss.detach())
        smooth = value if math.isnan(smooth) else 0.95 * smooth + 0.05 * value
        if step % 10 == 0:
            bar.set_postfix(loss=f"{smooth:.4f}", lr=f"{lr_at(step):.1e}")
    bar.close()
    train_s = time.perf_counter() - start

    model.eval()
    heldout = evaluate(model, cfg.eval_n, cfg.size, eval_seed, norm) if cfg.eval_n else float("nan")
    wall = time.perf_counter() - start
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    settings.pop("progress", None)
    settings.pop("extra", None)
    training = {
        "command": cfg.command,
        "settings": settings,
        "eval_seed": eval_seed,
        "heldout_dice": heldout,
        "heldout_n": cfg.eval_n,
        "heldout_size": cfg.size,
        "final_loss": smooth,
        "train_s": round(train_s, 1),
        "wall_s": round(wall, 1),
        "threads": torch.get_num_threads(),
        **cfg.extra,
    }
    spec = EngineSpec(
        height=cfg.size, width=cfg.size, channels=1, classes=2, min_batch=1, max_batch=cfg.max_batch,
        precision="fp32", normalization=norm, built_with=built_with("cpu", trained_on="synthetic"),
    )
    path = save_checkpoint(cfg.out, model, spec, training)
    return TrainResult(checkpoint=path, heldout_dice=heldout, final_loss=smooth, wall_s=wall)
