"""FID, IS and KID against torch-fidelity and pytorch-fid, precision/recall/density/coverage
against the prdc package, closed forms and exact references
(ill-conditioned and rank-deficient covariances, KID by brute force), statistics files."""
import contextlib
import io
import math

import numpy as np
import pytest
import torch

import metrics
from conftest import IS_SPLITS, KID_SUBSET_SIZE, KID_SUBSETS, rel_err


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
    from torch_fidelity.metric_kid import kid_features_to_metric  # peers here: they import torchvision
    ref64 = kid_features_to_metric(torch.from_numpy(fa), torch.from_numpy(fb), kid_subsets=KID_SUBSETS,
                                   kid_subset_size=KID_SUBSET_SIZE, verbose=False)
    assert rel_err(mean, ref64["kernel_inception_distance_mean"]) < 1e-9
    assert rel_err(std, ref64["kernel_inception_distance_std"]) < 1e-9


def test_is_matches_torch_fidelity_random_logits():
    logits = np.random.default_rng(0).normal(0, 4, (57, 1008))
    for splits in (1, 5, 10):
        from torch_fidelity.metric_isc import isc_features_to_metric
        ref = isc_features_to_metric(torch.from_numpy(logits), splits=splits, shuffle=True, rng_seed=2020)
        mean, std = metrics.inception_score(logits, splits=splits)
        assert rel_err(mean, ref["inception_score_mean"]) < 1e-10
        assert abs(std - ref["inception_score_std"]) < 1e-10 * mean


@pytest.mark.slow
def test_pytorch_fid_statistics_and_distance(env, ours_pytorch):
    # pytorch-fid's calculate_fid_given_paths in its two halves: its statistics over the
    # folder (equal to ours), and its distance on a 256-d block of those (still
    # rank-deficient) statistics, where scipy's sqrtm takes 0.2 s instead of 15-90 s. The
    # 2048-d distance itself is checked against torch-fidelity and exact references.
    from pytorch_fid import fid_score as pf_score  # here: it imports torchvision, 1.5 s per test worker
    from pytorch_fid.inception import InceptionV3 as PFInceptionV3
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
    # a set against itself is 0 exactly, where the sum of its terms rounds to about -4e-15
    # ("-0.0000" printed); a distance above rounding stays as it is (the closed forms above)
    feats = rng.normal(size=(40, d))
    assert metrics.frechet_distance(*metrics.feature_stats(feats), *metrics.feature_stats(feats)) == 0.0
    assert metrics.frechet_distance(*metrics.feature_stats(feats), *metrics.feature_stats(feats[:39])) > 0


def test_fid_ill_conditioned_full_rank_matches_exact():
    # graded scales (covariance eigenvalues over 8 decades, product over 14) in a random basis
    rng = np.random.default_rng(0)
    d = 64
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    x = rng.normal(size=(500, d)) * np.logspace(0, -4, d) @ q
    y = (rng.normal(size=(400, d)) * np.logspace(0, -3, d) + 0.1) @ q
    ours = metrics.frechet_distance(*metrics.feature_stats(x), *metrics.feature_stats(y))
    assert rel_err(ours, exact_fid(x, y)) < 1e-10  # observed ~3e-14


@pytest.mark.slow
def test_fid_rank_deficient_matches_exact(ours_tf1):
    fa, fb = ours_tf1["A"][0], ours_tf1["B"][0]
    mu, sigma = metrics.feature_stats(fa)
    assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-12 * np.trace(sigma)  # observed ~2e-15 rel
    ours = metrics.frechet_distance(*metrics.feature_stats(fa), *metrics.feature_stats(fb))
    assert rel_err(ours, exact_fid(fa, fb)) < 1e-10  # observed ~1e-14


def test_the_registry_fid_from_features_and_from_statistics_matches_exact(monkeypatch):
    # sides with fewer feature vectors than dimensions take their factor from the features;
    # a side with statistics only (a stats file) or more vectors takes it from eigh, once
    from types import SimpleNamespace
    rng = np.random.default_rng(1)
    d = 48
    few, other, many = rng.normal(size=(9, d)), rng.normal(0.2, 1.3, size=(12, d)), rng.normal(size=(80, d))
    side = lambda x, keep=True: SimpleNamespace(**dict(zip(("mu", "sigma"), metrics.feature_stats(x))),
                                                pool3=x if keep else None, cache={})
    eighs = []
    monkeypatch.setattr(metrics, "_sqrt_factor", lambda s, f=metrics._sqrt_factor: eighs.append(1) or f(s))
    fid = lambda a, b: metrics.METRICS["fid"].compute(a, b, "cpu", {})[0]
    assert rel_err(fid(side(few), side(other)), exact_fid(few, other)) < 1e-12 and not eighs
    ref = side(many)
    for x in (few, other):
        assert rel_err(fid(side(x, keep=False), ref), exact_fid(x, many)) < 1e-10
    assert len(eighs) == 3  # the reference's once, each stats-only side once


def test_statistics_files_refuse_negative_eigenvalues_beyond_rounding(tmp_path):
    rng = np.random.default_rng(2)
    q, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    for lowest, ok in ((0.0, True), (-1e-8, True), (-1e-4, False)):
        sigma = q @ np.diag(np.r_[lowest, np.linspace(0.5, 1, 15)]) @ q.T
        metrics.save_stats(tmp_path / "s.npz", np.zeros(16), (sigma + sigma.T) / 2)
        if ok:
            metrics.load_stats(tmp_path / "s.npz")
        else:
            with pytest.raises(metrics.UserError, match="negative eigenvalues"):
                metrics.load_stats(tmp_path / "s.npz")


def test_kid_matches_bruteforce(capsys):
    rng = np.random.default_rng(0)
    f1, f2 = rng.normal(size=(9, 5)), rng.normal(0.3, 1.2, size=(7, 5))
    ref = kid_reference(f1, f2, subsets=6, m=4)
    assert metrics.kernel_inception_distance(f1, f2, subsets=6, subset_size=4) == pytest.approx(ref, rel=1e-10)
    # sets smaller than subset_size: capped to the smaller set, with a warning
    got = metrics.kernel_inception_distance(f1, f2, subsets=3)
    assert "capped to 7" in capsys.readouterr().err
    assert got == pytest.approx(kid_reference(f1, f2, subsets=3, m=7), rel=1e-10)


def peer_prdc(real, fake, k):
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints the set sizes
        from prdc import compute_prdc  # here: it imports scikit-learn, half a second per test worker
        ref = compute_prdc(real, fake, k)
    return [float(ref[c]) for c in ("precision", "recall", "density", "coverage")]


def test_prdc_matches_the_prdc_package(monkeypatch):
    rng = np.random.default_rng(0)
    cases = [(50, 40, 8, 5), (30, 60, 16, 3), (100, 100, 64, 1), (120, 90, 2048, 5), (200, 50, 4, 10)]
    for chunk in (None, 150):
        if chunk:  # chunks of one or a few rows: as 10,000 x 10,000 distances are taken
            monkeypatch.setattr(metrics, "CHUNK_DISTANCES", chunk)
        for n_real, n_fake, d, k in cases:
            # 3-d sets embedded in d dimensions: in d-dimensional noise every distance is
            # about the same and precision and recall come out 0 or 1
            embed = rng.normal(size=(3, d))
            real = rng.normal(size=(n_real, 3)) @ embed
            fake = rng.normal(0.3, 1.3, size=(n_fake, 3)) @ embed
            ours = metrics.precision_recall_density_coverage(real, fake, k)
            ref = peer_prdc(real, fake, k)
            assert 0 < ref[3] < 1 and ref[0] > 0, ref  # not a degenerate case: some balls hold samples, some not
            np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=0, err_msg=str((n_real, n_fake, d, k)))


def test_prdc_closed_forms():
    rng = np.random.default_rng(1)
    real = rng.normal(size=(60, 16))
    # the same set on both sides: every sample inside its own ball, and the k-th neighbour of
    # each exactly on the rim (strict inequality), so each fake sample sits in k real balls
    assert metrics.precision_recall_density_coverage(real, real.copy(), 5) == (1.0, 1.0, 1.0, 1.0)
    # mode collapse: 60 copies of 6 real samples. Every one is real (precision 1), but their
    # balls have radius ~0 (10 copies each), so at most those 6 real samples are recalled,
    # and they fill only the real balls near those 6
    collapsed = np.repeat(real[:6], 10, axis=0)
    precision, recall, density, coverage = metrics.precision_recall_density_coverage(real, collapsed, 5)
    assert precision == 1 and recall <= 6 / 60 and coverage < 1
    with pytest.raises(metrics.UserError, match="more than 5 samples"):
        metrics.precision_recall_density_coverage(real[:5], real, 5)


def test_prdc_in_the_registry_takes_as_many_real_as_generated_samples():
    from types import SimpleNamespace
    rng = np.random.default_rng(2)
    generated = SimpleNamespace(pool3=rng.normal(size=(30, 8)))
    reference = SimpleNamespace(pool3=rng.normal(size=(80, 8)), cache={})
    got = metrics.METRICS["prdc"].compute(generated, reference, "cpu", {})
    real = reference.pool3[np.sort(np.random.default_rng(0).choice(80, 30, replace=False))]
    np.testing.assert_allclose(got, peer_prdc(real, generated.pool3, 5), rtol=1e-12)
    assert list(reference.cache) == [("prdc", 30, 5)]  # the real radii, kept for the next evaluation
    assert metrics.METRICS["prdc"].compute(generated, reference, "cpu", {}) == got
    # fewer real samples than generated: the first generated ones, as many as the real
    few = SimpleNamespace(pool3=reference.pool3[:20], cache={})
    got = metrics.METRICS["prdc"].compute(generated, few, "cpu", {"prdc_k": 3})
    np.testing.assert_allclose(got, peer_prdc(few.pool3, generated.pool3[:20], 3), rtol=1e-12)
    assert metrics.higher_is_better("recall_ema") and metrics.higher_is_better("is")
    assert not metrics.higher_is_better("fid") and not metrics.higher_is_better("kid")


def test_inception_score_closed_form():
    with pytest.raises(metrics.UserError, match=r"an image per split, at least 10 \(--isc_splits, isc_splits= in "
                                                r"the API\), got 9: pass more images or fewer splits"):
        metrics.inception_score(np.zeros((9, 1008)), splits=10)  # (the API's keyword, not "splits=")
    # confident predictions spread evenly over k classes in each split: IS = k exactly-ish
    k, n = 5, 20
    logits = np.zeros((n, 1008))
    logits[np.arange(n), np.arange(n) % k] = 60.0
    mean, std = metrics.inception_score(logits, splits=2, shuffle=False)
    assert mean == pytest.approx(k, rel=1e-9) and std < 1e-9
    assert metrics.inception_score(np.zeros((n, 1008)), splits=2)[0] == pytest.approx(1.0)


def test_stats_roundtrip_and_pytorch_fid_format(tmp_path):
    rng = np.random.default_rng(0)
    mu, a = rng.normal(size=4), rng.normal(size=(4, 4))
    sigma = a @ a.T  # a covariance: load_stats refuses what is not one
    metrics.save_stats(tmp_path / "s", mu, sigma, key={"resize": "tf1"}, n=7)  # no ".npz" appended
    m2, s2, meta = metrics.load_stats(tmp_path / "s")
    assert np.array_equal(m2, mu) and np.array_equal(s2, sigma)
    assert meta == {"n": 7, "key": {"resize": "tf1"}, "sources": None}
    metrics.save_stats(tmp_path / "t.npz", mu, sigma, key={"resize": "tf1"}, n=7, sources="3f2a")  # a training set's
    assert metrics.load_stats(tmp_path / "t.npz")[2] == {"n": 7, "key": {"resize": "tf1"}, "sources": "3f2a"}
    np.savez_compressed(tmp_path / "pf.npz", mu=mu, sigma=sigma)  # what pytorch-fid --save-stats writes
    m3, s3, meta = metrics.load_stats(tmp_path / "pf.npz")
    assert np.array_equal(m3, mu) and np.array_equal(s3, sigma) and meta == {"n": None, "key": {}, "sources": None}


def exact_fid(x, y):
    # with centred features Xc, Yc: the non-zero eigenvalues of S1 S2 are the squared
    # singular values of Xc Yc^T / sqrt((n1-1)(n2-1)), so tr sqrt(S1 S2) is its nuclear norm
    xc, yc = x - x.mean(0), y - y.mean(0)
    nuclear = np.linalg.svd(xc @ yc.T, compute_uv=False).sum() / math.sqrt((len(x) - 1) * (len(y) - 1))
    d = x.mean(0) - y.mean(0)
    return d @ d + (xc ** 2).sum() / (len(x) - 1) + (yc ** 2).sum() / (len(y) - 1) - 2 * nuclear


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
