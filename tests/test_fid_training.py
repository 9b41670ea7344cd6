"""FID during training, the reference-statistics cache, checkpoint inputs and `compare` (issue 4).
The metric itself is checked against pytorch-fid / torch-fidelity in test_fid.py."""
import csv
import re

import numpy as np
import pytest
import torch

import features
import inception
import fid
from conftest import TINY, out_dirs, random_fid_state_dict, run_cli, run_main
from data_loader import build_dataset
from run import configure

pytestmark = pytest.mark.slow  # training runs and multi-process launches

FID_FLAGS = ["--fid_step", "5", "--fid_samples", "12", "--fid_batch_size", "6", "--fid_ref_samples", "16"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Random weights with the real key layout (the real file cannot be downloaded here)."""
    path = tmp_path_factory.mktemp("w") / "fid_weights.pth"
    torch.save(random_fid_state_dict(), path)
    return path


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, weights):
    """Two tiny runs (span 0 and 1) on the bundled data, FID every 5 steps."""
    root = tmp_path_factory.mktemp("runs")
    results = {}
    for span in (0, 1):
        r = run_main([*TINY, *out_dirs(root), "--total_step", "10", "--span", span, "--ema_decay", "0.9",
                      "--sample_step", "10", "--model_save_step", "10", *FID_FLAGS, "--fid_weights", weights,
                      "--metrics", "fid,is,kid"], cwd=root)
        results[span] = r
    return root, results


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_training_writes_fid_rows_and_plot(two_runs):
    root, results = two_runs
    for span, r in results.items():
        assert r.returncode == 0, r.stderr
        log = root / f"logs/sagan_emoji_span{span}_32px"
        rows = read_csv(log / "fid.csv")
        assert [int(r["step"]) for r in rows] == [5, 10]
        for row in rows:
            for k in ("fid", "fid_ema", "is", "is_ema", "kid", "kid_ema"):
                assert np.isfinite(float(row[k])), (k, row)
            assert int(row["samples"]) == 12 and float(row["seconds"]) > 0
        assert (log / "fid.png").stat().st_size > 1000
    # the reference statistics were computed once, by the first run, and reused by the second
    stats = list((root / "logs/fid_stats").glob("*.npz"))
    assert len(stats) == 1
    assert "FID reference statistics of 16 real images saved" in results[0].stdout
    assert "FID reference statistics" not in results[1].stdout


def test_checkpoint_input_reproduces_the_logged_fid(two_runs, weights):
    root, _ = two_runs
    logged = float(read_csv(root / "logs/sagan_emoji_span1_32px/fid.csv")[-1]["fid"])
    logged_ema = float(read_csv(root / "logs/sagan_emoji_span1_32px/fid.csv")[-1]["fid_ema"])
    stats = next((root / "logs/fid_stats").glob("*.npz"))
    ckpt = root / "models/sagan_emoji_span1_32px/10.pt"
    for extra, expected in (([], logged), (["--ema"], logged_ema)):
        # the training logged with an Inception batch of 6; G's images do not depend on it
        r = run_main([ckpt, stats, "--fid_samples", 12, "--batch_size", 4, "--fid_weights", weights, "--device", "cpu",
                      "--no_progress", *extra], cwd=root, entry=fid.main)
        assert r.returncode == 0, r.stderr
        value = float(re.search(r"FID: (\S+)", r.stdout).group(1))
        assert value == pytest.approx(expected, rel=1e-5)


def test_compare_prints_a_table_and_writes_one_plot(two_runs):
    root, _ = two_runs
    out = root / "cmp.png"
    r = run_main(["compare", root / "logs/sagan_emoji_span0_32px", root / "logs/sagan_emoji_span1_32px", "--out", out],
                 cwd=root, entry=fid.main)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "sagan_emoji_span0_32px (span 0)" in lines[0] and "sagan_emoji_span1_32px (span 1)" in lines[0]
    assert [l.split()[0] for l in lines[1:3]] == ["5", "10"]
    best = [l for l in lines if l.strip().startswith("best fid")][0].split()[2:]
    fids = {s: [float(r["fid"]) for r in read_csv(root / f"logs/sagan_emoji_span{s}_32px/fid.csv")] for s in (0, 1)}
    assert [float(b) for b in best] == pytest.approx([min(fids[0]), min(fids[1])], abs=0.006)
    assert [l for l in lines if l.strip().startswith("at step")] and out.stat().st_size > 1000
    bad = run_main(["compare", root / "nope"], cwd=root, entry=fid.main)
    assert bad.returncode == 2 and "no fid.csv" in bad.stderr and "Traceback" not in bad.stderr


def test_offline_without_weights_warns_once_and_trains_on(tmp_path):
    env = {"TORCH_HOME": str(tmp_path / "torch_home"), "HTTPS_PROXY": "http://127.0.0.1:9",
           "HTTP_PROXY": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}
    r = run_cli([*TINY, *out_dirs(tmp_path), "--total_step", "10", *FID_FLAGS, "--version", "off"], cwd=tmp_path,
                env=env)
    assert r.returncode == 0, r.stderr
    warnings = [l for l in r.stderr.splitlines() if "FID Inception weights" in l]
    assert len(warnings) == 1 and inception.FID_WEIGHTS_URL in warnings[0]
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints" / inception.WEIGHT_FILENAMES[0]) in warnings[0]
    assert (tmp_path / "models/off/10.pt").exists() and not (tmp_path / "logs/off/fid.csv").exists()


def test_reference_cache_is_reused_and_recomputed_when_the_crop_changes(tmp_path, image_folder, weights,
                                                                          monkeypatch):
    ds = build_dataset(configure(["--dataset", "folder", "--image_path", str(image_folder), "--imsize", "32"]))
    model = inception.load_inception(weights)
    calls = []
    real_extract = features.extract_features
    monkeypatch.setattr(features, "extract_features", lambda *a, **k: calls.append(1) or real_extract(*a, **k))
    args = dict(model=model, weights=weights, resize="tf1", cap=100, batch_size=8, device="cpu",
                cache_dir=tmp_path / "stats", progress=False)
    first = features.reference_stats(ds, **args)
    again = features.reference_stats(ds, **args)
    assert len(calls) == 1 and again.path == first.path and np.array_equal(again.mu, first.mu)
    # what was measured: the dataset's images after the training crop/resize
    images = torch.stack([ds[i] for i in range(len(ds))])
    direct, _ = real_extract(model, [images[:8], images[8:]], progress=False)
    np.testing.assert_allclose(first.mu, direct.mean(0), rtol=1e-6, atol=1e-9)
    ds.crop = 24  # a different crop: different images, so new statistics
    cropped = features.reference_stats(ds, **args)
    assert len(calls) == 2 and cropped.path != first.path
    assert len(list((tmp_path / "stats").glob("*.npz"))) == 2
    pytorch_mode = features.reference_stats(ds, **{**args, "resize": "pytorch"})
    assert len(calls) == 3 and pytorch_mode.path != cropped.path


def test_reference_from_decoded_images_equals_reference_from_the_dataset(tmp_path, image_folder):
    # --cache and in-memory arrays hand the decoded images to the reference statistics
    # (no loader workers); they must be the statistics of the same images, also when capped.
    class PerImage(torch.nn.Module):  # stands in for Inception: features of each image alone
        precision = "fp32"

        def forward(self, b):
            f = b.float().flatten(1)[:, :64]
            return f, f[:, :8]

    weights = tmp_path / "w.bin"
    weights.write_bytes(b"stand-in")  # only hashed into the cache key
    ds = build_dataset(configure(["--dataset", "folder", "--image_path", str(image_folder), "--imsize", "32"]))
    images = torch.stack([ds[i] for i in range(len(ds))])
    for cap in (100, 9):
        args = dict(model=PerImage(), weights=weights, resize="tf1", cap=cap, batch_size=4, device="cpu",
                    progress=False)
        loaded = features.reference_stats(ds, cache_dir=tmp_path / f"a{cap}", **args)
        given = features.reference_stats(ds, cache_dir=tmp_path / f"b{cap}", images=images, **args)
        np.testing.assert_array_equal(given.mu, loaded.mu)
        np.testing.assert_array_equal(given.sigma, loaded.sigma)
