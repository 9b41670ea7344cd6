"""Runs on disk as the compare report reads them: a run folder's config.json, its logged
metric column, attention.csv and status.json (how its last process ended), checked as read
(one-line errors for files this package did not write)."""
import csv
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from checkpoint import read_config
from files import csv_rows_until, read_status
from folders import run_configs
from utils import UserError


# config.json keys that do not change what a run computes, so runs differing in them belong
# to one group: the random seed (what a group varies), names and paths, bookkeeping, speed-only
# settings that give identical images, and how long it ran.
NOT_SETTINGS = {"seed", "version", "log_path", "model_save_path", "sample_path", "attn_path", "image_path",
                "package_version", "git_commit", "torch", "device", "world_size", "dataset_files", "fid_weights_id",
                "num_workers", "cache", "resume", "pretrained_model", "start_checkpoint", "train", "n_samples",
                "parallel", "use_tensorboard", "log_step", "sample_step", "model_save_step", "total_step",
                "fid_batch_size", "jobs", "span", "sweep", "given", "trust_checkpoint", "config"}

@dataclass
class Outcome:
    """How a run ended, from its status.json (runlog.RunStatus, or a sweep that saw it die) and its logs."""
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


def settings_by_content(runs) -> list:
    """Each run's settings, with its --fid_weights as the weights' content: the id the run
    recorded (config.json's fid_weights_id), else the one id that the given runs with its path
    recorded (a run from before the id was recorded), else its path. So runs of the same
    weights at other paths (another machine) group together, and no older run leaves its group."""
    ids = {}
    for r in runs:
        if r.config.get("fid_weights_id"):
            ids.setdefault(json.dumps(r.config.get("fid_weights")), set()).add(r.config["fid_weights_id"])
    out = []
    for r in runs:
        s = r.settings
        if "fid_weights" in s:
            known = ids.get(json.dumps(s["fid_weights"]), set())
            if r.config.get("fid_weights_id") or len(known) == 1:
                s["fid_weights"] = r.config.get("fid_weights_id") or next(iter(known))
        out.append(s)
    return out


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


def saved_configs(folder) -> list:
    """(path, config) of every config a run recorded (folders.run_configs), in today's terms
    (checkpoint.read_config)."""
    return [(path, read_config(path)) for path in run_configs(folder)]


def load_run(folder, column="fid") -> Run:
    """A run folder: one that holds config.json counts as started, even with no fid.csv (it
    stopped or failed before its first FID)."""
    d = Path(folder)
    if not d.is_dir():
        raise UserError(f"{d} " + ("is a file; pass the folder of its run, " if d.is_file() else "does not exist; pass ")
                        + "<log_path>/<version> of a run")
    if not (d / "fid.csv").is_file() and not (d / "config.json").is_file():
        raise UserError(f"{d} has no fid.csv and no config.json; pass <log_path>/<version> of a run trained with "
                        f"--fid_step N")
    config = {}
    if (d / "config.json").is_file():
        config = read_config(d / "config.json")  # runs from before a setting existed group with their equals
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
    resumed = [read_config(p) for p in run_configs(d) if p.name != "config.json"]
    totals = [c.get("total_step") for c in [config] + resumed]
    totals = [t for t in totals if isinstance(t, int)]
    if not totals and not status:
        return Outcome("unknown", last)
    if last >= max(totals + [status.get("total_step") or 0]):
        return Outcome("finished", last)
    what = {"stopped": "interrupted", "running": "running or killed"}.get(status.get("status"), "ended early")
    return Outcome("stopped early", last, what)
