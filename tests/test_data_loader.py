"""Image-file scanning and the array-layout check in data_loader (CPU, offline, fast)."""
import errno
import os
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import batches
from data_loader import ArrayDataset, FileDataset, as_nhwc_uint8, build_dataset, image_files
from utils import UserError
from run import configure
from conftest import direct, folder_cfg, reference_files, save


@pytest.fixture
def flat_folder(tmp_path):
    root = tmp_path / "flat"
    for name in ["b.png", "A.JPG", "c.Jpeg", "a.bmp"]:
        save(root / name, fmt={"b.png": "PNG", "a.bmp": "BMP"}.get(name, "JPEG"))
    (root / "notes.txt").write_text("not an image")
    (root / "empty.png").write_bytes(b"")
    (root / "junk.gif").write_bytes(b"GIF? no")
    return root


@pytest.fixture
def tricky_folder(tmp_path):
    """Names where Path order, plain string order and torchvision's walk order all differ:
    files at the root next to subfolders, and `a-b/` next to `a/b/`."""
    root = tmp_path / "tricky"
    for rel in ["a/b/x.png", "a-b/y.png", "a.png", "a/z.png", "m.png", "a/b/c/d/deep.png", "dir.png/in.png"]:
        save(root / rel, fmt="PNG")
    return root


def test_nested_folder_matches_reference(image_folder, capsys):
    files, bad = image_files(image_folder)
    assert files == reference_files(image_folder, ["a/broken.jpg"])
    assert len(files) == 15 and bad == 1
    assert all(type(p) is type(image_folder) for p in files)  # Paths: the cache key stats them
    assert capsys.readouterr().err == ""  # image_files itself is silent: the caller warns


def test_order_is_path_order_not_walk_order(tricky_folder):
    files, bad = image_files(tricky_folder)
    ref = reference_files(tricky_folder)
    assert bad == 0 and files == ref
    # the case is only meaningful if Path order differs from plain string order
    assert [str(p) for p in ref] != sorted(str(p) for p in ref)
    assert [p.relative_to(tricky_folder).as_posix() for p in files] == [
        "a/b/c/d/deep.png", "a/b/x.png", "a/z.png", "a-b/y.png", "a.png", "dir.png/in.png", "m.png"]


def test_relative_root_gives_relative_paths(tricky_folder, monkeypatch):
    monkeypatch.chdir(tricky_folder.parent)
    files, _ = image_files(Path("tricky"))
    assert [str(p) for p in files] == [str(p.relative_to(tricky_folder.parent)) for p in reference_files(tricky_folder)]


def test_tilde_folder_is_literal(tmp_path, monkeypatch):
    # "~root" is a user's home to os.path.expanduser (which make_dataset applies), but a
    # plain relative folder to pathlib and to the old scanner
    monkeypatch.chdir(tmp_path)
    save(tmp_path / "~root" / "i.png", fmt="PNG")
    assert image_files(Path("~root")) == ([Path("~root/i.png")], 0)


def test_missing_root_is_empty(tmp_path):
    assert image_files(tmp_path / "nope") == ([], 0)


def test_file_dataset_nested_warns_once(image_folder, capsys):
    ds = FileDataset(image_folder, 16, "square", {"path": str(image_folder)})
    assert ds.files == reference_files(image_folder, ["a/broken.jpg"])
    assert len(ds) == 15
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"warning: skipped 1 unreadable image file(s) under {image_folder}"]
    x = ds[0]
    assert tuple(x.shape) == (3, 16, 16) and str(x.dtype) == "torch.uint8"
    assert ds.raw(3).mode == "RGB"
    assert ds.key()["n"] == 15


def test_flat_folder(flat_folder, capsys):
    ds = FileDataset(flat_folder, 8, None, {"path": str(flat_folder)})
    ref = reference_files(flat_folder, ["empty.png", "junk.gif"])
    assert ds.files == ref and [p.name for p in ref] == ["A.JPG", "a.bmp", "b.png", "c.Jpeg"]
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"warning: skipped 2 unreadable image file(s) under {flat_folder}"]
    assert all(tuple(ds[i].shape) == (3, 8, 8) for i in range(len(ds)))


def test_an_array_beside_images_is_refused_and_array_suffixes_are_any_case(flat_folder, tmp_path):
    np.save(flat_folder / "old.npy", np.zeros((6, 8, 8, 3), np.uint8))  # images and an array: which was meant?
    cfg = SimpleNamespace(dataset="folder", image_path=str(flat_folder), imsize=8)
    with pytest.raises(UserError, match=f"holds images and the array old.npy: point --image_path at "
                                        f"{flat_folder / 'old.npy'} to train on the array, or move it out"):
        build_dataset(cfg)
    (tmp_path / "alone").mkdir()
    with open(tmp_path / "alone" / "UP.NPY", "wb") as f:  # (given a name, np.save would add .npy)
        np.save(f, np.zeros((5, 8, 8, 3), np.uint8))
    for where in (tmp_path / "alone", tmp_path / "alone" / "UP.NPY"):  # the folder holding it, the file itself
        ds = build_dataset(SimpleNamespace(dataset="folder", image_path=str(where), imsize=8))
        assert isinstance(ds, ArrayDataset) and len(ds) == 5


def test_flat_folder_through_build_dataset(flat_folder, capsys):
    cfg = SimpleNamespace(dataset="folder", image_path=str(flat_folder), imsize=8)
    ds = build_dataset(cfg)
    assert isinstance(ds, FileDataset) and len(ds) == 4
    assert capsys.readouterr().err.count("warning:") == 1
    assert batches.cache_path(ds).name.startswith(".sagan_cache_folder_8_")


def test_clean_folder_does_not_warn(tricky_folder, capsys):
    FileDataset(tricky_folder, 8, None, {"path": str(tricky_folder)})
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------------------- array layout
def test_as_nhwc_uint8_accepts_both_layouts():
    rng = np.random.default_rng(0)
    nhwc = rng.integers(0, 256, (5, 6, 7, 3), dtype=np.uint8)
    out = as_nhwc_uint8(nhwc, "x")
    assert out.shape == (5, 6, 7, 3) and np.shares_memory(out, nhwc) and np.array_equal(out, nhwc)
    nchw = np.ascontiguousarray(nhwc.transpose(0, 3, 1, 2))
    out = as_nhwc_uint8(nchw, "x")
    assert out.shape == (5, 6, 7, 3) and np.array_equal(out, nhwc)
    assert np.shares_memory(out, nchw)  # a view: memory-mapped arrays are not read in


def test_as_nhwc_uint8_keeps_memmap_lazy(tmp_path):
    arr = np.arange(2 * 3 * 4 * 5, dtype=np.uint8).reshape(2, 3, 4, 5)
    np.save(tmp_path / "a.npy", arr)
    mm = np.load(tmp_path / "a.npy", mmap_mode="r")
    out = as_nhwc_uint8(mm, "a.npy")
    assert out.shape == (2, 4, 5, 3) and np.shares_memory(out, mm)
    assert np.array_equal(out, arr.transpose(0, 2, 3, 1))


@pytest.mark.parametrize("bad", [
    np.zeros((2, 8, 8, 3), np.float32),   # dtype
    np.zeros((2, 8, 8, 3), np.int64),
    np.zeros((8, 8, 3), np.uint8),        # one image, no N
    np.zeros((2, 8, 8, 4), np.uint8),     # RGBA
    np.zeros((2, 1, 8, 8), np.uint8),     # greyscale NCHW
    np.zeros((2, 8, 8), np.uint8),
    np.zeros((1, 2, 8, 8, 3), np.uint8),
])
def test_as_nhwc_uint8_rejects(bad):
    with pytest.raises(UserError) as e:
        as_nhwc_uint8(bad, "data/x.npy")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("data/x.npy: ")
    assert "(N, H, W, 3)" in msg and "(N, 3, H, W)" in msg
    assert str(bad.dtype) in msg and str(tuple(bad.shape)) in msg


def test_array_dataset_uses_the_check():
    rng = np.random.default_rng(1)
    nhwc = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    ds = ArrayDataset(nhwc.transpose(0, 3, 1, 2), 8, None, {"path": "p.npy"})
    assert np.array_equal(ds.raw(2), nhwc[2])
    assert np.array_equal(ds[2].numpy(), nhwc[2].transpose(2, 0, 1))
    with pytest.raises(UserError, match=r"^p\.npy: expected a uint8 image array \(N, H, W, 3\) or \(N, 3, H, W\)"):
        ArrayDataset(nhwc.astype(np.float32), 8, None, {"path": "p.npy"})


def test_16_bit_and_float_images_keep_their_brightness(tmp_path):
    root = tmp_path / "deep"
    root.mkdir()
    Image.fromarray(np.full((8, 8), 32896, np.uint16)).save(root / "grey16.png")  # 32896 / 257 = 128
    Image.fromarray(np.full((8, 8), 0.25, np.float32)).save(root / "float.tif")  # 0.25 * 255 = 63.75
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(root / "rgb8.png")
    with Image.open(root / "grey16.png") as im:
        assert im.mode.startswith("I")  # what PIL's convert("RGB") turns white
    ds = FileDataset(root, 8, None, {"path": str(root)})
    values = {f.name: int(ds[i].float().mean()) for i, f in enumerate(ds.files)}
    assert values == {"float.tif": 64, "grey16.png": 128, "rgb8.png": 200}


def _decode_in_worker(ds, i):
    return ds[i]


def test_an_undecodable_file_is_reported_once_across_loader_workers(tmp_path, capfd):
    import torch
    root = tmp_path / "w"
    root.mkdir()
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    for i in range(4):
        Image.fromarray(noise).save(root / f"{i}.jpg")
    # a valid header with cut-short pixel data: found readable up front, fails when decoded
    data = (root / "1.jpg").read_bytes()
    (root / "1.jpg").write_bytes(data[:len(data) // 2])
    ds = FileDataset(root, 8, None, {"path": str(root)})
    assert len(ds) == 4
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=2, sampler=[1, 1, 1, 1, 1, 1])
    assert len(list(loader)) == 6  # each worker met the bad file
    err = capfd.readouterr().err
    assert err.count("could not decode") == 1, err


def test_decompression_bomb_warning_is_one_line_of_ours(tmp_path, monkeypatch, capfd):
    root = tmp_path / "big"
    save(root / "big.png", size=(100, 100))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)  # 10,000 pixels: over it, under twice it
    ds = FileDataset(root, 8, None, {"path": str(root)})
    ds[0]
    ds[0]
    err = capfd.readouterr().err
    assert err.count("very large images") == 1 and "DecompressionBombWarning" not in err, err


# ---------------------------------------------------------------------------- folder links (item 12)
def test_links_back_into_the_folder_end_and_count_each_image_once(tmp_path):
    root = tmp_path / "loop"
    save(root / "m.png", fmt="PNG")
    save(root / "sub" / "x.png", fmt="PNG")
    os.symlink(".", root / "a")  # each a link to the folder itself: a/b/a/b/... without end
    os.symlink(".", root / "b")
    os.symlink("sub", root / "c")  # the same subfolder under a second name: its image counts once
    result = []
    scan = threading.Thread(target=lambda: result.append(image_files(root)), daemon=True)
    scan.start()
    scan.join(20)
    assert not scan.is_alive(), "the scan did not end"
    # each image once: the links back to the root add nothing, and sub/ is entered under
    # the first of its names in Path order (c/ before sub/)
    assert result == [([root / "c" / "x.png", root / "m.png"], 0)]


# ---------------------------------------------------------------------------- unreadable folders (item 6)
@pytest.mark.parametrize("which", ["subfolder", "image_path"])
def test_an_unreadable_folder_is_one_line_naming_it(tmp_path, monkeypatch, which):
    """What an unreadable folder does to a user who is not root (tests run as root, who reads
    folders whatever their mode, so the listing is refused by a patch)."""
    root = tmp_path / "imgs"
    save(root / "ok.png", fmt="PNG")
    save(root / "sub" / "x.png", fmt="PNG")
    bad = root / "sub" if which == "subfolder" else root

    def deny(real):
        def listing(path=".", *args, **kwargs):
            if not isinstance(path, int) and os.path.abspath(path) == str(bad):
                raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
            return real(path, *args, **kwargs)
        return listing

    monkeypatch.setattr(os, "scandir", deny(os.scandir))
    monkeypatch.setattr(os, "listdir", deny(os.listdir))
    with pytest.raises(UserError) as e:
        build_dataset(folder_cfg(root, 8))
    msg = str(e.value)
    assert "\n" not in msg and str(bad) in msg and "permission denied" in msg and "chmod -R a+rX" in msg


# ---------------------------------------------------------------------------- CelebA crop (item 15)
def test_celeb_crop_is_the_seeds_share_of_any_image_size(tmp_path):
    folder = tmp_path / "CelebA" / "img_align_celeba"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(3)
    original = rng.integers(0, 256, (218, 178, 3), dtype=np.uint8)  # H x W of the original code's CelebA
    small = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(original).save(folder / "000001.png")
    Image.fromarray(small).save(folder / "000002.png")
    Image.fromarray(np.full((64, 64, 3), 255, np.uint8)).save(folder / "000003.png")
    ds = build_dataset(SimpleNamespace(dataset="celeb", image_path=str(tmp_path), imsize=32))
    got = {p.name: ds[i].numpy() for i, p in enumerate(ds.files)}
    # the original code: torchvision CenterCrop(160) of 178x218 is the box from (9, 29), then Resize
    assert np.array_equal(got["000001.png"], direct(folder / "000001.png", 32, (9, 29, 169, 189)))
    # 64x64: the same share, 64 * 160 / 178 = 57.53 -> 58, centred from (3, 3); no padding
    assert np.array_equal(got["000002.png"], direct(folder / "000002.png", 32, (3, 3, 61, 61)))
    white = got["000003.png"]
    assert white.min() == 255, "a black frame around a white image"


@pytest.mark.parametrize("content", ["random", "objects"])
def test_an_array_file_that_is_not_numbers_is_one_line_without_pickle_advice(tmp_path, content):
    path = tmp_path / "images.npy"
    if content == "random":
        path.write_bytes(os.urandom(4096))
    else:
        np.save(path, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(UserError) as e:
        build_dataset(folder_cfg(path, 8))
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "allow_pickle" not in msg


def test_celeb_layout_crops_160_then_resizes(tmp_path):
    from data_loader import build_dataset
    rng = np.random.default_rng(1)
    folder = tmp_path / "CelebA" / "img_align_celeba"
    folder.mkdir(parents=True)
    arrays = [rng.integers(0, 256, (218, 178, 3), dtype=np.uint8) for _ in range(3)]
    for i, arr in enumerate(arrays):
        Image.fromarray(arr).save(folder / f"{i:06d}.png")
    cfg = configure(["--dataset", "celeb", "--image_path", str(tmp_path), "--imsize", "32"])
    ds = build_dataset(cfg)
    assert len(ds) == 3
    for i, arr in enumerate(arrays):
        # 178x218 → center 160x160 box starts at (9, 29), then PIL bilinear to 32
        ref = np.asarray(Image.fromarray(arr).crop((9, 29, 169, 189)).resize((32, 32), Image.BILINEAR))
        assert np.array_equal(ds[i].permute(1, 2, 0).numpy(), ref)


def test_lsun_array_is_center_cropped_not_stretched(tmp_path):
    from data_loader import build_dataset
    rng = np.random.default_rng(2)
    arr = rng.integers(0, 256, (5, 48, 64, 3), dtype=np.uint8)
    (tmp_path / "LSUN").mkdir()
    np.save(tmp_path / "LSUN" / "church_outdoor_train_lmdb_color_64.npy", arr)
    ds = build_dataset(configure(["--dataset", "lsun", "--image_path", str(tmp_path), "--imsize", "32"]))
    assert len(ds) == 5
    ref = np.asarray(Image.fromarray(arr[4][:, 8:56]).resize((32, 32), Image.BILINEAR))
    assert np.array_equal(ds[4].permute(1, 2, 0).numpy(), ref)


def test_crops_and_resizes_are_torchvisions_on_every_shape():
    # what the original code's torchvision transforms give on PIL images (CenterCrop, then
    # Resize, bilinear with antialias), including odd margins (round half to even) and
    # crops larger than the image (zero padding split unevenly)
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF
    from data_loader import center_crop, crop_resize
    rng = np.random.default_rng(4)
    for w, h in [(178, 218), (64, 64), (65, 64), (33, 50), (17, 20), (40, 37)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for side in {1, 5, min(w, h), min(w, h) - 3, min(w, h) + 3, max(w, h) + 4, 21, 40}:
            assert np.array_equal(np.asarray(center_crop(img, side)), np.asarray(TF.center_crop(img, side))), (w, h, side)
        for crop, side in (("square", min(w, h)), (23, 23), (max(w, h) + 3, max(w, h) + 3)):
            ref = TF.resize(TF.center_crop(img, side), [16, 16], InterpolationMode.BILINEAR, antialias=True)
            assert np.array_equal(crop_resize(img, crop, 16).permute(1, 2, 0).numpy(), np.asarray(ref)), (w, h, crop)


def test_an_image_path_that_is_missing_or_empty_says_which(tmp_path):
    from conftest import folder_cfg
    from utils import UserError
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="there is no --image_path .*gone: point it at a folder of images"):
        build_dataset(folder_cfg(tmp_path / "gone", 16))
    with pytest.raises(UserError, match="no images found under --image_path .*empty: point it at a folder"):
        build_dataset(folder_cfg(tmp_path / "empty", 16))
