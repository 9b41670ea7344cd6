"""Batches for training: global batches of indices that resume exactly, each rank's slice,
decoding by loader workers or from a --cache of decoded images in (GPU) memory."""
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from data_loader import CACHE_PREFIX, ArrayDataset, FileDataset, ImageDataset
from files import atomic_open
from utils import UserError, warn

# Seconds a DataLoader waits for one batch from its worker processes before the run stops
# with a UserError (loader_batches) instead of waiting for ever on a stuck worker.
LOADER_TIMEOUT_S = 300


def batch_indices(n: int, batch: int, seed: int, start: int = 0, device="cpu"):
    """Global batches of indices, forever: epoch e is randperm(n) seeded by seed + e,
    cut into n // batch batches (the remainder dropped, as the original code's drop_last).
    Batch number k is the same whatever `start` was, so a resumed run continues the
    exact order. The permutation moves to `device` once per epoch."""
    per_epoch = n // batch
    epoch, i = divmod(start, per_epoch)
    while True:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).to(device)
        for j in range(i, per_epoch):
            yield perm[j * batch:(j + 1) * batch]
        epoch, i = epoch + 1, 0


def _own_generator():
    """DataLoader iterators draw a worker seed from the generator they are given, by
    default the global one; a private one keeps the global RNG (which draws z) identical
    between a resumed run and an uninterrupted one."""
    return torch.Generator().manual_seed(0)


def worker_options(num_workers, device) -> dict:
    """DataLoader arguments for its worker processes. On CUDA they are started by spawn, not
    fork: a process forked from one that holds a CUDA context (and the threads beside it: the
    pin-memory thread, the driver's) can inherit a lock held at the fork and wait for ever.
    Spawned workers start from a fresh interpreter and get the dataset pickled. Every loader
    with workers gets a finite timeout, whose expiry loader_batches turns into a UserError."""
    if num_workers == 0:
        return {}
    cuda = torch.device(device).type == "cuda" or torch.cuda.is_initialized()
    return {"multiprocessing_context": "spawn" if cuda else None, "timeout": LOADER_TIMEOUT_S}


def loader_batches(loader):
    """The batches of a DataLoader; its timeout (worker_options) as one line naming the cause
    and the fix, instead of a RuntimeError from inside torch."""
    it = iter(loader)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except RuntimeError as e:
            if not str(e).startswith("DataLoader timed out"):
                raise
            for worker in getattr(it, "_workers", ()):  # stuck: ended now, not after torch's 5 s join per worker
                worker.terminate()
            raise UserError(f"no batch from the {loader.num_workers} image-decoding worker process(es) in "
                            f"{loader.timeout:g} s: they are stuck or far too slow; train with --num_workers 0 "
                            f"(decode in the main process) or --cache (decode once, then serve from memory)") from None
        yield batch


class _RankBatchSampler:
    """A DataLoader batch sampler: this rank's slice of each global batch."""

    def __init__(self, n, batch, seed, start, rank, world):
        self.args, self.rank, self.local = (n, batch, seed, start), rank, batch // world

    def __iter__(self):
        for idx in batch_indices(*self.args):
            yield idx[self.rank * self.local:(self.rank + 1) * self.local].tolist()


class LoaderBatches:
    """Decode per batch in DataLoader workers (persistent: no restarts between epochs)."""

    def __init__(self, dataset, batch, seed, start, device, num_workers, rank=0, world=1):
        self.device = torch.device(device)
        self.loader = DataLoader(
            dataset, batch_sampler=_RankBatchSampler(len(dataset), batch, seed, start, rank, world),
            num_workers=num_workers, pin_memory=self.device.type == "cuda", generator=_own_generator(),
            persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers > 0 else None,
            **worker_options(num_workers, self.device))

    def __iter__(self):
        for x in loader_batches(self.loader):
            yield x.to(self.device, non_blocking=True)


class TensorBatches:
    """Index batches out of one uint8 (N, 3, H, W) tensor held on the device."""

    def __init__(self, images: torch.Tensor, batch, seed, start, device, rank=0, world=1):
        on_device = device.type != "cuda" or images.nbytes < 0.5 * torch.cuda.mem_get_info(device)[0]
        # Too big for the GPU: keep it in pinned host memory and copy each batch.
        self.images = images.to(device) if on_device else images.pin_memory()
        self.args, self.device = (len(images), batch, seed, start), device
        self.lo, self.hi = rank * (batch // world), (rank + 1) * (batch // world)

    def __iter__(self):
        for idx in batch_indices(*self.args, device=self.images.device):
            yield self.images[idx[self.lo:self.hi]].to(self.device, non_blocking=True)


def decode_all(dataset, num_workers=0, desc="decoding", device="cpu") -> torch.Tensor:
    """Every image of a dataset as one uint8 (N, 3, H, W) tensor, decoded in parallel
    (`device`: the run's, which decides how the workers start)."""
    loader = DataLoader(dataset, batch_size=64, num_workers=num_workers, generator=_own_generator(),
                        **worker_options(num_workers, device))
    out = torch.empty((len(dataset), 3, dataset.size, dataset.size), dtype=torch.uint8)
    i = 0
    for x in tqdm(loader_batches(loader), desc=desc, total=len(loader), disable=len(dataset) < 5000, leave=False):
        out[i:i + len(x)] = x
        i += len(x)
    return out


def _source_stats(dataset: ImageDataset) -> list:
    """(name, bytes, mtime in ns) of every file the images come from: image files by
    their path under the root, an array file or the files of an LMDB folder by name.
    Cache files beside the data are not sources: they are never stat'ed here."""
    def not_a_source(name):  # our caches and temp files are hidden; LMDB touches lock.mdb on every open
        return name.startswith(".") or name == "lock.mdb"

    if isinstance(dataset, FileDataset):
        files = [(p, p.relative_to(dataset.root).as_posix()) for p in dataset.files]
    else:
        src = Path(dataset.description["path"])
        files = [(src, src.name)] if not src.is_dir() else \
            [(p, p.name) for p in sorted(src.iterdir()) if p.is_file() and not not_a_source(p.name)]
    return [(name, st.st_size, st.st_mtime_ns) for p, name in files for st in [p.stat()]]


def source_digest(dataset: ImageDataset) -> str:
    """A digest of _source_stats: another value when a source file changed, was added or
    removed. What --cache's file name, the FID reference statistics and a resumed run's check
    of its data compare; computed once per dataset object (one stat per file: a second or
    so for CelebA on a local disk)."""
    if getattr(dataset, "_source_digest", None) is None:
        dataset._source_digest = hashlib.sha1(json.dumps(_source_stats(dataset)).encode()).hexdigest()
    return dataset._source_digest


def cache_path(dataset: ImageDataset) -> Path:
    """Where --cache keeps the decoded array: CACHE_PREFIX<dataset>_<size>_<hash>.npy
    next to the data when writable, else in ./data_cache. The folder scan never takes
    such a file for data (see _from_path). The hash covers everything that decides
    the decoded pixels: the transform (size, crop, resize), the count, and each source
    file's name, size and mtime, so a changed, added or removed file makes a new
    cache instead of serving stale images."""
    key = {**dataset.key(), "files": source_digest(dataset)}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    src = Path(key["path"])
    folder = src if src.is_dir() else src.parent
    name = f"{CACHE_PREFIX}{key['dataset']}_{dataset.size}_{digest}.npy"
    return folder / name if os.access(folder, os.W_OK) else Path("data_cache") / name


def cached_images(dataset: ImageDataset, num_workers=0, log=print, device="cpu") -> torch.Tensor:
    """The dataset decoded, read from its --cache file, or decoded once and written there.
    Says in one line which of the two happened and where."""
    path = cache_path(dataset)
    shape = (len(dataset), 3, dataset.size, dataset.size)
    if path.exists():
        try:
            images = np.load(path)
        except (OSError, ValueError, EOFError) as e:  # cut short, or not ours
            images = None
            warn(f"--cache: cannot read {path} ({type(e).__name__}); decoding again")
        if images is not None and images.dtype == np.uint8 and images.shape == shape:
            log(f"--cache: using {len(dataset):,} decoded images from {path}")
            return torch.from_numpy(images)
        if images is not None:  # not what this key writes: someone else's file under our name
            warn(f"--cache: {path} holds {images.dtype} {images.shape}, not uint8 {shape}; decoding again")
    log(f"--cache: decoding {len(dataset):,} images once into {path}")
    _note_other_caches(path, log)
    images = decode_all(dataset, num_workers, device=device)
    with atomic_open(path) as f:  # a file object keeps np.save from renaming it
        np.save(f, images.numpy())
    return images


def _note_other_caches(path: Path, log):
    """One line naming the cache files already beside a new one: written for other images
    (a file changed, added or removed since) or other settings (another size or crop). Kept,
    since another run may still use one; said, since at CelebA scale each is gigabytes."""
    others = sorted(p for p in path.parent.glob(f"{CACHE_PREFIX}*.npy") if p != path)
    if others:
        size = sum(p.stat().st_size for p in others) / 1e6
        log(f"--cache: kept {len(others)} earlier cache file(s) in {path.parent} ({size:,.1f} MB), written for "
            f"other images or settings: {', '.join(p.name for p in others)}; delete the ones no run uses")


def make_batches(dataset, cfg, start, device, rank=0, world=1):
    """The batch stream the trainer draws from: (this rank's part of) batch_size images."""
    if isinstance(dataset, ArrayDataset) and dataset.crop is None and dataset.array.shape[1] == dataset.size:
        images = torch.from_numpy(np.ascontiguousarray(dataset.array)).permute(0, 3, 1, 2)
    elif isinstance(dataset, ArrayDataset) or cfg.cache:
        images = cached_images(dataset, cfg.num_workers, device=device) if cfg.cache else \
            decode_all(dataset, cfg.num_workers, device=device)
    else:
        return LoaderBatches(dataset, cfg.batch_size, cfg.seed, start, device, cfg.num_workers, rank, world)
    return TensorBatches(images, cfg.batch_size, cfg.seed, start, device, rank, world)
