"""The record of training: metrics.csv rows per --log_step interval (losses summed on the
device, read once per interval), attention.csv, the run's TensorBoard writer, progress
lines, the signals that stop a run at a checkpoint, and status.json: how the run's last
process ended."""
import csv
import signal
import sys
import time
from contextlib import contextmanager

import torch
from tqdm import tqdm

from files import STATUS_FILE, atomic_open, csv_header, csv_rows_until, write_status
from sagan_models import attention_layers
from utils import UserError, is_tty, warn

class Diverged(UserError):
    """A loss or a weight became NaN/inf: the run stops, and status.json says so."""


class RunStatus:
    """status.json in the run's log folder: {"status", "step", "total_step", "reason"} of the
    last process that trained the run. "running" from the start of training (its step: the
    one it started from; metrics.csv tells progress), so a process
    that dies without a word (kill -9, out of memory, power cut) leaves that; at the end
    "finished" (--total_step reached), "stopped" (a signal: a checkpoint was saved, resume
    continues it), "diverged" (NaN/inf) or "failed" (any other error, its first line in
    "reason"). The compare report counts failed runs from it (files.read_status). Rank 0 writes it."""

    def __init__(self, trainer):
        self.t = trainer
        self.path = trainer.dirs["log"] / STATUS_FILE if trainer.is_main else None

    def _write(self, status, reason=""):
        write_status(self.path.parent, status, self.t.step, self.t.cfg.total_step, reason)

    def __enter__(self):
        if self.path is not None:
            self._write("running")
        return self

    def __exit__(self, kind, error, tb):
        if self.path is None:
            return False
        if kind is None:
            status = "finished" if self.t.step >= self.t.cfg.total_step else "stopped"
        else:
            status = "diverged" if issubclass(kind, Diverged) else "failed"
        reason = "" if error is None else (str(error).strip().splitlines() or [kind.__name__])[0][:300]
        try:
            self._write(status, reason)
        except OSError as e:  # never in place of the error that ended the run
            warn(f"could not record the run's end in {self.path} ({e.strerror or e})")
        return False


class StopSignals:
    """SIGINT / SIGTERM while training are remembered (not raised), so the loop can save a
    checkpoint and stop cleanly; the previous handlers come back on exit."""

    def __enter__(self):
        self.received, self.doing = False, None
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        if self.doing and not self.received:  # a long FID: say why the stop is not immediate
            print(f"\nstopping: finishing {self.doing} first, then saving a checkpoint", file=sys.stderr, flush=True)
        self.received = True

    @contextmanager
    def busy(self, what):
        """A stretch of work a signal waits for (it is named if one comes)."""
        self.doing = what
        try:
            yield
        finally:
            self.doing = None

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class Interval:
    """The steps since the last metrics row: losses summed on the device (the host reads
    them once, at the log step) and the time, with outputs (samples, checkpoints, FID) left
    out of the it/s. A checkpoint between log steps carries it (state()), so the resumed
    run's next row averages the same steps as an uninterrupted run's."""

    def __init__(self, device, step, saved=None):
        self.sum = torch.zeros(5, device=device)  # d_loss, g_loss, D(real), D(fake), r_t
        self.start_time, self.start_step, self.excluded = time.perf_counter(), step, 0.0
        self.carried = (0.0, 0.0)  # (training, wall) seconds of this interval before a resume
        if saved is not None and saved["start_step"] < step:
            self.sum += saved["sum"].to(device)
            self.start_step, self.carried = saved["start_step"], saved["seconds"]

    def state(self) -> dict:
        wall = time.perf_counter() - self.start_time
        return {"sum": self.sum.cpu(), "start_step": self.start_step,
                "seconds": (self.carried[0] + wall - self.excluded, self.carried[1] + wall)}

    def add(self, losses):
        self.sum += losses

    @contextmanager
    def paused(self):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - start

    def close(self, step):
        """(mean losses, steps, training seconds, wall seconds) since the last close; starts
        the next interval."""
        now = time.perf_counter()
        steps, wall = step - self.start_step, now - self.start_time
        means = self.sum / steps
        self.sum.zero_()
        train, wall = wall - self.excluded + self.carried[0], wall + self.carried[1]
        self.start_time, self.start_step, self.excluded, self.carried = now, step, 0.0, (0.0, 0.0)
        return means, steps, train, wall


def rate_text(it_s) -> str:
    """A console line's speed: it/s, or s/it below one step a second, so that a slow first
    interval (torch.compile's minute of compiling, a CUDA graph's capture) reads as its
    seconds, not as "0.0 it/s"."""
    if it_s >= 1 or it_s <= 0:
        return f"{it_s:.1f} it/s"
    return f"{1 / it_s:.1f} s/it"


class RunLog:
    """Rank 0's record of training: metrics.csv (one row per --log_step interval; a resumed
    run drops the rows after its checkpoint), the same numbers on the run's TensorBoard, and progress:
    a tqdm bar on a terminal, else a plain line at most every 5 s. Other ranks write nothing."""

    COLUMNS = ["step", "seconds", "it_per_s", "images_per_s", "d_loss", "g_loss", "d_real", "d_fake", "rt"]

    def __init__(self, trainer):
        t, cfg = trainer, trainer.cfg
        self.total = cfg.total_step
        self.images_per_step = cfg.batch_size * cfg.d_iters
        self.bar = tqdm(total=cfg.total_step, initial=t.step, disable=not (t.is_main and is_tty()),
                        dynamic_ncols=True, desc=cfg.version)
        self.file, self.board = None, t.board
        self.last_print = 0.0
        if not t.is_main:
            return
        folder = t.dirs["log"]
        path = folder / "metrics.csv"
        self.names = self.columns(t)
        # The rows up to the checkpoint are rewritten through a temp file and a rename: a kill
        # or a write error in between leaves the old file whole, never a truncated one.
        rows = csv_rows_until(path, t.step)
        with atomic_open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, self.names)
            writer.writeheader()
            writer.writerows(rows)
        self.file = open(path, "a", newline="")
        self.csv = csv.writer(self.file)

    @classmethod
    def columns(cls, t):
        return cls.COLUMNS + [f"{net}_{n}_gamma" for net, m in (("g", t.G), ("d", t.D)) for n, _ in attention_layers(m)]

    @classmethod
    def check_columns(cls, t):
        """UserError, before the run touches anything, if the metrics.csv it would keep rows of
        has other columns (another network's attention layers: not this run's log)."""
        path = t.dirs["log"] / "metrics.csv"
        header = csv_header(path)
        if t.step > 0 and header is not None and header[:1] != cls.COLUMNS[:1]:  # damaged, or no log at all
            raise UserError(f"{path} is not a metrics.csv main.py wrote (its first line is no header of one): "
                            f"move it away (the run then logs from step {t.step} on) or pick another --log_path")
        if t.step > 0 and header is not None and header != cls.columns(t):
            raise UserError(f"{path} has the columns of another network ({len(header)} columns, this run "
                            f"logs {len(cls.columns(t))}): it is not this run's log; move it away or pick "
                            f"another --log_path")

    def __enter__(self):
        return self

    def write(self, step, seconds, it_s, values, gammas):
        self.bar.update(step - self.bar.n)
        img_s = it_s * self.images_per_step
        self.csv.writerow([step, f"{seconds:.2f}", f"{it_s:.3f}", f"{img_s:.1f}"] +
                          [f"{v:.6g}" for v in values + gammas])
        self.file.flush()
        self.board.scalars(step, dict(zip(self.names[2:], [it_s, img_s] + values + gammas)))
        self.bar.set_postfix(d=f"{values[0]:.3f}", g=f"{values[1]:.3f}", refresh=False)
        now = time.perf_counter()
        if not is_tty() and (now - self.last_print > 5 or step == self.total or self.last_print == 0):
            print(f"step {step}/{self.total}  {rate_text(it_s)}  d_loss {values[0]:.4f}  g_loss {values[1]:.4f}  "
                  f"D(real) {values[2]:.3f}  D(fake) {values[3]:.3f}", flush=True)
            self.last_print = now

    def __exit__(self, *exc):
        self.bar.close()
        if self.file is not None:
            self.file.close()


class AttentionLog:
    """attention.csv: at every --sample_step, per attention layer of G (on the fixed z) and of
    D (on a fixed batch of real images), a sagan_models.LayerAttention: the mean attention
    distance, what equal weights on the keys the span leaves would give (uniform), the
    attention's share of the layer's output (γ included) and the fraction of queries whose
    weights the mask fixes (1: uniform by construction). A resumed run drops the rows after
    its checkpoint."""

    COLUMNS = ["step", "network", "layer", "map", "distance", "uniform", "share", "fixed"]

    def __init__(self, path, start_step):
        self.path = path
        self.rows = csv_rows_until(path, start_step)

    def write(self, step, layers: dict):
        """layers: {"G": [LayerAttention, ...], "D": [...]} (empty lists for a network without
        attention layers)."""
        for net, rows in layers.items():
            self.rows += [{"step": step, "network": net, "layer": r.name, "map": r.map, "distance": f"{r.distance:.5g}",
                           "uniform": f"{r.uniform:.5g}", "share": f"{r.share:.5g}", "fixed": f"{r.fixed:.4g}"}
                          for r in rows]
        with atomic_open(self.path, "w", newline="") as f:
            w = csv.DictWriter(f, self.COLUMNS, restval="")  # rows of an older file lack the new columns
            w.writeheader()
            w.writerows(self.rows)


class TensorBoard:
    """The run's one TensorBoard writer (rank 0, --use_tensorboard), in its log folder: the
    metrics.csv columns, every metric of fid.csv, the attention distances, the sample grids
    and attention pictures, and the config as text. TensorBoard() writes nothing, and so
    does a board when tensorboard is not installed (one warning): every method is then a
    no-op, so callers need no check."""

    def __init__(self, folder=None, step=0):
        self.writer = None
        if folder is None:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter  # optional dependency
        except ImportError:
            warn("--use_tensorboard: tensorboard is not installed (pip install tensorboard); "
                 "metrics.csv and the other logs are still written")
            return
        # a resumed run hides what a killed run logged after its checkpoint, as metrics.csv
        # drops those rows (TensorBoard purges the steps from purge_step on)
        self.writer = SummaryWriter(str(folder), purge_step=step + 1)

    def __enter__(self):
        return self

    def scalars(self, step, values: dict, prefix=""):
        if self.writer is not None:
            for name, v in values.items():
                self.writer.add_scalar(prefix + name, v, step)

    def attention(self, step, layers: dict):
        """What AttentionLog.write records: per network and layer (sagan_models.LayerAttention)
        the mean distance, its uniform reference, the layer's share and its fixed fraction."""
        for net, rows in layers.items():
            for row in rows:
                for kind in ("distance", "uniform", "share", "fixed"):
                    self.scalars(step, {f"{net}_{row.name}": getattr(row, kind)}, f"attention_{kind}/")

    def image(self, tag, hwc_uint8, step):
        if self.writer is not None:
            self.writer.add_image(tag, hwc_uint8, step, dataformats="HWC")

    def text(self, tag, text, step):
        """`text` shown as written (a markdown code block: TensorBoard renders markdown)."""
        if self.writer is not None:
            self.writer.add_text(tag, "\n".join("    " + line for line in text.splitlines()), step)

    def __exit__(self, *exc):
        if self.writer is not None:
            self.writer.close()
