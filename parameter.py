"""Command-line flags: parsed and validated here, nothing else. No file system, no lock, no
checkpoint reads, no torch (so `python main.py --help` answers at once): run.configure()
turns the flags into the run's one frozen Config."""
import argparse
import difflib
import os
import re
import shlex
import sys
from pathlib import Path

from choices import FID_SAMPLES, FULLY_MASKED, IMAGE_SIZES, MASK_MODES, METRICS, PRDC_K, PRECISIONS, RESIZE_MODES
from choices import TRANSFORMS
from choices import count_or_all, parse_metrics, parse_policy, sbatch_options, slurm_mem, slurm_time, span_list
from choices import int_list, span_text, str2auto, str2bool
from folders import STATS_FOLDER
from utils import TRUST_FLAG, OneLineParser, UserError, int_at_least


DATASETS = ("emoji", "celeb", "lsun", "folder")
IMAGE_PATH = "./data"  # --image_path's default: there --dataset emoji falls back to the bundled set
# --diffaug when not given: on for the small bundled set, where it measurably helps (README,
# "Small data"); off for the rest, as in the original experiment.
DIFFAUG_DEFAULT = {"emoji": "color,translation,cutout"}


def _flag(p, name, **kw):
    """A boolean flag usable as `--name`, `--name true` or `--name false` (the original code's style)."""
    p.add_argument(name, type=str2bool, nargs="?", const=True, default=kw.pop("default", False), **kw)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="main.py", allow_abbrev=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                      description="Train SAGAN / Non-local SAGAN, or sample from a checkpoint (--train false). "
                                  "'The original' below is the Non-local SAGAN code this package reproduces; "
                                  "--seed is the random seed.")
    a = p.add_argument

    g = p.add_argument_group("model")
    g.add_argument("--model", default="sagan", choices=["sagan"],
                   help="network family; only sagan: the flag exists so the original README's command lines run "
                        "as written")
    g.add_argument("--imsize", type=int, default=64, help=f"image size, one of {IMAGE_SIZES}")
    g.add_argument("--z_dim", type=int, default=128)
    g.add_argument("--g_conv_dim", type=int, default=64)
    g.add_argument("--d_conv_dim", type=int, default=64)
    g.add_argument("--span", type=span_list, default=[0],
                   help="Non-local span: attention ignores keys within the (2·span+1)² square around "
                        "each query; 0 = plain SAGAN; none = no attention layers (plain SN-DCGAN). A comma list "
                        "(with --seed) runs a sweep, see --jobs")
    for net, name in (("g", "generator"), ("d", "discriminator")):
        g.add_argument(f"--{net}_span", type=span_list, default=None, help=f"span of the {name} (default: --span); "
                       "a list sweeps the product of the G and D lists, the one not given following --span")
    g.add_argument("--mask_mode", default="pre", choices=MASK_MODES,
                   help="pre: masked keys leave the softmax (the original code); post: softmax, then zero them "
                        "(the original README)")
    g.add_argument("--fully_masked", default=FULLY_MASKED[0], choices=FULLY_MASKED,
                   help="pre mode, a query with no key left: seed = the original code's float32 -1e9 arithmetic "
                        "(q, k keep training); mean = equal weight on every key (the original code's forward pass "
                        "while |energy| < 32, no gradient to q, k); skip = attend to nothing (x passes through)")
    _flag(g, "--original_attention",
          help="every attention layer computes as the original code did: -1e9 added to masked energies, dense, "
               "float32 softmax, and at span 0 each query's own pixel masked (to re-run the original README's table)")

    g = p.add_argument_group("training")
    g.add_argument("--adv_loss", default="hinge", choices=["hinge", "wgan-gp"])
    g.add_argument("--lambda_gp", type=float, default=10.0, help="gradient-penalty weight for wgan-gp")
    g.add_argument("--diffaug", default=None, metavar="POLICY",
                   help=f"differentiable augmentation of every image D sees in training: a comma list of "
                        f"{','.join(TRANSFORMS)}, or none (default: {DIFFAUG_DEFAULT['emoji']} for "
                        f"--dataset emoji, none otherwise)")
    g.add_argument("--total_step", type=int, default=100000, help="generator steps")
    g.add_argument("--d_iters", type=int, default=1, help="discriminator steps per generator step")
    g.add_argument("--batch_size", type=int, default=64,
                   help="global batch size; under torchrun each of K processes takes batch_size/K")
    g.add_argument("--num_workers", type=int, default=2, help="image-decoding worker processes")
    g.add_argument("--g_lr", type=float, default=1e-4)
    g.add_argument("--d_lr", type=float, default=4e-4)
    g.add_argument("--beta1", type=float, default=0.0)
    g.add_argument("--beta2", type=float, default=0.9)
    g.add_argument("--ema_decay", type=float, default=0.0,
                   help="EMA of generator weights (e.g. 0.999); 0 = off. Samples and FID then use it too")
    g.add_argument("--seed", type=int_list, default=None,
                   help="random seed (default: drawn and saved in config.json); a comma list runs a sweep")
    g.add_argument("--jobs", type=int, default=1,
                   help="a sweep (--span / --seed lists): cells run at once, spread over the visible GPUs")
    a("--version", default=None, help="run name (default: sagan_<dataset>_span<N>[...])")
    a("--config", default=None, metavar="FILE",
      help="start from the settings of a run's config.json; flags given here override them. Its run name, "
           "output folders and device are not taken, nor auto settings its device chose (see README)")
    a("--pretrained_model", type=int, default=None,
      help="checkpoint step: continue training from it, or sample from it with --train false")
    _flag(p, "--resume", help="continue from the newest checkpoint of --version")
    _flag(p, "--train", default=True, help="false: write --n_samples images from a checkpoint instead")
    a("--n_samples", type=int, default=64, help="images written by --train false")
    _flag(p, TRUST_FLAG, help="load a checkpoint of a version before 0.2 (pickled numpy RNG state): unpickling "
                              "can run code hidden in a file, so only for checkpoints you made yourself")
    _flag(p, "--parallel", help="all visible GPUs with DistributedDataParallel (re-launches via torchrun)")
    _flag(p, "--sync_bn", help="under torchrun: BatchNorm statistics over the global batch")

    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="emoji", choices=DATASETS,
                   help="emoji: bundled 1,432 emoji; celeb: <image_path>/CelebA; lsun: <image_path>/LSUN; "
                        "folder: any images under --image_path")
    g.add_argument("--image_path", default=IMAGE_PATH)
    g.add_argument("--cache", type=str2auto, nargs="?", const=True, default="auto",
                   help="decode/crop/resize image files once into a uint8 array next to the data and serve "
                        "batches from (GPU) memory; auto: on with CUDA, off on CPU")

    g = p.add_argument_group("speed (auto: the fast path on CUDA, the plain one on CPU; flags switch parts off)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--amp", default="auto", choices=["auto", "none", "bf16"],
                   help="bfloat16 autocast for G and D; auto: bf16 on CUDA, none on CPU")
    # torch.compile's reduce-overhead and max-autotune modes are not offered: the whole step is
    # already one CUDA graph (--cuda_graph), and autotuning was not measured
    g.add_argument("--compile", default="auto", choices=["auto", "none", "default"],
                   help="torch.compile G and D (fusion); auto: default on CUDA in one process (not with wgan-gp), "
                        "none on CPU")
    for name, what in (("--channels_last", "channels_last memory format for G and D"),
                       ("--cuda_graph", "capture the whole training step (D and G steps, Adam, EMA, z draws) "
                                        "in one CUDA graph after 3 eager steps; needs one process")):
        g.add_argument(name, type=str2auto, nargs="?", const=True, default="auto",
                       help=f"{what}; auto: on with CUDA, off on CPU")
    g.add_argument("--attn_impl", default="fused", choices=["fused", "dense"],
                   help="fused: scaled_dot_product_attention (pre mode); dense: materialised reference")

    g = p.add_argument_group("outputs")
    _flag(g, "--use_tensorboard", help="also log to TensorBoard (in the run's log folder; needs tensorboard): "
                                       "losses, metrics, attention distances, sample grids, attention pictures, config")
    g.add_argument("--log_path", default="./logs")
    g.add_argument("--model_save_path", default="./models")
    g.add_argument("--sample_path", default="./samples")
    g.add_argument("--attn_path", default="./attn")
    g.add_argument("--log_step", type=int, default=10)
    g.add_argument("--sample_step", type=int, default=1000)
    g.add_argument("--model_save_step", type=int, default=10000)

    g = p.add_argument_group("metrics")
    g.add_argument("--fid_step", type=int, default=None,
                   help="FID every N steps and at the end; 0 = off (default: 10000 on GPU, off on CPU)")
    g.add_argument("--fid_samples", type=int, default=FID_SAMPLES, help="generated images per FID")
    g.add_argument("--fid_ref_samples", type=count_or_all, default=50000,
                   help="cap on real images in the reference statistics (a fixed random subset); all (or 0): "
                        "every image of the dataset, as the original code (all 202,599 CelebA images)")
    g.add_argument("--fid_batch_size", type=int, default=None, help="Inception batch (default: 500 on GPU, 50 on CPU)")
    g.add_argument("--fid_weights", default=None, help="FID-Inception weights file (default: torch hub cache, "
                                                       "downloaded once)")
    g.add_argument("--fid_resize", default="tf1", choices=RESIZE_MODES,
                   help="tf1: torch-fidelity/TF reference; pytorch: pytorch-fid's pipeline")
    g.add_argument("--fid_precision", default="tf32", choices=PRECISIONS,
                   help="Inception arithmetic on CUDA: tf32 (TensorFloat-32; FID within 1e-4 relative of fp32, "
                        "2.4x faster, see README) or fp32 (IEEE)")
    g.add_argument("--fid_g_mode", default="batch", choices=["batch", "eval"],
                   help="BatchNorm of G when sampling for FID, grids and --train false: batch statistics "
                        "(as the original code) or running statistics")
    g.add_argument("--metrics", default="fid", help=f"comma-separated subset of {','.join(METRICS)}")

    g = p.add_argument_group("a sweep on a Slurm cluster (README: On a Slurm cluster)")
    g.add_argument("--launcher", default="local", choices=["local", "slurm"],
                   help="a sweep's cells: local processes (--jobs at a time), or a Slurm job each (needs submitit)")
    g.add_argument("--wait", action="store_true", help="slurm: wait for the cells' jobs, then print the report")
    g.add_argument("--slurm_partition", default=None, help="partition (None: the cluster's default)")
    g.add_argument("--slurm_time", type=slurm_time, default=240, metavar="TIME",
                   help="a job's time limit, minutes or D-HH:MM:SS; a cell that needs more is requeued and resumes")
    g.add_argument("--slurm_gpus", type=int_at_least(0), default=1, help="GPUs per job (one cell)")
    g.add_argument("--slurm_cpus", type=int_at_least(1), default=4, help="CPUs per job")
    g.add_argument("--slurm_mem", type=slurm_mem, default=None, help="memory per job, e.g. 32G (None: partition's)")
    g.add_argument("--slurm_account", default=None, help="account to charge")
    g.add_argument("--slurm_qos", default=None, help="quality of service")
    g.add_argument("--slurm_sbatch", type=sbatch_options, default={}, metavar="OPTIONS",
                   help="more sbatch options, written as for sbatch, in one quoted string (README: On a Slurm cluster)")
    g.add_argument("--slurm_setup", default=None, metavar="SHELL",
                   help="shell commands each job runs first, e.g. 'module load cuda; source env/bin/activate'")
    return p


def check_launcher(cfg):
    """UserError (one line) for launcher flags that cannot apply."""
    slurm_flags = [f"--{k}" for k in cfg.given if k.startswith("slurm_") or k == "wait"]
    if cfg.launcher == "local" and slurm_flags:
        raise UserError(f"{', '.join(slurm_flags)}: for a sweep on Slurm; add --launcher slurm or drop them")
    if cfg.launcher == "slurm" and not cfg.sweep:
        raise UserError("--launcher slurm runs the cells of a sweep as jobs; give --span or --seed a comma list")
    if cfg.launcher == "slurm" and "jobs" in cfg.given:
        raise UserError("--jobs is for --launcher local: on Slurm every cell is its own job; drop --jobs")


def _unknown_flag_message(unknown, parser):
    known = [s for a in parser._actions for s in a.option_strings]
    flag = next((u for u in unknown if u.startswith("-")), unknown[0])
    close = difflib.get_close_matches(flag.split("=")[0], known, n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    return f"unknown argument {flag}{hint}"


def validate(cfg):
    """UserError (one line) for a value no run can use."""
    def err(message):
        raise UserError(message)
    if cfg.imsize not in IMAGE_SIZES:
        err(f"--imsize {cfg.imsize} is not supported; use 32, 64 or 128")
    original_code = {"mask_mode": "pre", "fully_masked": "seed"}  # its one masking, its one answer for keyless rows
    bad = [f"--{k} {getattr(cfg, k)}" for k, v in original_code.items() if getattr(cfg, k) != v]
    if cfg.original_attention and bad:
        err(f"--original_attention computes attention as the original code did; drop {' and '.join(bad)}")
    if cfg.jobs < 1:
        err(f"--jobs must be >= 1, got {cfg.jobs}")
    positive = ("batch_size", "total_step", "d_iters", "z_dim", "g_conv_dim", "d_conv_dim", "log_step",
                "sample_step", "model_save_step", "fid_samples", "n_samples")
    for name in positive:
        if getattr(cfg, name) < 1:
            err(f"--{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.num_workers < 0:
        err("--num_workers must be >= 0")
    if cfg.fid_ref_samples < 0 or cfg.fid_ref_samples == 1:  # statistics need two images (0 is all)
        err(f"--fid_ref_samples must be a count >= 2 or all, got {cfg.fid_ref_samples}")
    if cfg.fid_step is not None and cfg.fid_step < 0:
        err("--fid_step must be >= 0 (0 turns FID off)")
    if cfg.fid_batch_size is not None and cfg.fid_batch_size < 1:
        err("--fid_batch_size must be >= 1")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(cfg, name) < 1:
            err(f"--{name} must be in [0, 1), got {getattr(cfg, name)}")
    for name in ("g_conv_dim", "d_conv_dim"):
        if getattr(cfg, name) < 8:
            err(f"--{name} must be >= 8 (attention projects to channels/8), got {getattr(cfg, name)}")
    if not 0 <= cfg.ema_decay < 1:
        err(f"--ema_decay must be in [0, 1), got {cfg.ema_decay}")
    for name in ("g_lr", "d_lr", "lambda_gp"):
        if not 0 <= getattr(cfg, name) < float("inf"):  # NaN fails this too
            err(f"--{name} must be a number >= 0, got {getattr(cfg, name)}")
    if cfg.version is not None and (not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", cfg.version)):
        err(f"--version {cfg.version!r}: use letters, digits, '.', '_' and '-' (it names folders under "
            f"the output roots), starting with a letter or digit")
    if cfg.version == STATS_FOLDER:  # a run there would mix its logs with every run's FID statistics
        err(f"--version {STATS_FOLDER} is the FID statistics folder under --log_path; name the run otherwise")
    if cfg.diffaug is not None:
        try:
            cfg.diffaug = parse_policy(cfg.diffaug)
        except ValueError as e:
            err(f"--diffaug {cfg.diffaug!r}: {e} (or none)")
    try:
        cfg.metrics = parse_metrics(cfg.metrics)
    except ValueError as e:
        err(str(e))
    check_metric_samples(cfg)
    for seed in cfg.seed or []:
        if not 0 <= seed < 2**63:
            err(f"--seed {seed} is out of range; use an integer in [0, 2^63)")
    if cfg.resume and cfg.pretrained_model is not None:
        err("--resume and --pretrained_model both say where to start; give one")


def check_metric_samples(cfg):
    """UserError unless --metrics can be computed on --fid_samples and --fid_ref_samples."""
    if cfg.fid_samples < 2 or ("is" in cfg.metrics and cfg.fid_samples < 10):
        raise UserError(f"--fid_samples {cfg.fid_samples} is too few: FID needs >= 2 images, IS >= 10 (its splits)")
    if "prdc" in cfg.metrics and (cfg.fid_samples <= PRDC_K or 0 < cfg.fid_ref_samples <= PRDC_K):
        raise UserError(f"--metrics prdc needs more than its {PRDC_K} nearest neighbours on each side: raise "
                        f"--fid_samples ({cfg.fid_samples}) and --fid_ref_samples ({cfg.fid_ref_samples}) above {PRDC_K}")


def resolve_device_defaults(cfg, device: str, world: int = 1):
    """Defaults that depend on the device ("cuda" or "cpu", see device.pick_device). The
    speed flags' auto values: the measured fast path on CUDA (README, Performance), the plain
    path on CPU; combinations that cannot run are refused here, at start. FID: every 10,000
    steps on CUDA; on a CPU, where Inception takes minutes, only when asked for."""
    cfg.device = device
    cuda = device == "cuda"
    if cfg.compile == "default" and cfg.adv_loss == "wgan-gp":
        raise UserError("--compile default cannot run wgan-gp: torch.compile has no double backward for the "
                        "gradient penalty; drop --compile (auto leaves it off for wgan-gp)")
    if cfg.cuda_graph is True and not cuda:
        raise UserError("--cuda_graph needs a CUDA device; drop it (or --cuda_graph false)")
    if cfg.cuda_graph is True and world > 1:
        raise UserError(f"--cuda_graph runs in one process, not under torchrun ({world} processes); drop it")
    # Under torchrun, compile and graphs stay off unless asked for: DDP with either is not measured.
    auto = {"amp": "bf16" if cuda else "none",
            "compile": "default" if cuda and world == 1 and cfg.adv_loss != "wgan-gp" else "none",
            "channels_last": cuda, "cache": cuda, "cuda_graph": cuda and world == 1}
    for name, value in auto.items():
        if getattr(cfg, name) == "auto":
            setattr(cfg, name, value)
    if cfg.fid_step is None:
        cfg.fid_step = 10000 if cuda else 0
    if cfg.fid_batch_size is None:
        cfg.fid_batch_size = 500 if cuda else 50


def run_name(cfg) -> str:
    """--version, or the default name: sagan_<dataset>_span<N> (span<G> when G and D agree,
    g<G>_d<D> otherwise; N is "none" without attention layers), and whatever else differs
    from the defaults in the network or its training."""
    if cfg.version is not None:
        return cfg.version
    name = f"sagan_{cfg.dataset}_{_span_part(cfg.g_span, cfg.d_span)}"
    if cfg.mask_mode != "pre":
        name += f"_{cfg.mask_mode}"
    if cfg.fully_masked != FULLY_MASKED[0]:
        name += f"_{cfg.fully_masked}"
    if cfg.original_attention:
        name += "_original"
    if cfg.diffaug not in (None, default_diffaug(cfg)):
        name += f"_diffaug-{cfg.diffaug.replace(',', '-')}" if cfg.diffaug else "_nodiffaug"
    if cfg.imsize != 64:
        name += f"_{cfg.imsize}px"
    return name


def _span_part(g_span, d_span) -> str:
    return f"span{span_text(g_span)}" if g_span == d_span else f"g{span_text(g_span)}_d{span_text(d_span)}"


def parse_flags(argv=None):
    """The command line as an argparse Namespace, validated (UserError otherwise), with
    `given` (the flags the command line gave) and `sweep` (the grid's cells, or None for
    one run). One run: g_span, d_span ints (NO_ATTENTION, -1: no attention layers), span
    their common value or None when G and D differ (never "no attention"); seed an int or
    None, version its name. A sweep keeps its lists in its cells."""
    parser = build_parser()
    # argparse leaves attributes it finds on the namespace alone unless the flag is given:
    # the sentinel tells which flags the command line gave (the resume hint repeats those,
    # and a resumed run keeps its checkpoint's settings where they are not given).
    unset = object()
    dests = [a.dest for a in parser._actions if a.option_strings and a.dest != "help"]
    cfg, unknown = parser.parse_known_args(sys.argv[1:] if argv is None else argv,
                                           argparse.Namespace(**dict.fromkeys(dests, unset)))
    if unknown:
        raise UserError(_unknown_flag_message(unknown, parser))
    cfg.given = sorted(k for k in dests if getattr(cfg, k) is not unset)
    for k in set(dests) - set(cfg.given):
        setattr(cfg, k, parser.get_default(k))
    validate(cfg)
    cfg.sweep = sweep_cells(cfg)
    check_launcher(cfg)
    if not cfg.sweep:
        cfg.version = run_name(cfg)
    return cfg


def sweep_cells(cfg):
    """The span and seed lists as the grid's cells, [(g_span, d_span, seed, version), ...], or
    None for one run (then span, g_span, d_span and seed become plain values, see
    parse_flags). The (g_span, d_span) pairs: each --span value for both networks; with
    --g_span or --d_span given, the product of the two lists, the one not given following
    --span. Cells are named after --version (or the default name) with _span<S> (or
    _g<G>_d<D>) and _seed<N> where those vary."""
    seeds = cfg.seed if cfg.seed is not None else [None]
    if cfg.g_span is not None and cfg.d_span is not None and "span" in cfg.given:
        raise UserError("--g_span and --d_span set both networks' spans, so --span would go unused; drop --span")
    if cfg.g_span is None and cfg.d_span is None:
        pairs = [(s, s) for s in cfg.span]
    else:
        pairs = [(g, d) for g in cfg.g_span or cfg.span for d in cfg.d_span or cfg.span]
    (cfg.g_span, cfg.d_span), cfg.seed = pairs[0], seeds[0]
    cfg.span = cfg.g_span if cfg.g_span == cfg.d_span else None  # never disagrees with them
    if len(pairs) == 1 and len(seeds) == 1:
        if cfg.jobs != 1:
            raise UserError("--jobs runs the cells of a sweep at once; give --span (--g_span, --d_span) or --seed a "
                            "comma list, or drop --jobs")
        return None
    if not cfg.train or cfg.resume or cfg.pretrained_model is not None:
        raise UserError("a sweep starts, continues or skips each of its cells by itself: drop --train false, "
                        "--resume and --pretrained_model (run the same command again to continue it)")
    cfg.sweep_name = (cfg.version or f"sagan_{cfg.dataset}") + "_sweep"
    cells = []
    for g_span, d_span in pairs:
        for seed in seeds:
            name = cfg.version + (f"_{_span_part(g_span, d_span)}" if len(pairs) > 1 else "") \
                if cfg.version is not None else \
                run_name(argparse.Namespace(**{**vars(cfg), "g_span": g_span, "d_span": d_span}))
            cells.append((g_span, d_span, seed, name + (f"_seed{seed}" if seed is not None else "")))
    return cells


def default_diffaug(cfg) -> str:
    return DIFFAUG_DEFAULT.get(cfg.dataset, "")


# Flags a resumed run does not repeat: where it starts comes from --resume itself, and a
# stop always leaves a checkpoint of the current format; --config's settings are among the
# flags given.
NOT_REPEATED = {"resume", "pretrained_model", "train", "trust_checkpoint", "parallel", "jobs", "config"}


def flag_words(settings: dict) -> list:
    """Command-line words that set {dest: value}, each value as the parser reads it back."""
    options = {a.dest: a.option_strings[-1] for a in build_parser()._actions if a.option_strings}
    words = []
    for dest, value in settings.items():
        if value is None:  # the flag's default
            continue
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif dest in ("span", "g_span", "d_span"):
            value = span_text(value)
        elif isinstance(value, (list, tuple)):
            value = ",".join(map(str, value))
        elif dest == "diffaug" and value == "":
            value = "none"
        words += [options[dest], str(value)]
    return words


def resume_command(cfg, world=1) -> str:
    """The command that continues this run, built from the parsed config: the flags the
    command line gave (with their resolved values), the run's --version, and --resume;
    main.py as a path from the current folder, so it runs when pasted here."""
    words = flag_words({d: getattr(cfg, d, None) for d in cfg.given if d not in NOT_REPEATED and d != "version"})
    main_py = os.path.relpath(Path(__file__).resolve().with_name("main.py"))
    launcher = ["python"] if world == 1 else ["torchrun", "--nproc_per_node", str(world)]
    return shlex.join(launcher + [main_py, *words, "--version", cfg.version, "--resume"])


class Config(argparse.Namespace):
    """The run's one config: the flags, the device's defaults and what the start checkpoint
    brings, resolved once by run.configure() and frozen after that: no module changes it
    (`replace` makes a changed copy), and every field keeps one type."""

    def __init__(self, **settings):
        self.__dict__.update(settings)

    def __setattr__(self, name, value):
        raise AttributeError(f"the config is frozen ({name} cannot change); use config.replace({name}=...)")

    def __delattr__(self, name):
        raise AttributeError(f"the config is frozen ({name} cannot be removed)")

    def replace(self, **changes) -> "Config":
        return Config(**{**vars(self), **changes})
