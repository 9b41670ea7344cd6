"""The `fid.py` command line: FID / IS / KID / precision, recall, density and coverage of
images, of a trained generator, or of statistics files, against each other.

    python fid.py A B            # A, B: image folder, .npy/.npz images, stats .npz or checkpoint .pt
    python fid.py A B --metrics fid,is,kid,prdc
    python fid.py --save-stats A OUT.npz
    python fid.py compare logs/RUN1 logs/RUN2 ...   # FID per group of seeds over steps + plots

Flags are parsed before torch is imported, so `--help` and a bad flag answer at once."""
import sys
from pathlib import Path

from choices import METRICS, PRDC_K, PRECISIONS, RESIZE_MODES
from utils import TRUST_FLAG, OneLineParser, UserError, int_at_least



def _parse_args(argv):
    p = OneLineParser(prog="fid.py", description="FID / IS / KID / PRDC with the TF FID Inception network.")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image folder, .npy/.npz image array (N,H,W,3 uint8) or statistics .npz (mu/sigma)")
    p.add_argument("--metrics", default="fid", help=f"comma list of {','.join(METRICS)} (IS is of the first input; "
                   "prdc: precision, recall, density, coverage of the first input against the second)")
    p.add_argument("--save-stats", "--save_stats", dest="save_stats", action="store_true",
                   help="compute statistics of INPUT and write them to OUT.npz: --save-stats INPUT OUT.npz")
    p.add_argument("--fid_weights", default=None, help="FID Inception weights file (default: torch hub cache)")
    p.add_argument("--fid_resize", default="tf1", choices=RESIZE_MODES,
                   help="tf1: torch-fidelity/TF reference resize; pytorch: pytorch-fid's")
    p.add_argument("--fid_precision", default="tf32", choices=PRECISIONS,
                   help="Inception arithmetic on CUDA: tf32 (TensorFloat-32; FID within 1e-4 relative of fp32, "
                        "2.4x faster, see README) or fp32 (IEEE)")
    p.add_argument("--batch_size", type=int_at_least(1), default=50)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--kid_subsets", type=int_at_least(1), default=100)
    p.add_argument("--kid_subset_size", type=int_at_least(2), default=1000)  # the unbiased MMD divides by m(m-1)
    p.add_argument("--isc_splits", type=int_at_least(1), default=10)
    p.add_argument("--prdc_k", type=int_at_least(1), default=PRDC_K, help="nearest neighbours of --metrics prdc")
    p.add_argument("--fid_samples", type=int_at_least(2), default=10000,  # a covariance needs 2
                   help="images generated from a checkpoint input")
    p.add_argument("--ema", action="store_true", help="checkpoint inputs: use the EMA generator")
    p.add_argument(TRUST_FLAG, action="store_true",
                   help="checkpoint inputs: load one of a version before 0.2 (pickled numpy RNG state); unpickling "
                        "can run code hidden in a file, so only for checkpoints you made yourself")
    p.add_argument("--no_progress", action="store_true")
    return p.parse_args(argv)


def _run(args):
    # imported here, after the flags: --help and bad flags need no torch
    from device import pick_device
    from features import resolve_input
    from files import check_writable
    from inception import check_published_weights, load_inception, resolve_weights
    from metrics import METRICS, _is_stats_file, parse_metrics, save_stats
    metrics = parse_metrics(args.metrics)
    need = 2 if args.save_stats or any(METRICS[m].needs != "logits" for m in metrics) else 1
    if len(args.inputs) != need:
        raise UserError(f"expected {need} input(s), got {len(args.inputs)}"
                       + ("; usage: --save-stats INPUT OUT.npz" if args.save_stats else ""))
    if args.batch_size < 1:
        raise UserError("--batch_size must be >= 1")
    device = pick_device(args.device)
    weights, model = None, None
    if args.fid_weights is not None:
        weights = resolve_weights(args.fid_weights)  # fail fast on a bad path

    def get_model():
        nonlocal weights, model
        if model is None:
            if weights is None:
                weights = resolve_weights(quiet=True)  # load_inception's error says the same
            model = load_inception(weights, args.fid_resize, device, args.fid_precision)
            check_published_weights(weights)  # after loading: a file that is no weights gets its error alone
        return model

    key = lambda: {"resize": args.fid_resize, "weights": Path(weights).name if weights else None}
    resolve = lambda spec: resolve_input(spec, get_model, args.batch_size, device, not args.no_progress,
                                         args.fid_samples, args.ema, args.trust_checkpoint)

    if args.save_stats:
        src, out = args.inputs
        if Path(out).is_dir():
            raise UserError(f"--save-stats: {out} is a folder; give a file name, e.g. {Path(out) / 'stats.npz'}")
        check_writable(Path(out).absolute().parent, "--save-stats")  # before minutes of feature extraction
        r = resolve(src)
        if r.pool3 is None:
            raise UserError(f"{src} is already a statistics file")
        save_stats(out, r.mu, r.sigma, key=key(), n=len(r.pool3))
        print(f"saved statistics of {len(r.pool3)} images to {out}")
        return 0

    # check what needs per-image features before spending time on extraction
    for i, spec in enumerate(args.inputs):
        if Path(spec).is_file() and _is_stats_file(spec):
            for m in metrics:
                if METRICS[m].needs == "features":
                    raise UserError(f"{m.upper()} needs per-image features, but {spec} is a statistics file; pass images")
                if METRICS[m].needs == "logits" and i == 0:
                    raise UserError(f"{m.upper()} needs images, but {spec} is a statistics file")
    inputs = [resolve(s) for s in args.inputs]
    for r in inputs:  # stats from the other resize pipeline are not comparable
        saved = r.meta.get("key", {}).get("resize")
        if r.pool3 is None and saved and saved != args.fid_resize:
            raise UserError(f"{r.spec} was computed with --fid_resize {saved}; rerun with --fid_resize {saved}")
    options = {"isc_splits": args.isc_splits, "kid_subsets": args.kid_subsets, "kid_subset_size": args.kid_subset_size,
               "prdc_k": args.prdc_k}
    for name in metrics:
        metric = METRICS[name]
        values = metric.compute(inputs[0], inputs[-1], device, options)
        print(f"{name.upper()}: " + metric.text.format(*values))
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv and argv[0] == "compare":
            from compare import compare  # the sub-command; a folder of that name can be given as ./compare
            return compare(argv[1:])
        return _run(_parse_args(argv))
    except UserError as e:  # UserError and the UserErrors of the data and checkpoint helpers
        print(f"fid.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C: nothing half-written is left (atomic writes), so no traceback
        print("fid.py: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
