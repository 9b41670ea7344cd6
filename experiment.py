"""The span experiment: run a grid of spans × seeds (`python main.py --span 0,3 --seed 0,1`)
and compare runs with statistics (`python fid.py compare RUN...`).

Runs whose config.json differ only in their seed (and names, paths and bookkeeping, see
NOT_SETTINGS) form a group; per group and step the FID is summarised over its runs: n,
mean, std, a Student-t 95% confidence interval, and Welch's t-test against the span-0
group with otherwise equal settings. One seed per span cannot tell a real difference
from run-to-run noise; this is what can.
"""
import argparse
import csv
import ctypes
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import numpy as np
import torch
from scipy import stats

from utils import (LEGACY_SETTINGS, OneLineParser, UserError, atomic_open, check_output_file, checkpoints, run_started,
                   write_failed)

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from matplotlib.backend_bases import FigureCanvasBase  # noqa: E402

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
        config = {**LEGACY_SETTINGS, **config}  # runs from before a setting existed group with their equals
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
    half = float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n)
    return Summary(n, mean, std, (mean - half, mean + half))


def welch_p(a, b) -> float:
    """Two-sided p-value of Welch's t-test (unequal variances); nan with fewer than 2 per side."""
    if len(a) < 2 or len(b) < 2:
        return math.nan
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
            parts.append(f"span {s['g_span']}")
        elif "g_span" in s:
            parts.append(f"span G{s['g_span']}/D{s.get('d_span')}")
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
                w.writerow([g.label, g.settings.get("g_span", ""), g.settings.get("d_span", ""), step, m.n,
                            f"{m.mean:.6g}", opt(m.std), opt(m.ci95[0]), opt(m.ci95[1])])


def plot_groups(groups, path, column="fid"):
    """Each group's mean FID against step, with a ±std band where it has several runs."""
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for g in groups:
        t = g.table()
        steps = list(t)
        mean = np.array([t[s].mean for s in steps])
        line, = ax.plot(steps, mean, "-o", ms=3, label=f"{g.label} (n={len(g.runs)})")
        std = np.array([t[s].std for s in steps])
        if np.isfinite(std).any():
            ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2, lw=0)
    ax.set_xlabel("generator step")
    ax.set_ylabel(f"{column} (lower is better; band: ±1 std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save_figure(fig, path, dpi=100)


def plot_attention(groups, path):
    """Mean attention distance against step, a panel per attention layer, a line per group;
    dotted: what uniform weights over the keys the span leaves would give."""
    layers = sorted({(r["network"], r["layer"]) for g in groups for run in g.runs for r in run.attention})
    if not layers:
        return False
    fig, axes = plt.subplots(1, len(layers), figsize=(3.6 * len(layers), 3.4), squeeze=False)
    for ax, (net, layer) in zip(axes[0], layers):
        for g in groups:
            by_step, uniform, size = {}, None, ""
            for run in g.runs:
                for r in run.attention:
                    if (r["network"], r["layer"]) == (net, layer):
                        by_step.setdefault(int(r["step"]), []).append(float(r["distance"]))
                        uniform, size = float(r["uniform"]), r["map"]
            if not by_step:
                continue
            steps = sorted(by_step)
            line, = ax.plot(steps, [np.mean(by_step[s]) for s in steps], "-o", ms=3, label=g.label)
            ax.axhline(uniform, color=line.get_color(), ls=":", lw=1)
        ax.set_title(f"{net} {layer} ({size})", fontsize=9)
        ax.set_xlabel("generator step")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("mean attention distance (pixels of the map)")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("where attention looks (dotted: uniform over the keys left by the span)", fontsize=10)
    fig.tight_layout()
    _save_figure(fig, path, dpi=90)
    return True


def _save_figure(fig, path, dpi):
    """Write through a temp file renamed over `path` (a full disk never costs the earlier
    picture), in the format its suffix names (see figure_path)."""
    try:
        with atomic_open(path) as f:
            fig.savefig(f, dpi=dpi, format=Path(path).suffix[1:].lower())
    finally:
        plt.close(fig)


def figure_path(out, flag) -> Path:
    """The picture file `out` names: a suffix matplotlib writes (none: .png is added, as
    matplotlib does); UserError for a folder or an unknown suffix, before any work."""
    out = Path(out)
    if out.is_dir():
        raise UserError(f"{flag} {out} is a folder; give a file name, e.g. {out / 'fid_compare.png'}")
    if not out.suffix:
        return out.with_name(out.name + ".png")
    kinds = FigureCanvasBase.get_supported_filetypes()
    if out.suffix[1:].lower() not in kinds:
        raise UserError(f"{flag} {out}: cannot draw a {out.suffix} file; end the name in one of "
                        f"{', '.join('.' + k for k in sorted(kinds))}")
    return out


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
    # parameter imports fid, which imports this module: taken here, at call time, not at import
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


# ---------------------------------------------------------------------------- the sweep
SWEEP_FLAGS = ("--span", "--seed", "--version", "--jobs")  # what each cell sets for itself


def cell_argv(argv, span, seed, version, resume):
    """The sweep's command line for one cell: its own span, seed and name, the rest as given."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in SWEEP_FLAGS:
            skip = True
        elif not a.startswith(tuple(f + "=" for f in SWEEP_FLAGS)):
            out.append(a)
    out += ["--span", str(span), "--version", version] + (["--seed", str(seed)] if seed is not None else [])
    return out + (["--resume"] if resume else [])


def cell_state(cfg, version):
    """'done' (a checkpoint at --total_step or later), 'started' (checkpoints or logs) or 'new'."""
    found = checkpoints(Path(cfg.model_save_path) / version)
    if found and max(found) >= cfg.total_step:
        return "done"
    return "started" if run_started(argparse.Namespace(**{**vars(cfg), "version": version})) else "new"


class _Cell:
    def __init__(self, span, seed, version):
        self.span, self.seed, self.version = span, seed, version
        self.proc, self.slot, self.result, self.reader = None, None, None, None


# Exit codes of a cell that stopped because it was told to, not because something broke: 0
# (a signal while training: it saved a checkpoint first), 130 or death by SIGINT/SIGTERM (a
# signal while starting up, before there was anything to save).
STOPPED_CODES = (0, 130, -signal.SIGINT, -signal.SIGTERM)


def cell_result(done, returncode) -> str:
    """What became of a cell whose process ended: "ok" (a checkpoint at --total_step),
    "interrupted" (stopped by a signal, the sweep's or its own, before that: the same
    command continues it) or "failed (...)"."""
    if returncode < 0:
        how = f"killed by {signal.Signals(-returncode).name}" if -returncode in signal.valid_signals() \
            else f"killed by signal {-returncode}"
    else:
        how = f"exit {returncode}"
    if done:  # stopped by a signal after its last checkpoint is as good as finished; a crash is not
        return "ok" if returncode in STOPPED_CODES else f"failed ({how}, after its last checkpoint)"
    return "interrupted" if returncode in STOPPED_CODES else f"failed ({how})"


def sweep_summary(results):
    """(the sweep's closing line, its exit code) from [(version, result)], result as
    run_sweep sets it: "done before", "ok", "interrupted", "failed (...)" or None (never
    started). Counts and names come from the one list, so they always agree; exit code 1
    if a cell failed."""
    kinds = {"finished": [], "interrupted": [], "failed": [], "not started": []}
    for version, result in results:
        kind = "finished" if result in ("done before", "ok") else "not started" if result is None else \
            "interrupted" if result == "interrupted" else "failed"
        kinds[kind].append(version)
    parts = [f"{len(kinds['finished'])}/{len(results)} cells finished"]
    for kind in ("interrupted", "failed", "not started"):
        if kinds[kind]:
            parts.append(f"{kind}: {len(kinds[kind])} ({', '.join(kinds[kind])})" +
                         (", their output above says why" if kind == "failed" else ""))
    if len(kinds["finished"]) < len(results):
        parts.append("run the same command again to continue the rest")
    return "sweep: " + "; ".join(parts), 1 if kinds["failed"] else 0


def run_sweep(cfg, argv, main_py) -> int:
    """Run the cells of cfg.sweep (spans × seeds, otherwise the same flags), cfg.jobs at a
    time, each as its own `python main.py` process: finished cells are skipped, started ones
    continue (--resume). Every cell is an ordinary run folder, and every cell measures FID
    against the same cached reference statistics (<log_path>/fid_stats). Ctrl-C / SIGTERM
    stop every running cell at a checkpoint (forwarded, then waited for); the same command
    continues the sweep. If this process dies without that chance (SIGKILL, OOM killer), its
    cells get SIGTERM from the kernel (Linux, see _die_with) and stop the same way, so none
    trains on unwatched holding its run's lock. At the end it prints the comparison of
    `fid.py compare`. Returns the exit code."""
    cells = [_Cell(*c) for c in cfg.sweep]
    todo = []
    for c in cells:
        state = cell_state(cfg, c.version)
        if state == "done":
            c.result = "done before"
        else:
            todo.append((c, state == "started"))
    print(f"sweep: {len(cells)} cells (span {sorted({c.span for c in cells})} × seed "
          f"{sorted({str(c.seed) for c in cells})}), {len(cells) - len(todo)} already finished, "
          f"{len(todo)} to run, {cfg.jobs} at a time", flush=True)
    gpus = _visible_gpus() if cfg.device == "cuda" else []
    stop = {"signal": None}
    running = []

    def on_signal(signum, frame):
        stop["signal"] = signum
        for c in running:  # each cell saves a checkpoint and exits
            if c.proc is not None:
                c.proc.send_signal(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while todo or running:
            while todo and len(running) < cfg.jobs and stop["signal"] is None:
                cell, resume = todo.pop(0)
                cell.slot = min(set(range(cfg.jobs)) - {c.slot for c in running})
                running.append(cell)  # before it starts: a signal from now on reaches it (on_signal)
                _launch(cell, cell_argv(argv, cell.span, cell.seed, cell.version, resume), main_py, cfg, gpus,
                        prefix=cfg.jobs > 1)
                if stop["signal"] is not None:  # the signal came while it was starting
                    cell.proc.send_signal(stop["signal"])
                print(f"sweep: {'continuing' if resume else 'starting'} {cell.version}", flush=True)
            time.sleep(0.2)
            for c in [c for c in running if c.proc.poll() is not None]:
                running.remove(c)
                if c.reader is not None:  # its last lines first
                    c.reader.join(timeout=10)
                c.result = cell_result(cell_state(cfg, c.version) == "done", c.proc.returncode)
                print(f"sweep: {c.version} {c.result}", flush=True)
            if stop["signal"] is not None and not running:
                break
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    line, code = sweep_summary([(c.version, c.result) for c in cells])
    print(line, flush=True)
    dirs = [Path(cfg.log_path) / c.version for c in cells]
    have_fid = [d for d in dirs if (d / "fid.csv").is_file()]
    if have_fid:
        show(group_runs([load_run(d) for d in have_fid]), Path(cfg.log_path) / f"{cfg.sweep_name}_fid_compare.png",
             flag="--log_path")
    else:
        print("sweep: no FID logged (on a CPU FID is off unless --fid_step N is given)")
    print("compare again with: python fid.py compare " + " ".join(str(d) for d in dirs), flush=True)
    return code


def _visible_gpus():
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [g for g in listed.split(",") if g.strip()] if listed else [str(i) for i in range(torch.cuda.device_count())]
    return ids if len(ids) > 1 else []


def _launch(cell, args, main_py, cfg, gpus, prefix):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if gpus:  # cells spread over the GPUs, one process per GPU slot
        env["CUDA_VISIBLE_DEVICES"] = gpus[cell.slot % len(gpus)]
    elif cfg.device == "cpu" and cfg.jobs > 1 and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // cfg.jobs))  # share the cores
    if not prefix:  # one cell at a time: it writes to this process's own stdout and stderr
        cell.proc = subprocess.Popen([sys.executable, str(main_py), *args], env=env, preexec_fn=_die_with(os.getpid()))
        return
    # Several cells at once: their lines, each marked with its cell. They go through an
    # unlinked temp file, not a pipe: if this process dies, a cell writing to a pipe nobody
    # reads would fail on its next print (BrokenPipeError) before it saved its checkpoint; a
    # file takes its lines until it stops, and the space goes with the cell.
    fd, name = tempfile.mkstemp(prefix=f"sagan_sweep_{cell.version}_")
    try:
        read_fd = os.open(name, os.O_RDONLY)
    finally:
        os.unlink(name)
    try:
        cell.proc = subprocess.Popen([sys.executable, str(main_py), *args], env=env, stdout=fd,
                                     stderr=subprocess.STDOUT, preexec_fn=_die_with(os.getpid()))
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(fd)  # the cell has its copy
    cell.reader = threading.Thread(target=_forward, args=(read_fd, cell.proc, f"[{cell.version}] "), daemon=True)
    cell.reader.start()


def _forward(fd, proc, prefix):
    """Print the lines a cell writes to the file behind `fd`, each behind `prefix`, until
    the cell has ended and all it wrote is printed; closes fd."""
    pending = b""
    try:
        while True:
            ended = proc.poll() is not None  # asked before reading: what it wrote before ending is read below
            chunk = os.read(fd, 1 << 16)
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                print(prefix + line.decode(errors="replace").rstrip("\r"), flush=True)
            if not chunk and ended:
                if pending:
                    print(prefix + pending.decode(errors="replace"), flush=True)
                return
            if not chunk:
                time.sleep(0.1)
    finally:
        os.close(fd)


_prctl = None


def _die_with(parent_pid):
    """preexec_fn for a cell: on Linux, ask the kernel to send it SIGTERM when this process
    dies, however it dies (a sweep killed with SIGKILL cannot forward anything itself), so
    the cell saves a checkpoint, exits and frees its run lock instead of training on
    unwatched. The kernel ties this to the thread that started the cell, which is the main
    thread (run_sweep). Elsewhere: None (no such request exists)."""
    global _prctl
    if not sys.platform.startswith("linux"):
        return None
    if _prctl is None:  # looked up here, not in the forked child, where as little as possible should run
        try:
            _prctl = ctypes.CDLL(None, use_errno=True).prctl
        except (OSError, AttributeError):
            return None
    prctl, sigterm = _prctl, int(signal.SIGTERM)

    def preexec():
        prctl(1, sigterm)  # PR_SET_PDEATHSIG = 1
        if os.getppid() != parent_pid:  # the sweep died before the request was made: stop now
            os._exit(1)
    return preexec
