"""The compare report: runs whose config.json differ only in their seed (and names, paths
and bookkeeping, see NOT_SETTINGS) form a group; per group and step the FID is summarised
over its runs: n, mean, std, a Student-t 95% confidence interval, and Welch's t-test against
the span-0 group with otherwise equal settings. One seed per span cannot tell a real
difference from run-to-run noise; this is what can. `python fid.py compare RUN...`."""
import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from checkpoint import migrate_config
from choices import span_text
from files import atomic_open, check_output_file
from plots import figure_path, plot_attention, plot_groups
from utils import OneLineParser, UserError, write_failed


# config.json keys that do not change what a run computes, so runs differing in them belong
# to one group: the seed (what a group varies), names and paths, bookkeeping, speed-only
# settings that give identical images, and how long it ran.
NOT_SETTINGS = {"seed", "version", "log_path", "model_save_path", "sample_path", "attn_path", "image_path",
                "package_version", "git_commit", "torch", "device", "world_size", "num_workers", "cache",
                "resume", "pretrained_model", "start_checkpoint", "train", "n_samples", "parallel",
                "use_tensorboard", "log_step", "sample_step", "model_save_step", "total_step", "fid_batch_size",
                "jobs", "span", "sweep", "given", "trust_checkpoint"}
CSV_COLUMNS = ["group", "g_span", "d_span", "step", "n", "mean", "std", "ci95_low", "ci95_high"]


# ---------------------------------------------------------------------------- reading runs
@dataclass
class Run:
    folder: Path
    config: dict
    fid: dict  # {step: value} of the compared column
    attention: list = field(default_factory=list)  # rows of attention.csv

    @property
    def settings(self) -> dict:
        return {k: v for k, v in self.config.items() if k not in NOT_SETTINGS}


def _read_csv(path: Path) -> list:
    """The rows of a CSV this package wrote; UserError (one line) for anything else."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    except (UnicodeDecodeError, csv.Error, OSError) as e:
        raise UserError(f"cannot read {path} ({type(e).__name__}); is it a file this package wrote?") from None


def _number(row, key, path, kind=float):
    try:
        value = kind(row[key])
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{path}: malformed row {dict(row)!r} (no number in column {key!r}); is it a file this "
                        f"package wrote?") from None
    return value


def load_run(folder, column="fid") -> Run:
    d = Path(folder)
    if not (d / "fid.csv").is_file():
        raise UserError(f"{d} has no fid.csv; pass <log_path>/<version> of a run trained with --fid_step N")
    config = {}
    if (d / "config.json").is_file():
        try:
            config = json.loads((d / "config.json").read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise UserError(f"cannot read {d / 'config.json'} ({type(e).__name__})") from None
        config = migrate_config(config)  # runs from before a setting existed group with their equals
    path = d / "fid.csv"
    fid = {_number(r, "step", path, int): _number(r, column, path) for r in _read_csv(path)
           if r.get(column) not in (None, "")}
    attention = _read_csv(d / "attention.csv") if (d / "attention.csv").is_file() else []
    for r in attention:  # checked here, not half-way through a plot
        _number(r, "step", d / "attention.csv", int), _number(r, "distance", d / "attention.csv")
        _number(r, "uniform", d / "attention.csv")
        if any(r.get(k) in (None, "") for k in ("network", "layer", "map")):
            raise UserError(f"{d / 'attention.csv'}: malformed row {dict(r)!r}; is it a file this package wrote?")
    return Run(d, config, fid, attention)


# ---------------------------------------------------------------------------- statistics
@dataclass
class Summary:
    n: int
    mean: float
    std: float  # ddof=1; nan when n = 1
    ci95: tuple  # Student t; (nan, nan) when n = 1


def summarize(values) -> Summary:
    x = np.asarray(values, dtype=np.float64)
    n, mean = len(x), float(x.mean())
    if n < 2:
        return Summary(n, mean, math.nan, (math.nan, math.nan))
    std = float(x.std(ddof=1))
    from scipy import stats  # here, not at the top: ~1 s of imports that only the report needs
    half = float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n)
    return Summary(n, mean, std, (mean - half, mean + half))


def welch_p(a, b) -> float:
    """Two-sided p-value of Welch's t-test (unequal variances); nan with fewer than 2 per side."""
    if len(a) < 2 or len(b) < 2:
        return math.nan
    from scipy import stats
    return float(stats.ttest_ind(np.asarray(a, float), np.asarray(b, float), equal_var=False).pvalue)


@dataclass
class Group:
    label: str
    settings: dict
    runs: list

    def values(self, step) -> list:
        return [r.fid[step] for r in self.runs if step in r.fid]

    def steps(self) -> list:
        return sorted({s for r in self.runs for s in r.fid})

    def full_steps(self) -> set:
        """The steps every run of the group logged."""
        return set.intersection(*(set(r.fid) for r in self.runs))

    def table(self) -> dict:
        """{step: Summary} over the runs that logged the step."""
        return {s: summarize(self.values(s)) for s in self.steps()}

    def reach(self, target) -> int | None:
        """The first step at which the mean FID is <= target."""
        return next((s for s, m in self.table().items() if m.mean <= target), None)


def group_runs(runs) -> list:
    """Runs with equal settings, in first-seen order, labelled by the settings that vary
    between groups (e.g. "span 3"); runs without a config.json stay alone."""
    groups = []
    for run in runs:
        hit = next((g for g in groups if run.config and g.settings == run.settings), None)
        if hit is None:
            groups.append(Group("", run.settings, [run]))
        else:
            hit.runs.append(run)
    keys = sorted({k for g in groups for k in g.settings})
    varying = [k for k in keys if len({json.dumps(g.settings.get(k), sort_keys=True) for g in groups}) > 1]
    for g in groups:
        parts, s = [], g.settings
        if "g_span" in s and s.get("g_span") == s.get("d_span"):
            parts.append(f"span {span_text(s['g_span'])}")
        elif "g_span" in s:
            parts.append(f"span G{span_text(s['g_span'])}/D{span_text(s.get('d_span'))}")
        parts += [f"{k}={s.get(k)}" for k in varying if k not in ("g_span", "d_span")]
        if not g.runs[0].config:
            g.label = g.runs[0].folder.name
        elif len(g.runs) == 1:
            g.label = f"{g.runs[0].config.get('version', g.runs[0].folder.name)} ({', '.join(parts)})"
        else:
            g.label = ", ".join(parts) or g.runs[0].folder.name
    seen = {}
    for g in groups:  # labels stay unique
        seen[g.label] = seen.get(g.label, 0) + 1
        if seen[g.label] > 1:
            g.label += f" [{g.runs[0].folder}]"
    return groups


def baseline_of(group, groups):
    """The span-0 group whose other settings equal this group's (None if absent, or if
    this is it)."""
    want = {**group.settings, "g_span": 0, "d_span": 0}
    if not group.runs[0].config or want == group.settings:
        return None
    return next((g for g in groups if g.runs[0].config and g.settings == want), None)


# ---------------------------------------------------------------------------- the report
def report(groups, column="fid", reach=None) -> str:
    tables = [g.table() for g in groups]
    steps = sorted({s for t in tables for s in t})
    cell = lambda m: "-" if m is None else (f"{m.mean:.2f}" if m.n == 1 else f"{m.mean:.2f} ± {m.std:.2f} ({m.n})")
    width = max([16] + [len(g.label) for g in groups])
    row = lambda first, vals: f"{first:>12}  " + "  ".join(f"{v:>{width}}" for v in vals)
    lines = [row("step", [g.label for g in groups])]
    lines += [row(s, [cell(t.get(s)) for t in tables]) for s in steps]
    finite = [{s: m for s, m in t.items() if math.isfinite(m.mean)} for t in tables]
    best = [min(t.items(), key=lambda kv: kv[1].mean) if t else None for t in finite]
    lines.append(row(f"best {column}", ["-" if b is None else f"{b[1].mean:.2f}" for b in best]))
    lines.append(row("at step", ["-" if b is None else str(b[0]) for b in best]))
    # the last step at which every run of the group logged: later means may be over fewer seeds
    ci = lambda g, t: "-" if not g.full_steps() or len(g.runs) < 2 else \
        "[{:.2f}, {:.2f}]".format(*t[max(g.full_steps())].ci95)
    lines.append(row("last: 95% CI", [ci(g, t) for g, t in zip(groups, tables)]))
    pvals = []
    for g in groups:
        base = baseline_of(g, groups)
        common = sorted(g.full_steps() & base.full_steps()) if base else []
        if not common:
            pvals.append("-")
            continue
        a, b = g.values(common[-1]), base.values(common[-1])
        p = welch_p(a, b)
        pvals.append("n<2" if min(len(a), len(b)) < 2 else "nan" if math.isnan(p) else f"{p:.3g} @{common[-1]}")
    lines.append(row("p vs span 0", pvals))
    if reach is not None:
        lines.append(row(f"reach {column}≤{reach:g}", [str(g.reach(reach) or "never") for g in groups]))
    lines.append("mean ± std (n runs) per step; 95% CI: Student t; p: Welch's t-test against the span-0 group "
                 "with the same other settings; both at the last step every run of the groups logged")
    return "\n".join(lines)


def write_csv(groups, path):
    with atomic_open(path, "w", newline="") as f:  # a failed write leaves the earlier file whole
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for g in groups:
            for step, m in g.table().items():
                opt = lambda v: "" if math.isnan(v) else f"{v:.6g}"
                spans = [span_text(g.settings[k]) if k in g.settings else "" for k in ("g_span", "d_span")]
                w.writerow([g.label, *spans, step, m.n,
                            f"{m.mean:.6g}", opt(m.std), opt(m.ci95[0]), opt(m.ci95[1])])


def show(groups, out, column="fid", reach=None, flag="--out"):
    """Print the report and write the FID plot to `out`, the attention plot beside it; a
    plot that cannot be written is a UserError naming `flag`, the option that chose it."""
    print(report(groups, column, reach))
    attention_out = Path(out).with_name(Path(out).stem + "_attention.png")
    path = out  # the file being written, for the message
    try:
        plot_groups(groups, out, column)
        print(f"plot: {out}")
        path = attention_out
        if plot_attention(groups, attention_out):
            print(f"attention distance: {attention_out}")
    except OSError as e:
        raise write_failed(flag, path, e) from None


def compare(argv) -> int:
    """`python fid.py compare RUN_LOG_DIR ...`"""
    p = OneLineParser(prog="fid.py compare", description="FID of several runs, grouped by settings "
                      "(runs differing only in --seed form one group), with statistics and plots.")
    p.add_argument("runs", nargs="+", metavar="RUN_LOG_DIR", help="<log_path>/<version> folders holding fid.csv")
    p.add_argument("--out", default="fid_compare.png", help="the FID plot; the attention plot goes beside it")
    p.add_argument("--ema", action="store_true", help="compare the EMA generators (fid_ema)")
    p.add_argument("--reach", type=float, default=None, metavar="F",
                   help="also report the first step at which each group's mean FID is <= F")
    p.add_argument("--csv", default=None, metavar="OUT",
                   help=f"write one row per group and step: {','.join(CSV_COLUMNS)}")
    args = p.parse_args(argv)
    column = "fid_ema" if args.ema else "fid"
    out = check_output_file(figure_path(args.out, "--out"), "--out")  # before reading any run
    if args.csv:
        check_output_file(args.csv, "--csv")
    folders = list(dict.fromkeys(Path(d).resolve() for d in args.runs))  # a folder given twice is one run
    groups = group_runs([load_run(d, column) for d in folders])
    show(groups, out, column, args.reach)
    if args.csv:
        try:
            write_csv(groups, args.csv)
        except OSError as e:
            raise write_failed("--csv", args.csv, e) from None
        print(f"csv: {args.csv}")
    return 0
