"""Inception features of every input (an image folder, an image array, a generator or its
checkpoint), the reference statistics of a training set (cached, shared by every run on the
same data), and the FID monitor that measures G during training. The network and its
weights are in inception.py, the metrics in metrics.py, the command line in fid.py."""
import csv
import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from batches import loader_batches, source_digest, worker_options
from checkpoint import generator_from_checkpoint
from choices import FID_SAMPLES
from data_loader import IMAGE_EXTS, as_nhwc_uint8, image_files, load_array, quiet_pil, to_rgb
from distributed import gather_rows
from files import atomic_open, check_array_file, csv_header, csv_rows_until, file_lock
from folders import STATS_FOLDER, checkpoints
from inception import FEATURES, check_published_weights, load_inception, weights_id
from metrics import METRICS, _is_stats_file, feature_stats, headline_column, higher_is_better, load_stats
from metrics import recorded_sources, save_stats
from sampling import fixed_latents, uint8_batches, whole_batches
from utils import UserError, is_tty, warn


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
        found = checkpoints(path)  # a run's model folder, given for its newest checkpoint
        hint = f"; a checkpoint is given as its file, e.g. {found[max(found)]}" if found else ""
        raise UserError(f"no readable images ({', '.join(sorted(IMAGE_EXTS))}) under {path}{unreadable}{hint}")
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


def generated_features(G, model, z, batch_size, device, bn_mode="batch", progress=True, rank=0, world=1,
                       gen_batch=None, n=None):
    """(pool3, logits) of the first n images (default: len(z)) from G, quantised to uint8 as
    saving PNGs would.

    z: CPU latents for whole batches, e.g. fixed_latents(seed, "fid", whole_batches(n,
    gen_batch), z_dim): the same images whatever the process count. With BatchNorm on batch
    statistics an image depends on its batch, so G draws them in whole batches of
    `gen_batch` (the run's --batch_size) and keeps the first n: every image's statistics
    come from a full batch, and none moves with `batch_size`, the Inception batch
    (--fid_batch_size). Under torchrun generation batch j is drawn by rank j % world and the
    features are gathered back in batch order."""
    n, gen_batch = len(z) if n is None else n, gen_batch or batch_size
    starts = list(range(0, n, gen_batch))
    mine = starts[rank::world]
    if mine:
        images = _rebatch(uint8_batches(G, z, mine, gen_batch, device, bn_mode, n), batch_size)
        count = sum(min(gen_batch, n - s) for s in mine)
        pool3, logits = extract_features(model, _Sized(images, -(-count // batch_size)), device, progress,
                                         desc="FID samples")
    else:
        pool3, logits = np.zeros((0, FEATURES)), np.zeros((0, 1008))
    if world == 1:
        return pool3, logits
    per_rank = gather_rows(np.concatenate([pool3, logits], axis=1), device)
    rows, taken = [], [0] * world
    for j, s in enumerate(starts):
        r, size = j % world, min(gen_batch, n - s)
        rows.append(per_rank[r][taken[r]:taken[r] + size])
        taken[r] += size
    both = np.concatenate(rows)
    return both[:, :FEATURES], both[:, FEATURES:]


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


@dataclass
class Reference:
    mu: np.ndarray
    sigma: np.ndarray
    pool3: np.ndarray  # per-image features: kept for KID and PRDC, and when fewer than FEATURES (FID's factor)
    path: Path
    n: int = 0  # real images
    computed: bool = False  # now, by this process (else read from the cache)
    cache: dict = field(default_factory=dict)  # what metrics derive from it once (PRDC's k-NN radii)


def reference_stats(dataset, model, weights, resize, cap, batch_size, device, cache_dir, with_features=False,
                    num_workers=0, progress=True, rank=0, world=1, images=None) -> Reference:
    """Statistics of the training images as training sees them (after crop/resize): all of
    them (cap 0, or a cap >= their number), or a fixed random `cap`. Cached as <cache_dir>/<dataset>_<size>px_<n>_<hash>.npz,
    the hash over everything that determines them (dataset, path, size, crop/resize,
    count, protocol, weights), the key itself stored in the file. Every run on the same
    data reuses them; a changed key computes new ones. Rank 0 computes, others wait.
    `images`: the dataset already decoded (uint8 (N, 3, H, W), as --cache and in-memory
    arrays serve training), read directly instead of through loader workers."""
    # the key holds the count: "all" and a cap at or above the dataset's size are the same
    # images, so they share one file; a smaller cap is another subset, another file
    n = len(dataset) if cap == 0 else min(len(dataset), cap)
    wid = check_published_weights(weights) if rank == 0 else weights_id(weights)  # one warning, not one per rank
    key = {**dataset.key(), "count": n, "resize": resize, "weights": wid}
    if torch.device(device).type == "cuda" and model.precision != "fp32":  # fp32 keys stay as they were
        key["precision"] = model.precision
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    path = Path(cache_dir) / f"{key['dataset']}_{key['size']}px_{n}_{digest}.npz"
    feats_path = path.with_suffix(".pool3.npy")
    # Features are kept for KID and PRDC, and for fewer images than dimensions, where they are
    # small and FID's square-root factor comes from them, not from sigma's eigendecomposition
    keep = with_features or n < FEATURES
    # runs starting together (a sweep's --jobs) wait for the one computing them instead of repeating it
    computed = False
    if rank == 0:
        sources = source_digest(dataset)
        with file_lock(path.with_name(f".{path.name}.lock")):
            # (statistics written before the files were recorded are taken as they are)
            stale = path.exists() and recorded_sources(path) not in (None, sources)
            if stale:  # (its features too: a run without KID/PRDC would not rewrite them)
                warn(f"the images under {dataset.description['path']} changed since {path} was computed from them "
                     f"(a file changed, added or removed, by name, size and mtime; a copy without its mtimes "
                     f"counts too): computing the FID reference statistics again")
                feats_path.unlink(missing_ok=True)
            if stale or not path.exists() or (with_features and not feats_path.exists()):
                _compute_reference(dataset, model, n, batch_size, device, num_workers, progress, images, path,
                                   feats_path, key, keep, sources)
                computed = True
    if world > 1:
        dist.barrier()
    mu, sigma, meta = load_stats(path)
    if meta["key"] != key:
        raise UserError(f"{path} holds statistics for other data ({meta['key']}); delete it to recompute")
    pool3 = np.load(feats_path).astype(np.float64) if with_features or (keep and feats_path.exists()) else None
    return Reference(mu, sigma, pool3, path, n=n, computed=computed)


def _compute_reference(dataset, model, n, batch_size, device, num_workers, progress, images, path, feats_path, key,
                       with_features, sources):
    g = torch.Generator().manual_seed(0)
    idx = range(n) if n == len(dataset) else torch.randperm(len(dataset), generator=g)[:n].sort().values.tolist()
    if images is not None:
        chosen = images if n == len(images) else images[torch.as_tensor(idx, device=images.device)]
        loader = _Sized((chosen[i:i + batch_size] for i in range(0, n, batch_size)), -(-n // batch_size))
    else:
        # workers started after the CUDA context exists: spawned, with a timeout (batches.worker_options)
        loader = DataLoader(Subset(dataset, idx), batch_size, num_workers=num_workers, generator=g,
                            **worker_options(num_workers, device))
        loader = _Sized(loader_batches(loader), len(loader))
    pool3, _ = extract_features(model, loader, device, progress, desc="FID reference")
    mu, sigma = feature_stats(pool3)
    save_stats(path, mu, sigma, key, n, sources)
    if with_features:
        with atomic_open(feats_path) as f:
            np.save(f, pool3.astype(np.float32))


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
        self.weights_id = weights_id(weights)  # config.json records it: runs compare by the weights, not their path
        self.ref = reference_stats(
            dataset, self.model, weights, cfg.fid_resize, cfg.fid_ref_samples, cfg.fid_batch_size, device,
            Path(cfg.log_path) / STATS_FOLDER, with_features=any(METRICS[m].needs == "features" for m in cfg.metrics),
            num_workers=cfg.num_workers, progress=self.progress, rank=rank, world=world, images=images)
        self.z = fixed_latents(cfg.seed, "fid", whole_batches(cfg.fid_samples, cfg.batch_size), cfg.z_dim)
        # every column of the registry's metrics, of G and of its EMA: the numbers of a row
        self.metric_columns = [c + suffix for name in cfg.metrics for suffix in ("", "_ema")
                               for c in METRICS[name].columns]
        self.columns = ["step", "fid", "fid_ema", "samples", "seconds"]  # fid's always: compare reads them
        self.columns += [c for c in self.metric_columns if c not in self.columns]
        self.path = Path(log_dir) / "fid.csv"
        # a resumed run with other --metrics keeps the columns it measured before (blank from here on)
        self.columns += [c for c in csv_header(self.path) or [] if c not in self.columns]
        if rank == 0:  # a resumed run drops what was logged after its checkpoint
            self._write(csv_rows_until(self.path, start_step))

    def evaluate(self, step, G, G_ema=None):
        """The row of fid.csv for `step` (rank 0; None on the other ranks), written there."""
        cfg, start = self.cfg, time.perf_counter()
        row = {"step": step, "samples": cfg.fid_samples}
        for suffix, g in (("", G), ("_ema", G_ema)):
            if g is None:
                continue
            pool3, logits = generated_features(g, self.model, self.z, cfg.fid_batch_size, self.device, cfg.fid_g_mode,
                                               progress=self.progress, rank=self.rank, world=self.world,
                                               gen_batch=cfg.batch_size, n=cfg.fid_samples)
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
        return row

    def summary(self, row) -> str:
        """A row of evaluate() in one line."""
        values = "  ".join(f"{k} {row[k]:.4g}" for k in self.columns if isinstance(row.get(k), float) and k != "seconds")
        return f"step {row['step']}: {values}  ({row['samples']} samples, {row['seconds']:.1f} s)"

    def _write(self, rows):
        with atomic_open(self.path, "w", newline="") as f:
            w = csv.DictWriter(f, self.columns, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        if rows:
            from plots import plot_fid  # here: matplotlib, 0.4 s, for the runs that measure FID
            column = headline_column(self.cfg.metrics)
            plot_fid({self.cfg.version: rows}, self.path.with_name("fid.png"), column, higher_is_better(column))


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
    cache: dict = field(default_factory=dict)  # as Reference.cache


def is_checkpoint(spec) -> bool:
    """Whether resolve_input takes `spec` as a training checkpoint (by its .pt name)."""
    return Path(spec).suffix.lower() == ".pt"


def resolve_input(spec, get_model, batch_size=50, device=None, progress=True, n_samples=FID_SAMPLES, ema=False,
                  trust=False):
    """Turn a CLI input into statistics (+ features when computed from images).
    `get_model` is called only when features must be computed, so stats-only runs
    need no weights."""
    path = Path(spec)
    if not path.exists():
        raise UserError(f"{spec} does not exist")
    if is_checkpoint(path):
        G, cfg = generator_from_checkpoint(path, ema, trust)  # a bad file fails before the network loads
        if progress and torch.device(device or "cpu").type == "cpu" and n_samples >= FID_SAMPLES:
            print(f"note: generating and measuring {n_samples} images of {path.name} on the CPU takes many minutes; "
                  f"--fid_samples N for a quicker, noisier FID", file=sys.stderr, flush=True)
        z = fixed_latents(cfg.seed, "fid", whole_batches(n_samples, cfg.batch_size), cfg.z_dim)
        pool3, logits = generated_features(G.to(device), get_model(), z, batch_size, device, cfg.fid_g_mode,
                                           progress=progress, gen_batch=cfg.batch_size, n=n_samples)
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
