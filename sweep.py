"""The span experiment as one command: `python main.py --span none,0,3 --seed 0,1` runs every
(span, seed) cell (G's and D's span, see parameter.sweep_cells) as an ordinary run in its
own process, skips finished cells, resumes started ones, and ends with the compare report."""
import argparse
import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from choices import span_text
from files import record_unseen_end
from folders import checkpoints, run_started
from utils import UserError, warn

SWEEP_FLAGS = ("--span", "--g_span", "--d_span", "--seed", "--version", "--jobs",  # what each cell sets for itself
               "--launcher", "--slurm_partition", "--slurm_time", "--slurm_gpus", "--slurm_cpus",  # the sweep's
               "--slurm_mem", "--slurm_account", "--slurm_qos", "--slurm_sbatch", "--slurm_setup")
SWEEP_SWITCHES = ("--wait",)  # the sweep's too, without a value


def cell_argv(argv, g_span, d_span, seed, version, resume, total_step):
    """The sweep's command line for one cell: its own spans, seed and name, the rest as given;
    resumed, with the --total_step the sweep counts it done at (a resumed run would take its
    checkpoint's, and the sweep would start it again and again)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in SWEEP_SWITCHES:
            continue
        elif a in SWEEP_FLAGS:
            skip = True
        elif not a.startswith(tuple(f + "=" for f in SWEEP_FLAGS)):
            out.append(a)
    spans = ["--span", span_text(g_span)] if g_span == d_span else \
        ["--g_span", span_text(g_span), "--d_span", span_text(d_span)]
    out += [*spans, "--version", version] + (["--seed", str(seed)] if seed is not None else [])
    return out + (["--total_step", str(total_step), "--resume"] if resume else [])


def cell_state(cfg, version):
    """'done' (a checkpoint at --total_step or later), 'started' (checkpoints or logs) or 'new'."""
    found = checkpoints(Path(cfg.model_save_path) / version)
    if found and max(found) >= cfg.total_step:
        return "done"
    return "started" if run_started(argparse.Namespace(**{**vars(cfg), "version": version})) else "new"


def cell_spans(g_span, d_span) -> str:
    """A cell's spans as the sweep prints them: '3', 'none', or 'G3/Dnone' when they differ."""
    return span_text(g_span) if g_span == d_span else f"G{span_text(g_span)}/D{span_text(d_span)}"


def grid(cells) -> str:
    """'6 cells (span [none, 0, 3] × seed ['1', '2'])' of cfg.sweep's [(g_span, d_span, seed, version)]."""
    spans = dict.fromkeys(cell_spans(g, d) for g, d, _, _ in cells)
    return f"{len(cells)} cells (span [{', '.join(spans)}] × seed {sorted({str(seed) for _, _, seed, _ in cells})})"


def cell_settings(cfg, g_span, d_span, seed) -> dict:
    """A cell's settings as its config.json will hold them: the sweep's, with the cell's spans
    and seed (none without --seed: the cell draws its own, whatever it is) and what the
    cell's own start resolves (--diffaug's default), through JSON."""
    from parameter import default_diffaug
    cell = {**vars(cfg), "g_span": g_span, "d_span": d_span, "seed": seed,
            "diffaug": default_diffaug(cfg) if cfg.diffaug is None else cfg.diffaug}
    if seed is None:
        del cell["seed"]
    return json.loads(json.dumps(cell, default=str))


def check_start(cfg, queued=None):
    """What a sweep checks once, before any cell starts (UserError, one line): its data, on
    which every cell would otherwise fail alone (local cells only: a Slurm job may see or
    stage data the submitting host does not); and that its cells ran, or are queued
    (`queued`: {version: (job id, the settings the job runs with)}), with this command's
    settings. Under the same names, other settings (another --g_lr, say) would report the
    finished cells as the new experiment and continue the started ones under their
    checkpoints' settings: two experiments mixed in one report. Every setting counts that
    `fid.py compare` groups by (runs.NOT_SETTINGS are not), and the number of training images."""
    from run import DEVICE_RESOLVED  # here: a Slurm job imports this module, and starts its cell without torch
    from runs import NOT_SETTINGS, saved_configs
    n_images = None
    if cfg.launcher == "local":
        from data_loader import training_set
        n_images = len(training_set(cfg))
    # a cell's seed counts too: a folder of the cell's name trained with another seed would join
    # the report as this seed, and pairing by seed would pair other runs
    skip = (NOT_SETTINGS | {f.lstrip("-") for f in SWEEP_FLAGS + SWEEP_SWITCHES}) - {"g_span", "d_span", "seed"}
    if cfg.launcher != "local":  # resolved by each job's node (unless given), not by this host
        skip |= DEVICE_RESOLVED - set(cfg.given)
    for g_span, d_span, seed, version in cfg.sweep:
        cell = cell_settings(cfg, g_span, d_span, seed)
        if n_images is not None:
            cell["dataset_size"] = n_images
        ran = [(f"ran ({path.name})", saved) for path, saved in saved_configs(Path(cfg.log_path) / version)]
        if version in (queued or {}):
            ran.append((f"is queued (job {queued[version][0]})", queued[version][1]))
        for how, saved in ran:
            differ = [k for k in cell if k not in skip and k in saved and cell[k] != saved[k]
                      and not _same_weights(k, cell, saved)]
            if differ:
                raise UserError(f"sweep '{cfg.sweep_name}': its cell {version} {how} with {_as_flags(saved, differ)}, "
                                f"where this command gives {_as_flags(cell, differ)}; give the cell's settings to "
                                f"continue this sweep, or another --version to start a new sweep beside it")


def _same_weights(key, cell, saved) -> bool:
    """Whether a --fid_weights path other than the one a cell ran with holds the same file (the
    id its config.json recorded): another machine's path to the same weights is no other setting."""
    if key != "fid_weights" or not saved.get("fid_weights_id") or not cell.get("fid_weights") \
            or not Path(cell["fid_weights"]).is_file():
        return False
    from inception import weights_id  # here: torch, and a hash of the file, only when the paths differ
    return weights_id(cell["fid_weights"]) == saved["fid_weights_id"]


def _as_flags(config, keys) -> str:
    """Settings as the flags that give them: '--g_lr 0.0001, --diffaug none, no --ema_decay'."""
    from parameter import flag_words
    shown = []
    for k in keys:
        if k == "dataset_size":
            shown.append(f"{config[k]} training images")
            continue
        try:
            shown.append(" ".join(flag_words({k: config[k]})) or f"no --{k}")
        except KeyError:  # not a flag
            shown.append(f"{k}={config[k]}")
    return ", ".join(shown)


class _Cell:
    def __init__(self, g_span, d_span, seed, version):
        self.g_span, self.d_span, self.seed, self.version = g_span, d_span, seed, version
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


def cell_end(cfg, version, returncode) -> str:
    """cell_result of a cell whose process ended; a failed cell short of --total_step gets
    its end recorded (record_failure). A cell done is as good as finished, however it ended."""
    done = cell_state(cfg, version) == "done"
    result = cell_result(done, returncode)
    if not done:
        record_failure(cfg, version, result)
    return result


def record_failure(cfg, version, result):
    """A failed cell (not done) whose process died without recording it (status.json still
    "running": killed by a signal, out of memory) gets the sweep's reason in its status.json,
    so that the compare report calls it failed, as the sweep's summary does."""
    if not result.startswith("failed ("):
        return
    try:
        record_unseen_end(Path(cfg.log_path) / version, f"{result[len('failed ('):-1]}; the sweep saw its process end")
    except OSError as e:  # a note lost, never the sweep
        warn(f"could not record how {version} ended in its status.json ({e.strerror or e})")


def sweep_summary(results, why="their output above says why"):
    """(the sweep's closing line, its exit code) from [(version, result)], result as
    run_sweep sets it: "done before", "ok", "interrupted", "failed (...)" or None (never
    started). Counts and names come from the one list, so they always agree; `why` follows
    the failed ones. Exit code 1 if a cell failed."""
    kinds = {"finished": [], "interrupted": [], "failed": [], "not started": []}
    for version, result in results:
        kind = "finished" if result in ("done before", "ok") else "not started" if result is None else \
            "interrupted" if result == "interrupted" else "failed"
        kinds[kind].append(version)
    parts = [f"{len(kinds['finished'])}/{len(results)} cells finished"]
    for kind in ("interrupted", "failed", "not started"):
        if kinds[kind]:
            parts.append(f"{kind}: {len(kinds[kind])} ({', '.join(kinds[kind])})" +
                         (f", {why}" if kind == "failed" else ""))
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
    `fid.py compare` and writes its plots and HTML page beside the cells' log folders.
    Returns the exit code."""
    from run import lock_run  # here: a Slurm job imports this module, and starts its cell without torch
    # one process runs a sweep: a second copy would find the first's cells locked and report them failed
    lock_run(Path(cfg.log_path).resolve() / f".{cfg.sweep_name}.sweep.lock", f"sweep '{cfg.sweep_name}'")
    check_start(cfg)
    cells = [_Cell(*c) for c in cfg.sweep]
    todo = []
    for c in cells:
        state = cell_state(cfg, c.version)
        if state == "done":
            c.result = "done before"
        else:
            todo.append((c, state == "started"))
    print(f"sweep: {grid(cfg.sweep)}, {len(cells) - len(todo)} already finished, "
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
                args = cell_argv(argv, cell.g_span, cell.d_span, cell.seed, cell.version, resume, cfg.total_step)
                _launch(cell, args, main_py, cfg, gpus, prefix=cfg.jobs > 1)
                if stop["signal"] is not None:  # the signal came while it was starting
                    cell.proc.send_signal(stop["signal"])
                print(f"sweep: {'continuing' if resume else 'starting'} {cell.version}", flush=True)
            time.sleep(0.2)
            for c in [c for c in running if c.proc.poll() is not None]:
                running.remove(c)
                if c.reader is not None:  # its last lines first
                    c.reader.join(timeout=10)
                c.result = cell_end(cfg, c.version, c.proc.returncode)
                print(f"sweep: {c.version} {c.result}", flush=True)
            if stop["signal"] is not None and not running:
                break
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return report(cfg, [(c.version, c.result) for c in cells])


def report(cfg, results, why="their output above says why") -> int:
    """The end of a sweep: its summary line (sweep_summary), the comparison of its cells
    that logged FID (as `fid.py compare` prints it) and the command that compares them
    again. Returns the sweep's exit code."""
    from compare import group_runs, load_run, show  # here: a Slurm job imports this module, and needs no report
    from metrics import headline_column
    line, code = sweep_summary(results, why)
    print(line, flush=True)
    dirs = [Path(cfg.log_path) / version for version, _ in results]
    started = [d for d in dirs if (d / "config.json").is_file() or (d / "fid.csv").is_file()]
    gone = [v for v, result in results if result in ("done before", "ok") and not (Path(cfg.log_path) / v).is_dir()]
    if gone:  # finished by its checkpoints, yet the report would leave it out without a word
        print(f"sweep: not in the report: {', '.join(gone)}: finished (its checkpoints say) but its log folder is "
              f"not in {cfg.log_path}; move it back there to count it", flush=True)
    column = headline_column(cfg.metrics)
    if any((d / "fid.csv").is_file() for d in dirs):  # every cell started counts, with FID or not
        show(group_runs([load_run(d, column) for d in started]),
             Path(cfg.log_path) / f"{cfg.sweep_name}_fid_compare.png", column, flag="--log_path",
             html_out=Path(cfg.log_path) / f"{cfg.sweep_name}_report.html", html_flag="--log_path")
    elif cfg.fid_step == 0:
        print("sweep: no FID logged (FID is off: --fid_step 0, the default on a CPU; give --fid_step N)")
    else:
        print("sweep: no FID logged (no cell wrote a row of fid.csv; the cells' output says why)")
    if started:  # a cell refused at its start checks wrote nothing to compare
        again = "python fid.py compare " + " ".join(str(d) for d in started) + \
            (f" --column {column}" if column != "fid" else "")
        print(f"compare again with: {again}" + (f"\n(of the EMA generators: {again} --ema)" if cfg.ema_decay else ""),
              flush=True)
    return code


def _visible_gpus():
    import torch  # here: a Slurm job imports this module, and starts its cell without torch
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
