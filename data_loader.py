"""Datasets: bundled emoji, CelebA, LSUN, any image folder or uint8 array.

Every dataset yields uint8 (3, size, size) tensors after its crop/resize; scaling to
[-1, 1] happens on the training device. The same uint8 images feed FID's reference
statistics, so "real images" means the same thing for training and measuring.

Two ways to serve batches, with identical images and order (both are a pure function
of the seed and the batch counter, so resumed and multi-GPU runs see the same data):
- `TensorBatches`: the whole dataset as one uint8 tensor (on the GPU when it fits);
  used for in-memory arrays and for `--cache`, which decodes image files once.
- `LoaderBatches`: a DataLoader that decodes files in worker processes.
"""
import atexit
import hashlib
import json
import os
import shutil
import tempfile
import warnings
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import LSUN
from torchvision.datasets.folder import make_dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF
from tqdm import tqdm

from utils import REPO, UserError, atomic_open, warn

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
ARRAY_EXTS = {".npy", ".npz"}
CELEBA_URL = "https://www.kaggle.com/datasets/jessicali9530/celeba-dataset"
LSUN_URL = "https://www.kaggle.com/datasets/ajaykgp12/lsunchurch"
LSUN_CLASS = "church_outdoor_train"
CELEB_CROP = 160  # the seed's CelebA center crop before resizing


# ---------------------------------------------------------------------------- transform
def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB, scaled by what its pixel values mean: 16-bit greyscale
    (PNG "I;16"/"I") maps 0..65535 to 0..255 and float images ("F", e.g. float TIFFs)
    map 0..1 to 0..255, where PIL's convert("RGB") would clip them to white or round them
    to black."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        if img.mode == "F":  # floats in 0..1 (the usual convention), or already 0..255
            a = a * 255.0 if a.max(initial=0) <= 1.0 else a
        elif img.mode == "I" and a.max(initial=0) <= 255:  # 32-bit container of 8-bit values
            pass
        else:
            a = a / 257.0  # 65535 -> 255
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    return img.convert("RGB")


def crop_resize(img: Image.Image, crop, size: int) -> torch.Tensor:
    """PIL image → uint8 (3, size, size). crop: an int (center crop of that side, the
    seed's CelebA 160), "square" (center crop to the shorter side, so nothing is
    stretched) or None (image is already square). Resize: PIL bilinear with antialias,
    what torchvision's Resize does on PIL images in the seed."""
    img = to_rgb(img)
    if crop == "square":
        img = TF.center_crop(img, min(img.size))
    elif crop is not None:
        img = TF.center_crop(img, crop)
    if img.size != (size, size):
        img = TF.resize(img, [size, size], InterpolationMode.BILINEAR, antialias=True)
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


class ImageDataset(Dataset):
    """Base: subclasses give `__len__` and `raw(i)` (a PIL image or an HWC uint8 array)."""

    crop = None
    size = 64
    description: dict = {}

    def __getitem__(self, i):
        raw = self.raw(i)
        if isinstance(raw, np.ndarray):
            if raw.shape[:2] == (self.size, self.size):
                return torch.from_numpy(np.ascontiguousarray(raw)).permute(2, 0, 1)
            raw = Image.fromarray(raw)
        return crop_resize(raw, self.crop, self.size)

    def key(self) -> dict:
        """What determines the images: the cache and FID-statistics key."""
        return {**self.description, "size": self.size, "crop": self.crop, "n": len(self),
                "image_resize": "PIL-bilinear-antialias"}


def as_nhwc_uint8(arr, where) -> np.ndarray:
    """A uint8 image array as (N, H, W, 3): (N, H, W, 3) passes as is, (N, 3, H, W) is
    transposed. Returns a view, never a copy, so a memory-mapped .npy stays on disk
    (wrap it in np.ascontiguousarray where contiguous memory is needed). Anything else
    raises UserError, one line naming `where` and the expected layout."""
    arr = np.asarray(arr)
    if arr.ndim == 4 and arr.shape[-1] != 3 and arr.shape[1] == 3:
        arr = arr.transpose(0, 2, 3, 1)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise UserError(f"{where}: expected a uint8 image array (N, H, W, 3) or (N, 3, H, W), "
                        f"got {arr.dtype} {tuple(arr.shape)}")
    return arr


class ArrayDataset(ImageDataset):
    def __init__(self, array: np.ndarray, size: int, crop, description: dict):
        array = as_nhwc_uint8(array, description.get("path"))
        self.array, self.size, self.description = array, size, description
        square = array.shape[1] == array.shape[2]
        self.crop = None if square else crop

    def __len__(self):
        return len(self.array)

    def raw(self, i):
        return self.array[i]


def _is_image_name(path: str) -> bool:
    # is_file: os.walk lists broken links and other non-files among the files
    return Path(path).suffix.lower() in IMAGE_EXTS and os.path.isfile(path)


def _header_readable(path: Path) -> bool:
    try:
        with quiet_pil(path), Image.open(path) as im:
            im.size  # header only: cheap, catches non-images and empty files
        return True
    except Exception:
        return False


_marks = None


def said_once_folder() -> str:
    """A folder, made once by the main process, in which loader workers (which get it with
    the dataset) mark what has been said: a warning is then said once, not once per worker."""
    global _marks
    if _marks is None:
        _marks = tempfile.mkdtemp(prefix="sagan_warned_")
        atexit.register(shutil.rmtree, _marks, True)
    return _marks


def warn_once_across_workers(key: str, message: str, folder=None) -> None:
    try:
        os.close(os.open(os.path.join(folder or said_once_folder(), hashlib.sha1(key.encode()).hexdigest()),
                         os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return
    except OSError:  # the folder is gone: say it anyway
        pass
    warn(message)


@contextmanager
def quiet_pil(path, said=None):
    """PIL's decompression-bomb warning (images over Image.MAX_IMAGE_PIXELS) as one line of
    ours, said once (across the workers sharing the `said` folder), instead of a raw Python
    warning per file and worker."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", Image.DecompressionBombWarning)
        yield
    for w in caught:  # PIL's other warnings go on as they came
        if not issubclass(w.category, Image.DecompressionBombWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if any(issubclass(w.category, Image.DecompressionBombWarning) for w in caught):
        warn_once_across_workers("bomb", f"very large images (e.g. {path}, over {Image.MAX_IMAGE_PIXELS:,} pixels) "
                                         f"are slow to decode; resize them once, or train with --cache", said)


def image_files(root) -> tuple[list[Path], int]:
    """The image files under `root`, flat or nested to any depth, as one unlabeled set:
    (files, n_unreadable).

    files: pathlib.Path objects (root joined with the relative path, so a relative root
    gives relative paths), sorted as Paths (component by component), which is the
    order training batches and --cache keys depend on. A file counts as an image when
    its suffix, in any case, is in IMAGE_EXTS and PIL can read its header; the
    n_unreadable files that have such a suffix but no readable header (empty,
    truncated, not an image) are left out. Nothing is printed: the caller reports
    n_unreadable in its one warning. A missing root gives ([], 0).

    The walk is torchvision's `make_dataset` with the root itself as the only "class"
    (ImageFolder wants class subfolders and rejects flat folders); subfolder links are
    followed, and a file reached twice (a link back into the tree) counts once. Its order
    (each folder's files before its subfolders) is re-sorted."""
    root = Path(root)
    directory = str(root)
    if directory.startswith("~"):  # make_dataset expands "~"; a folder named "~x" is literal here
        directory = os.path.join(".", directory)
    found = make_dataset(directory, class_to_idx={"": 0}, is_valid_file=_is_image_name, allow_empty=True)
    files, seen = [], set()
    for p in sorted(Path(p) for p, _ in found):  # a file reached again through a linked folder counts once
        real = os.path.realpath(p)
        if real not in seen:
            seen.add(real)
            files.append(p)
    good = [p for p in files if _header_readable(p)]
    return good, len(files) - len(good)


class FileDataset(ImageDataset):
    """Image files under `root`, flat or nested (see `image_files`). Files whose header
    PIL cannot read are dropped up front with one warning that counts them; a file that
    fails later while decoding is replaced by the next readable one."""

    def __init__(self, root: Path, size: int, crop, description: dict):
        files, bad = image_files(root)
        if bad:
            warn(f"skipped {bad} unreadable image file(s) under {root}")
        self.files, self.size, self.crop, self.description = files, size, crop, description
        self.said = said_once_folder()

    def __len__(self):
        return len(self.files)

    def raw(self, i):
        for k in range(len(self.files)):
            path = self.files[(i + k) % len(self.files)]
            try:
                with quiet_pil(path, self.said), Image.open(path) as im:
                    im.load()
                    return to_rgb(im)
            except Exception:
                warn_once_across_workers(str(path), f"could not decode {path}; using the next image instead", self.said)
        raise UserError(f"no decodable image under {self.description['path']}")


class LsunDataset(ImageDataset):
    def __init__(self, root: Path, size: int, description: dict):
        try:
            import lmdb  # noqa: F401  (optional: torchvision's LSUN needs it)
        except ImportError:
            raise UserError(f"{root} is an LSUN LMDB folder, which needs the lmdb package: pip install lmdb")
        self.lsun = LSUN(str(root), classes=[LSUN_CLASS])
        self.size, self.crop, self.description = size, "square", description

    def __len__(self):
        return len(self.lsun)

    def raw(self, i):
        return self.lsun[i][0]


def load_array(path: Path) -> np.ndarray:
    """An image array from .npy (memory-mapped: big arrays stay on disk) or .npz (the
    'images' key, or its only array). Shape and dtype are checked by the caller."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".npy":
            return np.load(path, mmap_mode="r")
        with np.load(path, allow_pickle=False) as z:
            if "images" in z.files:
                return z["images"]
            if len(z.files) == 1:
                return z[z.files[0]]
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    raise UserError(f"{path}: store the images under the key 'images' (found {z.files})")


def _from_path(path: Path, size: int, crop, name: str) -> ImageDataset:
    """A folder of images, or a .npy/.npz array file, or a folder holding one array."""
    desc = {"dataset": name, "path": str(path.resolve())}
    if path.is_file() and path.suffix in ARRAY_EXTS:
        return ArrayDataset(load_array(path), size, crop, desc)
    arrays = sorted(p for p in path.iterdir() if p.suffix in ARRAY_EXTS) if path.is_dir() else []
    if len(arrays) == 1:
        desc["path"] = str(arrays[0].resolve())
        return ArrayDataset(load_array(arrays[0]), size, crop, desc)
    return FileDataset(path, size, crop, desc)


def _missing(path: Path, what: str, url: str, layout: str) -> UserError:
    return UserError(f"no {what} images at {path}: download them from {url} and put them there "
                     f"({layout}), or pass --image_path DIR")


def build_dataset(cfg) -> ImageDataset:
    """The training set named by --dataset / --image_path at --imsize."""
    root = Path(cfg.image_path)
    size = cfg.imsize
    if cfg.dataset == "emoji":
        path = root / "emoji64.npz"
        if not path.exists():
            path = REPO / "data" / "emoji64.npz"
        return ArrayDataset(load_array(path), size, None, {"dataset": "emoji", "path": str(path.resolve())})
    if cfg.dataset == "celeb":
        path = root / "CelebA"
        ds = FileDataset(path, size, CELEB_CROP, {"dataset": "celeb", "path": str(path.resolve())}) \
            if path.is_dir() else None
        if ds is None or len(ds) == 0:
            raise _missing(path, "CelebA", CELEBA_URL, "CelebA/img_align_celeba/*.jpg as Kaggle unpacks it")
        return ds
    if cfg.dataset == "lsun":
        path = root / "LSUN"
        lmdb_dir = path / f"{LSUN_CLASS}_lmdb"
        if lmdb_dir.is_dir():
            return LsunDataset(path, size, {"dataset": "lsun", "path": str(lmdb_dir.resolve())})
        ds = _from_path(path, size, "square", "lsun") if path.exists() else None
        if ds is None or len(ds) == 0:
            raise _missing(path, "LSUN", LSUN_URL, f"the .npy array, a folder of images or {LSUN_CLASS}_lmdb/")
        return ds
    # folder: any images under --image_path, nested or flat, or an array file
    ds = _from_path(root, size, "square", "folder") if root.exists() else None
    if ds is None or len(ds) == 0:
        raise UserError(f"no images found under --image_path {root}: point it at a folder of images "
                        f"(any depth) or a .npy/.npz uint8 array (N, H, W, 3)")
    return ds


# ---------------------------------------------------------------------------- batches
def batch_indices(n: int, batch: int, seed: int, start: int = 0, device="cpu"):
    """Global batches of indices, forever: epoch e is randperm(n) seeded by seed + e,
    cut into n // batch batches (the remainder dropped, as the seed's drop_last).
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
        self.device = device
        self.loader = DataLoader(
            dataset, batch_sampler=_RankBatchSampler(len(dataset), batch, seed, start, rank, world),
            num_workers=num_workers, pin_memory=device.type == "cuda", generator=_own_generator(),
            persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers > 0 else None)

    def __iter__(self):
        for x in self.loader:
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


def decode_all(dataset, num_workers=0, desc="decoding") -> torch.Tensor:
    """Every image of a dataset as one uint8 (N, 3, H, W) tensor, decoded in parallel."""
    loader = DataLoader(dataset, batch_size=256, num_workers=num_workers, generator=_own_generator())
    out = torch.empty((len(dataset), 3, dataset.size, dataset.size), dtype=torch.uint8)
    i = 0
    for x in tqdm(loader, desc=desc, disable=len(dataset) < 5000, leave=False):
        out[i:i + len(x)] = x
        i += len(x)
    return out


def cache_path(dataset: ImageDataset) -> Path:
    """Where --cache keeps the decoded array: next to the data when writable, else
    ./data_cache. The name hashes the transform and the file list, so a change in
    either makes a new cache instead of serving stale images."""
    key = dataset.key()
    if isinstance(dataset, FileDataset):
        st = [(str(p), p.stat().st_size, int(p.stat().st_mtime)) for p in dataset.files]
        key["files"] = hashlib.sha1(json.dumps(st).encode()).hexdigest()
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    src = Path(key["path"])
    folder = src if src.is_dir() else src.parent
    name = f".sagan_cache_{key['dataset']}_{dataset.size}_{digest}.npy"
    return folder / name if os.access(folder, os.W_OK) else Path("data_cache") / name


def cached_images(dataset: ImageDataset, num_workers=0, log=print) -> torch.Tensor:
    path = cache_path(dataset)
    if path.exists():
        return torch.from_numpy(np.load(path))
    log(f"--cache: decoding {len(dataset):,} images once into {path}")
    images = decode_all(dataset, num_workers)
    with atomic_open(path) as f:  # a file object keeps np.save from renaming it
        np.save(f, images.numpy())
    return images


def make_batches(dataset, cfg, start, device, rank=0, world=1):
    """The batch stream the trainer draws from: (this rank's part of) batch_size images."""
    if isinstance(dataset, ArrayDataset) and dataset.crop is None and dataset.array.shape[1] == dataset.size:
        images = torch.from_numpy(np.ascontiguousarray(dataset.array)).permute(0, 3, 1, 2)
    elif isinstance(dataset, ArrayDataset) or cfg.cache:
        images = cached_images(dataset, cfg.num_workers) if cfg.cache else decode_all(dataset, cfg.num_workers)
    else:
        return LoaderBatches(dataset, cfg.batch_size, cfg.seed, start, device, cfg.num_workers, rank, world)
    return TensorBatches(images, cfg.batch_size, cfg.seed, start, device, rank, world)
