"""Features of every input: image folders and arrays, generators (whatever the Inception
batch), checkpoints; FID during training (the monitor), and the reference-statistics cache.
The metrics themselves are checked against pytorch-fid / torch-fidelity in test_metrics.py."""
import csv
import hashlib
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import features
import fid
import inception
import metrics
import utils
from conftest import out_dirs, run_main, small_data, structured_images, TINY
from data_loader import build_dataset
from run import configure

FID_SAMPLES, REF_SAMPLES = 10, 10  # IS takes at least 10 (its splits)
FID_FLAGS = ["--fid_step", "5", "--fid_samples", str(FID_SAMPLES), "--fid_batch_size", "6", "--fid_ref_samples",
             str(REF_SAMPLES)]


@pytest.fixture(scope="module")
def weights(fid_weights):
    """Random weights with the real key layout (the real file cannot be downloaded here)."""
    return fid_weights


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, weights):
    """Two tiny runs on the small emoji set, FID (and IS, KID, PRDC) every 5 steps: span 0 for
    10 steps, span 1 (which finds the reference statistics of the first) for 5."""
    root = tmp_path_factory.mktemp("runs")
    results = {}
    for span, steps in STEPS.items():
        r = run_main([*TINY, *out_dirs(root), *small_data(), "--total_step", steps, "--span", span, "--ema_decay",
                      "0.9", "--sample_step", steps, "--model_save_step", steps, *FID_FLAGS, "--fid_weights", weights,
                      "--metrics", "fid,is,kid,prdc"], cwd=root)
        results[span] = r
    return root, results


STEPS = {0: 10, 1: 5}  # each run's --total_step


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_training_writes_fid_rows_and_plot(two_runs, weights):
    root, results = two_runs
    for span, r in results.items():
        assert r.returncode == 0, r.stderr
        log = root / f"logs/sagan_emoji_span{span}_32px"
        rows = read_csv(log / "fid.csv")
        assert [int(r["step"]) for r in rows] == list(range(5, STEPS[span] + 1, 5))
        for row in rows:
            for k in ("fid", "fid_ema", "is", "is_ema", "kid", "kid_ema", "precision", "recall", "density", "coverage",
                      "precision_ema", "recall_ema", "density_ema", "coverage_ema"):
                assert np.isfinite(float(row[k])), (k, row)
            assert all(0 <= float(row[k]) <= 1 for k in ("precision", "recall", "coverage"))
            assert int(row["samples"]) == FID_SAMPLES and float(row["seconds"]) > 0
        assert (log / "fid.png").stat().st_size > 1000
        # the weights it measured with, by content (compare groups by it): sha256's first 16 hex digits
        digest = hashlib.sha256(Path(weights).read_bytes()).hexdigest()[:16]
        assert json.loads((log / "config.json").read_text())["fid_weights_id"] == digest
    # the reference statistics were computed once, by the first run, and reused by the second
    stats = list((root / "logs/fid_stats").glob("*.npz"))
    assert len(stats) == 1
    assert f"FID reference statistics of {REF_SAMPLES} real images saved" in results[0].stdout
    assert "FID reference statistics" not in results[1].stdout


@pytest.mark.slow
def test_checkpoint_input_reproduces_the_logged_fid(two_runs, weights):
    root, _ = two_runs
    logged = float(read_csv(root / "logs/sagan_emoji_span1_32px/fid.csv")[-1]["fid"])
    logged_ema = float(read_csv(root / "logs/sagan_emoji_span1_32px/fid.csv")[-1]["fid_ema"])
    stats = next((root / "logs/fid_stats").glob("*.npz"))
    ckpt = root / f"models/sagan_emoji_span1_32px/{STEPS[1]}.pt"
    for extra, expected in (([], logged), (["--ema"], logged_ema)):
        # the training logged with an Inception batch of 6; G's images do not depend on it
        r = run_main([ckpt, stats, "--fid_samples", FID_SAMPLES, "--batch_size", 4, "--fid_weights", weights,
                      "--device", "cpu", "--no_progress", *extra], cwd=root, entry=fid.main)
        assert r.returncode == 0, r.stderr
        value = float(re.search(r"FID: (\S+)", r.stdout).group(1))
        assert value == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow
def test_a_resume_with_fewer_metrics_keeps_the_columns_measured_before(two_runs, tmp_path):
    import shutil
    root, _ = two_runs
    run = "sagan_emoji_span1_32px"  # fid, is, kid, prdc at step 5, its last
    for sub in (f"logs/{run}", f"models/{run}", "logs/fid_stats"):
        shutil.copytree(root / sub, tmp_path / sub)
    before = read_csv(tmp_path / f"logs/{run}/fid.csv")
    r = run_main([*out_dirs(tmp_path), "--version", run, "--resume", "--total_step", "10", "--metrics", "fid"],
                 cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    after = read_csv(tmp_path / f"logs/{run}/fid.csv")
    assert [row["step"] for row in after] == ["5", "10"] and after[0] == before[0]  # every column of step 5 kept
    assert np.isfinite(float(after[1]["fid"])) and after[1]["is"] == after[1]["precision_ema"] == ""


@pytest.mark.slow
def test_offline_without_weights_warns_once_and_trains_on(tmp_path, monkeypatch):
    for name, value in {"TORCH_HOME": str(tmp_path / "torch_home"), "HTTPS_PROXY": "http://127.0.0.1:9",
                        "HTTP_PROXY": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}.items():
        monkeypatch.setenv(name, value)  # torch.hub reads them at each call: no download can get through
    r = run_main([*TINY, *out_dirs(tmp_path), *small_data(), "--total_step", "10", *FID_FLAGS, "--version", "off"],
                 cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    warnings = [l for l in r.stderr.splitlines() if "FID Inception weights" in l]
    assert len(warnings) == 1 and inception.FID_WEIGHTS_URL in warnings[0]
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints" / inception.WEIGHT_FILENAMES[0]) in warnings[0]
    assert (tmp_path / "models/off/10.pt").exists() and not (tmp_path / "logs/off/fid.csv").exists()


@pytest.mark.slow
def test_reference_cache_is_reused_and_recomputed_when_the_crop_changes(tmp_path, weights, monkeypatch):
    # three non-square images (each image costs an Inception forward at 299 px, four times here)
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, h in enumerate((40, 48, 44)):
        Image.fromarray(rng.integers(0, 256, (h, 36, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    ds = build_dataset(configure(["--dataset", "folder", "--image_path", str(folder), "--imsize", "32"]))
    model = inception.load_inception(weights)
    calls = []
    real_extract = features.extract_features
    monkeypatch.setattr(features, "extract_features", lambda *a, **k: calls.append(1) or real_extract(*a, **k))
    args = dict(model=model, weights=weights, resize="tf1", cap=100, batch_size=2, device="cpu",
                cache_dir=tmp_path / "stats", progress=False)
    first = features.reference_stats(ds, **args)
    again = features.reference_stats(ds, **args)
    assert len(calls) == 1 and again.path == first.path and np.array_equal(again.mu, first.mu)
    # what was measured: the dataset's images after the training crop/resize
    images = torch.stack([ds[i] for i in range(len(ds))])
    direct, _ = real_extract(model, [images[:2], images[2:]], progress=False)
    np.testing.assert_allclose(first.mu, direct.mean(0), rtol=1e-6, atol=1e-9)
    ds.crop = 24  # a different crop: different images, so new statistics
    cropped = features.reference_stats(ds, **args)
    assert len(calls) == 2 and cropped.path != first.path
    assert len(list((tmp_path / "stats").glob("*.npz"))) == 2
    pytorch_mode = features.reference_stats(ds, **{**args, "resize": "pytorch"})
    assert len(calls) == 3 and pytorch_mode.path != cropped.path
    # fewer images than dimensions: the features are kept beside the statistics, read again with
    # them, and FID's factor comes from them, not from an eigendecomposition of sigma
    assert np.array_equal(again.pool3, direct) and first.path.with_suffix(".pool3.npy").is_file()
    generated = features.Resolved("generated", *metrics.feature_stats(direct[::-1] * 1.5), direct[::-1] * 1.5)
    eighs = []
    monkeypatch.setattr(metrics, "_sqrt_factor", lambda s, f=metrics._sqrt_factor: eighs.append(1) or f(s))
    fid_from_features = metrics.METRICS["fid"].compute(generated, again, "cpu", {})[0]
    assert not eighs
    assert fid_from_features == pytest.approx(metrics.frechet_distance(generated.mu, generated.sigma, again.mu,
                                                                       again.sigma), rel=1e-10)


class PerImage(torch.nn.Module):  # stands in for Inception: features of each image alone
    precision = "fp32"

    def forward(self, b):
        f = b.float().flatten(1)[:, :64]
        return f, f[:, :8]


def folder_and_stand_in_weights(tmp_path, image_folder):
    """The image_folder fixture as a 32 px folder dataset, and a weights file that is only
    hashed into the reference cache key (PerImage needs none)."""
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"stand-in")
    return build_dataset(configure(["--dataset", "folder", "--image_path", str(image_folder), "--imsize", "32"])), weights


@pytest.mark.slow
def test_reference_from_decoded_images_equals_reference_from_the_dataset(tmp_path, image_folder):
    # --cache and in-memory arrays hand the decoded images to the reference statistics
    # (no loader workers); they must be the statistics of the same images, also when capped.
    ds, weights = folder_and_stand_in_weights(tmp_path, image_folder)
    images = torch.stack([ds[i] for i in range(len(ds))])
    for cap in (100, 9):
        args = dict(model=PerImage(), weights=weights, resize="tf1", cap=cap, batch_size=4, device="cpu",
                    progress=False)
        loaded = features.reference_stats(ds, cache_dir=tmp_path / f"a{cap}", **args)
        given = features.reference_stats(ds, cache_dir=tmp_path / f"b{cap}", images=images, **args)
        np.testing.assert_array_equal(given.mu, loaded.mu)
        np.testing.assert_array_equal(given.sigma, loaded.sigma)


def test_reference_statistics_of_changed_images_are_computed_again(tmp_path, image_folder, capsys):
    # the statistics' file name holds what decides the images, not the files' contents: an image
    # overwritten in place (same name, same count) must not leave a new run measured against them
    ds, weights = folder_and_stand_in_weights(tmp_path, image_folder)
    args = dict(model=PerImage(), weights=weights, resize="tf1", cap=0, batch_size=4, device="cpu", progress=False,
                cache_dir=tmp_path / "stats", with_features=True)
    first = features.reference_stats(ds, **args)
    assert "changed since" not in capsys.readouterr().err
    rebuild = lambda: build_dataset(configure(["--dataset", "folder", "--image_path", str(image_folder),
                                               "--imsize", "32"]))  # as a new run builds it
    assert not features.reference_stats(rebuild(), **args).computed  # the same files: the same statistics
    Image.fromarray(np.full((40, 36, 3), 7, np.uint8)).save(image_folder / "a" / "b" / "rgb0.jpg")
    changed = rebuild()
    again = features.reference_stats(changed, **args)
    assert again.computed and again.path == first.path
    assert f"the images under {image_folder} changed since {first.path}" in capsys.readouterr().err
    images = torch.stack([changed[i] for i in range(len(changed))])
    np.testing.assert_array_equal(again.pool3, images.float().flatten(1)[:, :64].numpy())  # the new images'
    np.testing.assert_allclose(again.mu, again.pool3.mean(0), rtol=1e-12)
    assert not features.reference_stats(rebuild(), **args).computed  # and then they are current again
    # statistics written before files were recorded are used as they are (no way to tell)
    metrics.save_stats(first.path, first.mu, first.sigma, metrics.load_stats(first.path)[2]["key"], len(ds))
    Image.fromarray(np.full((40, 36, 3), 9, np.uint8)).save(image_folder / "a" / "b" / "rgb0.jpg")
    assert not features.reference_stats(rebuild(), **args).computed


def test_load_images_formats_and_errors(tmp_path, capsys):
    imgs = structured_images(3, 0, 0)
    np.save(tmp_path / "a.npy", imgs)
    np.savez(tmp_path / "b.npz", images=imgs.transpose(0, 3, 1, 2), other=np.zeros(2))
    np.savez(tmp_path / "c.npz", imgs)
    for f in ("a.npy", "b.npz", "c.npz"):
        assert np.array_equal(features.load_images(tmp_path / f), imgs)
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    Image.fromarray(imgs[0]).save(d / "x.png")
    Image.fromarray(imgs[1]).save(d / "sub" / "y.jpg", quality=95)
    (d / "broken.png").write_bytes(b"not a png")
    (d / "broken2.jpg").write_bytes(b"")
    got = features.load_images(d)
    assert "skipped 2 unreadable" in capsys.readouterr().err
    assert got.shape == (2, 48, 48, 3) and got.dtype == np.uint8 and np.array_equal(got[1], imgs[0])
    Image.fromarray(imgs[0][:40]).save(d / "z.png")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(utils.UserError, match="differ in size"):
            features.load_images(d)
    np.save(tmp_path / "f.npy", imgs.astype(np.float32))
    with pytest.raises(utils.UserError, match="uint8"):  # the data loader's layout check
        features.load_images(tmp_path / "f.npy")
    batches = features.batches_from_array(imgs, 2)
    assert len(batches) == 2
    batches = list(batches)
    assert [b.shape for b in batches] == [(2, 3, 48, 48), (1, 3, 48, 48)] and batches[0].dtype == torch.uint8
    assert torch.equal(batches[1][0], torch.from_numpy(imgs[2]).permute(2, 0, 1))


def per_image(b):  # stands in for Inception: features of each image alone
    f = b.float().flatten(1)
    return f[:, :2048], f[:, :1008]


def test_generated_images_do_not_depend_on_the_inception_batch():
    # G samples with batch statistics, so an image depends on the images drawn beside it:
    # they are drawn in batches of the run's --batch_size (gen_batch), whatever the
    # Inception batch is.
    from sagan_models import Generator
    torch.manual_seed(0)
    G = Generator(32, z_dim=16, conv_dim=16)
    z = torch.randn(24, 16)

    def pool3(inception_batch, gen_batch):
        return features.generated_features(G, per_image, z, inception_batch, "cpu", progress=False, gen_batch=gen_batch,
                                           n=20)[0]

    ref = pool3(20, 8)
    assert ref.shape[0] == 20
    for inception_batch in (3, 8, 7):
        np.testing.assert_array_equal(pool3(inception_batch, 8), ref)
    assert not np.array_equal(pool3(8, 4), ref)  # the generation batch itself does matter


class BatchStatisticsG(torch.nn.Module):
    """A G whose every image depends on the batch it is drawn in: BatchNorm on batch statistics."""

    def __init__(self, z_dim=4):
        super().__init__()
        self.linear = torch.nn.Linear(z_dim, 3 * 4 * 4)
        self.bn = torch.nn.BatchNorm1d(3 * 4 * 4)

    def forward(self, z):
        return torch.tanh(self.bn(self.linear(z))).view(-1, 3, 4, 4)


def test_a_count_not_a_multiple_of_the_batch_keeps_the_first_images_of_whole_batches():
    from sampling import whole_batches
    torch.manual_seed(0)
    G = BatchStatisticsG()
    with torch.no_grad():
        G.bn.weight.uniform_(0.5, 2), G.bn.bias.uniform_(-1, 1)
    n, batch = 10, 4  # 10 images in batches of 4: 4, 4 and 2 of a third batch of 4
    z = torch.randn(whole_batches(n, batch), 4)
    assert len(z) == 12

    def by_hand(rows):  # G on these latents as one batch, normalised by that batch's statistics
        h = G.linear(rows)
        h = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + G.bn.eps) * G.bn.weight + G.bn.bias
        x = torch.tanh(h).view(-1, 3, 4, 4)
        return ((x + 1) * 127.5 + 0.5).clamp(0, 255).to(torch.uint8).flatten(1).numpy().astype(np.float64)

    with torch.no_grad():
        whole = np.concatenate([by_hand(z[s:s + batch]) for s in range(0, 12, batch)])
        short_last = np.concatenate([by_hand(z[s:min(s + batch, n)]) for s in range(0, n, batch)])
    got = features.generated_features(G, per_image, z, 3, "cpu", progress=False, gen_batch=batch, n=n)[0]
    assert got.shape == (n, 48)
    np.testing.assert_array_equal(got, whole[:n, :48])
    assert not np.array_equal(short_last[8:], whole[8:n])  # a short last batch would have other images
    with pytest.raises(ValueError, match="whole batches"):  # latents that end inside a batch are refused
        features.generated_features(G, per_image, z[:n], 3, "cpu", progress=False, gen_batch=batch)


def test_the_reference_of_all_images_uses_every_image(tmp_path, image_folder):
    from parameter import parse_flags
    assert configure(["--fid_ref_samples", "all"]).fid_ref_samples == 0
    assert configure(["--fid_ref_samples", "0"]).fid_ref_samples == 0

    ds, weights = folder_and_stand_in_weights(tmp_path, image_folder)
    assert len(ds) == 15
    args = dict(model=PerImage(), weights=weights, resize="tf1", batch_size=4, device="cpu", progress=False,
                cache_dir=tmp_path / "stats", with_features=True)
    every = features.reference_stats(ds, cap=0, **args)
    capped = features.reference_stats(ds, cap=9, **args)
    images = torch.stack([ds[i] for i in range(len(ds))])
    assert every.pool3.shape == (15, 64) and capped.pool3.shape == (9, 64)
    np.testing.assert_array_equal(every.pool3, images.float().flatten(1)[:, :64].numpy())
    assert every.path != capped.path  # another subset, another cache file
    # a cap at or above the dataset's size is every image too: the same statistics, one file
    assert features.reference_stats(ds, cap=1000, **args).path == every.path
    for bad in ("some", "-1"):
        with pytest.raises(utils.UserError, match="fid_ref_samples"):
            parse_flags(["--fid_ref_samples", bad])


@pytest.mark.slow
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
    assert best[1::2] == ["(1/1)", "(1/1)"]  # over 1 of the 1 runs started
    assert [float(b) for b in best[::2]] == pytest.approx([min(fids[0]), min(fids[1])], abs=0.006)
    assert [l for l in lines if l.strip().startswith("at step")] and out.stat().st_size > 1000
    bad = run_main(["compare", root / "nope"], cwd=root, entry=fid.main)
    assert bad.returncode == 2 and "nope does not exist" in bad.stderr and "Traceback" not in bad.stderr


def test_a_run_without_fid_plots_its_first_metric(tmp_path, monkeypatch):
    # --metrics is: fid.png plotted the empty fid column (matplotlib warned of an empty legend
    # at every FID step); now it plots IS, which the legend names
    import warnings
    from types import SimpleNamespace
    from features import FIDMonitor
    monitor = FIDMonitor.__new__(FIDMonitor)  # the writer alone: no Inception
    monitor.cfg, monitor.path = SimpleNamespace(version="r", metrics=["is"]), tmp_path / "fid.csv"
    monitor.columns = ["step", "fid", "fid_ema", "samples", "seconds", "is", "is_std"]
    rows = [{"step": s, "fid": "", "fid_ema": "", "samples": 8, "seconds": 1.0, "is": 2.0 + s, "is_std": 0.1}
            for s in (5, 10)]
    for row in rows:
        row["is_ema"] = row["is"] + 1
    monitor.columns.append("is_ema")
    import plots
    drawn, real_save = [], plots.plt.Figure.savefig

    def save(fig, *a, **k):  # the legend's labels as drawn
        drawn.extend(t.get_text() for ax in fig.axes for t in ax.get_legend().get_texts())
        return real_save(fig, *a, **k)
    monkeypatch.setattr(plots.plt.Figure, "savefig", save)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monitor._write(rows)
    assert drawn == ["r", "r (EMA)"] and (tmp_path / "fid.png").stat().st_size > 1000
