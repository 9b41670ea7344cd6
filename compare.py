"""The compare report: runs whose config.json differ only in their seed (and names, paths
and bookkeeping, see NOT_SETTINGS) form a group. Every run started counts: a group says how
many runs it started, which failed (NaN/inf, a crash) or stopped early and at which step, and
per step the statistics over the runs that reached it (stats.py). Against the span-0 group
with otherwise equal settings: a paired t-test where both arms hold the same seeds, else
Welch's, Holm-adjusted over the comparisons at the same step, and a bootstrap interval of
the difference. `python fid.py compare RUN...`."""
import csv
import json
import math
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from checkpoint import migrate_config
from choices import span_text
from files import atomic_open, check_output_file, csv_header, csv_rows_until
from metrics import METRICS, higher_is_better
from plots import figure_path, plot_attention, plot_groups
from report_html import write_page
from runlog import read_status
from stats import compare_arms, holm_within, reach_summary, summarize
from utils import OneLineParser, UserError, write_failed


# config.json keys that do not change what a run computes, so runs differing in them belong
# to one group: the random seed (what a group varies), names and paths, bookkeeping, speed-only
# settings that give identical images, and how long it ran.
NOT_SETTINGS = {"seed", "version", "log_path", "model_save_path", "sample_path", "attn_path", "image_path",
                "package_version", "git_commit", "torch", "device", "world_size", "num_workers", "cache",
                "resume", "pretrained_model", "start_checkpoint", "train", "n_samples", "parallel",
                "use_tensorboard", "log_step", "sample_step", "model_save_step", "total_step", "fid_batch_size",
                "jobs", "span", "sweep", "given", "trust_checkpoint"}
CSV_COLUMNS = ["group", "g_span", "d_span", "step", "n_started", "n", "mean", "std", "ci95_low", "ci95_high", "note",
               "n_failed", "failed_at", "n_stopped_early", "stopped_at", "baseline", "test", "n_baseline", "p",
               "p_holm", "holm_m", "diff", "diff_boot95_low", "diff_boot95_high", "reach_target", "reach_median",
               "reach_min", "reach_max", "reach_never", "reach_per_run"]
NO_INTERVAL = "n = 1: no interval"


# ---------------------------------------------------------------------------- reading runs
@dataclass
class Outcome:
    """How a run ended, from its status.json (runlog.RunStatus) and its logs."""
    kind: str  # "finished", "stopped early", "diverged", "failed", or "unknown" (no config.json, no status)
    step: int  # the step it failed or stopped at; its last logged step otherwise
    what: str = ""  # in a word or three: "diverged", "interrupted", "running or killed", ...
    reason: str = ""  # the error's line, where one was recorded

    @property
    def failed(self) -> bool:
        return self.kind in ("diverged", "failed")


@dataclass
class Run:
    folder: Path
    config: dict
    fid: dict  # {step: value} of the compared column, finite values only
    attention: list = field(default_factory=list)  # rows of attention.csv
    outcome: Outcome = field(default_factory=lambda: Outcome("unknown", 0))

    @property
    def settings(self) -> dict:
        return {k: v for k, v in self.config.items() if k not in NOT_SETTINGS}

    @property
    def seed(self):
        return self.config.get("seed")

    @property
    def name(self) -> str:
        return f"seed{self.seed}" if self.seed is not None else self.folder.name


def _read_csv(path: Path) -> list:
    """The rows of a CSV this package wrote; UserError (one line) for anything else."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    except (UnicodeDecodeError, csv.Error, OSError) as e:
        raise UserError(f"cannot read {path} ({type(e).__name__}); is it a file this package wrote?") from None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise UserError(f"cannot read {path} ({type(e).__name__})") from None


def _number(row, key, path, kind=float):
    try:
        value = kind(row[key])
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{path}: malformed row {dict(row)!r} (no number in column {key!r}); is it a file this "
                        f"package wrote?") from None
    return value


def load_run(folder, column="fid") -> Run:
    """A run folder: one that holds config.json counts as started, even with no fid.csv (it
    stopped or failed before its first FID)."""
    d = Path(folder)
    if not (d / "fid.csv").is_file() and not (d / "config.json").is_file():
        raise UserError(f"{d} has no fid.csv and no config.json; pass <log_path>/<version> of a run trained with "
                        f"--fid_step N")
    config = {}
    if (d / "config.json").is_file():
        config = migrate_config(_read_json(d / "config.json"))  # runs from before a setting existed group with their equals
    path = d / "fid.csv"
    rows = _read_csv(path) if path.is_file() else []
    every = {_number(r, "step", path, int): _number(r, column, path) for r in rows if r.get(column) not in (None, "")}
    attention = _read_csv(d / "attention.csv") if (d / "attention.csv").is_file() else []
    for r in attention:  # checked here, not half-way through a plot
        _number(r, "step", d / "attention.csv", int), _number(r, "distance", d / "attention.csv")
        _number(r, "uniform", d / "attention.csv")
        for optional in ("share", "fixed"):  # files written before these columns have none
            if r.get(optional) not in (None, ""):
                _number(r, optional, d / "attention.csv")
        if any(r.get(k) in (None, "") for k in ("network", "layer", "map")):
            raise UserError(f"{d / 'attention.csv'}: malformed row {dict(r)!r}; is it a file this package wrote?")
    fid = {s: v for s, v in every.items() if math.isfinite(v)}
    return Run(d, config, fid, attention, _outcome(d, config, every, column))


def _outcome(d, config, every, column) -> Outcome:
    status = read_status(d)
    logged = [int(r["step"]) for r in csv_rows_until(d / "metrics.csv", sys.maxsize)]
    last = max([*every, *logged, status.get("step", 0)], default=0)
    if status.get("status") in ("diverged", "failed"):
        return Outcome(status["status"], status["step"], status["status"], str(status.get("reason", "")))
    bad = sorted(s for s, v in every.items() if not math.isfinite(v))
    if bad:
        return Outcome("diverged", bad[0], "diverged", f"{column} is {every[bad[0]]} at step {bad[0]}")
    if status.get("status") == "finished":
        return Outcome("finished", status["step"])
    # a resumed run may have raised --total_step: its later config files say so
    totals = [c.get("total_step") for c in [config] + [_read_json(p) for p in d.glob("config_resumed_at_*.json")]]
    totals = [t for t in totals if isinstance(t, int)]
    if not totals and not status:
        return Outcome("unknown", last)
    if last >= max(totals + [status.get("total_step") or 0]):
        return Outcome("finished", last)
    what = {"stopped": "interrupted", "running": "running or killed"}.get(status.get("status"), "ended early")
    return Outcome("stopped early", last, what)


# ---------------------------------------------------------------------------- groups
@dataclass
class Group:
    label: str
    settings: dict
    runs: list

    def at(self, step) -> list:
        """[(run, value)] of the runs with a (finite) value at `step`."""
        return [(r, r.fid[step]) for r in self.runs if step in r.fid]

    def values(self, step) -> list:
        return [v for _, v in self.at(step)]

    def steps(self) -> list:
        return sorted({s for r in self.runs for s in r.fid})

    def table(self) -> dict:
        """{step: Summary} over the runs that reached the step."""
        return {s: summarize(self.values(s)) for s in self.steps()}

    def failed(self) -> list:
        return [r for r in self.runs if r.outcome.failed]

    def stopped_early(self) -> list:
        return [r for r in self.runs if r.outcome.kind == "stopped early"]

    def reach(self, target, higher=False) -> list:
        """Per run, the first step with a value <= target (>= where higher is better, e.g.
        recall); None if it never got there or failed (a run that diverged later produced no
        usable model, whatever it passed)."""
        there = (lambda v: v >= target) if higher else (lambda v: v <= target)
        return [None if r.outcome.failed else next((s for s in sorted(r.fid) if there(r.fid[s])), None)
                for r in self.runs]


def group_runs(runs) -> list:
    """Runs with equal settings, in first-seen order, labelled by the settings that vary
    between groups (e.g. "span 3"); runs without a config.json stay alone. A group holding
    one seed twice (a run copied, or given under two names) is refused: it is one sample."""
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
    for g in groups:
        first = {}
        for r in g.runs:
            if r.seed is not None and first.setdefault(r.seed, r) is not r:
                raise UserError(f"{g.label}: seed {r.seed} twice ({first[r.seed].folder} and {r.folder}); one seed "
                                f"is one sample, not two: pass only one of them")
    return groups


def baseline_of(group, groups):
    """The span-0 group whose other settings equal this group's (None if absent, or if
    this is it)."""
    want = {**group.settings, "g_span": 0, "d_span": 0}
    if not group.runs[0].config or want == group.settings:
        return None
    return next((g for g in groups if g.runs[0].config and g.settings == want), None)


def comparisons(groups) -> dict:
    """{(group index, step): stats.Comparison} against each group's baseline, at every step
    where both have 2 runs or more (paired if they hold the same seeds, else Welch). Holm's
    family: all comparisons with a p-value at the same step."""
    out = {}
    for i, g in enumerate(groups):
        base = baseline_of(g, groups)
        for step in sorted(set(g.steps()) & set(base.steps())) if base else []:
            c = compare_arms(*([(r.seed, v) for r, v in x.at(step)] for x in (g, base)))
            if c is not None:
                out[i, step] = c
    holm_within(out, family=lambda key: key[1])
    return out


# ---------------------------------------------------------------------------- the report
def _ends(runs) -> str:
    return ", ".join(f"{r.name} {r.outcome.what} @{r.outcome.step}" for r in runs)


def _reach_cell(reach) -> str:
    r = reach_summary(reach)
    if r.never == r.runs:
        return f"never ({r.never}/{r.runs})"
    median = "never" if math.isinf(r.median) else f"{r.median:g}"
    return f"{median} [{r.low:g}, {r.high:g}], never {r.never}/{r.runs}"


def report_table(groups, column="fid", reach=None, tests=None):
    """The report as rows [(name, [a cell per group])], the first naming the groups, and
    the lines that explain them: what the terminal prints and the HTML page shows."""
    tests = comparisons(groups) if tests is None else tests
    tables = [g.table() for g in groups]
    steps = sorted({s for t in tables for s in t})

    def cell(m, g):
        if m is None:
            return "-"
        return f"{m.mean:.2f} ({NO_INTERVAL})" if m.n == 1 else f"{m.mean:.2f} ± {m.std:.2f} ({m.n}/{len(g.runs)})"

    rows = [("step", [g.label for g in groups])]
    rows += [(s, [cell(t.get(s), g) for g, t in zip(groups, tables)]) for s in steps]
    rows.append(("runs started", [str(len(g.runs)) for g in groups]))
    rows.append(("failed", [f"{len(g.failed())}" + (f": {_ends(g.failed())}" if g.failed() else "") for g in groups]))
    rows.append(("stopped early", [f"{len(g.stopped_early())}" + (f": {_ends(g.stopped_early())}"
                                                                 if g.stopped_early() else "") for g in groups]))
    higher = higher_is_better(column)
    best = [(max if higher else min)(t.items(), key=lambda kv: kv[1].mean) if t else None for t in tables]
    rows.append((f"best {column}", ["-" if b is None else f"{b[1].mean:.2f} ({b[1].n}/{len(g.runs)})"
                                    for g, b in zip(groups, best)]))
    rows.append(("at step", ["-" if b is None else str(b[0]) for b in best]))
    last = [(max(t), t[max(t)]) if t else None for t in tables]
    rows.append(("95% CI, last step", ["-" if x is None else f"{NO_INTERVAL} @{x[0]}" if x[1].n == 1 else
                                       f"[{x[1].ci95[0]:.2f}, {x[1].ci95[1]:.2f}] @{x[0]}" for x in last]))
    at = [max((s for (j, s) in tests if j == i), default=None) for i in range(len(groups))]
    heads = [tests[i, s] if s is not None else None for i, s in enumerate(at)]
    untested = ["-" if baseline_of(g, groups) is None else "no test: n < 2 in an arm" for g in groups]
    rows.append(("vs span 0", [u if c is None else f"{c.kind}, {c.n} vs {c.n_base} @{s}"
                               for u, c, s in zip(untested, heads, at)]))
    rows.append(("p", ["-" if c is None else "no spread" if math.isnan(c.p) else f"{c.p:.3g}" for c in heads]))
    rows.append(("p Holm", ["-" if c is None or not c.m else f"{c.p_holm:.3g} (m={c.m})" for c in heads]))
    rows.append(("diff of means", ["-" if c is None else f"{c.diff:+.2f}" for c in heads]))
    rows.append(("diff 95% bootstrap", ["-" if c is None else f"[{c.boot[0]:+.2f}, {c.boot[1]:+.2f}]" for c in heads]))
    if reach is not None:
        rows.append((f"reach {column}{'≥' if higher else '≤'}{reach:g}",
                     [_reach_cell(g.reach(reach, higher)) for g in groups]))
    notes = ["per step: mean ± std over the runs that reached it (n of the runs started); 95% CI: Student t.",
              "vs span 0: against the span-0 group with the same other settings, at the last step both have 2 runs",
              "  or more: a paired t-test if both hold the same seeds there, else Welch's; p Holm: Holm-Bonferroni",
              "  over the m comparisons made at that step; diff: mean - span-0 mean, 95% percentile bootstrap."]
    if reach is not None:
        notes += [f"reach: per run the first step with {column} {'≥' if higher else '≤'} {reach:g} (a failed run: "
                  "never); median [range] "
                  "over the runs,", "  a never counting as later than any step."]
    return rows, notes


def report(groups, column="fid", reach=None, tests=None) -> str:
    return format_report(*report_table(groups, column, reach, tests))


def format_report(rows, notes) -> str:
    """report_table's rows as aligned text columns, then its notes."""
    width = max(len(v) for _, vals in rows for v in vals)
    first = max(len(str(name)) for name, _ in rows)
    lines = [f"{name:>{first}}  " + "  ".join(f"{v:>{width}}" for v in vals) for name, vals in rows]
    return "\n".join(lines + notes)


def write_csv(groups, path, reach=None, tests=None, higher=False):
    """One row per group and step (a group none of whose runs logged a value: one row, step
    empty, so its failures are in the table too)."""
    tests = comparisons(groups) if tests is None else tests
    opt = lambda v: "" if v is None or math.isnan(v) else f"{v:.6g}"
    ends = lambda runs: ";".join(f"{r.name}:{r.outcome.what}@{r.outcome.step}" for r in runs)
    with atomic_open(path, "w", newline="") as f:  # a failed write leaves the earlier file whole
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for i, g in enumerate(groups):
            base = baseline_of(g, groups)
            reach_cols = [""] * 6
            if reach is not None:
                per_run = g.reach(reach, higher)
                r = reach_summary(per_run)
                reach_cols = [f"{reach:g}", "never" if math.isinf(r.median) else opt(r.median), opt(r.low),
                              opt(r.high), r.never,
                              ";".join(f"{run.name}:{'failed' if run.outcome.failed else 'never' if s is None else s}"
                                       for run, s in zip(g.runs, per_run))]
            runs = [len(g.failed()), ends(g.failed()), len(g.stopped_early()), ends(g.stopped_early())]
            spans = [span_text(g.settings[k]) if k in g.settings else "" for k in ("g_span", "d_span")]
            for step, m in g.table().items() or [("", None)]:
                c = tests.get((i, step))
                stat = [m.n, f"{m.mean:.6g}", opt(m.std), opt(m.ci95[0]), opt(m.ci95[1]),
                        NO_INTERVAL if m.n == 1 else ""] if m else [0, "", "", "", "", ""]
                test = [base.label if base else "", c.kind, c.n_base, opt(c.p), opt(c.p_holm), c.m or "",
                        opt(c.diff), opt(c.boot[0]), opt(c.boot[1])] if c else \
                    [base.label, "none: n < 2 in an arm"] + [""] * 7 if base else [""] * 9
                w.writerow([g.label, *spans, step, len(g.runs),
                            *stat, *runs, *test, *reach_cols])


def show(groups, out, column="fid", reach=None, flag="--out", csv_out=None, html_out=None, html_flag="--html"):
    """Print the report and write the FID plot to `out`, the attention plot beside it, the
    table to `csv_out` and the HTML page to `html_out` if given; an output that cannot be
    written is a UserError naming its flag (`flag` for the plots, `html_flag` for the page)."""
    tests = comparisons(groups)
    rows, notes = report_table(groups, column, reach, tests)
    print(format_report(rows, notes))
    attention_out = Path(out).with_name(Path(out).stem + "_attention.png")
    path = out  # the file being written, for the message
    try:
        plot_groups(groups, out, column, higher_is_better(column))
        print(f"plot: {out}")
        path = attention_out
        if plot_attention(groups, attention_out):
            print(f"attention distance: {attention_out}")
        if csv_out is not None:
            flag, path = "--csv", csv_out
            write_csv(groups, csv_out, reach, tests, higher_is_better(column))
            print(f"csv: {csv_out}")
        if html_out is not None:
            flag, path = html_flag, html_out
            with tempfile.TemporaryDirectory(prefix="sagan_page_") as tmp:  # the plots as PNG, whatever --out is
                fid_png, attention_png = Path(tmp) / "fid.png", Path(tmp) / "attention.png"
                plot_groups(groups, fid_png, column, higher_is_better(column))
                write_page(html_out, groups, rows, notes, fid_png,
                           attention_png if plot_attention(groups, attention_png) else None, column)
            print(f"report page: {html_out}")
    except OSError as e:
        raise write_failed(flag, path, e) from None


def compare(argv) -> int:
    """`python fid.py compare RUN_LOG_DIR ...`"""
    p = OneLineParser(prog="fid.py compare", description="FID of several runs, grouped by settings "
                      "(runs differing only in --seed form one group), with statistics and plots.")
    p.add_argument("runs", nargs="+", metavar="RUN_LOG_DIR",
                   help="<log_path>/<version> folders of runs (config.json, fid.csv); every run started counts")
    p.add_argument("--out", default="fid_compare.png", help="the FID plot; the attention plot goes beside it")
    p.add_argument("--column", default="fid", choices=[c for m in METRICS.values() for c in m.columns],
                   help="the fid.csv column to compare (a metric of --metrics, e.g. recall)")
    p.add_argument("--ema", action="store_true", help="compare the EMA generators (<column>_ema)")
    p.add_argument("--reach", type=float, default=None, metavar="F",
                   help="also report per run the first step with a value <= F (>= F where higher is better: is, "
                        "precision, recall, density, coverage), and per group its median, range and how many runs "
                        "never got there")
    p.add_argument("--csv", default=None, metavar="OUT",
                   help="write one row per group and step with every number of the report: runs started, "
                        "failed and stopped early, mean/std/CI, test, p, Holm p, bootstrap interval, reach")
    p.add_argument("--html", default=None, metavar="OUT",
                   help="write the report as one HTML page with its images inside: the table, the plots, and "
                        "each run's newest sample grid and attention picture, a row per group, a column per seed")
    args = p.parse_args(argv)
    column = args.column + ("_ema" if args.ema else "")
    out = check_output_file(figure_path(args.out, "--out"), "--out")  # before reading any run
    for name in ("csv", "html"):
        if getattr(args, name):
            check_output_file(getattr(args, name), f"--{name}")
    folders = list(dict.fromkeys(Path(d).resolve() for d in args.runs))  # a folder given twice is one run
    headers = [h for h in (csv_header(d / "fid.csv") for d in folders) if h is not None]
    if headers and not any(column in h for h in headers):  # a metric the runs left off: no empty table
        metric = next(name for name, m in METRICS.items() if args.column in m.columns)
        raise UserError(f"no run logged {column}; runs trained with --metrics fid,{metric} log it")
    groups = group_runs([load_run(d, column) for d in folders])
    show(groups, out, column, args.reach, csv_out=args.csv, html_out=args.html)
    return 0
