"""The compare report: runs whose config.json differ only in their seed (and names, paths
and bookkeeping, see runs.NOT_SETTINGS) form a group. Every run started counts: a group says how
many runs it started, which failed (NaN/inf, a crash) or stopped early and at which step, and
per step the statistics over the runs that reached it (stats.py). Against the span-0 group
with otherwise equal settings: a paired t-test where both arms hold the same seeds, else
Welch's, Holm-adjusted over the comparisons at the same step, and a bootstrap interval of
the difference. `python fid.py compare RUN...`."""
import csv
import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

from choices import NO_ATTENTION, span_text
from files import atomic_open, check_output_file, csv_header
from metrics import METRICS, headline_column, higher_is_better
from plots import figure_path, plot_attention, plot_groups
from report_html import write_page
from runs import load_run, settings_by_content
from stats import compare_arms, holm_within, reach_summary, summarize
from utils import OneLineParser, UserError, finite_float, json_line, write_failed


CSV_COLUMNS = ["group", "g_span", "d_span", "step", "n_started", "n", "mean", "std", "ci95_low", "ci95_high", "note",
               "n_failed", "failed_at", "n_stopped_early", "stopped_at", "baseline", "test", "n_baseline", "p",
               "p_holm", "holm_m", "diff", "diff_boot95_low", "diff_boot95_high", "reach_target", "reach_median",
               "reach_min", "reach_max", "reach_never", "reach_per_run"]
NO_INTERVAL = "n = 1: no interval"


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
    for run, settings in zip(runs, settings_by_content(runs)):
        hit = next((g for g in groups if run.config and g.settings == settings), None)
        if hit is None:
            groups.append(Group("", settings, [run]))
        else:
            hit.runs.append(run)
    # what labels a group: the settings that vary among groups with a config (a folder with
    # fid.csv only has no settings, and would make every setting of the others "vary")
    known = [g for g in groups if g.runs[0].config]
    keys = sorted({k for g in known for k in g.settings})
    varying = [k for k in keys if len({json.dumps(g.settings.get(k), sort_keys=True) for g in known}) > 1]
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


def statistics_rows(groups, reach=None, tests=None, higher=False) -> list:
    """Every number of the report: a dict (CSV_COLUMNS) per group and step (step None for a group with no
    value: its failures are there too). Undefined or not asked for: None; a median reach never: "never"."""
    tests = comparisons(groups) if tests is None else tests
    opt = lambda v: None if v is None or math.isnan(v) else v
    ends = lambda runs: ";".join(f"{r.name}:{r.outcome.what}@{r.outcome.step}" for r in runs) or None
    rows = []
    for i, g in enumerate(groups):
        base = baseline_of(g, groups)
        reach_cols = [None] * 6
        if reach is not None:
            per_run = g.reach(reach, higher)
            r = reach_summary(per_run)
            reach_cols = [reach, "never" if math.isinf(r.median) else opt(r.median), opt(r.low), opt(r.high), r.never,
                          ";".join(f"{run.name}:{'failed' if run.outcome.failed else 'never' if s is None else s}"
                                   for run, s in zip(g.runs, per_run))]
        runs = [len(g.failed()), ends(g.failed()), len(g.stopped_early()), ends(g.stopped_early())]
        # numbers as numbers (the API, --json), but "none" for a network without attention
        spans = [None if k not in g.settings else "none" if g.settings[k] == NO_ATTENTION else g.settings[k]
                 for k in ("g_span", "d_span")]
        for step, m in g.table().items() or [(None, None)]:
            c = tests.get((i, step))
            stat = [m.n, m.mean, opt(m.std), opt(m.ci95[0]), opt(m.ci95[1]), NO_INTERVAL if m.n == 1 else None] \
                if m else [0] + [None] * 5
            test = [base.label if base else None, c.kind, c.n_base, opt(c.p), opt(c.p_holm), c.m or None,
                    opt(c.diff), opt(c.boot[0]), opt(c.boot[1])] if c else \
                [base.label, "none: n < 2 in an arm"] + [None] * 7 if base else [None] * 9
            rows.append(dict(zip(CSV_COLUMNS, [g.label, *spans, step,
                                               len(g.runs), *stat, *runs, *test, *reach_cols])))
    return rows


def write_csv(groups, path, reach=None, tests=None, higher=False):
    """statistics_rows as CSV: numbers to 6 significant digits, None empty."""
    cell = lambda v: "" if v is None else f"{v:.6g}" if isinstance(v, float) else v
    with atomic_open(path, "w", newline="") as f:  # a failed write leaves the earlier file whole
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        w.writerows([cell(row[c]) for c in CSV_COLUMNS] for row in statistics_rows(groups, reach, tests, higher))


def show(groups, out, column="fid", reach=None, flag="--out", csv_out=None, html_out=None, html_flag="--html"):
    """Print the report and write the FID plot to `out`, the attention plot beside it, the
    table to `csv_out` and the HTML page to `html_out` if given; an output that cannot be
    written is a UserError naming its flag (`flag` for the plots, `html_flag` for the page)."""
    tests = comparisons(groups)
    rows, notes = report_table(groups, column, reach, tests)
    print(format_report(rows, notes))
    for what, path in write_outputs(groups, out, column, reach, tests, flag, csv_out, html_out, html_flag,
                                    table=(rows, notes)).items():
        print(f"{what}: {path}")


def attention_path(out) -> Path:
    """The attention-distance plot written beside the FID plot `out`."""
    return Path(out).with_name(Path(out).stem + "_attention.png")


def write_outputs(groups, out, column, reach, tests, flag="--out", csv_out=None, html_out=None,
                  html_flag="--html", table=None) -> dict:
    """show's files, without a word: {what: path} of those written. table: report_table's
    (rows, notes) when already built."""
    attention_out = attention_path(out)
    path, written = out, {}  # the file being written, for the message
    try:
        plot_groups(groups, out, column, higher_is_better(column))
        written["plot"] = out
        path = attention_out
        if plot_attention(groups, attention_out):
            written["attention distance"] = attention_out
        if csv_out is not None:
            flag, path = "--csv", csv_out
            write_csv(groups, csv_out, reach, tests, higher_is_better(column))
            written["csv"] = csv_out
        if html_out is not None:
            flag, path = html_flag, html_out
            with tempfile.TemporaryDirectory(prefix="sagan_page_") as tmp:  # the plots as PNG, whatever --out is
                fid_png, attention_png = Path(tmp) / "fid.png", Path(tmp) / "attention.png"
                plot_groups(groups, fid_png, column, higher_is_better(column))
                write_page(html_out, groups, *(table or report_table(groups, column, reach, tests)), fid_png,
                           attention_png if plot_attention(groups, attention_png) else None, column)
            written["report page"] = html_out
    except OSError as e:
        raise write_failed(flag, path, e) from None
    return written


def check_logged(groups, column="fid", ema=False) -> list:
    """`groups`, unless their configs say no run logged `column` (of the EMA generator with
    ema=True): then UserError naming what they did log, not a table of dashes."""
    shown = column + ("_ema" if ema else "")
    stated = [(r.config or {}).get("metrics") for g in groups for r in g.runs]  # as every config.json holds them
    metric = next(name for name, m in METRICS.items() if column in m.columns)
    if all(stated) and not any(metric in m for m in stated):
        logged = [name for name in METRICS if any(name in m for m in stated)]
        raise UserError(f"no run logged {shown}: they trained with --metrics {','.join(logged)}; pass --column "
                        f"{headline_column(logged)} (or another column of theirs)")
    if ema and not any((r.config or {}).get("ema_decay") for g in groups for r in g.runs):
        raise UserError(f"no run logged {shown}: they trained without an EMA generator (--ema_decay); drop --ema "
                        f"(in the API: ema=False)")
    return groups


def load_groups(folders, column="fid") -> list:
    """The runs of `folders` (<log_path>/<version>; one given twice is one run), grouped."""
    return group_runs([load_run(d, column) for d in dict.fromkeys(Path(d).resolve() for d in folders)])


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
    p.add_argument("--reach", type=finite_float, default=None, metavar="F",
                   help="also report per run the first step with a value <= F (>= F where higher is better: is, "
                        "precision, recall, density, coverage), and per group its median, range and how many runs "
                        "never got there")
    p.add_argument("--csv", default=None, metavar="OUT",
                   help="write one row per group and step with every number of the report: runs started, "
                        "failed and stopped early, mean/std/CI, test, p, Holm p, bootstrap interval, reach")
    p.add_argument("--html", default=None, metavar="OUT",
                   help="write the report as one HTML page with its images inside: the table, the plots, and "
                        "each run's newest sample grid and attention picture, a row per group, a column per seed")
    p.add_argument("--json", action="store_true",
                   help="print, instead of the report, one JSON object: the rows of --csv (as numbers) and the "
                        "files written")
    args = p.parse_args(argv)
    column = args.column + ("_ema" if args.ema else "")
    out = check_output_file(figure_path(args.out, "--out"), "--out")  # before reading any run
    outputs = {"--out": out, "the attention plot beside --out": attention_path(out)}
    for name in ("csv", "html"):
        if getattr(args, name) is not None:
            outputs[f"--{name}"] = check_output_file(getattr(args, name), f"--{name}")
    named = {}
    for what, path in outputs.items():  # one output written over another would be lost
        first = named.setdefault(path.resolve(), what)
        if first != what:
            raise UserError(f"{first} and {what} both name {path}; give each its own file")
    folders = list(dict.fromkeys(Path(d).resolve() for d in args.runs))  # a folder given twice is one run
    headers = [h for h in (csv_header(d / "fid.csv") for d in folders) if h is not None]
    metric = next(name for name, m in METRICS.items() if args.column in m.columns)
    if headers and not any(column in h for h in headers):  # a metric the runs left off: no empty table
        raise UserError(f"no run logged {column}; runs trained with " +
                        ("--fid_step N log it" if metric == "fid" else f"--metrics fid,{metric} log it"))
    groups = check_logged(load_groups(folders, column), args.column, args.ema)
    if not args.json:
        show(groups, out, column, args.reach, csv_out=args.csv, html_out=args.html)
        return 0
    tests = comparisons(groups)
    written = write_outputs(groups, out, column, args.reach, tests, csv_out=args.csv, html_out=args.html)
    print(json_line({"column": column, "rows": statistics_rows(groups, args.reach, tests, higher_is_better(column)),
                     "files": {what: str(path) for what, path in written.items()}}))
    return 0
