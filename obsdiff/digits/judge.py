"""The digit judge: a small classifier trained on the real digits, and the scores built on it.

Conditional accuracy asks whether the judge reads the digit the prompt asked for; the Fréchet
distance compares the judge's penultimate features of generated and real digits (FID in miniature).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from obsdiff.digits.data import IMAGE_SIZE, load_digit_images, split_indices
from obsdiff.errors import ModelFolderError

log = logging.getLogger(__name__)

JUDGE_WEIGHTS = "judge.safetensors"
JUDGE_CONFIG = "judge.json"


class DigitJudge(nn.Module):
    """Two convs and an MLP; ``features`` is the 64-d embedding used for the Fréchet distance."""

    def __init__(self, feature_dim: int = 64) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(32 * (IMAGE_SIZE // 4) ** 2, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, 10)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed(self.conv(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def to_judge_input(images: torch.Tensor) -> torch.Tensor:
    """Pipeline images (N, C, H, W) in [0, 1] → judge input (N, 1, 16, 16) in [-1, 1]."""
    gray = images.float().mean(dim=1, keepdim=True)
    if gray.shape[-1] != IMAGE_SIZE:
        gray = F.interpolate(gray, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return gray * 2 - 1


def _shift(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random ±1 pixel translations: cheap augmentation so the judge is not fooled by position."""
    dx, dy = torch.randint(-1, 2, (2,), generator=generator).tolist()
    return torch.roll(images, shifts=(dy, dx), dims=(2, 3))


def train_judge(out_dir: Path, epochs: int = 20, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    images, labels = load_digit_images()
    train_idx, held_idx = split_indices(len(images))
    model = DigitJudge()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    x_train, y_train = images[train_idx], labels[train_idx]
    for epoch in range(epochs):
        order = torch.randperm(len(x_train), generator=gen)
        for i in range(0, len(order), 64):
            batch = order[i : i + 64]
            loss = F.cross_entropy(model(_shift(x_train[batch], gen)), y_train[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
        log.info("judge epoch %d loss %.4f", epoch, loss.item())
    model.eval()
    with torch.no_grad():
        held_acc = (model(images[held_idx]).argmax(1) == labels[held_idx]).float().mean().item()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), out_dir / JUDGE_WEIGHTS)
    info = {"feature_dim": 64, "held_out_accuracy": held_acc, "held_out_size": len(held_idx), "epochs": epochs}
    (out_dir / JUDGE_CONFIG).write_text(json.dumps(info, indent=2))
    return info


def load_judge(folder: Path) -> DigitJudge:
    weights = folder / JUDGE_WEIGHTS
    if not weights.is_file():
        raise ModelFolderError(f"no judge at {weights}")
    cfg = json.loads((folder / JUDGE_CONFIG).read_text())
    model = DigitJudge(cfg["feature_dim"])
    model.load_state_dict(load_file(weights))
    return model.eval()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (rows are samples)."""
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    # ReLU features have dead dimensions: a small ridge keeps sqrtm well defined (as in pytorch-fid).
    eps = 1e-6 * np.eye(a.shape[1])
    cov_a, cov_b = np.cov(a, rowvar=False) + eps, np.cov(b, rowvar=False) + eps
    covmean, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


@torch.no_grad()
def score_images(judge: DigitJudge, images: torch.Tensor, requested: torch.Tensor) -> dict[str, float]:
    """Conditional accuracy and Fréchet distance (vs all real digits) of generated images in [0, 1]."""
    x = to_judge_input(images)
    predicted = judge(x).argmax(1)
    real, _ = load_digit_images()
    fd = frechet_distance(judge.features(x).numpy().astype(np.float64), judge.features(real).numpy().astype(np.float64))
    per_digit = {
        int(d): float((predicted[requested == d] == d).float().mean()) for d in requested.unique().tolist()
    }
    return {
        "conditional_accuracy": float((predicted == requested).float().mean()),
        "frechet_distance": fd,
        "per_digit_accuracy": per_digit,
    }
