"""Batch streams and --cache: batches resume exactly, the cache equals per-step decoding and
never stands in for the folder it came from."""
import numpy as np
import torch
from PIL import Image

from batches import cache_path, cached_images, make_batches
from conftest import direct, folder_cfg, GOOD, reference_files
from data_loader import build_dataset
from run import configure


def test_batches_resume_exactly_and_cache_matches_per_step_decoding(tmp_path, image_folder):
    from batches import LoaderBatches, TensorBatches, batch_indices, cached_images
    from data_loader import build_dataset
    stream = batch_indices(10, 3, seed=5)
    first = [next(stream) for _ in range(8)]  # crosses epochs (3 batches per epoch)
    resumed = batch_indices(10, 3, seed=5, start=5)
    assert all(torch.equal(first[5 + i], next(resumed)) for i in range(3))
    assert all(len(set(torch.cat(first[e * 3:e * 3 + 3]).tolist())) == 9 for e in range(2))

    cfg = configure(["--dataset", "folder", "--image_path", str(image_folder), "--imsize", "32", "--cache"])
    ds = build_dataset(cfg)
    cached = cached_images(ds)
    assert len(list(image_folder.glob(".sagan_cache_*.npy"))) == 1
    assert torch.equal(cached_images(ds), cached)  # second call reads the file
    per_step = iter(LoaderBatches(ds, 4, 7, 2, torch.device("cpu"), num_workers=0))
    from_cache = iter(TensorBatches(cached, 4, 7, 2, torch.device("cpu")))
    for _ in range(6):
        assert torch.equal(next(per_step), next(from_cache))
    # a different transform (image size) makes a new cache file instead of reusing
    cfg16 = configure(["--dataset", "folder", "--image_path", str(image_folder), "--imsize", "32", "--cache"])
    cfg16 = cfg16.replace(imsize=16)
    cached_images(build_dataset(cfg16))
    assert len(list(image_folder.glob(".sagan_cache_*.npy"))) == 2


def test_a_cache_does_not_stand_in_for_the_folder_at_another_size(image_folder):
    cfg16 = folder_cfg(image_folder, 16)
    make_batches(build_dataset(cfg16), cfg16, 0, torch.device("cpu"))  # a --cache run at 16
    assert len(list(image_folder.glob(".sagan_cache_*.npy"))) == 1
    ds = build_dataset(folder_cfg(image_folder, 32))
    files = reference_files(image_folder, GOOD)
    want = np.stack([direct(f, 32) for f in files])  # not the 16-pixel cache scaled up
    assert len(ds) == len(files) == 15
    assert np.array_equal(np.stack([ds[i].numpy() for i in range(len(ds))]), want)
    assert np.array_equal(cached_images(ds).numpy(), want)


def test_an_image_added_or_changed_after_caching_is_trained_on(image_folder, capsys):
    cfg = folder_cfg(image_folder, 16)
    cached_images(build_dataset(cfg))
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(image_folder / "new.png")
    changed = image_folder / "a" / "rgb1.jpg"  # same name and pixel size, new pixels
    Image.fromarray(rng.integers(0, 256, (48, 36, 3), dtype=np.uint8)).save(changed)
    capsys.readouterr()
    first = next(image_folder.glob(".sagan_cache_*.npy"))
    ds = build_dataset(cfg)
    assert len(ds) == 16
    images = cached_images(ds)
    # the earlier cache is kept (another run may use it) and named with its size
    mb = first.stat().st_size / 1e6
    assert capsys.readouterr().out.splitlines() == [
        f"--cache: decoding 16 images once into {cache_path(ds)}",
        f"--cache: kept 1 earlier cache file(s) in {image_folder} ({mb:,.1f} MB), written for other images or "
        f"settings: {first.name}; delete the ones no run uses"]
    files = reference_files(image_folder, GOOD)
    assert np.array_equal(images.numpy(), np.stack([direct(f, 16) for f in files]))
    assert sorted(image_folder.glob(".sagan_cache_*.npy")) == sorted([first, cache_path(ds)])


def test_cache_use_is_said_in_one_line(image_folder, capsys):
    cfg = folder_cfg(image_folder, 16)
    ds = build_dataset(cfg)
    capsys.readouterr()
    written = cached_images(ds)
    path = cache_path(ds)
    assert capsys.readouterr().out.splitlines() == [f"--cache: decoding 15 images once into {path}"]
    ds = build_dataset(cfg)  # a later run
    capsys.readouterr()
    assert torch.equal(cached_images(ds), written)
    assert cache_path(ds) == path
    assert capsys.readouterr().out.splitlines() == [f"--cache: using 15 decoded images from {path}"]


def test_a_cache_beside_an_array_does_not_hide_it(tmp_path, capsys):
    arr = np.random.default_rng(2).integers(0, 256, (5, 48, 48, 3), dtype=np.uint8)
    (tmp_path / "LSUN").mkdir()
    np.save(tmp_path / "LSUN" / "church.npy", arr)
    cfg = folder_cfg(tmp_path, 32, dataset="lsun")
    first = cached_images(build_dataset(cfg))
    assert len(list((tmp_path / "LSUN").glob(".sagan_cache_*.npy"))) == 1
    ds = build_dataset(cfg)  # two .npy files in the folder now; one of them is ours
    assert ds.description["path"] == str((tmp_path / "LSUN" / "church.npy").resolve())
    capsys.readouterr()
    assert torch.equal(cached_images(ds), first)
    assert capsys.readouterr().out.startswith("--cache: using 5 decoded images")
    want = np.stack([np.asarray(Image.fromarray(a).resize((32, 32), Image.BILINEAR)).transpose(2, 0, 1) for a in arr])
    assert np.array_equal(first.numpy(), want)


def test_an_unreadable_cache_is_decoded_again(image_folder, capsys):
    ds = build_dataset(folder_cfg(image_folder, 16))
    cache_path(ds).write_bytes(b"not an array")
    capsys.readouterr()
    images = cached_images(ds)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: --cache: cannot read {cache_path(ds)}")
    assert np.array_equal(images.numpy(), np.stack([direct(f, 16) for f in reference_files(image_folder, GOOD)]))
    assert np.load(cache_path(ds)).shape == (15, 3, 16, 16)  # rewritten
