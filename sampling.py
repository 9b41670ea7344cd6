"""Images from a generator without changing its state: fixed latent streams, the sampling
mode, uint8 quantisation as a PNG would store it, and grids written as PNG files."""
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.nn.modules.batchnorm import _BatchNorm


# Fixed latent streams, one per use, each a private generator seeded from the run's seed:
# the same images at every call and on every resume, and the training RNG left alone.
LATENT_STREAMS = {"grid": 1, "eval": 2, "fid": 3}


def fixed_latents(seed: int, stream: str, n: int, z_dim: int) -> torch.Tensor:
    """n latent vectors (CPU) of the named stream: "grid" (sample grids), "eval"
    (--train false samples) or "fid" (FID samples)."""
    g = torch.Generator().manual_seed(seed + LATENT_STREAMS[stream])
    return torch.randn(n, z_dim, generator=g)


def whole_batches(n: int, batch_size: int) -> int:
    """n rounded up to whole batches: how many latents n images drawn in full batches take
    (see uint8_batches)."""
    return -(-n // batch_size) * batch_size


# ---------------------------------------------------------------------------- images
def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats → uint8 exactly as saving a PNG quantises them (round, clamp)."""
    return ((x.float() + 1) * 127.5 + 0.5).clamp_(0, 255).to(torch.uint8)


@contextmanager
def sampling_mode(G: torch.nn.Module, bn_mode: str = "batch"):
    """Sample from G without changing any of its state.

    eval() stops the spectral-norm power iteration. bn_mode="batch" (--fid_g_mode) keeps BatchNorm on batch
    statistics (what the original code's samples used) without updating the running statistics:
    with its running buffers detached, BatchNorm normalises by the batch and writes
    nothing. bn_mode="eval" uses the running statistics."""
    was_training = G.training
    G.eval()
    detached = []
    if bn_mode == "batch":
        for m in G.modules():
            if isinstance(m, _BatchNorm):
                detached.append((m, m.running_mean, m.running_var))
                m.running_mean = m.running_var = None
    try:
        with torch.no_grad():
            yield G
    finally:
        for m, mean, var in detached:
            m.running_mean, m.running_var = mean, var
        G.train(was_training)


def uint8_batches(G, z, starts, batch_size, device, bn_mode="batch", n=None):
    """uint8 images from G, one batch per start index into z (a CPU tensor), in sampling
    mode: what sample PNGs and FID both use. Each batch is drawn whole and the images from
    index n on are dropped after: with BatchNorm on batch statistics an image depends on the
    batch it is drawn in, so a last batch of 16 (10,000 at 64) would give its images other
    statistics than the rest. z must hold latents for whole batches (whole_batches)."""
    n = len(z) if n is None else n
    with sampling_mode(G, bn_mode):
        for s in starts:
            if len(z) < s + batch_size:
                raise ValueError(f"{len(z)} latents cannot draw whole batches of {batch_size} up to image {n}")
            yield to_uint8(G(z[s:s + batch_size].to(device)))[:n - s]


def image_grid(images: torch.Tensor, nrow: int = 8, pad: int = 2) -> np.ndarray:
    """uint8 (B, 3, H, W) → one (rows·(H+pad)+pad, …, 3) uint8 grid on a black frame."""
    B, C, H, W = images.shape
    rows = -(-B // nrow)
    grid = np.zeros((rows * (H + pad) + pad, nrow * (W + pad) + pad, C), np.uint8)
    arr = images.permute(0, 2, 3, 1).cpu().numpy()
    for i in range(B):
        r, c = divmod(i, nrow)
        grid[pad + r * (H + pad):pad + r * (H + pad) + H, pad + c * (W + pad):pad + c * (W + pad) + W] = arr[i]
    return grid


def save_png(array_hwc: np.ndarray, path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array_hwc).save(path)
