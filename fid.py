"""
FID / IS / KID with the Inception network of the TF FID reference (2015-12-05 graph).

The network and weights are the ones pytorch-fid and torch-fidelity port, so numbers
are comparable with published values. Two input pipelines are offered because the two
peers differ there: "tf1" (torch-fidelity, bit-faithful to the TF reference) and
"pytorch" (pytorch-fid). Everything statistical is done in float64 on the host.

CLI:
    python fid.py A B            # A, B: image folder, .npy/.npz images, stats .npz or checkpoint .pt
    python fid.py A B --metrics fid,is,kid
    python fid.py --save-stats A OUT.npz
    python fid.py compare logs/RUN1 logs/RUN2 ...   # FID per group of seeds over steps + plots

The training side (generated_features, reference_stats) is used by the Trainer's FID
monitor: FID of G every --fid_step against reference statistics cached per dataset.
"""

import argparse
import contextlib
import csv
import hashlib
import json
import os
import sys
import time
import zipfile
from dataclasses import dataclass, field
from typing import Callable
from pathlib import Path

import matplotlib
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Subset
from torchvision.models.inception import BasicConv2d, InceptionA, InceptionB, InceptionC, InceptionD, InceptionE
from tqdm import tqdm

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

from experiment import compare  # the `compare` sub-command (statistics over seeds)
from data_loader import IMAGE_EXTS, as_nhwc_uint8, check_array_file, image_files, load_array, quiet_pil, to_rgb
from sagan_models import build_generator
from utils import (TRUST_FLAG, OneLineParser, UserError, int_at_least, write_failed, atomic_open, check_writable, csv_rows_until, file_lock, fixed_latents, is_tty, load_checkpoint, pick_device,
                   set_tf32, tf32_flags, uint8_batches, warn)

FID_WEIGHTS_URL = ('https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/'
                   'pt_inception-2015-12-05-6726825d.pth')
# the same converted TF weights under pytorch-fid's and torch-fidelity's file names
WEIGHT_FILENAMES = ("pt_inception-2015-12-05-6726825d.pth", "weights-inception-2015-12-05-6726825d.pth")
# torch hub's naming convention (its check_hash): <name>-<first hex digits of the file's sha256>.<ext>
PUBLISHED_SHA256_PREFIX = FID_WEIGHTS_URL.rsplit("-", 1)[1].split(".")[0]  # "6726825d"
RESIZE_MODES = ("tf1", "pytorch")


# -----------------------------------------------------------------------------
# network


class _FIDPoolBranch:
    # The TF graph differs from torchvision's Inception only in the pooling branch:
    # TF's avg pool ignores padded zeros, and its last block uses a max pool.
    pool = "avg"

    def _pool_branch(self, x):
        if self.pool == "max":
            x = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            x = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
        return self.branch_pool(x)


class FIDInceptionA(_FIDPoolBranch, InceptionA):
    def _forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return [self.branch1x1(x), b5, b3, self._pool_branch(x)]


class FIDInceptionC(_FIDPoolBranch, InceptionC):
    def _forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                     self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = conv(bd)
        return [self.branch1x1(x), b7, bd, self._pool_branch(x)]


class FIDInceptionE(_FIDPoolBranch, InceptionE):
    def __init__(self, in_channels, pool="avg"):
        super().__init__(in_channels)
        self.pool = pool

    def _forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        return [self.branch1x1(x), b3, bd, self._pool_branch(x)]


def resize_tf1(x, size=(299, 299)):
    """Bilinear resize the way TF1's resize_bilinear(align_corners=False) does it: source
    coordinate = dst * in/out (no half-pixel offset, no antialiasing), coordinates and
    lerps in float32, lerp across x then y. x: float (B, C, H, W)."""
    def axis(n_in, n_out):
        # built on x's device (no host->device copy, hence no sync, per batch); TF computes
        # the scale and coordinates in float32, and a float32-exact Python scalar keeps that
        scale = float(np.float32(n_in) / np.float32(n_out))
        src = torch.arange(n_out, dtype=torch.float32, device=x.device) * scale
        lo = src.floor()
        hi = (lo + 1).clamp(max=n_in - 1)
        return lo.long(), hi.long(), (src - lo).to(x.dtype)

    y0, y1, fy = axis(x.shape[-2], size[0])
    x0, x1, fx = axis(x.shape[-1], size[1])
    top, bot = x.index_select(-2, y0), x.index_select(-2, y1)
    tl, tr = top.index_select(-1, x0), top.index_select(-1, x1)
    bl, br = bot.index_select(-1, x0), bot.index_select(-1, x1)
    top = tl + (tr - tl) * fx
    bot = bl + (br - bl) * fx
    return top + (bot - top) * fy[:, None]


PRECISIONS = ("fp32", "tf32")


@contextlib.contextmanager
def matmul_precision(device, precision):
    """fp32: IEEE float32 convs and matmuls (TF32, the cuDNN default on Ampere+, costs ~3
    decimal digits of the features); tf32: TensorFloat-32. Restores the caller's setting."""
    if torch.device(device).type != "cuda":
        yield
        return
    saved = tf32_flags()
    set_tf32(precision == "tf32", precision == "tf32")
    try:
        yield
    finally:
        set_tf32(*saved)


class FIDInception(nn.Module):
    """Inception-v3 as in the TF FID graph. Module names match pytorch-fid's state dict
    (which torch-fidelity's file shares), so either weight file loads strictly.
    forward(uint8 (B,3,H,W)) -> (pool3 (B,2048), logits without fc bias (B,1008)), float32."""

    def __init__(self, resize="tf1", precision="fp32"):
        super().__init__()
        if resize not in RESIZE_MODES:
            raise UserError(f"unknown resize mode {resize!r}; use one of {RESIZE_MODES}")
        if precision not in PRECISIONS:
            raise UserError(f"unknown precision {precision!r}; use one of {PRECISIONS}")
        self.resize, self.precision = resize, precision
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, pool="avg")
        self.Mixed_7c = FIDInceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)  # 1008 classes in the TF graph (1000 + unused)

    def preprocess(self, x):
        """uint8 (B,3,H,W) -> float32 (B,3,299,299) in [-1, 1] as the chosen peer does it."""
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
            raise UserError(f"FIDInception expects uint8 (B,3,H,W) images, got {x.dtype} {tuple(x.shape)}")
        x = x.float()
        if self.resize == "tf1":
            return (resize_tf1(x, (299, 299)) - 128) / 128
        x = F.interpolate(x / 255, size=(299, 299), mode="bilinear", align_corners=False)
        return 2 * x - 1

    def forward(self, x):
        # never let an outer bf16 autocast or the caller's TF32 setting decide the metric
        with torch.autocast(x.device.type, enabled=False), matmul_precision(x.device, self.precision):
            x = self.preprocess(x)
            if x.is_cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            for block in (self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3):
                x = block(x)
            x = F.max_pool2d(x, kernel_size=3, stride=2)
            x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
            x = F.max_pool2d(x, kernel_size=3, stride=2)
            for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                          self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
                x = block(x)
            pool3 = F.adaptive_avg_pool2d(x, 1).flatten(1)
            # IS uses the logits without the fc bias (the TF reference takes them before the bias add)
            return pool3, pool3 @ self.fc.weight.T

# -----------------------------------------------------------------------------
# weights


# Download targets that failed in this process: offline, every retry would wait on a timeout.
_failed_downloads = set()


def _cache_dir():
    return Path(torch.hub.get_dir()) / "checkpoints"


def _missing_weights_message():
    return (f"no FID Inception weights found: download {FID_WEIGHTS_URL} and put it at "
            f"{_cache_dir() / WEIGHT_FILENAMES[0]} (or pass --fid_weights PATH)")


def resolve_weights(path=None, download=True, quiet=False):
    """Path of the FID Inception weights: `path`, else the torch hub cache (either file
    name), else a one-time download into that cache. None (with one warning per process
    and cache folder) when none is available; never falls back to other weights."""
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise UserError(f"FID weights file {p} does not exist; fix the path or omit it to use {_cache_dir()}")
        return p
    cache = _cache_dir()
    for name in WEIGHT_FILENAMES:
        if (cache / name).is_file():
            return cache / name
    target = cache / WEIGHT_FILENAMES[0]
    if download and target not in _failed_downloads:
        tmp = target.with_name(f"{target.name}.{os.getpid()}.part")  # no half-written file under the real name
        try:
            cache.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(FID_WEIGHTS_URL, str(tmp), progress=sys.stderr.isatty())
            os.replace(tmp, target)
            return target
        except Exception:
            _failed_downloads.add(target)
            tmp.unlink(missing_ok=True)
    if not quiet:
        warn(_missing_weights_message() + "; FID is skipped", once=True)
    return None


def load_inception(weights_path, resize="tf1", device="cpu", precision="fp32"):
    """FIDInception with weights loaded strictly, in eval mode, no grads, float32."""
    if weights_path is None:
        raise UserError(_missing_weights_message())
    with torch.random.fork_rng(devices=[]):  # its random init must not shift the training RNG
        model = FIDInception(resize, precision)
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated download, random bytes, a pickle of other objects
        # torch's message advises weights_only=False, i.e. running code from the file: not passed on
        raise UserError(f"{weights_path} is not an FID Inception (2015-12-05) weights file (no plain tensor "
                        f"state dict: {type(e).__name__}); get {FID_WEIGHTS_URL}") from None
    try:
        model.load_state_dict(state, strict=True)
    except Exception as e:  # wrong keys or shapes: one line, not a traceback
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{weights_path} is not an FID Inception (2015-12-05) weights file ({first}); "
                       f"get {FID_WEIGHTS_URL}") from None
    device = torch.device(device)
    model = model.float().to(device).eval().requires_grad_(False)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model

# -----------------------------------------------------------------------------
# features and metrics


def extract_features(model, batches, device=None, progress=True, desc="features"):
    """Run uint8 (b,3,H,W) batches through the model -> (pool3, logits_unbiased) as float64 numpy."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    pools, logits = [], []
    total = len(batches) if hasattr(batches, "__len__") else None
    with torch.inference_mode():
        for b in tqdm(batches, desc=desc, total=total, disable=not progress, unit="batch", leave=False):
            b = torch.as_tensor(b)
            if device.type == "cuda" and not b.is_cuda:
                b = b.pin_memory()  # lets the upload overlap the previous batch's compute
            p, l = model(b.to(device, non_blocking=True))
            pools.append(p)  # stay on device: no host sync per batch
            logits.append(l)
    if not pools:
        raise UserError("no images to extract features from")
    to_np = lambda ts: torch.cat(ts).to("cpu", torch.float64).numpy()
    return to_np(pools), to_np(logits)


def feature_stats(pool3):
    """(mu, sigma) in float64; sigma unbiased (N-1), as both peers compute it."""
    pool3 = np.asarray(pool3, dtype=np.float64)
    if pool3.ndim != 2 or len(pool3) < 2:
        raise UserError(f"need at least 2 feature vectors for statistics, got shape {pool3.shape}")
    return pool3.mean(axis=0), np.cov(pool3, rowvar=False)


def _sqrt_factor(sigma):
    # A with A A^T = sigma, keeping only eigenvalues above the numerical-rank tolerance (as
    # np.linalg.matrix_rank): those below are rounding noise, and dropping them also shrinks
    # the work to the rank for covariances of few samples
    w, v = torch.linalg.eigh((sigma + sigma.T) / 2)
    keep = w > w.max().clamp(min=0) * len(w) * torch.finfo(torch.float64).eps
    return v[:, keep] * w[keep].sqrt()


def frechet_distance(mu1, sigma1, mu2, sigma2, device="cpu"):
    """||mu1-mu2||^2 + tr(S1) + tr(S2) - 2 tr(sqrt(S1 S2)), in float64.

    Eigenvalue form without sqrtm: with S1 = A A^T and S2 = B B^T from eigh (A = V1 W1^1/2),
    S1 S2 has the non-zero eigenvalues of (A^T B)(A^T B)^T, so tr(sqrt(S1 S2)) is the sum of
    the singular values of A^T B. Why this one: it is real by construction (no complex
    parts, no eps*I fallback as with scipy's sqrtm), it is much faster than sqrtm at d=2048,
    and it takes no sqrt of near-zero eigenvalues. That matters for the rank-deficient
    covariances of fewer samples than dimensions, where the peers' sqrt of ~2000 rounding-
    noise eigenvalues (~1e-16 -> ~1e-8 each) biases FID by ~1e-5 relative; this form
    matches an exact evaluation to ~1e-12 there, and on ill-conditioned full-rank ones.
    Computed with torch in float64 on `device` (LAPACK on the CPU, cuSOLVER on a GPU).
    """
    mu1, mu2 = (torch.atleast_1d(torch.as_tensor(np.asarray(m, np.float64), device=device)) for m in (mu1, mu2))
    sigma1, sigma2 = (torch.atleast_2d(torch.as_tensor(np.asarray(s, np.float64), device=device))
                      for s in (sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise UserError(f"statistics do not match: mu {tuple(mu1.shape)} vs {tuple(mu2.shape)}, "
                       f"sigma {tuple(sigma1.shape)} vs {tuple(sigma2.shape)}")
    ab = _sqrt_factor(sigma1).T @ _sqrt_factor(sigma2)
    tr_covmean = torch.linalg.svdvals(ab).sum() if ab.numel() else 0.0
    diff = mu1 - mu2
    return float(diff @ diff + sigma1.trace() + sigma2.trace() - 2 * tr_covmean)


def inception_score(logits_unbiased, splits=10, shuffle=True, seed=2020):
    """(mean, std) over splits of exp(E_x KL(p(y|x) || p(y))), softmax over all 1008 logits."""
    logits = np.asarray(logits_unbiased, dtype=np.float64)
    n = len(logits)
    if n < splits:
        raise UserError(f"Inception Score needs at least splits={splits} images, got {n}")
    if shuffle:  # same permutation as torch-fidelity for a given seed
        logits = logits[np.random.RandomState(seed).permutation(n)]
    log_p = logits - logits.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    p = np.exp(log_p)
    scores = []
    for i in range(splits):
        lo, hi = i * n // splits, (i + 1) * n // splits
        log_q = np.log(p[lo:hi].mean(axis=0))
        kl = (p[lo:hi] * (log_p[lo:hi] - log_q)).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


def kernel_inception_distance(f1, f2, subsets=100, subset_size=1000, degree=3, gamma=None, coef0=1, seed=2020):
    """(mean, std) over random subsets of the unbiased MMD^2 with k(x,y) = (gamma x.y + coef0)^degree.

    Subsets are drawn like torch-fidelity (one RandomState, f1 then f2 indices per subset,
    without replacement). Where torch-fidelity refuses sets smaller than subset_size, the
    size is capped to the smaller set (with a warning) so small evaluations still work."""
    f1, f2 = np.asarray(f1, dtype=np.float64), np.asarray(f2, dtype=np.float64)
    if f1.ndim != 2 or f1.shape[1:] != f2.shape[1:]:
        raise UserError(f"KID feature sets do not match: {f1.shape} vs {f2.shape}")
    n1, n2 = len(f1), len(f2)
    m = min(subset_size, n1, n2)
    if m < 2:
        raise UserError(f"KID needs at least 2 samples per set, got {n1} and {n2}")
    if m < subset_size:
        warn(f"KID subset_size {subset_size} capped to {m} (sets have {n1} and {n2} samples)", once=True)
    gamma = 1.0 / f1.shape[1] if gamma is None else gamma
    kernel = lambda a, b: (gamma * (a @ b.T) + coef0) ** degree
    rng = np.random.RandomState(seed)
    mmds = np.empty(subsets)
    for s in range(subsets):
        x = f1[rng.choice(n1, m, replace=False)]
        y = f2[rng.choice(n2, m, replace=False)]
        kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
        # unbiased: within-set sums leave out the diagonal (k(x_i, x_i))
        within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        mmds[s] = within - 2 * kxy.sum() / (m * m)
    return float(mmds.mean()), float(mmds.std())

# -----------------------------------------------------------------------------
# statistics files


def save_stats(path, mu, sigma, key=None, n=None):
    """Write mu, sigma, n and a JSON key (what produced the stats) to an .npz, atomically:
    when writing fails (disk full, read-only, folder gone) `path` keeps what it had and a
    UserError names it and the fix."""
    try:
        with atomic_open(path) as f:  # parallel runs may write the same stats; a file object keeps np.savez's name
            np.savez(f, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64),
                     n=np.int64(-1 if n is None else n), key=np.array(json.dumps(key or {}, sort_keys=True)))
    except OSError as e:
        raise write_failed("statistics file", path, e) from None


def _is_stats_file(path):
    if Path(path).suffix.lower() != ".npz":
        return False
    try:
        with np.load(path, allow_pickle=False) as f:
            return "mu" in f.files and "sigma" in f.files
    except (OSError, ValueError, zipfile.BadZipFile):
        return False  # load_images() reports it


def load_stats(path):
    """(mu, sigma, meta) from our .npz or a pytorch-fid one (mu/sigma only);
    meta = {"n": int or None, "key": dict}."""
    check_array_file(Path(path))
    try:
        with np.load(path, allow_pickle=False) as f:
            if "mu" not in f.files or "sigma" not in f.files:
                raise UserError(f"{path} is not a statistics file (no 'mu'/'sigma' arrays)")
            mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
            n = int(f["n"]) if "n" in f.files else -1
            key = json.loads(str(f["key"])) if "key" in f.files else {}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise UserError(f"cannot read statistics {path}: {e}") from None
    # what would otherwise come out as "FID: nan" or a negative FID, printed as a result
    if sigma.ndim != 2 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise UserError(f"statistics {path}: sigma {sigma.shape} is not the covariance of mu {mu.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise UserError(f"statistics {path} hold NaN or inf values; recompute them (--save-stats)")
    scale = max(np.abs(sigma).max(), 1e-300)
    if np.abs(sigma - sigma.T).max() > 1e-6 * scale:
        raise UserError(f"statistics {path}: sigma is not symmetric, so it is no covariance; recompute them")
    if np.linalg.eigvalsh(sigma).min() < -1e-6 * scale:
        raise UserError(f"statistics {path}: sigma has negative eigenvalues, so it is no covariance; recompute them")
    return mu, sigma, {"n": None if n < 0 else n, "key": key}

# -----------------------------------------------------------------------------
# image inputs


def load_images(path):
    """uint8 (N,H,W,3) from a folder of images (recursive) or a .npy/.npz image array."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist")
    if path.is_file():
        if path.suffix.lower() not in (".npy", ".npz"):
            raise UserError(f"{path}: expected a folder of images or a .npy/.npz image array")
        check_array_file(path)
        return np.ascontiguousarray(as_nhwc_uint8(load_array(path), path))
    files, bad = image_files(path)
    images = []
    for f in files:
        try:
            with quiet_pil(f), Image.open(f) as im:
                images.append(np.asarray(to_rgb(im)))
        except (OSError, ValueError, SyntaxError):  # truncated / not really an image
            bad += 1
    if not images:  # the error alone says it all: one line, no warning above it
        unreadable = f" ({bad} file(s) with an image name could not be read)" if bad else ""
        raise UserError(f"no readable images ({', '.join(sorted(IMAGE_EXTS))}) under {path}{unreadable}")
    if bad:
        warn(f"skipped {bad} unreadable image file(s) under {path}")
    sizes = {im.shape for im in images}
    if len(sizes) > 1:
        a, b = sorted(sizes)[:2]
        raise UserError(f"images under {path} differ in size ({a[1]}x{a[0]} vs {b[1]}x{b[0]}, ...); "
                       f"resize them to one size first")
    return np.stack(images)


class _Sized:
    """A one-pass iterable with a length, so progress bars show a total."""
    def __init__(self, it, n):
        self.it, self.n = it, n

    def __iter__(self):
        return iter(self.it)

    def __len__(self):
        return self.n


def batches_from_array(arr, batch_size):
    """uint8 (b,3,H,W) tensors from a uint8 (N,H,W,3) array (one pass, has len())."""
    gen = (torch.from_numpy(np.ascontiguousarray(arr[i:i + batch_size].transpose(0, 3, 1, 2)))
           for i in range(0, len(arr), batch_size))
    return _Sized(gen, -(-len(arr) // batch_size))

# -----------------------------------------------------------------------------
# generators, reference statistics, FID during training


_weights_ids = {}


def weights_id(path) -> str:
    """The weights file's identity for cache keys: a prefix of its sha256 (once per process)."""
    path = str(Path(path).resolve())
    if path not in _weights_ids:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _weights_ids[path] = h.hexdigest()[:16]
    return _weights_ids[path]


def check_published_weights(path) -> str:
    """weights_id(path), with one warning per file and process when it is not the published
    file's: other weights (converted again, fine-tuned, another port) move FID, so their
    numbers cannot be set beside published ones. The fingerprint is still recorded."""
    digest = weights_id(path)
    if not digest.startswith(PUBLISHED_SHA256_PREFIX):
        warn(f"FID weights {path} (sha256 {digest}...) are not the published {WEIGHT_FILENAMES[0]} (sha256 "
             f"{PUBLISHED_SHA256_PREFIX}...): FID/IS/KID from them are not comparable with published numbers "
             f"(converted or fine-tuned weights?); for comparable numbers use {FID_WEIGHTS_URL}", once=True)
    return digest


def generated_features(G, model, z, batch_size, device, bn_mode="batch", progress=True, rank=0, world=1,
                       gen_batch=None):
    """(pool3, logits) of n images from G, quantised to uint8 as saving PNGs would.

    z: (n, z_dim) CPU latents, e.g. utils.fixed_latents(seed, "fid", n, z_dim): the same
    images whatever the process count. With BatchNorm on batch statistics an image
    depends on its batch, so G draws them in batches of `gen_batch` (the run's
    --batch_size) whatever `batch_size`, the Inception batch, is: the value does not move
    with --fid_batch_size. Under torchrun generation batch j is drawn by rank j % world
    and the features are gathered back in batch order."""
    n, gen_batch = len(z), gen_batch or batch_size
    starts = list(range(0, n, gen_batch))
    mine = starts[rank::world]
    if mine:
        images = _rebatch(uint8_batches(G, z, mine, gen_batch, device, bn_mode), batch_size)
        count = sum(min(gen_batch, n - s) for s in mine)
        pool3, logits = extract_features(model, _Sized(images, -(-count // batch_size)), device, progress,
                                         desc="FID samples")
    else:
        pool3, logits = np.zeros((0, 2048)), np.zeros((0, 1008))
    if world == 1:
        return pool3, logits
    per_rank = _gather_rows(np.concatenate([pool3, logits], axis=1), device)
    rows, taken = [], [0] * world
    for j, s in enumerate(starts):
        r, size = j % world, min(gen_batch, n - s)
        rows.append(per_rank[r][taken[r]:taken[r] + size])
        taken[r] += size
    both = np.concatenate(rows)
    return both[:, :2048], both[:, 2048:]


def _rebatch(batches, size):
    """The images of a stream of batches, in the same order, in batches of `size`."""
    pending, count = [], 0
    for b in batches:
        pending.append(b)
        count += len(b)
        while count >= size:
            joined = torch.cat(pending)
            yield joined[:size]
            pending, count = [joined[size:]], count - size
    if count:
        yield torch.cat(pending)


def _gather_rows(arr, device):
    """all_gather of a 2-D float64 array whose row count differs between ranks."""
    world = dist.get_world_size()
    local = torch.from_numpy(np.ascontiguousarray(arr)).to(device)
    count = torch.tensor([len(local)], device=device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    padded = torch.zeros((max(counts), arr.shape[1]), dtype=local.dtype, device=device)
    padded[:len(local)] = local
    chunks = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(chunks, padded)
    return [c[:k].cpu().numpy() for c, k in zip(chunks, counts)]


@dataclass
class Reference:
    mu: np.ndarray
    sigma: np.ndarray
    pool3: np.ndarray  # per-image features, only kept when KID needs them
    path: Path


def reference_stats(dataset, model, weights, resize, cap, batch_size, device, cache_dir, with_features=False,
                    num_workers=0, progress=True, rank=0, world=1, images=None) -> Reference:
    """Statistics of the training images as training sees them (after crop/resize): all of
    them, or a fixed random `cap`. Cached as <cache_dir>/<dataset>_<size>px_<n>_<hash>.npz,
    the hash over everything that determines them (dataset, path, size, crop/resize,
    count, protocol, weights), the key itself stored in the file. Every run on the same
    data reuses them; a changed key computes new ones. Rank 0 computes, others wait.
    `images`: the dataset already decoded (uint8 (N, 3, H, W), as --cache and in-memory
    arrays serve training), read directly instead of through loader workers."""
    n = min(len(dataset), cap)
    wid = check_published_weights(weights) if rank == 0 else weights_id(weights)  # one warning, not one per rank
    key = {**dataset.key(), "count": n, "resize": resize, "weights": wid}
    if torch.device(device).type == "cuda" and model.precision != "fp32":  # fp32 keys stay as they were
        key["precision"] = model.precision
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    path = Path(cache_dir) / f"{key['dataset']}_{key['size']}px_{n}_{digest}.npz"
    feats_path = path.with_suffix(".pool3.npy")
    # runs starting together (a sweep's --jobs) wait for the one computing them instead of repeating it
    if rank == 0:
        with file_lock(path.with_name(f".{path.name}.lock")):
            if not path.exists() or (with_features and not feats_path.exists()):
                _compute_reference(dataset, model, n, batch_size, device, num_workers, progress, images, path,
                                   feats_path, key, with_features)
    if world > 1:
        dist.barrier()
    mu, sigma, meta = load_stats(path)
    if meta["key"] != key:
        raise UserError(f"{path} holds statistics for other data ({meta['key']}); delete it to recompute")
    pool3 = np.load(feats_path).astype(np.float64) if with_features else None
    return Reference(mu, sigma, pool3, path)


def _compute_reference(dataset, model, n, batch_size, device, num_workers, progress, images, path, feats_path, key,
                       with_features):
    g = torch.Generator().manual_seed(0)
    idx = range(n) if n == len(dataset) else torch.randperm(len(dataset), generator=g)[:n].sort().values.tolist()
    if images is not None:
        chosen = images if n == len(images) else images[torch.as_tensor(idx, device=images.device)]
        loader = _Sized((chosen[i:i + batch_size] for i in range(0, n, batch_size)), -(-n // batch_size))
    else:
        loader = DataLoader(Subset(dataset, idx), batch_size, num_workers=num_workers, generator=g)
    pool3, _ = extract_features(model, loader, device, progress, desc="FID reference")
    mu, sigma = feature_stats(pool3)
    save_stats(path, mu, sigma, key, n)
    if with_features:
        with atomic_open(feats_path) as f:
            np.save(f, pool3.astype(np.float32))
    print(f"FID reference statistics of {n:,} real images saved to {path}", flush=True)


def generator_from_checkpoint(path, ema=False, trust=False):
    """(G, its config) from a training checkpoint, built with the checkpoint's own settings
    (size, spans, mask mode, BatchNorm mode, seed). UserError for anything else."""
    ck = load_checkpoint(path, trust=trust)
    cfg = argparse.Namespace(**ck["config"])
    if ema and ck.get("G_ema") is None:
        raise UserError(f"{path} has no EMA generator (trained without --ema_decay); drop --ema")
    try:
        G = build_generator(cfg)
        G.load_state_dict(ck["G_ema"] if ema else ck["G"])
    except (RuntimeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise UserError(f"{path}: its generator does not fit the config stored with it ({type(e).__name__}); "
                        f"pass a checkpoint main.py wrote") from None
    return G, cfg


@dataclass(frozen=True)
class Metric:
    """One entry of the metric registry. compute(a, b, device, options) -> one float per
    column, where a is the measured side (mu, sigma, pool3, logits: generated images, or
    the CLI's first input) and b the reference side (mu, sigma, pool3)."""
    columns: tuple
    needs: str  # "stats": mu/sigma of both; "logits": a's logits; "features": per-image pool3 of both
    compute: Callable
    text: str  # how the CLI prints the values


METRICS = {
    "fid": Metric(("fid",), "stats", lambda a, b, device, o: (frechet_distance(a.mu, a.sigma, b.mu, b.sigma, device),),
                  "{:.6f}"),
    "is": Metric(("is", "is_std"), "logits", lambda a, b, device, o: inception_score(a.logits, o.get("isc_splits", 10)),
                 "{:.6f} +- {:.6f}"),
    "kid": Metric(("kid", "kid_std"), "features",
                  lambda a, b, device, o: kernel_inception_distance(a.pool3, b.pool3, o.get("kid_subsets", 100),
                                                                    o.get("kid_subset_size", 1000)),
                  "{:.6g} +- {:.6g}"),
}


def parse_metrics(text) -> list:
    """'is,fid' -> ["fid", "is"], checked against the registry (UserError otherwise)."""
    names = {m.strip().lower() for m in str(text).split(",") if m.strip()}
    if not names or names - set(METRICS):
        raise UserError(f"--metrics {text!r}: choose a comma list of {','.join(METRICS)}")
    return [m for m in METRICS if m in names]  # the registry's order: fid.csv columns do not move


class FIDMonitor:
    """FID (and IS / KID with --metrics) of G, and of its EMA when on, every --fid_step:
    rows in <log_dir>/fid.csv, a plot in <log_dir>/fid.png. The real side is reference
    statistics cached under <log_path>/fid_stats and shared by every run on the same data,
    so runs of different spans are measured against identical numbers. Under torchrun
    every rank generates its share; rank 0 computes and writes."""

    def __init__(self, cfg, dataset, weights, device, log_dir, start_step, rank=0, world=1, images=None):
        self.cfg, self.device, self.rank, self.world = cfg, device, rank, world
        self.progress = rank == 0 and is_tty()
        self.model = load_inception(weights, cfg.fid_resize, device, cfg.fid_precision)
        self.ref = reference_stats(
            dataset, self.model, weights, cfg.fid_resize, cfg.fid_ref_samples, cfg.fid_batch_size, device,
            Path(cfg.log_path) / "fid_stats", with_features="kid" in cfg.metrics, num_workers=cfg.num_workers,
            progress=self.progress, rank=rank, world=world, images=images)
        self.z = fixed_latents(cfg.seed, "fid", cfg.fid_samples, cfg.z_dim)
        self.columns = ["step", "fid", "fid_ema", "samples", "seconds"]  # fid's always: compare reads them
        for name in cfg.metrics:
            if name != "fid":
                self.columns += [c + suffix for suffix in ("", "_ema") for c in METRICS[name].columns]
        self.path = Path(log_dir) / "fid.csv"
        if rank == 0:  # a resumed run drops what was logged after its checkpoint
            self._write(csv_rows_until(self.path, start_step))

    def evaluate(self, step, G, G_ema=None):
        cfg, start = self.cfg, time.perf_counter()
        row = {"step": step, "samples": cfg.fid_samples}
        for suffix, g in (("", G), ("_ema", G_ema)):
            if g is None:
                continue
            pool3, logits = generated_features(g, self.model, self.z, cfg.fid_batch_size, self.device, cfg.fid_g_mode,
                                               progress=self.progress, rank=self.rank, world=self.world,
                                               gen_batch=cfg.batch_size)
            if self.rank != 0:
                continue
            generated = Resolved("generated", *feature_stats(pool3), pool3, logits)
            for name in cfg.metrics:
                metric = METRICS[name]
                values = metric.compute(generated, self.ref, self.device, {})
                row.update({c + suffix: v for c, v in zip(metric.columns, values)})
        if self.rank != 0:
            return
        row["seconds"] = time.perf_counter() - start
        self._write(csv_rows_until(self.path, step) + [{k: (f"{v:.8g}" if isinstance(v, float) else v)
                                                        for k, v in row.items()}])
        summary = "  ".join(f"{k} {row[k]:.4g}" for k in self.columns if isinstance(row.get(k), float) and k != "seconds")
        print(f"step {step}: {summary}  ({cfg.fid_samples} samples, {row['seconds']:.1f} s)", flush=True)

    def _write(self, rows):
        with atomic_open(self.path, "w", newline="") as f:
            w = csv.DictWriter(f, self.columns, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        if rows:
            plot_fid({self.cfg.version: rows}, self.path.with_name("fid.png"))


def plot_fid(runs: dict, path):
    """FID against step, a line per run; its EMA generator dashed in the same colour."""
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for label, rows in runs.items():
        color = None
        for key, style in (("fid", "-o"), ("fid_ema", "--s")):
            pts = [(int(r["step"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
            if pts:
                line, = ax.plot(*zip(*pts), style, ms=3, color=color,
                                label=label + (" (EMA)" if key == "fid_ema" else ""))
                color = line.get_color()
    ax.set_xlabel("generator step")
    ax.set_ylabel("FID (lower is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -----------------------------------------------------------------------------
# CLI


@dataclass
class Resolved:
    """One CLI input: statistics always, features only when computed from images."""
    spec: str
    mu: np.ndarray
    sigma: np.ndarray
    pool3: np.ndarray = None
    logits: np.ndarray = None
    meta: dict = field(default_factory=dict)


def resolve_input(spec, get_model, batch_size=50, device=None, progress=True, n_samples=10000, ema=False,
                  trust=False):
    """Turn a CLI input into statistics (+ features when computed from images).
    `get_model` is called only when features must be computed, so stats-only runs
    need no weights."""
    path = Path(spec)
    if not path.exists():
        raise UserError(f"{spec} does not exist")
    if path.suffix.lower() == ".pt":
        G, cfg = generator_from_checkpoint(path, ema, trust)  # a bad file fails before the network loads
        z = fixed_latents(cfg.seed, "fid", n_samples, cfg.z_dim)
        pool3, logits = generated_features(G.to(device), get_model(), z, batch_size, device, cfg.fid_g_mode,
                                           progress=progress, gen_batch=cfg.batch_size)
        return Resolved(str(spec), *feature_stats(pool3), pool3, logits, meta={"n": len(pool3), "key": {}})
    if path.is_file() and _is_stats_file(path):
        mu, sigma, meta = load_stats(path)
        return Resolved(str(spec), mu, sigma, meta=meta)
    images = load_images(path)
    model = get_model()
    pool3, logits = extract_features(model, batches_from_array(images, batch_size), device=device,
                                     progress=progress, desc=path.name)
    mu, sigma = feature_stats(pool3)
    return Resolved(str(spec), mu, sigma, pool3, logits, meta={"n": len(pool3), "key": {}})


def _parse_args(argv):
    p = OneLineParser(prog="fid.py", description="FID / IS / KID with the TF FID Inception network.")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image folder, .npy/.npz image array (N,H,W,3 uint8) or statistics .npz (mu/sigma)")
    p.add_argument("--metrics", default="fid", help="comma list of fid,is,kid (IS is of the first input)")
    p.add_argument("--save-stats", "--save_stats", dest="save_stats", action="store_true",
                   help="compute statistics of INPUT and write them to OUT.npz: --save-stats INPUT OUT.npz")
    p.add_argument("--fid_weights", default=None, help="FID Inception weights file (default: torch hub cache)")
    p.add_argument("--fid_resize", default="tf1", choices=RESIZE_MODES,
                   help="tf1: torch-fidelity/TF reference resize; pytorch: pytorch-fid's")
    p.add_argument("--fid_precision", default="tf32", choices=PRECISIONS,
                   help="Inception arithmetic on CUDA: tf32 (TensorFloat-32; FID within 1e-4 relative of fp32, "
                        "2.4x faster, see README) or fp32 (IEEE)")
    p.add_argument("--batch_size", type=int_at_least(1), default=50)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--kid_subsets", type=int_at_least(1), default=100)
    p.add_argument("--kid_subset_size", type=int_at_least(2), default=1000)  # the unbiased MMD divides by m(m-1)
    p.add_argument("--isc_splits", type=int_at_least(1), default=10)
    p.add_argument("--fid_samples", type=int_at_least(2), default=10000,  # a covariance needs 2
                   help="images generated from a checkpoint input")
    p.add_argument("--ema", action="store_true", help="checkpoint inputs: use the EMA generator")
    p.add_argument(TRUST_FLAG, action="store_true",
                   help="checkpoint inputs: load one of a version before 0.2 (pickled numpy RNG state); unpickling "
                        "can run code hidden in a file, so only for checkpoints you made yourself")
    p.add_argument("--no_progress", action="store_true")
    return p.parse_args(argv)


def _run(args):
    metrics = parse_metrics(args.metrics)
    need = 2 if args.save_stats or any(METRICS[m].needs != "logits" for m in metrics) else 1
    if len(args.inputs) != need:
        raise UserError(f"expected {need} input(s), got {len(args.inputs)}"
                       + ("; usage: --save-stats INPUT OUT.npz" if args.save_stats else ""))
    if args.batch_size < 1:
        raise UserError("--batch_size must be >= 1")
    device = pick_device(args.device)
    weights, model = None, None
    if args.fid_weights is not None:
        weights = resolve_weights(args.fid_weights)  # fail fast on a bad path

    def get_model():
        nonlocal weights, model
        if model is None:
            if weights is None:
                weights = resolve_weights(quiet=True)  # load_inception's error says the same
            model = load_inception(weights, args.fid_resize, device, args.fid_precision)
            check_published_weights(weights)  # after loading: a file that is no weights gets its error alone
        return model

    key = lambda: {"resize": args.fid_resize, "weights": Path(weights).name if weights else None}
    resolve = lambda spec: resolve_input(spec, get_model, args.batch_size, device, not args.no_progress,
                                         args.fid_samples, args.ema, args.trust_checkpoint)

    if args.save_stats:
        src, out = args.inputs
        if Path(out).is_dir():
            raise UserError(f"--save-stats: {out} is a folder; give a file name, e.g. {Path(out) / 'stats.npz'}")
        check_writable(Path(out).absolute().parent, "--save-stats")  # before minutes of feature extraction
        r = resolve(src)
        if r.pool3 is None:
            raise UserError(f"{src} is already a statistics file")
        save_stats(out, r.mu, r.sigma, key=key(), n=len(r.pool3))
        print(f"saved statistics of {len(r.pool3)} images to {out}")
        return 0

    # check what needs per-image features before spending time on extraction
    for i, spec in enumerate(args.inputs):
        if Path(spec).is_file() and _is_stats_file(spec):
            for m in metrics:
                if METRICS[m].needs == "features":
                    raise UserError(f"{m.upper()} needs per-image features, but {spec} is a statistics file; pass images")
                if METRICS[m].needs == "logits" and i == 0:
                    raise UserError(f"{m.upper()} needs images, but {spec} is a statistics file")
    inputs = [resolve(s) for s in args.inputs]
    for r in inputs:  # stats from the other resize pipeline are not comparable
        saved = r.meta.get("key", {}).get("resize")
        if r.pool3 is None and saved and saved != args.fid_resize:
            raise UserError(f"{r.spec} was computed with --fid_resize {saved}; rerun with --fid_resize {saved}")
    options = {"isc_splits": args.isc_splits, "kid_subsets": args.kid_subsets, "kid_subset_size": args.kid_subset_size}
    for name in metrics:
        metric = METRICS[name]
        values = metric.compute(inputs[0], inputs[-1], device, options)
        print(f"{name.upper()}: " + metric.text.format(*values))
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv and argv[0] == "compare":  # the sub-command; a folder of that name can be given as ./compare
            return compare(argv[1:])
        return _run(_parse_args(argv))
    except UserError as e:  # UserError and the UserErrors of the data and checkpoint helpers
        print(f"fid.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C: nothing half-written is left (atomic writes), so no traceback
        print("fid.py: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
