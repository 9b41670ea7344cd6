"""The named choices of flags, shared by the command line and the code that implements
them. No torch here: `python main.py --help` lists them without importing it."""

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
PRDC_K = 5  # nearest neighbours of precision/recall/density/coverage, as both papers use


def parse_policy(text) -> str:
    """'cutout,color' -> 'color,cutout' (canonical order); '' / 'none' -> ''. ValueError otherwise."""
    names = {t.strip().lower() for t in str(text).split(",") if t.strip()} - {"none"}
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
