"""The named choices of flags, shared by the command line and the code that implements
them. No torch here: `python main.py --help` lists them without importing it."""
import re
import shlex
from argparse import ArgumentTypeError

IMAGE_SIZES = (32, 64, 128)  # sagan_models builds these
MASK_MODES = ("pre", "post")  # see sagan_models.Self_Attn
FULLY_MASKED = ("seed", "mean", "skip")  # the first is the default of a new run
# A span value that builds a network without its attention layers (`--span none`). Configs and
# checkpoints hold spans as ints, so "no attention" is this int, never None (which
# parameter.Config's `span` uses for "G and D differ").
NO_ATTENTION = -1
TRANSFORMS = ("color", "translation", "cutout")  # DiffAugment (diffaug.py), in the paper's order of application
RESIZE_MODES = ("tf1", "pytorch")  # the FID input pipelines (inception.FIDInception)
PRECISIONS = ("fp32", "tf32")  # the FID network's arithmetic on CUDA
METRICS = ("fid", "is", "kid", "prdc")  # metrics.METRICS implements each, in this order (the fid.csv columns)
FID_SAMPLES = 10000  # generated images per FID, in training and for a checkpoint input of fid.py
PRDC_K = 5  # nearest neighbours of precision/recall/density/coverage, as both papers use


def parse_policy(text) -> str:
    """'cutout,color' -> 'color,cutout' (canonical order); '' / 'none' -> ''. ValueError otherwise."""
    names = {t.strip().lower() for t in str(text).split(",") if t.strip()}
    if "none" in names and len(names) > 1:  # 'none,color' would quietly mean color
        raise ValueError(f"none turns augmentation off, so it goes alone; choose from {','.join(TRANSFORMS)}")
    names -= {"none"}
    unknown = names - set(TRANSFORMS)
    if unknown:
        raise ValueError(f"unknown transform(s) {', '.join(sorted(unknown))}; choose from {','.join(TRANSFORMS)}")
    return ",".join(t for t in TRANSFORMS if t in names)


def parse_metrics(text) -> list:
    """'is,fid' -> ["fid", "is"] (the registry's order: fid.csv columns do not move);
    ValueError for an empty list or an unknown name."""
    names = {m.strip().lower() for m in str(text).split(",") if m.strip()}
    if not names or names - set(METRICS):
        raise ValueError(f"--metrics {text!r}: choose a comma list of {','.join(METRICS)}")
    return [m for m in METRICS if m in names]


# A job gets SIGUSR2 this long before its time limit: time to finish the step, a FID in flight
# and the checkpoint (--launcher slurm).
SLURM_SIGNAL_DELAY_S = 180


def slurm_time(text) -> int:
    """argparse type: a Slurm time limit as sbatch --time takes it (minutes, MM:SS,
    HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) -> whole minutes, rounded up. Refused: 0 (no limit
    to Slurm), and limits that leave no time after the stop signal."""
    days, dash, clock = str(text).strip().rpartition("-")
    try:
        d, parts = int(days) if dash else 0, [int(p) for p in clock.split(":")]
    except ValueError:
        d, parts = 0, []
    if not 1 <= len(parts) <= 3 or min(parts + [d]) < 0:
        raise ArgumentTypeError(f"{text!r} is not a Slurm time: give minutes, HH:MM:SS or D-HH:MM:SS")
    if dash:  # D-HH, D-HH:MM, D-HH:MM:SS
        h, m, s = (parts + [0, 0])[:3]
    elif len(parts) == 3:  # HH:MM:SS
        h, m, s = parts
    else:  # MM, MM:SS
        h, m, s = 0, parts[0], (parts + [0])[1]
    seconds = ((d * 24 + h) * 60 + m) * 60 + s
    if seconds <= SLURM_SIGNAL_DELAY_S:
        raise ArgumentTypeError(f"{text!r} is too short: a job is told to stop {SLURM_SIGNAL_DELAY_S // 60} "
                                f"minutes before its time limit")
    return -(-seconds // 60)


def slurm_mem(text) -> str:
    """argparse type: memory as sbatch --mem takes it (32G, 4000M, 4000)."""
    if not re.fullmatch(r"[0-9]+[KMGT]?", str(text)):
        raise ArgumentTypeError(f"{text!r}: give a size as sbatch --mem takes it, e.g. 32G or 4000M")
    return str(text)


# sbatch options that --launcher slurm sets itself: the flag that sets it, or None (the launcher)
SBATCH_OWNED = {"partition": "--slurm_partition", "p": "--slurm_partition", "time": "--slurm_time",
                "t": "--slurm_time", "gpus-per-node": "--slurm_gpus", "gpus": "--slurm_gpus",
                "cpus-per-task": "--slurm_cpus", "c": "--slurm_cpus", "mem": "--slurm_mem",
                "account": "--slurm_account", "A": "--slurm_account", "qos": "--slurm_qos", "q": "--slurm_qos",
                "job-name": None, "J": None, "array": None, "a": None, "output": None, "o": None, "error": None,
                "e": None, "signal": None, "requeue": None, "no-requeue": None, "open-mode": None}


def sbatch_options(text) -> dict:
    """argparse type: '--constraint=a100 --exclusive' -> {"constraint": "a100", "exclusive":
    True}, more sbatch options, each --name or --name=value; not those the launcher sets
    itself (SBATCH_OWNED)."""
    options = {}
    for word in shlex.split(str(text)):
        name, eq, value = word[2:].partition("=")
        if not word.startswith("--") or not name:
            raise ArgumentTypeError(f"{word!r}: write each option as --name=value or --name (one word)")
        if name in SBATCH_OWNED:
            owner = SBATCH_OWNED[name]
            raise ArgumentTypeError(f"--{name} is set by " + (f"{owner}; use that" if owner else "the launcher"))
        options[name] = value if eq else True
    return options


def parse_span(text) -> int:
    """'3' -> 3, 'none' -> NO_ATTENTION; ValueError for anything else (negative numbers too)."""
    word = str(text).strip().lower()
    if word == "none":
        return NO_ATTENTION
    if not (word.isascii() and word.isdigit()):
        raise ValueError(f"expected a span >= 0 or none, got {text!r}")
    return int(word)


def span_text(span) -> str:
    """A span as the command line writes it: 'none' for NO_ATTENTION, the number otherwise."""
    return "none" if span == NO_ATTENTION else str(span)


# ---------------------------------------------------------------------------- flag value types
def str2bool(v):
    if isinstance(v, bool):
        return v
    if v.lower() in ("true", "1", "yes", "y", "on"):
        return True
    if v.lower() in ("false", "0", "no", "n", "off"):
        return False
    raise ArgumentTypeError(f"expected true or false, got {v!r}")


def str2auto(v):
    """auto, true or false (speed flags: auto means on where it pays, i.e. on CUDA)."""
    return "auto" if str(v).lower() == "auto" else str2bool(v)


def int_list(v):
    """'3' -> [3]; '0,1,2' -> [0, 1, 2] (a sweep over the values)."""
    try:
        values = [int(x) for x in str(v).split(",")]
    except ValueError:
        raise ArgumentTypeError(f"expected an integer or a comma list of integers, got {v!r}") from None
    if len(set(values)) != len(values):
        raise ArgumentTypeError(f"{v!r} repeats a value")
    return values


def span_list(v):
    """'3' -> [3]; 'none,0,3' -> [NO_ATTENTION, 0, 3] (choices.parse_span; a sweep over the values)."""
    try:
        values = [parse_span(x) for x in str(v).split(",")]
    except ValueError:
        raise ArgumentTypeError(f"expected a span (an integer >= 0, 0 = plain SAGAN, or none = no "
                                         f"attention layers) or a comma list of them, got {v!r}") from None
    if len(set(values)) != len(values):
        raise ArgumentTypeError(f"{v!r} repeats a value")
    return values


def count_or_all(v):
    """'50000' -> 50000; 'all' (or 0) -> 0, which stands for every image (--fid_ref_samples)."""
    if str(v).strip().lower() == "all":
        return 0
    try:
        return int(v)
    except ValueError:
        raise ArgumentTypeError(f"expected a count or 'all', got {v!r}") from None
