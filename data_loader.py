"""Datasets: bundled emoji, CelebA, LSUN, any image folder or uint8 array.

Every dataset yields uint8 (3, size, size) tensors after its crop/resize; scaling to
[-1, 1] happens on the training device. The same uint8 images feed FID's reference
statistics, so "real images" means the same thing for training and measuring.
"""
import atexit
import hashlib
import os
import shutil
import stat
import tempfile
import warnings
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from files import check_array_file
from parameter import IMAGE_PATH
from utils import REPO, UserError, warn

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
ARRAY_EXTS = {".npy", ".npz"}
CELEBA_URL = "https://www.kaggle.com/datasets/jessicali9530/celeba-dataset"
LSUN_URL = "https://www.kaggle.com/datasets/ajaykgp12/lsunchurch"
LSUN_CLASS = "church_outdoor_train"
# The original code's CelebA center crop, 160 pixels of the 178x218 photographs, as a share of the
# shorter side: the same 160 there, and pre-resized copies (64x64, 128x128) get the same
# share instead of a 160 crop that zero-pads them into a black frame.
CELEB_CROP = "160/178"
CACHE_PREFIX = ".sagan_cache_"  # --cache files; never read as data (see _from_path)


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


def center_crop(img: Image.Image, side: int) -> Image.Image:
    """torchvision's center_crop of a PIL image, without importing torchvision (a second per
    process): offsets round((extent - side) / 2), half to even; where the image is smaller,
    zeros split (missing // 2) before, the rest after (PIL's crop fills outside with zeros)."""
    left, top = (-((side - e) // 2) if side > e else round((e - side) / 2) for e in img.size)
    return img.crop((left, top, left + side, top + side))


def crop_resize(img: Image.Image, crop, size: int) -> torch.Tensor:
    """PIL image → uint8 (3, size, size). crop: "square" (center crop to the shorter
    side, so nothing is stretched), "A/B" (center square of side round(shorter side·A/B),
    half up: CELEB_CROP gives the original code's 160 on 178x218 CelebA), an int (center crop of
    that side, zero-padded where the image is smaller) or None (image is already
    square). Resize: PIL bilinear with antialias, what torchvision's Resize does on PIL
    images in the original code."""
    img = to_rgb(img)
    if crop == "square":
        img = center_crop(img, min(img.size))
    elif isinstance(crop, str):
        num, den = map(int, crop.split("/"))
        short = min(img.size)
        # integer half-up rounding (exact, no float ties); capped at the shorter side, so never padded
        img = center_crop(img, min(short, max(1, (2 * short * num + den) // (2 * den))))
    elif crop is not None:
        img = center_crop(img, crop)
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)  # PIL's filters always antialias
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
        self.npy_file = array.filename if isinstance(array, np.memmap) else None  # load_array's memory map
        array = as_nhwc_uint8(array, description.get("path"))
        self.array, self.size, self.description = array, size, description
        square = array.shape[1] == array.shape[2]
        self.crop = None if square else crop

    def __len__(self):
        return len(self.array)

    def raw(self, i):
        return self.array[i]

    def __getstate__(self):  # for spawned loader workers: a mapped .npy travels as its name, not its (GBs of) data
        return {**self.__dict__, "array": None} if self.npy_file else self.__dict__

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self.npy_file:  # mapped again, as load_array and as_nhwc_uint8 gave it
            self.array = as_nhwc_uint8(np.load(self.npy_file, mmap_mode="r"), self.npy_file)


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


def unreadable_folder(folder, e: OSError, root=None) -> UserError:
    """One line for a folder the scan cannot list, naming it and the fix."""
    why = "permission denied" if isinstance(e, PermissionError) else (e.strerror or str(e))
    elsewhere = f" or move it out of {root}" if root is not None and Path(folder) != Path(root) else ""
    return UserError(f"cannot read the folder {folder} ({why}): make it readable "
                     f"(chmod -R a+rX '{folder}'){elsewhere}")


def _walk_images(root: Path) -> list[Path]:
    """Files under root with an image suffix (any case), following folder links but
    entering each real folder (st_dev, st_ino) once: links back into the tree (`a -> .`,
    `b -> .`) would otherwise branch without end. Depth first, names in sorted order, so
    a folder reached by several paths is entered under the first in Path order."""
    found, seen, stack = [], set(), [root]
    while stack:
        folder = stack.pop()
        subfolders = []
        try:
            st = os.stat(folder)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda entry: entry.name)
            for entry in entries:
                # is_dir/is_file follow links; broken or looping links are neither
                if entry.is_dir():
                    subfolders.append(folder / entry.name)
                elif Path(entry.name).suffix.lower() in IMAGE_EXTS and entry.is_file():
                    found.append(folder / entry.name)
        except (FileNotFoundError, NotADirectoryError):  # gone or replaced while scanning
            continue
        except OSError as e:  # unreadable: its images would be left out without a word
            raise unreadable_folder(e.filename or folder, e, root) from None
        stack += reversed(subfolders)
    return found


def image_files(root) -> tuple[list[Path], int]:
    """(files, n_unreadable): the image files under `root`, flat or nested, as one unlabeled
    set of Paths (root joined with the relative path) sorted as Paths, the order training
    batches and --cache keys depend on. An image: a suffix in IMAGE_EXTS (any case) and a
    header PIL can read; the n_unreadable others with such a suffix are left out, and the
    caller's one warning counts them. A missing root gives ([], 0); a folder that cannot be
    listed raises UserError naming it. Folder links are followed, each real folder entered
    once, and a file reached twice (a link to it) counts once."""
    root = Path(root)
    try:
        if not stat.S_ISDIR(os.stat(root).st_mode):
            return [], 0
    except (FileNotFoundError, NotADirectoryError):
        return [], 0
    except OSError as e:  # e.g. a parent folder without search permission
        raise unreadable_folder(root, e) from None
    files, seen = [], set()
    for p in sorted(_walk_images(root)):  # a file reached again through a link counts once
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
        self.root, self.files, self.size, self.crop, self.description = Path(root), files, size, crop, description
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
        self.root, self.size, self.crop, self.description, self._lsun = str(root), size, "square", description, None
        len(self)  # opened now: a broken folder fails here, not in a loader worker

    @property
    def lsun(self):  # torchvision (a second's import) only here; an LMDB environment does not pickle:
        if self._lsun is None:  # each loader worker opens the folder again
            from torchvision.datasets import LSUN
            self._lsun = LSUN(self.root, classes=[LSUN_CLASS])
        return self._lsun

    def __len__(self):
        return len(self.lsun)

    def raw(self, i):
        return self.lsun[i][0]

    def __getstate__(self):
        return {**self.__dict__, "_lsun": None}


def load_array(path: Path) -> np.ndarray:
    """An image array from .npy (memory-mapped: big arrays stay on disk) or .npz (the
    'images' key, or its only array). Shape and dtype are checked by the caller."""
    path = Path(path)
    check_array_file(path)  # before np.load, whose errors advise allow_pickle
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
    """A folder of images, or a .npy/.npz array file, or a folder holding one array.
    --cache files (CACHE_PREFIX) are not arrays here: one beside the images would
    otherwise stand in for them, at its own size, in every later run."""
    desc = {"dataset": name, "path": str(path.resolve())}
    if path.is_file() and path.suffix.lower() in ARRAY_EXTS:
        return ArrayDataset(load_array(path), size, crop, desc)
    try:
        arrays = sorted(p for p in path.iterdir() if p.suffix.lower() in ARRAY_EXTS
                        and not p.name.startswith(CACHE_PREFIX)) if path.is_dir() else []
    except OSError as e:
        raise unreadable_folder(path, e) from None
    if len(arrays) == 1:
        if _walk_images(path):  # which did the user mean? neither may quietly stand in for the other
            raise UserError(f"{path} holds images and the array {arrays[0].name}: point --image_path at "
                            f"{arrays[0]} to train on the array, or move it out of the folder to train on the images")
        desc["path"] = str(arrays[0].resolve())
        return ArrayDataset(load_array(arrays[0]), size, crop, desc)
    return FileDataset(path, size, crop, desc)


def _missing(path: Path, what: str, url: str, layout: str) -> UserError:
    if path.parent.name == path.name:  # --image_path named the dataset's own folder, not the one holding it
        return UserError(f"no {what} images at {path}: --image_path is the folder that holds {what}/; pass "
                         f"--image_path {path.parent.parent}")
    return UserError(f"no {what} images at {path}: download them from {url} and put them there "
                     f"({layout}), or pass --image_path DIR")


def build_dataset(cfg) -> ImageDataset:
    """The training set named by --dataset / --image_path at --imsize."""
    try:
        return _build_dataset(cfg)
    except PermissionError as e:  # any the scan did not name itself (e.g. a parent without search permission)
        raise UserError(f"cannot read {e.filename} (permission denied): make it readable "
                        f"(chmod -R a+rX '{e.filename}') or pass another --image_path") from None


def training_set(cfg) -> ImageDataset:
    """build_dataset, refused (one line) when it cannot fill one --batch_size batch: what a
    run checks at its start, and a sweep once before any of its cells starts."""
    dataset = build_dataset(cfg)
    if len(dataset) < cfg.batch_size:
        raise UserError(f"the dataset has {len(dataset)} image{'s' * (len(dataset) != 1)}, fewer than --batch_size "
                        f"{cfg.batch_size}: give --batch_size {len(dataset)} or less, or more images")
    return dataset


def _build_dataset(cfg) -> ImageDataset:
    root = Path(cfg.image_path)
    size = cfg.imsize
    if cfg.dataset == "emoji":
        path = root / "emoji64.npz"
        if not path.exists():
            if cfg.image_path != IMAGE_PATH:  # the user's own images, a whole run on the emoji instead
                raise UserError(f"--dataset emoji (the default) trains on the bundled emoji, or on an emoji64.npz "
                                f"under --image_path, and {root} holds none: add --dataset folder to train on "
                                f"the images there")
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
        raise UserError(f"{'no images found under' if root.exists() else 'there is no'} --image_path {root}: point "
                        f"it at a folder of images (any depth) or a .npy/.npz uint8 array (N, H, W, 3)")
    return ds


