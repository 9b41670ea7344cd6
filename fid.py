"""The `fid.py` command line of api.py: FID / IS / KID / precision, recall, density and
coverage of images, of a trained generator, or of statistics files, against each other.

    python fid.py A B            # A, B: image folder, .npy/.npz images, stats .npz or checkpoint .pt
    python fid.py A B --metrics fid,is,kid,prdc [--json]
    python fid.py --save-stats A OUT.npz
    python fid.py compare logs/RUN1 logs/RUN2 ...   # FID per group of seeds over steps + plots

Flags are parsed before torch is imported, so `--help` and a bad flag answer at once."""
import inspect
import sys

from choices import FID_SAMPLES, METRICS, PRDC_K, PRECISIONS, RESIZE_MODES
from utils import TRUST_FLAG, OneLineParser, UserError, int_at_least, json_line


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
    p.add_argument("--fid_samples", type=int_at_least(2), default=None,  # a covariance needs 2
                   help=f"images generated from a checkpoint input (default: {FID_SAMPLES})")
    p.add_argument("--ema", action="store_true", help="checkpoint inputs: use the EMA generator")
    p.add_argument(TRUST_FLAG, action="store_true",
                   help="checkpoint inputs: load one of a version before 0.2 (pickled numpy RNG state); unpickling "
                        "can run code hidden in a file, so only for checkpoints you made yourself")
    p.add_argument("--no_progress", action="store_true")
    p.add_argument("--json", action="store_true",
                   help="print the results as one JSON object (metric columns, e.g. {\"fid\": ...}; with "
                        "--save-stats the file and its image count)")
    return p.parse_args(argv)


def _run(args):
    import api  # imported here, after the flags: --help and bad flags need no torch
    from metrics import METRICS, parse_metrics
    metrics = parse_metrics(args.metrics)
    need = 2 if args.save_stats or any(METRICS[m].needs != "logits" for m in metrics) else 1
    if len(args.inputs) != need:
        fix = "usage: --save-stats INPUT OUT.npz" if args.save_stats else \
            f"--metrics {','.join(metrics)} takes one set of images" if need == 1 else \
            "FID, KID and PRDC compare two sets: give INPUT1 INPUT2"
        raise UserError(f"expected {need} input(s), got {len(args.inputs)}; {fix}")
    _check_generator_flags(args)
    if args.save_stats:
        src, out = args.inputs
        stats = api.statistics(src, out, **_options(args, api.statistics))
        result, text = {"statistics": out, "n": stats["n"]}, f"saved statistics of {stats['n']} images to {out}"
    else:
        result = api.metrics(*args.inputs, metrics=metrics, **_options(args, api.metrics))
        text = "\n".join(f"{m.upper()}: " + METRICS[m].text.format(*(result[c] for c in METRICS[m].columns))
                         for m in metrics)
    print(json_line(result) if args.json else text)
    return 0


def _check_generator_flags(args):
    """--fid_samples and --ema shape what a checkpoint input generates: refused where no input
    is one (they would do nothing: every image of a folder or array counts)."""
    from features import is_checkpoint
    from folders import checkpoints
    given = [flag for flag, on in (("--fid_samples", args.fid_samples is not None), ("--ema", args.ema)) if on]
    inputs = args.inputs[:1 if args.save_stats else None]
    # (a run's checkpoint folder given for its checkpoint gets its own hint, naming the file)
    if given and not any(is_checkpoint(i) or checkpoints(i) for i in inputs):
        raise UserError(f"{' and '.join(given)} only shape{'s' * (len(given) == 1)} the images generated from a "
                        f"checkpoint (.pt) input, and no input is one (every image of a folder or array counts): "
                        f"drop {' and '.join(given)}")
    if args.fid_samples is None:
        args.fid_samples = FID_SAMPLES


def _options(args, function):
    """The flags that are keyword options of `function` (the API takes fid.py's flags)."""
    names = inspect.signature(function).parameters
    return {k: v for k, v in {**vars(args), "progress": not args.no_progress}.items()
            if k in names and inspect.Parameter.KEYWORD_ONLY == names[k].kind}


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
