"""Generate digits with a pipeline and score them with the judge (conditional accuracy, Fréchet distance)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from obsdiff.digits.data import prompt_for
from obsdiff.digits.judge import load_judge, score_images


@dataclass(frozen=True)
class EvalSettings:
    samples: int = 200
    steps: int = 25
    guidance: float = 5.0
    seed: int = 0
    batch_size: int = 100


def requested_digits(samples: int) -> torch.Tensor:
    """Equal counts per digit (0,1,…,9,0,1,…), so accuracy is balanced."""
    return torch.arange(samples) % 10


@torch.no_grad()
def generate_digits(pipe, settings: EvalSettings) -> tuple[torch.Tensor, torch.Tensor]:
    digits = requested_digits(settings.samples)
    images = []
    for start in tqdm(range(0, settings.samples, settings.batch_size), desc="generate", leave=False):
        batch = digits[start : start + settings.batch_size].tolist()
        out = pipe([prompt_for(d) for d in batch], num_inference_steps=settings.steps,
                   guidance_scale=settings.guidance, output_type="pt",
                   generator=torch.Generator().manual_seed(settings.seed + start))
        images.append(out.images.float().cpu())
    return torch.cat(images), digits


def evaluate_pipeline(pipe, judge_dir: Path, settings: EvalSettings) -> dict:
    images, digits = generate_digits(pipe, settings)
    scores = score_images(load_judge(judge_dir), images, digits)
    return {**scores, "samples": settings.samples, "steps": settings.steps, "guidance": settings.guidance,
            "seed": settings.seed}


@torch.no_grad()
def final_latents(pipe, count: int, steps: int = 25, guidance: float = 5.0, seed: int = 0) -> torch.Tensor:
    """Final denoised latents from fixed initial noise: comparable across dense and pruned models."""
    scale = pipe.vae_scale_factor
    size = pipe.unet.config.sample_size
    start = torch.randn((count, pipe.unet.config.in_channels, size, size), generator=torch.Generator().manual_seed(seed))
    out = pipe([prompt_for(i % 10) for i in range(count)], latents=start, num_inference_steps=steps,
               guidance_scale=guidance, output_type="latent", height=size * scale, width=size * scale)
    return out.images.float()
