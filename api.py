"""The package from Python, as numbers: the metrics of the registry (FID, IS, KID, ...)
between two image sets, statistics and their files, images of a trained generator, and the
compare report's statistics of runs. fid.py is this module's command line.

    import api
    api.metrics("my_images", "data/emoji64.npz", metrics="fid,kid")  # {'fid': ..., 'kid': ..., 'kid_std': ...}

Nothing here prints or exits: a mistake a user can fix raises utils.UserError, whose
message is the one line the command line prints (warnings, such as weights other than the
published ones, go to stderr). Progress bars only with progress=True."""
import math
import numbers
from pathlib import Path

import numpy as np
import torch

import inception  # by its name: tests put a stand-in network in its place
from checkpoint import generator_from_checkpoint
from choices import FID_SAMPLES, PRDC_K, PRECISIONS, RESIZE_MODES
from compare import check_logged, load_groups, statistics_rows
from data_loader import as_nhwc_uint8
from device import pick_device
from features import Resolved, batches_from_array, extract_features, resolve_input
from files import check_writable
from metrics import METRICS, _is_stats_file, feature_stats, parse_metrics, save_stats
from sampling import fixed_latents, uint8_batches, whole_batches
from utils import UserError


class _Network:
    """The FID-Inception network, loaded when an input first needs features: statistics
    need none, so statistics alone need no weights."""

    def __init__(self, fid_weights, fid_resize, fid_precision, device):
        for name, value, allowed in (("fid_resize", fid_resize, RESIZE_MODES), ("fid_precision", fid_precision,
                                                                               PRECISIONS)):
            if value not in allowed:  # before a statistics file's "computed with" names the other choice
                raise UserError(f"{name} {value!r}: choose one of {', '.join(allowed)}")
        # a bad path fails before anything else
        self.weights = inception.resolve_weights(fid_weights) if fid_weights is not None else None
        self.resize, self.precision, self.device, self.model = fid_resize, fid_precision, device, None

    def __call__(self):
        if self.model is None:
            if self.weights is None:
                self.weights = inception.resolve_weights(quiet=True)  # load_inception's error says the same
            self.model = inception.load_inception(self.weights, self.resize, self.device, self.precision)
            # after loading: a file that is no weights gets its error alone
            inception.check_published_weights(self.weights)
        return self.model

    def fingerprint(self):
        """The weights' inception.weights_id (resolved, not loaded), or None where there are none."""
        if self.weights is None:
            self.weights = inception.resolve_weights(quiet=True)
        return inception.weights_id(self.weights) if self.weights else None

    def key(self) -> dict:
        """What a statistics file records of how it was computed (as training's reference
        statistics do: the weights by their fingerprint)."""
        return {"resize": self.resize, "weights": self.fingerprint()}


def _in_memory(source):
    """A dict of statistics or a uint8 image array (N, H, W, 3) as given in memory, checked
    (UserError); None for a path."""
    if isinstance(source, dict):
        if "mu" not in source or "sigma" not in source:
            raise UserError(f"a dict input holds statistics: mu and sigma (as api.statistics returns); got "
                            f"{sorted(source)}")
        return source
    if isinstance(source, (np.ndarray, torch.Tensor)):
        return as_nhwc_uint8(source.cpu() if torch.is_tensor(source) else source, "images")
    if source is not None and not isinstance(source, (str, Path)):  # a list of arrays: np.stack it first
        raise UserError(f"an input is a path (folder, image array, statistics or checkpoint file), a uint8 image "
                        f"array or tensor, or a dict of statistics; got a {type(source).__name__}")
    return None


def _check_counts(**counts):
    """UserError unless each keyword option is an integer >= 1 (as fid.py's flags are); numpy's
    integers are integers."""
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise UserError(f"{name} must be an integer >= 1, got {value!r}")


def _resolve(source, network, batch_size, progress, fid_samples, ema, trust_checkpoint) -> Resolved:
    """An input as statistics (+ per-image features when computed from images): a path (as
    fid.py takes it), a uint8 image array or tensor, or a dict with mu and sigma."""
    given = _in_memory(source)
    if isinstance(given, dict):
        return Resolved("statistics", np.asarray(given["mu"], np.float64), np.asarray(given["sigma"], np.float64),
                        meta={"n": given.get("n"), "key": {}})
    if given is not None:
        images = np.ascontiguousarray(given)
        pool3, logits = extract_features(network(), batches_from_array(images, batch_size), network.device,
                                         progress, desc="images")
        return Resolved("images", *feature_stats(pool3), pool3, logits, meta={"n": len(pool3), "key": {}})
    return resolve_input(str(source), network, batch_size, network.device, progress, fid_samples, ema,
                         trust_checkpoint)


def _stats_only(source) -> bool:
    return isinstance(source, dict) or (isinstance(source, (str, Path)) and Path(source).is_file()
                                        and _is_stats_file(source))


def metrics(a, b=None, metrics="fid", *, fid_weights=None, fid_resize="tf1", fid_precision="tf32", device="auto",
            batch_size=50, fid_samples=FID_SAMPLES, ema=False, trust_checkpoint=False, isc_splits=10, kid_subsets=100,
            kid_subset_size=1000, prdc_k=PRDC_K, progress=False) -> dict:
    """The metrics (a comma list or a list of names of the registry) of image set `a`
    against `b`: {column: value}, e.g. {"fid": 31.2, "kid": 0.011, "kid_std": 0.001}.

    Each of a and b: a folder of images, a .npy/.npz uint8 image array, a statistics .npz
    (mu/sigma, e.g. from statistics()), a training checkpoint .pt (fid_samples images of its
    generator, or of its EMA generator with ema=True), a uint8 array (N, H, W, 3) or
    (N, 3, H, W) (numpy or torch), or a dict with mu and sigma. IS is of `a` alone (b may be
    left out); KID and PRDC (`a` measured against `b`, the real images) need images on both
    sides. The other options are fid.py's flags."""
    if not isinstance(metrics, (str, list, tuple)) or not all(isinstance(m, str) for m in metrics):
        raise UserError(f"metrics is a comma list or a list of names of {list(METRICS)}; got {metrics!r}")
    names = parse_metrics(metrics if isinstance(metrics, str) else ",".join(metrics))
    _check_counts(batch_size=batch_size, fid_samples=fid_samples, isc_splits=isc_splits, kid_subsets=kid_subsets,
                  kid_subset_size=kid_subset_size, prdc_k=prdc_k)
    if b is None and any(METRICS[m].needs != "logits" for m in names):
        raise UserError(f"{', '.join(m.upper() for m in names if METRICS[m].needs != 'logits')} compares two "
                        f"image sets: pass b")
    # what needs per-image features is checked before minutes of feature extraction
    for i, source in enumerate((a, b)):
        _in_memory(source)
        if isinstance(source, (str, Path)) and not Path(source).exists():  # not after a generator's minutes
            raise UserError(f"{source} does not exist")
        if source is not None and _stats_only(source):
            what = source if isinstance(source, (str, Path)) else "the dict"
            for m in names:
                if METRICS[m].needs == "features":
                    raise UserError(f"{m.upper()} needs per-image features, but {what} holds only statistics; "
                                    f"pass images")
                if METRICS[m].needs == "logits" and i == 0:
                    raise UserError(f"{m.upper()} needs images, but {what} holds only statistics")
    device = pick_device(device)
    network = _Network(fid_weights, fid_resize, fid_precision, device)
    sides = [a] if b is None or all(METRICS[m].needs == "logits" for m in names) else [a, b]
    inputs = [None] * len(sides)
    # statistics first (read, not computed): statistics of another resize pipeline or other
    # weights are not comparable, and are refused before minutes of feature extraction
    stats = [i for i in range(len(sides)) if _stats_only(sides[i])]
    weights = {}  # fingerprint: where it comes from
    for i in stats:
        r = inputs[i] = _resolve(sides[i], network, batch_size, progress, fid_samples, ema, trust_checkpoint)
        saved = r.meta.get("key", {}).get("resize")
        if saved and saved != fid_resize:
            raise UserError(f"{r.spec} was computed with --fid_resize {saved}; rerun with --fid_resize {saved}")
        saved = r.meta.get("key", {}).get("weights")
        if inception.is_weights_id(saved):  # older files name a file instead
            weights.setdefault(saved, r.spec)
    ours = network.fingerprint() if weights and len(stats) < len(sides) else None
    if ours:
        weights.setdefault(ours, f"the FID weights {network.weights}")
    if len(weights) > 1:
        (a_id, a_from), (b_id, b_from) = list(weights.items())[:2]
        raise UserError(f"{a_from} was computed with FID weights {a_id}..., {b_from} with {b_id}...: FIDs across "
                        f"weights are not comparable; pass the --fid_weights of the statistics, or recompute them")
    for i in (i for i in range(len(sides)) if i not in stats):
        inputs[i] = _resolve(sides[i], network, batch_size, progress, fid_samples, ema, trust_checkpoint)
    options = {"isc_splits": isc_splits, "kid_subsets": kid_subsets, "kid_subset_size": kid_subset_size,
               "prdc_k": prdc_k}
    result = {}
    for name in names:
        values = METRICS[name].compute(inputs[0], inputs[-1], device, options)
        result.update(zip(METRICS[name].columns, map(float, values)))
    return result


def statistics(images, out=None, *, fid_weights=None, fid_resize="tf1", fid_precision="tf32", device="auto",
               batch_size=50, fid_samples=FID_SAMPLES, ema=False, trust_checkpoint=False, progress=False) -> dict:
    """FID statistics of an image set (any input of metrics() but statistics): {"mu", "sigma",
    "n"}, and written to `out` (.npz, as fid.py --save-stats) when given. Either can be
    passed to metrics() later."""
    if out is not None:  # before minutes of feature extraction
        if Path(out).is_dir():
            raise UserError(f"out={out} is a folder; give a file name, e.g. {Path(out) / 'stats.npz'}")
        if Path(out).suffix.lower() != ".npz":  # what every reader of statistics looks for
            raise UserError(f"out={out}: statistics are an .npz file; give a name ending in .npz")
        if Path(out).exists() and not _is_stats_file(out):  # images, a checkpoint: never written over
            raise UserError(f"out={out} exists and holds no statistics; give another file name")
        check_writable(Path(out).absolute().parent, "out")
    _check_counts(batch_size=batch_size, fid_samples=fid_samples)
    _in_memory(images)
    if _stats_only(images):
        what = images if isinstance(images, (str, Path)) else "the dict"
        raise UserError(f"{what} holds statistics already; pass images")
    network = _Network(fid_weights, fid_resize, fid_precision, pick_device(device))
    r = _resolve(images, network, batch_size, progress, fid_samples, ema, trust_checkpoint)
    if out is not None:
        save_stats(out, r.mu, r.sigma, key=network.key(), n=len(r.pool3))
    return {"mu": r.mu, "sigma": r.sigma, "n": len(r.pool3)}


def load_generator(checkpoint, ema=False, trust_checkpoint=False):
    """(G, its run's settings as a dict) from a training checkpoint .pt, G built with the
    checkpoint's own settings and on the CPU. To draw images use generate(): G's BatchNorm
    and spectral norm change their state when it runs in training mode."""
    G, cfg = generator_from_checkpoint(checkpoint, ema, trust_checkpoint)
    return G, dict(vars(cfg))


def generate(checkpoint, n=64, *, ema=False, device="auto", batch_size=None, trust_checkpoint=False) -> np.ndarray:
    """n images of a checkpoint's generator (its EMA generator with ema=True) as uint8
    (n, H, W, 3), from the latents of `main.py --train false --n_samples n` (the run's seed),
    drawn in batches of the run's --batch_size unless batch_size is given: with BatchNorm on
    batch statistics an image depends on its batch, so these are the images --train false
    writes at that --batch_size."""
    _check_counts(n=n, **({} if batch_size is None else {"batch_size": batch_size}))
    G, cfg = generator_from_checkpoint(checkpoint, ema, trust_checkpoint)
    device = pick_device(device)
    size = cfg.batch_size if batch_size is None else int(batch_size)
    z = fixed_latents(cfg.seed, "eval", whole_batches(int(n), size), cfg.z_dim)
    batches = uint8_batches(G.to(device), z, range(0, int(n), size), size, device, cfg.fid_g_mode, n=int(n))
    return torch.cat([b.cpu() for b in batches]).permute(0, 2, 3, 1).numpy()


def compare_runs(runs, ema=False, reach=None) -> list:
    """The numbers of `fid.py compare RUN...` as rows: runs (<log_path>/<version> folders)
    whose settings differ only in their seed form a group, and each group has one dict per
    step holding the columns of compare's --csv (compare.CSV_COLUMNS: group, spans, step,
    runs started, n, mean, std, 95% interval, failures, the test against span 0 and its p,
    Holm's p, the bootstrap interval, and with reach=F the steps at which FID <= F); None
    where a number is undefined (std of one run). ema=True: of the EMA generators' FID."""
    runs = [runs] if isinstance(runs, (str, Path)) else runs  # one run folder, not its characters
    if not isinstance(runs, (list, tuple)) or not runs or not all(isinstance(r, (str, Path)) for r in runs):
        raise UserError(f"runs is a list of run folders (<log_path>/<version>); got {runs!r}")
    if reach is not None and (isinstance(reach, bool) or not isinstance(reach, numbers.Real)
                              or not math.isfinite(reach)):
        raise UserError(f"reach is a finite number (an FID to reach), got {reach!r}")
    groups = check_logged(load_groups(runs, "fid_ema" if ema else "fid"), "fid", ema)
    return statistics_rows(groups, reach)
