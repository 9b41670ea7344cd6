"""
fid.py against its peers (pytorch-fid 0.3.0, torch-fidelity 0.4.0) and independent
references. Offline: the real weights are never downloaded; random weights with the real
key layout stand in for them, written where both peers look for their file.
"""

import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import compare
import device
import features
import inception
import metrics
import utils
import fid  # noqa: E402
from conftest import random_fid_state_dict, structured_images  # noqa: E402

from pytorch_fid import fid_score as pf_score  # noqa: E402
from pytorch_fid.inception import InceptionV3 as PFInceptionV3, fid_inception_v3  # noqa: E402
from torch_fidelity import calculate_metrics  # noqa: E402
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3  # noqa: E402
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x  # noqa: E402
from torch_fidelity.metric_isc import isc_features_to_metric  # noqa: E402
from torch_fidelity.metric_kid import kid_features_to_metric  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
N_IMAGES = 16
KID_SUBSETS, KID_SUBSET_SIZE, IS_SPLITS = 20, 10, 4

# -----------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """TORCH_HOME with random weights under pytorch-fid's cached file name + two image folders."""
    root = tmp_path_factory.mktemp("fid")
    ckpt_dir = root / "torch_home" / "hub" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    weights = ckpt_dir / inception.WEIGHT_FILENAMES[0]
    torch.save(random_fid_state_dict(), weights)
    dirs = {}
    for name, seed, shift in (("A", 1, 0), ("B", 2, 90)):
        d = root / name
        d.mkdir()
        for i, img in enumerate(structured_images(N_IMAGES, seed, shift)):
            Image.fromarray(img).save(d / f"{i:03d}.png")
        dirs[name] = d
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(root / "torch_home"))
        assert Path(torch.hub.get_dir()) == root / "torch_home" / "hub", "torch.hub.set_dir() overrides TORCH_HOME"
        yield dict(root=root, weights=weights, A=dirs["A"], B=dirs["B"])


def _ours(env, resize):
    model = inception.load_inception(env["weights"], resize=resize)
    out = {}
    for name in ("A", "B"):
        imgs = features.load_images(env[name])
        out[name] = features.extract_features(model, features.batches_from_array(imgs, 8), progress=False)
    return out


@pytest.fixture(scope="module")
def ours_tf1(env):
    return _ours(env, "tf1")


@pytest.fixture(scope="module")
def ours_pytorch(env):
    return _ours(env, "pytorch")


@pytest.fixture(scope="module")
def fidelity_metrics(env):
    return calculate_metrics(input1=str(env["A"]), input2=str(env["B"]), cuda=False, fid=True, isc=True, kid=True,
                             isc_splits=IS_SPLITS, kid_subsets=KID_SUBSETS, kid_subset_size=KID_SUBSET_SIZE,
                             feature_extractor_weights_path=str(env["weights"]), batch_size=8, cache=False,
                             verbose=False, save_cpu_ram=True)


def rel_err(a, b):
    return abs(a - b) / max(abs(b), 1e-300)

# -----------------------------------------------------------------------------
# network: layout and features against the peers


@pytest.mark.slow
def test_state_dict_layout_matches_both_peers(env):
    ours = inception.FIDInception().state_dict()
    # pytorch-fid's network (its file's layout); it loads our cached file strictly via torch.hub
    pf_sd = fid_inception_v3().state_dict()
    tf = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                     feature_extractor_weights_path=str(env["weights"]))
    tf_sd = tf.state_dict()
    assert len(ours) == 566 and set(pf_sd) == set(ours) == set(tf_sd)
    assert all(pf_sd[k].shape == ours[k].shape == tf_sd[k].shape for k in ours)
    # torch-fidelity's own file layout (its module's state dict) loads strictly into ours
    tf_file = env["root"] / inception.WEIGHT_FILENAMES[1]
    tf_sd = {k: v.clone() for k, v in tf_sd.items()}
    tf_sd["fc.weight"] += 1.0  # make sure the values really come from this file
    torch.save(tf_sd, tf_file)
    m = inception.load_inception(tf_file)
    assert torch.equal(m.fc.weight, tf_sd["fc.weight"])


@pytest.mark.slow
def test_features_pytorch_mode_match_pytorch_fid(env):
    imgs = features.load_images(env["A"])[:8]
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        ref = PFInceptionV3([3], resize_input=True, normalize_input=True).eval()(x.float() / 255)[0].flatten(1)
    ours, _ = features.extract_features(inception.load_inception(env["weights"], "pytorch"), [x], progress=False)
    ref = ref.double().numpy()
    assert ref.std(0).mean() > 1e-2 * np.abs(ref).mean()  # features differ between images
    err = np.abs(ours - ref).max()
    assert err <= 1e-5 * np.abs(ref).max(), err  # observed: 0 (same float32 ops)


@pytest.mark.slow
def test_features_tf1_match_torch_fidelity(env):
    imgs = features.load_images(env["A"])[:8]
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous()
    tf = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                     feature_extractor_weights_path=str(env["weights"]))
    with torch.no_grad():
        ref_pool, ref_logits = (t.double().numpy() for t in tf(x))
    pool, logits = features.extract_features(inception.load_inception(env["weights"]), [x[:5], x[5:]], progress=False)
    assert np.abs(pool - ref_pool).max() <= 1e-5 * np.abs(ref_pool).max()  # observed: 0
    assert np.abs(logits - ref_logits).max() <= 1e-5 * np.abs(ref_logits).max()  # observed: 0


def tf1_resize_reference(img, oh, ow):
    # TF1 resize_bilinear(align_corners=False) by definition: src = dst * in/out, no
    # half-pixel offset, edge-clamped neighbour, bilinear weights; float64 per pixel
    h, w = img.shape
    out = np.empty((oh, ow))
    for i in range(oh):
        sy = i * h / oh
        y0 = math.floor(sy)
        y1, dy = min(y0 + 1, h - 1), sy - y0
        for j in range(ow):
            sx = j * w / ow
            x0 = math.floor(sx)
            x1, dx = min(x0 + 1, w - 1), sx - x0
            top = (1 - dx) * img[y0, x0] + dx * img[y0, x1]
            bot = (1 - dx) * img[y1, x0] + dx * img[y1, x1]
            out[i, j] = (1 - dy) * top + dy * bot
    return out


@pytest.mark.parametrize("hw,out,tol", [((5, 7), (11, 13), 1e-3), ((13, 9), (4, 6), 1e-3),
                                        ((32, 32), (299, 299), 2e-2)])
def test_resize_tf1_matches_bruteforce(hw, out, tol):
    # tolerance: TF (and we) compute coordinates in float32; a 1e-7 relative coordinate error
    # at index ~300 shifts a sample by ~1e-5 px, i.e. up to ~5e-3 grey levels on a 255 edge
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(1, 3, *hw, generator=g) * 255).round()
    ours = inception.resize_tf1(x, out)
    ref = tf1_resize_reference(x[0, 1].double().numpy(), *out)
    assert np.abs(ours[0, 1].double().numpy() - ref).max() < tol
    peer = interpolate_bilinear_2d_like_tensorflow1x(x, size=out, align_corners=False)
    assert torch.allclose(ours, peer, atol=1e-4, rtol=0)  # observed: bit-exact

# -----------------------------------------------------------------------------
# metrics against the peers


@pytest.mark.slow
def test_fid_matches_torch_fidelity(ours_tf1, fidelity_metrics):
    (pa, _), (pb, _) = ours_tf1["A"], ours_tf1["B"]
    ours = metrics.frechet_distance(*metrics.feature_stats(pa), *metrics.feature_stats(pb))
    ref = fidelity_metrics["frechet_inception_distance"]
    assert ref > 1
    # observed 8.9e-6: the peer's sum of sqrt(eigvals(S1 S2)) picks up ~2000 rounding-noise
    # eigenvalues of the rank-15 product; ours matches the exact value (below) to ~1e-14
    assert rel_err(ours, ref) < 1e-4, (ours, ref)


@pytest.mark.slow
def test_is_matches_torch_fidelity(ours_tf1, fidelity_metrics):
    mean, std = metrics.inception_score(ours_tf1["A"][1], splits=IS_SPLITS)
    assert fidelity_metrics["inception_score_mean"] > 1.05  # not the degenerate IS = 1
    # same float32 logits on both sides, then float64 math: observed ~3e-16
    assert rel_err(mean, fidelity_metrics["inception_score_mean"]) < 1e-9
    assert rel_err(std, fidelity_metrics["inception_score_std"]) < 1e-9


@pytest.mark.slow
def test_kid_matches_torch_fidelity(ours_tf1, fidelity_metrics):
    fa, fb = ours_tf1["A"][0], ours_tf1["B"][0]
    mean, std = metrics.kernel_inception_distance(fa, fb, subsets=KID_SUBSETS, subset_size=KID_SUBSET_SIZE)
    ref_mean = fidelity_metrics["kernel_inception_distance_mean"]
    ref_std = fidelity_metrics["kernel_inception_distance_std"]
    assert ref_mean > 0
    # the peer evaluates the kernel on its float32 features in float32 (observed 4e-6, 1e-7);
    # fed the same features in float64 it must agree to rounding (observed 3e-15)
    assert rel_err(mean, ref_mean) < 1e-4 and rel_err(std, ref_std) < 1e-4, (mean, ref_mean, std, ref_std)
    ref64 = kid_features_to_metric(torch.from_numpy(fa), torch.from_numpy(fb), kid_subsets=KID_SUBSETS,
                                   kid_subset_size=KID_SUBSET_SIZE, verbose=False)
    assert rel_err(mean, ref64["kernel_inception_distance_mean"]) < 1e-9
    assert rel_err(std, ref64["kernel_inception_distance_std"]) < 1e-9


def test_is_matches_torch_fidelity_random_logits():
    logits = np.random.default_rng(0).normal(0, 4, (57, 1008))
    for splits in (1, 5, 10):
        ref = isc_features_to_metric(torch.from_numpy(logits), splits=splits, shuffle=True, rng_seed=2020)
        mean, std = metrics.inception_score(logits, splits=splits)
        assert rel_err(mean, ref["inception_score_mean"]) < 1e-10
        assert abs(std - ref["inception_score_std"]) < 1e-10 * mean


@pytest.mark.slow
def test_pytorch_fid_statistics_and_distance(env, ours_pytorch):
    # calculate_fid_given_paths in two halves (the whole call is the next test): its
    # statistics over the folder, and its distance on a 256-d block of those (still
    # rank-deficient) statistics, where scipy's sqrtm takes 0.2 s instead of 15-90 s
    model = PFInceptionV3([3])
    ref = {k: pf_score.compute_statistics_of_path(str(env[k]), model, 8, 2048, "cpu", num_workers=0) for k in "AB"}
    stats = {k: metrics.feature_stats(ours_pytorch[k][0]) for k in "AB"}
    for k in "AB":
        (mu, sigma), (rmu, rsigma) = stats[k], ref[k]
        assert np.abs(mu - rmu).max() <= 1e-6 * np.abs(rmu).max()  # observed: 0
        assert np.abs(sigma - rsigma).max() <= 1e-6 * np.abs(rsigma).max()  # observed: 0
    d = 256
    blk = lambda s: (s[0][:d], s[1][:d, :d])
    ref_fid = pf_score.calculate_frechet_distance(*blk(ref["A"]), *blk(ref["B"]))
    ours = metrics.frechet_distance(*blk(stats["A"]), *blk(stats["B"]))
    assert rel_err(ours, ref_fid) < 1e-4, (ours, ref_fid)  # observed 2.5e-6 (sqrtm noise, as below)


@pytest.mark.slow
def test_fid_matches_pytorch_fid_end_to_end(env, ours_pytorch):
    ref = pf_score.calculate_fid_given_paths([str(env["A"]), str(env["B"])], 8, "cpu", 2048, num_workers=0)
    (pa, _), (pb, _) = ours_pytorch["A"], ours_pytorch["B"]
    ours = metrics.frechet_distance(*metrics.feature_stats(pa), *metrics.feature_stats(pb))
    # observed 8.8e-6: pytorch-fid (like torch-fidelity) sums sqrt of ~2000 rounding-noise
    # eigenvalues of the rank-15 product; ours matches the exact value (see below) to 1e-14
    assert rel_err(ours, ref) < 1e-4, (ours, ref)

# -----------------------------------------------------------------------------
# closed forms and independent references


def test_fid_closed_forms():
    rng = np.random.default_rng(0)
    d = 16
    a = rng.normal(size=(d, d))
    sigma = a @ a.T
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    assert metrics.frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-9)
    for a_, b_ in ((1.0, 3.0), (2.5, 0.5)):
        got = metrics.frechet_distance(mu1, a_ ** 2 * np.eye(d), mu1, b_ ** 2 * np.eye(d))
        assert got == pytest.approx(d * (a_ - b_) ** 2, rel=1e-9)
    # 1-d: (m1-m2)^2 + (s1-s2)^2
    assert metrics.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4 + 1)
    # zero covariance (all-identical images) and mixed rank
    assert metrics.frechet_distance(mu1, np.zeros((d, d)), mu2, sigma) == pytest.approx(
        np.sum((mu1 - mu2) ** 2) + np.trace(sigma), rel=1e-12)


def test_fid_ill_conditioned_full_rank_matches_exact():
    # graded scales (covariance eigenvalues over 8 decades, product over 14) in a random basis
    rng = np.random.default_rng(0)
    d = 64
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    x = rng.normal(size=(500, d)) * np.logspace(0, -4, d) @ q
    y = (rng.normal(size=(400, d)) * np.logspace(0, -3, d) + 0.1) @ q
    ours = metrics.frechet_distance(*metrics.feature_stats(x), *metrics.feature_stats(y))
    assert rel_err(ours, exact_fid(x, y)) < 1e-10  # observed ~3e-14


def exact_fid(x, y):
    # with centred features Xc, Yc: the non-zero eigenvalues of S1 S2 are the squared
    # singular values of Xc Yc^T / sqrt((n1-1)(n2-1)), so tr sqrt(S1 S2) is its nuclear norm
    xc, yc = x - x.mean(0), y - y.mean(0)
    nuclear = np.linalg.svd(xc @ yc.T, compute_uv=False).sum() / math.sqrt((len(x) - 1) * (len(y) - 1))
    d = x.mean(0) - y.mean(0)
    return d @ d + (xc ** 2).sum() / (len(x) - 1) + (yc ** 2).sum() / (len(y) - 1) - 2 * nuclear


@pytest.mark.slow
def test_fid_rank_deficient_matches_exact(ours_tf1):
    fa, fb = ours_tf1["A"][0], ours_tf1["B"][0]
    mu, sigma = metrics.feature_stats(fa)
    assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-12 * np.trace(sigma)  # observed ~2e-15 rel
    ours = metrics.frechet_distance(*metrics.feature_stats(fa), *metrics.feature_stats(fb))
    assert rel_err(ours, exact_fid(fa, fb)) < 1e-10  # observed ~1e-14


def kid_reference(f1, f2, subsets, m, seed=2020):
    # explicit double loops; subset draws follow torch-fidelity (f1 then f2, per subset)
    d = f1.shape[1]
    k = lambda x, y: (float(np.dot(x, y)) / d + 1) ** 3
    rng = np.random.RandomState(seed)
    vals = []
    for _ in range(subsets):
        x = f1[rng.choice(len(f1), m, replace=False)]
        y = f2[rng.choice(len(f2), m, replace=False)]
        xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
        yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
        xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
        vals.append(xx + yy - 2 * xy)
    return np.mean(vals), np.std(vals)


def test_kid_matches_bruteforce(capsys):
    rng = np.random.default_rng(0)
    f1, f2 = rng.normal(size=(9, 5)), rng.normal(0.3, 1.2, size=(7, 5))
    ref = kid_reference(f1, f2, subsets=6, m=4)
    assert metrics.kernel_inception_distance(f1, f2, subsets=6, subset_size=4) == pytest.approx(ref, rel=1e-10)
    # sets smaller than subset_size: capped to the smaller set, with a warning
    got = metrics.kernel_inception_distance(f1, f2, subsets=3)
    assert "capped to 7" in capsys.readouterr().err
    assert got == pytest.approx(kid_reference(f1, f2, subsets=3, m=7), rel=1e-10)


def test_inception_score_closed_form():
    # confident predictions spread evenly over k classes in each split: IS = k exactly-ish
    k, n = 5, 20
    logits = np.zeros((n, 1008))
    logits[np.arange(n), np.arange(n) % k] = 60.0
    mean, std = metrics.inception_score(logits, splits=2, shuffle=False)
    assert mean == pytest.approx(k, rel=1e-9) and std < 1e-9
    assert metrics.inception_score(np.zeros((n, 1008)), splits=2)[0] == pytest.approx(1.0)

# -----------------------------------------------------------------------------
# weights resolution


def test_resolve_weights_explicit_missing(tmp_path):
    with pytest.raises(utils.UserError, match="does not exist"):
        inception.resolve_weights(tmp_path / "nope.pth")


@pytest.mark.parametrize("name", inception.WEIGHT_FILENAMES)
def test_resolve_weights_from_hub_cache(tmp_path, monkeypatch, name):
    ckpt = tmp_path / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    (ckpt / name).write_bytes(b"x")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("must not download"))
    assert inception.resolve_weights() == ckpt / name


def test_resolve_weights_offline_warns_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    calls = []

    def offline(url, dst, *a, **k):
        calls.append(url)
        Path(dst).write_bytes(b"partial")  # a half-done download must not be left behind
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    assert inception.resolve_weights() is None
    assert inception.resolve_weights() is None
    assert calls == [inception.FID_WEIGHTS_URL]  # tried once per process (and cache folder)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1  # one warning, one line
    msg = err[0]
    assert inception.FID_WEIGHTS_URL in msg and str(tmp_path / "hub" / "checkpoints" / inception.WEIGHT_FILENAMES[0]) in msg
    assert not list((tmp_path / "hub" / "checkpoints").iterdir())


def test_resolve_weights_download_success(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda url, dst, *a, **k: Path(dst).write_bytes(b"w"))
    assert inception.resolve_weights() == tmp_path / "hub" / "checkpoints" / inception.WEIGHT_FILENAMES[0]


@pytest.mark.slow
def test_load_inception_rejects_other_weights(tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(3)}, bad)
    with pytest.raises(utils.UserError, match="not an FID Inception"):
        inception.load_inception(bad)
    with pytest.raises(utils.UserError, match="download"):
        inception.load_inception(None)
    (tmp_path / "garbage.pth").write_bytes(b"half a download")  # not even a pickle
    with pytest.raises(utils.UserError, match="not an FID Inception"):
        inception.load_inception(tmp_path / "garbage.pth")


def test_fid_precision_context_sets_and_restores_flags():
    m, c = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = (m.fp32_precision, c.fp32_precision)
    try:
        m.fp32_precision, c.fp32_precision = "tf32", "tf32"
        with device.matmul_precision("cuda", "fp32"):
            assert (m.fp32_precision, c.fp32_precision) == ("ieee", "ieee")
        assert (m.fp32_precision, c.fp32_precision) == ("tf32", "tf32")
        m.fp32_precision, c.fp32_precision = "ieee", "ieee"
        with device.matmul_precision("cuda", "tf32"):
            assert (m.fp32_precision, c.fp32_precision) == ("tf32", "tf32")
        assert (m.fp32_precision, c.fp32_precision) == ("ieee", "ieee")
    finally:
        m.fp32_precision, c.fp32_precision = before

# -----------------------------------------------------------------------------
# inputs and stats files


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


def test_stats_roundtrip_and_pytorch_fid_format(tmp_path):
    rng = np.random.default_rng(0)
    mu, a = rng.normal(size=4), rng.normal(size=(4, 4))
    sigma = a @ a.T  # a covariance: load_stats refuses what is not one
    metrics.save_stats(tmp_path / "s", mu, sigma, key={"resize": "tf1"}, n=7)  # no ".npz" appended
    m2, s2, meta = metrics.load_stats(tmp_path / "s")
    assert np.array_equal(m2, mu) and np.array_equal(s2, sigma) and meta == {"n": 7, "key": {"resize": "tf1"}}
    np.savez_compressed(tmp_path / "pf.npz", mu=mu, sigma=sigma)  # what pytorch-fid --save-stats writes
    m3, s3, meta = metrics.load_stats(tmp_path / "pf.npz")
    assert np.array_equal(m3, mu) and np.array_equal(s3, sigma) and meta == {"n": None, "key": {}}

# -----------------------------------------------------------------------------
# CLI


def _cli(capsys, *argv):
    assert fid.main([*map(str, argv), "--no_progress"]) == 0
    return capsys.readouterr().out


def _value(out, name):
    line = next(l for l in out.splitlines() if l.startswith(f"{name}: "))
    return float(line.split()[1])


@pytest.mark.slow
def test_cli_fid_is_kid_and_saved_stats(env, capsys, fidelity_metrics, tmp_path):
    out = _cli(capsys, env["A"], env["B"], "--metrics", "fid,is,kid", "--batch_size", 7, "--isc_splits", IS_SPLITS,
               "--kid_subsets", KID_SUBSETS, "--kid_subset_size", KID_SUBSET_SIZE, "--device", "cpu")
    ref_fid = fidelity_metrics["frechet_inception_distance"]
    assert rel_err(_value(out, "FID"), ref_fid) < 1e-4
    assert rel_err(_value(out, "IS"), fidelity_metrics["inception_score_mean"]) < 1e-5
    assert rel_err(_value(out, "KID"), fidelity_metrics["kernel_inception_distance_mean"]) < 1e-4
    stats = tmp_path / "a_stats.npz"
    assert "saved" in _cli(capsys, "--save-stats", env["A"], stats)
    mu, sigma, meta = metrics.load_stats(stats)
    assert meta["n"] == N_IMAGES and meta["key"]["resize"] == "tf1" and mu.shape == (2048,)
    assert rel_err(_value(_cli(capsys, stats, env["B"]), "FID"), ref_fid) < 1e-4
    # stats of the other pipeline are refused rather than silently compared
    with pytest.raises(SystemExit) as e:
        fid.main([str(stats), str(env["B"]), "--fid_resize", "pytorch"])
    assert e.value.code == 2 and "--fid_resize tf1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        fid.main([str(stats), str(env["B"]), "--metrics", "kid"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "KID needs per-image features" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_cli_user_errors_are_one_line(env, capsys, tmp_path, monkeypatch):
    with pytest.raises(SystemExit) as e:
        fid.main([str(tmp_path / "missing"), str(env["B"])])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("fid.py: error:") and len(err.strip().splitlines()) == 1
    # no weights anywhere and offline: the error says what to download and where to put it
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the CLI must not add a warning on top of its error line
        with pytest.raises(SystemExit) as e:
            fid.main([str(env["A"]), str(env["B"]), "--no_progress"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1
    assert inception.FID_WEIGHTS_URL in err and str(tmp_path / "hub" / "checkpoints" / inception.WEIGHT_FILENAMES[0]) in err
    # stats-only inputs need no weights at all
    metrics.save_stats(tmp_path / "s.npz", np.zeros(3), np.eye(3))
    assert _value(_cli(capsys, tmp_path / "s.npz", tmp_path / "s.npz"), "FID") == 0


def test_cli_subcommand_dispatch(monkeypatch):
    seen = []
    monkeypatch.setattr(compare, "compare", lambda argv: seen.append(argv) or 0)
    assert fid.main(["compare", "x", "--y"]) == 0 and seen == [["x", "--y"]]


@pytest.mark.slow
def test_cli_subprocess_bad_path(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "fid.py"), str(tmp_path / "x"), str(tmp_path / "y")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("fid.py: error:") and "Traceback" not in r.stderr


def test_generated_images_do_not_depend_on_the_inception_batch():
    # G samples with batch statistics, so an image depends on the images drawn beside it:
    # they are drawn in batches of the run's --batch_size (gen_batch), whatever the
    # Inception batch is.
    from sagan_models import Generator
    torch.manual_seed(0)
    G = Generator(32, z_dim=16, conv_dim=16)
    z = torch.randn(20, 16)

    def per_image(b):  # stands in for Inception: features of each image alone
        f = b.float().flatten(1)
        return f[:, :2048], f[:, :1008]

    def pool3(inception_batch, gen_batch):
        return features.generated_features(G, per_image, z, inception_batch, "cpu", progress=False, gen_batch=gen_batch)[0]

    ref = pool3(20, 8)
    for inception_batch in (3, 8, 7):
        np.testing.assert_array_equal(pool3(inception_batch, 8), ref)
    assert not np.array_equal(pool3(8, 4), ref)  # the generation batch itself does matter
