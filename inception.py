"""The FID-Inception network of the TF FID reference (the 2015-12-05 graph as pytorch-fid
and torch-fidelity port it), its two input pipelines (TF1 resize or pytorch-fid's), and its
weights: found, downloaded once, verified against the published file."""
import hashlib
import os
import re
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from choices import PRECISIONS, RESIZE_MODES
from device import matmul_precision
from utils import UserError, warn

FID_WEIGHTS_URL = ('https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/'
                   'pt_inception-2015-12-05-6726825d.pth')


# the same converted TF weights under pytorch-fid's and torch-fidelity's file names
WEIGHT_FILENAMES = ("pt_inception-2015-12-05-6726825d.pth", "weights-inception-2015-12-05-6726825d.pth")


FEATURES = 2048  # pool3: the dimension of FID's feature vectors


# torch hub's naming convention (its check_hash): <name>-<first hex digits of the file's sha256>.<ext>
PUBLISHED_SHA256_PREFIX = FID_WEIGHTS_URL.rsplit("-", 1)[1].split(".")[0]  # "6726825d"


# The Inception-v3 blocks (Szegedy et al., 2016), with the module names of torchvision's, which
# pytorch-fid's and torch-fidelity's weight files use. Written here rather than imported: importing
# torchvision costs a second and a half per process (it imports torch._dynamo), and every FID-
# measuring run, sweep cell and fid.py call would pay it. The TF graph differs from torchvision's
# network only in the pooling branches: its average pool ignores padded zeros, and its last block
# max-pools.
class BasicConv2d(nn.Module):
    def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)


def _chain(x, *convs):
    for conv in convs:
        x = conv(x)
    return x


def pool2d(fn, x, **kwargs):
    """fn(x, **kwargs) for F.max_pool2d or F.avg_pool2d, with the numbers of ATen's NCHW pooling,
    faster on the CPU, where pooling is a quarter of this network's time in ATen's NCHW kernels:
    a 3x3 max is taken over rows, then over columns (a max is exact in any order; strided maxima
    are about twice as fast as channels-last pooling and its two layout copies), and an average
    runs channels-last (ATen adds the same window in the same order and divides by the same
    count). The convolutions stay NCHW, the layout in which the peers compute theirs."""
    if x.device.type != "cpu":
        return fn(x, **kwargs)
    if fn is F.max_pool2d and kwargs.get("kernel_size") == 3 and set(kwargs) <= {"kernel_size", "stride", "padding"}:
        return _max_pool_3x3(x, kwargs.get("stride", 3), kwargs.get("padding", 0))
    if x.is_contiguous(memory_format=torch.channels_last):
        return fn(x, **kwargs)
    return fn(x.contiguous(memory_format=torch.channels_last), **kwargs).contiguous()


def _max_pool_3x3(x, stride, padding):
    if padding:  # -inf never wins a max: the padded cells are left out, as ATen leaves them out
        x = F.pad(x, (padding,) * 4, value=float("-inf"))
    h, w = (x.shape[-2] - 3) // stride + 1, (x.shape[-1] - 3) // stride + 1
    rows = [x[..., d:d + stride * (h - 1) + 1:stride, :] for d in range(3)]
    x = torch.maximum(torch.maximum(rows[0], rows[1]), rows[2])
    cols = [x[..., d:d + stride * (w - 1) + 1:stride] for d in range(3)]
    return torch.maximum(torch.maximum(cols[0], cols[1]), cols[2])


class _Block(nn.Module):
    pool = "avg"  # the pooling branch: "avg" (padded zeros left out, as TF) or "max"

    def _pool_branch(self, x):
        if self.pool == "max":
            x = pool2d(F.max_pool2d, x, kernel_size=3, stride=1, padding=1)
        else:
            x = pool2d(F.avg_pool2d, x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
        return self.branch_pool(x)

    def forward(self, x):
        return torch.cat(self.branches(x), 1)


class FIDInceptionA(_Block):
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def branches(self, x):
        return [self.branch1x1(x), _chain(x, self.branch5x5_1, self.branch5x5_2),
                _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3), self._pool_branch(x)]


class InceptionB(_Block):  # the grid reduction 35 -> 17
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def branches(self, x):
        return [self.branch3x3(x), _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
                pool2d(F.max_pool2d, x, kernel_size=3, stride=2)]


class FIDInceptionC(_Block):  # factorised 7x7 convolutions
    def __init__(self, cin, channels_7x7):
        super().__init__()
        c = channels_7x7
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c, 1)
        self.branch7x7_2 = BasicConv2d(c, c, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c, 1)
        self.branch7x7dbl_2 = BasicConv2d(c, c, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c, c, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c, c, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def branches(self, x):
        return [self.branch1x1(x), _chain(x, self.branch7x7_1, self.branch7x7_2, self.branch7x7_3),
                _chain(x, self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                       self.branch7x7dbl_5), self._pool_branch(x)]


class InceptionD(_Block):  # the grid reduction 17 -> 8
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def branches(self, x):
        return [_chain(x, self.branch3x3_1, self.branch3x3_2),
                _chain(x, self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4),
                pool2d(F.max_pool2d, x, kernel_size=3, stride=2)]


class FIDInceptionE(_Block):  # expanded filter banks
    def __init__(self, cin, pool="avg"):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)
        self.pool = pool

    def branches(self, x):
        b3 = self.branch3x3_1(x)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return [self.branch1x1(x), torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1),
                torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1), self._pool_branch(x)]


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
    # the lerp across x of every source row, once: output rows that share a source row get
    # the same numbers as if each made its own (4-8x faster than lerping per output row)
    left, right = x.index_select(-1, x0), x.index_select(-1, x1)
    rows = left + (right - left) * fx
    top, bot = rows.index_select(-2, y0), rows.index_select(-2, y1)
    return top + (bot - top) * fy[:, None]


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
        self.fc = nn.Linear(FEATURES, 1008)  # 1008 classes in the TF graph (1000 + unused)

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
            x = pool2d(F.max_pool2d, x, kernel_size=3, stride=2)
            x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
            x = pool2d(F.max_pool2d, x, kernel_size=3, stride=2)
            for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                          self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
                x = block(x)
            pool3 = F.adaptive_avg_pool2d(x, 1).flatten(1)
            # IS uses the logits without the fc bias (the TF reference takes them before the bias add)
            return pool3, pool3 @ self.fc.weight.T


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


_weights_ids = {}


def is_weights_id(text) -> bool:
    """Whether `text` is a weights_id (statistics files from before it recorded a file name)."""
    return isinstance(text, str) and re.fullmatch(r"[0-9a-f]{16}", text) is not None


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
