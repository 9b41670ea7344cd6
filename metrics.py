"""The metrics on Inception features, and their registry: Fréchet distance (FID), Inception
Score, KID, precision/recall/density/coverage (PRDC); feature statistics and the statistics files (.npz) that hold them."""
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import choices
from files import atomic_open, check_array_file
from utils import UserError, warn, write_failed

def feature_stats(pool3):
    """(mu, sigma) in float64; sigma unbiased (N-1), as both peers compute it."""
    pool3 = np.asarray(pool3, dtype=np.float64)
    if pool3.ndim != 2:
        raise UserError(f"statistics are of (images, features) arrays, got shape {pool3.shape}")
    if len(pool3) < 2:  # a covariance needs two; one image as an input (fid.py) or a --fid_ref_samples 1 set
        raise UserError(f"statistics need at least 2 images, got {len(pool3)}")
    return pool3.mean(axis=0), np.cov(pool3, rowvar=False)


def _sqrt_factor(sigma):
    # A with A A^T = sigma, keeping only eigenvalues above the numerical-rank tolerance (as
    # np.linalg.matrix_rank): those below are rounding noise, and dropping them also shrinks
    # the work to the rank for covariances of few samples
    w, v = torch.linalg.eigh((sigma + sigma.T) / 2)
    keep = w > w.max().clamp(min=0) * len(w) * torch.finfo(torch.float64).eps
    return v[:, keep] * w[keep].sqrt()


def sqrt_factor(side, device="cpu"):
    """A with A A^T = side.sigma (side: anything with mu, sigma, pool3, cache), kept in
    side.cache: a reference's is computed once per run, not at every FID evaluation. From
    fewer feature vectors than dimensions it is their centred matrix over sqrt(N - 1), which
    is what np.cov multiplies out (exact, and no d x d eigendecomposition, ~1 s on a CPU at
    d = 2048); otherwise from sigma's eigenvalues."""
    key = ("sqrt_factor", str(device))
    if key not in side.cache:
        pool3 = getattr(side, "pool3", None)
        if pool3 is not None and 2 <= len(pool3) < np.shape(side.sigma)[0]:
            x = torch.as_tensor(np.asarray(pool3, np.float64), device=device)
            side.cache[key] = (x - x.mean(dim=0)).T / (len(x) - 1) ** 0.5
        else:
            side.cache[key] = _sqrt_factor(torch.as_tensor(np.asarray(side.sigma, np.float64), device=device))
    return side.cache[key]


def frechet_distance(mu1, sigma1, mu2, sigma2, device="cpu", factor1=None, factor2=None):
    """||mu1-mu2||^2 + tr(S1) + tr(S2) - 2 tr(sqrt(S1 S2)), in float64.

    Eigenvalue form without sqrtm: with S1 = A A^T and S2 = B B^T from eigh (A = V1 W1^1/2),
    S1 S2 has the non-zero eigenvalues of (A^T B)(A^T B)^T, so tr(sqrt(S1 S2)) is the sum of
    the singular values of A^T B. Why this one: it is real by construction (no complex
    parts, no eps*I fallback as with scipy's sqrtm), it is much faster than sqrtm at d=2048,
    and it takes no sqrt of near-zero eigenvalues. That matters for the rank-deficient
    covariances of fewer samples than dimensions, where the peers' sqrt of ~2000 rounding-
    noise eigenvalues (~1e-16 -> ~1e-8 each) biases FID by ~1e-5 relative; this form
    matches an exact evaluation to ~1e-12 there, and on ill-conditioned full-rank ones.
    Computed with torch in float64 on `device` (LAPACK on the CPU, cuSOLVER on a GPU).
    factor1/factor2: A and B when already known (sqrt_factor), else from eigh here.
    """
    mu1, mu2 = (torch.atleast_1d(torch.as_tensor(np.asarray(m, np.float64), device=device)) for m in (mu1, mu2))
    sigma1, sigma2 = (torch.atleast_2d(torch.as_tensor(np.asarray(s, np.float64), device=device))
                      for s in (sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise UserError(f"statistics do not match: mu {tuple(mu1.shape)} vs {tuple(mu2.shape)}, "
                       f"sigma {tuple(sigma1.shape)} vs {tuple(sigma2.shape)}; both must be of the same network's "
                       f"features (FID-Inception: 2048), e.g. both written by fid.py --save-stats")
    a = _sqrt_factor(sigma1) if factor1 is None else factor1
    b = _sqrt_factor(sigma2) if factor2 is None else factor2
    ab = a.T @ b
    tr_covmean = torch.linalg.svdvals(ab).sum() if ab.numel() else 0.0
    diff = mu1 - mu2
    traces = float(sigma1.trace() + sigma2.trace())
    value = float(diff @ diff + traces - 2 * tr_covmean)
    # the distance is >= 0; a set against itself ends as rounding of the traces' size (-4e-15),
    # which would print as "-0.0000": within that rounding it is 0
    return 0.0 if -1e-12 * max(traces, 1.0) < value < 0 else value


def _fid(a, b, device, options):
    return (frechet_distance(a.mu, a.sigma, b.mu, b.sigma, device, sqrt_factor(a, device), sqrt_factor(b, device)),)


def inception_score(logits_unbiased, splits=10, shuffle=True, seed=2020):
    """(mean, std) over splits of exp(E_x KL(p(y|x) || p(y))), softmax over all 1008 logits."""
    logits = np.asarray(logits_unbiased, dtype=np.float64)
    n = len(logits)
    if n < splits:
        raise UserError(f"Inception Score needs an image per split, at least {splits} (--isc_splits, isc_splits= in "
                        f"the API), got {n}: pass more images or fewer splits")
    if shuffle:  # same permutation as torch-fidelity for a given seed
        logits = logits[np.random.RandomState(seed).permutation(n)]
    log_p = logits - logits.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    p = np.exp(log_p)
    scores = []
    for i in range(splits):
        lo, hi = i * n // splits, (i + 1) * n // splits
        log_q = np.log(p[lo:hi].mean(axis=0))
        kl = (p[lo:hi] * (log_p[lo:hi] - log_q)).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


def kernel_inception_distance(f1, f2, subsets=100, subset_size=1000, degree=3, gamma=None, coef0=1, seed=2020):
    """(mean, std) over random subsets of the unbiased MMD^2 with k(x,y) = (gamma x.y + coef0)^degree.

    Subsets are drawn like torch-fidelity (one RandomState, f1 then f2 indices per subset,
    without replacement). Where torch-fidelity refuses sets smaller than subset_size, the
    size is capped to the smaller set (with a warning) so small evaluations still work."""
    f1, f2 = np.asarray(f1, dtype=np.float64), np.asarray(f2, dtype=np.float64)
    if f1.ndim != 2 or f1.shape[1:] != f2.shape[1:]:
        raise UserError(f"KID feature sets do not match: {f1.shape} vs {f2.shape}")
    n1, n2 = len(f1), len(f2)
    m = min(subset_size, n1, n2)
    if m < 2:
        raise UserError(f"KID needs at least 2 samples per set, got {n1} and {n2}")
    if m < subset_size:
        warn(f"KID subset_size {subset_size} capped to {m} (sets have {n1} and {n2} samples)", once=True)
    gamma = 1.0 / f1.shape[1] if gamma is None else gamma
    kernel = lambda a, b: (gamma * (a @ b.T) + coef0) ** degree
    rng = np.random.RandomState(seed)
    mmds = np.empty(subsets)
    for s in range(subsets):
        x = f1[rng.choice(n1, m, replace=False)]
        y = f2[rng.choice(n2, m, replace=False)]
        kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
        # unbiased: within-set sums leave out the diagonal (k(x_i, x_i))
        within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        mmds[s] = within - 2 * kxy.sum() / (m * m)
    return float(mmds.mean()), float(mmds.std())


CHUNK_DISTANCES = 2 ** 25  # 256 MB of float64 distances: 10,000 x 10,000 would be 800 MB at once


def _distance_chunks(a, b):
    """(start, Euclidean distances of rows a[start:start + r] to every row of b), in chunks of
    at most CHUNK_DISTANCES distances."""
    rows = max(1, CHUNK_DISTANCES // max(len(b), 1))
    for i in range(0, len(a), rows):
        yield i, torch.cdist(a[i:i + rows], b)


def knn_radii(x, k):
    """(n,): the distance of every row of x (a float64 tensor) to its k-th nearest other row
    (the k + 1-th smallest distance, the row itself at 0 counted first, as the papers do)."""
    radii = torch.empty(len(x), dtype=x.dtype, device=x.device)
    for i, d in _distance_chunks(x, x):
        radii[i:i + len(d)] = d.topk(k + 1, dim=1, largest=False).values[:, -1]
    return radii


def precision_recall_density_coverage(real, fake, k=choices.PRDC_K, device="cpu", real_radii=None):
    """(precision, recall, density, coverage) of fake features against real ones, with
    k-nearest-neighbour balls (radius: the distance to the k-th nearest neighbour in the
    own set, strict inequality as the reference implementation, prdc on PyPI):

    precision (Kynkäänniemi et al., 2019): the share of fake samples inside some real ball;
    recall: the share of real samples inside some fake ball; density (Naeem et al., 2020):
    the real balls holding each fake sample, counted, over k, averaged over fake samples
    (1 for a fake set spread like the real one; not capped at 1); coverage: the share of
    real balls that hold at least one fake sample.

    float64 on `device`, the distances in chunks (no sample loops). real_radii: the real
    balls' radii when already known (knn_radii of the same real set and k)."""
    real, fake = (torch.as_tensor(x if torch.is_tensor(x) else np.asarray(x), device=device).double()
                  for x in (real, fake))
    if real.ndim != 2 or real.shape[1:] != fake.shape[1:]:
        raise UserError(f"precision/recall feature sets do not match: {tuple(real.shape)} vs {tuple(fake.shape)}")
    if min(len(real), len(fake)) <= k:
        raise UserError(f"precision/recall/density/coverage with k = {k} need more than {k} samples per set, "
                        f"got {len(real)} real and {len(fake)} generated")
    r_real = knn_radii(real, k) if real_radii is None else torch.as_tensor(real_radii, device=device)
    r_fake = knn_radii(fake, k)
    in_real_ball = torch.zeros(len(fake), dtype=torch.bool, device=device)
    balls_per_fake = torch.zeros(len(fake), dtype=torch.float64, device=device)
    in_fake_ball = torch.empty(len(real), dtype=torch.bool, device=device)
    covered = torch.empty(len(real), dtype=torch.bool, device=device)
    # one pass over real rows: the same orientation as the real radii, so a fake copy of a
    # real sample sits exactly on (not inside) the balls of the real sample's k-th neighbours
    for i, d in _distance_chunks(real, fake):
        inside = d < r_real[i:i + len(d), None]  # (real rows, fake): fake j inside real ball i
        in_real_ball |= inside.any(dim=0)
        balls_per_fake += inside.sum(dim=0)
        in_fake_ball[i:i + len(d)] = (d < r_fake[None, :]).any(dim=1)
        covered[i:i + len(d)] = inside.any(dim=1)
    mean = lambda t: float(t.double().mean())
    return mean(in_real_ball), mean(in_fake_ball), mean(balls_per_fake) / k, mean(covered)


def _prdc(a, b, device, options):
    """The registry's PRDC: on equal numbers of real and generated samples, as both papers
    measure (the k-NN radii shrink with the count, so unequal sets would tilt precision
    against recall): the smaller count, the generated ones first (their latents are random
    already), the reference's as a fixed random subset (seed 0), so every run on the same
    reference is measured against the same real samples. Their radii are kept in b.cache."""
    k, m = options.get("prdc_k", choices.PRDC_K), min(len(a.pool3), len(b.pool3))
    key = ("prdc", m, k)
    if key not in b.cache:
        pick = np.sort(np.random.default_rng(0).choice(len(b.pool3), m, replace=False))
        real = torch.as_tensor(np.asarray(b.pool3[pick]), device=device).double()
        b.cache[key] = (real, knn_radii(real, k) if m > k else None)
    real, radii = b.cache[key]
    return precision_recall_density_coverage(real, a.pool3[:m], k, device, radii)


def save_stats(path, mu, sigma, key=None, n=None, sources=None):
    """Write mu, sigma, n, a JSON key (what produced the stats) and, for a training set, the
    digest of its files (`sources`: what tells statistics of changed images) to an .npz,
    atomically: when writing fails (disk full, read-only, folder gone) `path` keeps what it
    had and a UserError names it and the fix."""
    extra = {} if sources is None else {"sources": np.array(sources)}
    try:
        with atomic_open(path) as f:  # parallel runs may write the same stats; a file object keeps np.savez's name
            np.savez(f, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64),
                     n=np.int64(-1 if n is None else n), key=np.array(json.dumps(key or {}, sort_keys=True)), **extra)
    except OSError as e:
        raise write_failed("statistics file", path, e) from None


def _is_stats_file(path):
    if Path(path).suffix.lower() != ".npz":
        return False
    try:
        with np.load(path, allow_pickle=False) as f:
            has = [k for k in ("mu", "sigma") if k in f.files]
    except (OSError, ValueError, zipfile.BadZipFile):
        return False  # load_images() reports it
    if len(has) == 1:  # half of a statistics file: not images either
        raise UserError(f"{path} holds {has[0]} but no {({'mu', 'sigma'} - set(has)).pop()}: statistics files hold "
                        f"both (fid.py --save-stats writes them)")
    return len(has) == 2


def recorded_sources(path):
    """The training files' digest save_stats recorded in a statistics file, or None (a file
    from before it was recorded, or unreadable: load_stats reports that). Reads that entry
    alone, without the checks load_stats makes of mu and sigma."""
    try:
        with np.load(path, allow_pickle=False) as f:
            return str(f["sources"]) if "sources" in f.files else None
    except (OSError, ValueError, zipfile.BadZipFile):
        return None


def load_stats(path):
    """(mu, sigma, meta) from our .npz or a pytorch-fid one (mu/sigma only);
    meta = {"n": int or None, "key": dict, "sources": str or None (save_stats)}."""
    check_array_file(Path(path))
    try:
        with np.load(path, allow_pickle=False) as f:
            if "mu" not in f.files or "sigma" not in f.files:
                raise UserError(f"{path} is not a statistics file (no 'mu'/'sigma' arrays)")
            mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
            n = int(f["n"]) if "n" in f.files else -1
            key = json.loads(str(f["key"])) if "key" in f.files else {}
            sources = str(f["sources"]) if "sources" in f.files else None
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise UserError(f"cannot read statistics {path}: {e}") from None
    # what would otherwise come out as "FID: nan" or a negative FID, printed as a result
    if sigma.ndim != 2 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise UserError(f"statistics {path}: sigma {sigma.shape} is not the covariance of mu {mu.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise UserError(f"statistics {path} hold NaN or inf values; recompute them (--save-stats)")
    scale = max(np.abs(sigma).max(), 1e-300)
    if np.abs(sigma - sigma.T).max() > 1e-6 * scale:
        raise UserError(f"statistics {path}: sigma is not symmetric, so it is no covariance; recompute them")
    # no eigenvalue below -1e-6 * scale, i.e. sigma + 1e-6 * scale * I has a Cholesky factor:
    # a fifth of eigvalsh's time at d = 2048, and this runs for every statistics file read
    shifted = sigma + (1e-6 * scale) * np.eye(len(sigma))
    if torch.linalg.cholesky_ex(torch.from_numpy(shifted)).info.item() != 0:
        raise UserError(f"statistics {path}: sigma has negative eigenvalues, so it is no covariance; recompute them")
    return mu, sigma, {"n": None if n < 0 else n, "key": key, "sources": sources}


@dataclass(frozen=True)
class Metric:
    """One entry of the metric registry. compute(a, b, device, options) -> one float per
    column, where a is the measured side (mu, sigma, pool3, logits: generated images, or
    the CLI's first input) and b the reference side (mu, sigma, pool3)."""
    columns: tuple
    needs: str  # "stats": mu/sigma of both; "logits": a's logits; "features": per-image pool3 of both
    compute: Callable
    text: str  # how the CLI prints the values
    higher_is_better: bool = False  # of its first column (fid.py compare's best and reach)


METRICS = {
    "fid": Metric(("fid",), "stats", _fid, "{:.6f}"),
    "is": Metric(("is", "is_std"), "logits", lambda a, b, device, o: inception_score(a.logits, o.get("isc_splits", 10)),
                 "{:.6f} +- {:.6f}", True),
    "kid": Metric(("kid", "kid_std"), "features",
                  lambda a, b, device, o: kernel_inception_distance(a.pool3, b.pool3, o.get("kid_subsets", 100),
                                                                    o.get("kid_subset_size", 1000)),
                  "{:.6g} +- {:.6g}"),
    "prdc": Metric(("precision", "recall", "density", "coverage"), "features", _prdc,
                   "precision {:.4f}  recall {:.4f}  density {:.4f}  coverage {:.4f}", True),
}


assert tuple(METRICS) == choices.METRICS  # the flag's choices are this registry's entries


def higher_is_better(column) -> bool:
    """Whether a larger value of a fid.csv column (e.g. "recall", "is_ema") is the better one."""
    column = column.removesuffix("_ema")
    return any(m.higher_is_better for m in METRICS.values() if column in m.columns)


def headline_column(names) -> str:
    """The fid.csv column that stands for runs that logged metrics `names` (in the registry's
    order, as parse_metrics gives them): "fid", or the first column of their first metric."""
    return METRICS[names[0]].columns[0]


def parse_metrics(text) -> list:
    """'is,fid' -> ["fid", "is"], checked against the registry (UserError otherwise)."""
    try:
        return choices.parse_metrics(text)
    except ValueError as e:
        raise UserError(str(e)) from None
