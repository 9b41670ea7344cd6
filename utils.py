"""Small helpers shared by the trainer, the data loader and the metrics."""
import argparse
import csv
import errno
import os
import pickle
import random
import re
import subprocess
import sys
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.nn.modules.batchnorm import _BatchNorm

__version__ = "0.2.0"  # 0.2: checkpoints load with weights_only (no pickled numpy)
REPO = Path(__file__).resolve().parent


# Run settings that checkpoints and config.json files saved before the flag existed lack:
# what those runs trained with.
LEGACY_SETTINGS = {"fully_masked": "skip", "diffaug": ""}


class UserError(Exception):
    """A mistake the user can fix: printed as one line, no traceback, exit code 2."""


class OneLineParser(argparse.ArgumentParser):
    """The parser of every entry point: a bad flag ends in one line naming the fix, not a
    usage dump or a traceback."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see python {self.prog} --help)\n")


_warned = set()


def warn(message: str, once: bool = False) -> None:
    """A one-line warning on stderr (no source line, unlike warnings.warn)."""
    if once and message in _warned:
        return
    _warned.add(message)
    print(f"warning: {message}", file=sys.stderr, flush=True)


def git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible; use --device cpu or auto")
    return torch.device(name)


def tf32_flags():
    """(matmul, conv): whether CUDA float32 matmuls / convolutions may use TF32."""
    m, c = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(m, "fp32_precision") and hasattr(c, "conv"):
        return m.fp32_precision == "tf32", c.conv.fp32_precision == "tf32"
    return m.allow_tf32, c.allow_tf32


def set_tf32(matmul: bool, conv: bool) -> None:
    """Set both TF32 switches. torch >= 2.9 raises when its legacy allow_tf32 flags and
    the newer fp32_precision API are mixed, so the newer one is used where it exists,
    everywhere in this package."""
    m, c = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(m, "fp32_precision") and hasattr(c, "conv"):
        m.fp32_precision = "tf32" if matmul else "ieee"
        c.conv.fp32_precision = "tf32" if conv else "ieee"
    else:
        m.allow_tf32, c.allow_tf32 = matmul, conv


def configure_backends(cfg) -> None:
    """Process-wide CUDA settings for training, set once by the entry point: TF32 matmuls
    and convolutions (float32 speed; the FID network turns TF32 off for itself) and cuDNN
    autotuning (a training run's shapes never change)."""
    if cfg.device == "cuda":
        set_tf32(True, True)
        torch.backends.cudnn.benchmark = True


# ---------------------------------------------------------------------------- images
def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats → uint8 exactly as saving a PNG quantises them (round, clamp)."""
    return ((x.float() + 1) * 127.5 + 0.5).clamp_(0, 255).to(torch.uint8)


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


# ---------------------------------------------------------------------------- state
@contextmanager
def atomic_open(path, mode="wb", **kwargs):
    """Write through a hidden temp file beside `path`, renamed over it when the block ends
    without error: readers, crashes and parallel writers never see half a file. On error
    the temp file is removed and `path` keeps what it had."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # durable before it takes the name, not only atomic
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # and the rename itself survives a power cut (POSIX; best effort where folders cannot be opened)
        folder = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


@contextmanager
def file_lock(path):
    """Hold an exclusive lock on `path` (created if missing) for the block, waiting for
    other processes that hold it. The OS drops the lock when its process dies, so a lock
    file left by a killed process never blocks anyone."""
    try:
        import fcntl
    except ImportError:  # no advisory locks on this platform
        yield
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield  # closing the file releases it


def check_writable(folder, flag: str) -> None:
    """UserError (one line naming the flag) unless `folder` exists as a writable folder or
    can be created as one; creates nothing."""
    path = Path(folder).absolute()
    probe = path
    while not os.path.exists(probe):  # os.path: no PermissionError from an unreadable parent
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"{flag}: {probe} is a file, so {path} cannot be a folder; pick another {flag}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{flag}: cannot write to {probe} (permission denied or read-only); pick another {flag}")


def int_at_least(low):
    """argparse type: an integer >= low (0 steps, splits or subsets would divide by zero or
    print nan as a result)."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    parse.__name__ = f"integer >= {low}"  # what argparse calls it in messages
    return parse


def check_output_file(path, flag) -> Path:
    """Before the work: UserError (one line) if `path` cannot become a file, because it is
    a folder or its folder cannot be created or written."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; give a file name")
    check_writable(path.parent, flag)
    return path


def write_failed(what, path, error) -> UserError:
    """The one line for an output file that could not be written (a full disk, a read-only
    or missing folder): the path, why, and the fix. Writes go through atomic_open, so an
    earlier file at the path is as it was."""
    reasons = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
               errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
               errno.EPERM: "permission denied", errno.ENOTDIR: "part of its folder is a file",
               errno.EEXIST: "its folder is a file", errno.EISDIR: "it is a folder", errno.ENOENT: "its folder is gone"}
    why = reasons.get(getattr(error, "errno", None), getattr(error, "strerror", None) or type(error).__name__)
    fix = "free some space or pick another" if error.errno in (errno.ENOSPC, errno.EDQUOT) else "pick another"
    return UserError(f"cannot write {what} {path}: {why}; {fix} {what} (any earlier file there is unchanged)")


_run_locks = {}  # path -> open file: the run locks this process holds


def lock_run(path, what: str) -> None:
    """Make this process the only writer of a run: an exclusive lock on `path`, kept until
    unlock_run or the process ends (the OS releases it then, also after kill -9, so a
    lock of a dead process is never in the way). UserError naming the holder if another
    live process has it. Taking it again in the same process is a no-op."""
    path = Path(path)
    if path in _run_locks:
        return
    try:
        import fcntl
    except ImportError:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise UserError(f"{what} is being written by {holder}; wait for it to end or stop it "
                        f"(it saves a checkpoint), or pick another --version") from None
    f.seek(0)
    f.truncate()
    f.write(f"process {os.getpid()} ({' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])})")
    f.flush()
    _run_locks[path] = f


def unlock_run() -> None:
    """Release the run locks this process holds."""
    while _run_locks:
        _run_locks.popitem()[1].close()


def remove_stale_temp_files(folder) -> int:
    """Remove the temp files atomic_open leaves behind when its process is killed mid-write
    (kill -9): those whose writing process is gone. Returns how many."""
    removed = 0
    for p in Path(folder).glob(".*.tmp*"):
        m = re.fullmatch(r"\..+\.tmp(\d+)", p.name)
        if m and not _process_alive(int(m.group(1))):
            p.unlink(missing_ok=True)
            removed += 1
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def atomic_save(obj, path) -> None:
    """torch.save that never leaves a half-written file."""
    with atomic_open(path) as f:
        torch.save(obj, f)


# Fixed latent streams, one per use, each a private generator seeded from the run's seed:
# the same images at every call and on every resume, and the training RNG left alone.
LATENT_STREAMS = {"grid": 1, "eval": 2, "fid": 3}


def fixed_latents(seed: int, stream: str, n: int, z_dim: int) -> torch.Tensor:
    """n latent vectors (CPU) of the named stream: "grid" (sample grids), "eval"
    (--train false samples) or "fid" (FID samples)."""
    g = torch.Generator().manual_seed(seed + LATENT_STREAMS[stream])
    return torch.randn(n, z_dim, generator=g)


def checkpoints(folder: Path) -> dict:
    """{step: path} of the checkpoints in a run's model folder."""
    return {int(p.stem): p for p in folder.glob("*.pt") if p.stem.isdigit()} if folder.is_dir() else {}


OUTPUT_FOLDERS = ("log", "model_save", "sample", "attn")  # each under its --<name>_path root


def run_dirs(cfg) -> dict:
    """A run's output folders: {"log", "model_save", "sample", "attn"} → <root>/<version>."""
    return {k: Path(getattr(cfg, f"{k}_path")) / cfg.version for k in OUTPUT_FOLDERS}


def run_started(cfg) -> bool:
    """Whether run cfg.version has begun: checkpoints, or a config or logs it wrote (a run
    stopped before its first checkpoint). Such a run is continued, never started over."""
    dirs = run_dirs(cfg)
    return bool(checkpoints(dirs["model_save"])) or any((dirs["log"] / f).exists()
                                                         for f in ("config.json", "metrics.csv"))


# The entries every checkpoint holds (written by trainer.Trainer._state), and those a run
# that trains on from it needs too.
CHECKPOINT_KEYS = frozenset({"G", "D", "config", "step"})
TRAINING_KEYS = frozenset({"g_opt", "d_opt", "rng"})
TRUST_FLAG = "--trust_checkpoint"


def load_checkpoint(path, mmap=False, trust=False, needs=CHECKPOINT_KEYS) -> dict:
    """A checkpoint on the CPU, checked to hold `needs`; mmap=True reads tensors lazily
    (cheap when only the config is needed).

    Loaded with weights_only=True: unpickling an arbitrary .pt can run code hidden in it, so
    only tensors and plain Python values are accepted. Checkpoints of versions before 0.2
    pickled numpy's RNG state and need `trust` (the --trust_checkpoint flag), an explicit
    statement that the file is the user's own. Every failure is one UserError line."""
    unreadable = UserError(f"cannot read checkpoint {path} (not a checkpoint file, or cut short); use another "
                           f"step or re-copy the file")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; anything else is not ours
        raise unreadable
    try:
        ck = torch.load(path, map_location="cpu", weights_only=not trust, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower():  # a garbled pickle inside the archive
            raise unreadable from None
        raise UserError(f"{path} holds pickled Python objects, which a safe load refuses: a checkpoint saved "
                        f"before version 0.2, or a file that runs code when opened. Only if you made it yourself, "
                        f"add {TRUST_FLAG} to load it unsafely") from None
    except Exception:  # an archive cut short or damaged
        raise unreadable from None
    missing = sorted(set(needs) - set(ck)) if isinstance(ck, dict) else None
    if missing is None or missing or not isinstance(ck.get("config"), dict):
        what = f"it lacks {', '.join(missing)}" if missing else "not a dict with a config"
        raise UserError(f"{path} is not a training checkpoint of this package ({what}); pass a <step>.pt "
                        f"that main.py wrote")
    return ck


def csv_rows_until(path: Path, step: int) -> list:
    """The rows (dicts) of a log CSV up to `step`: a resumed run drops what was logged
    after its checkpoint. Lines a kill or a full disk left broken (NUL bytes, cut short, a
    step that is not a number) are dropped with one warning, never kept as rows."""
    path = Path(path)
    if not path.exists():
        return []
    with open(path, newline="", errors="replace") as f:
        lines = f.read().splitlines(keepends=True)
    good = [line for line in lines if "\x00" not in line]
    reader = csv.DictReader(good)
    rows, broken = [], len(lines) - len(good)
    for r in reader:
        try:
            ok = None not in r and None not in r.values() and int(r["step"]) >= 0
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            broken += 1
        elif int(r["step"]) <= step:
            rows.append(r)
    if broken:
        warn(f"{path}: dropped {broken} broken line(s) (a write cut short by a kill or a full disk)")
    return rows


def csv_header(path: Path):
    """The column names of a CSV file, or None if it is missing or empty."""
    path = Path(path)
    if not path.exists():
        return None
    with open(path, newline="", errors="replace") as f:
        return next(csv.reader(line for line in f if "\x00" not in line), None)


def rng_state() -> dict:
    """The host and device RNG states as tensors and plain values, which a weights_only
    load accepts (numpy's own state holds an ndarray)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():  # this process's GPU: under torchrun every rank holds the same state
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    n = state["numpy"]
    if isinstance(n, dict):
        np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    else:  # the tuple of checkpoints before version 0.2 (loaded with --trust_checkpoint)
        np.random.set_state(n)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # Every rank draws the same global z, so rank 0's state serves any number of GPUs.
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextmanager
def sampling_mode(G: torch.nn.Module, bn_mode: str = "batch"):
    """Sample from G without changing any of its state.

    eval() stops the spectral-norm power iteration. bn_mode="batch" (--fid_g_mode) keeps BatchNorm on batch
    statistics (what the seed's samples used) without updating the running statistics:
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


def uint8_batches(G, z, starts, batch_size, device, bn_mode="batch"):
    """uint8 images from G, one batch per start index into z (a CPU tensor), in sampling
    mode: what sample PNGs and FID both use."""
    with sampling_mode(G, bn_mode):
        for s in starts:
            yield to_uint8(G(z[s:s + batch_size].to(device)))


def is_tty() -> bool:
    return sys.stderr.isatty()


# ---------------------------------------------------------------------------- distributed
def dist_info():
    """(rank, world_size, local_rank) under torchrun, (0, 1, 0) otherwise."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    return 0, 1, 0


class _SumAllReduce(torch.autograd.Function):
    """all_reduce(SUM) that gradients flow through (backward: all_reduce of the grads)."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class SyncBatchNorm2d(torch.nn.BatchNorm2d):
    """BatchNorm whose training statistics cover the global batch of all ranks.
    Unlike torch.nn.SyncBatchNorm it also runs on CPU (gloo), so the multi-process test
    can check it. Two passes (mean, then squared deviations), each one all_reduce, keep
    the variance as accurate as single-process BatchNorm's."""

    def forward(self, x):
        if not (self.training and dist.is_initialized()):
            return super().forward(x)
        C = x.shape[1]
        xf = x.float()
        sums = _SumAllReduce.apply(torch.cat([xf.sum((0, 2, 3)), xf.new_full((1,), x.numel() / C)]))
        n = sums[-1]
        mean = sums[:C] / n
        centred = xf - mean.view(1, C, 1, 1)
        var = _SumAllReduce.apply((centred * centred).sum((0, 2, 3))) / n
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_((var * n / (n - 1)).detach(), self.momentum)
        scale = self.weight * torch.rsqrt(var + self.eps)
        return (centred * scale.view(1, C, 1, 1) + self.bias.view(1, C, 1, 1)).to(x.dtype)


def convert_sync_bn(model: torch.nn.Module) -> torch.nn.Module:
    for name, child in model.named_children():
        if type(child) is torch.nn.BatchNorm2d:
            new = SyncBatchNorm2d(child.num_features, child.eps, child.momentum).to(child.weight.device)
            new.load_state_dict(child.state_dict())
            setattr(model, name, new)
        else:
            convert_sync_bn(child)
    return model
