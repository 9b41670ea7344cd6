"""A run's folders on disk: where its outputs go, the file of its checkpoint at each step, and
whether it has begun. Plain paths, no torch: a sweep's Slurm job asks these before it starts
its cell (slurm.CellJob), in a process that should not spend seconds importing torch first."""
from pathlib import Path

OUTPUT_FOLDERS = ("log", "model_save", "sample", "attn")  # each under its --<name>_path root
STATS_FOLDER = "fid_stats"  # under --log_path: the reference statistics every run there shares; no run's name


def run_dirs(cfg) -> dict:
    """A run's output folders: {"log", "model_save", "sample", "attn"} → <root>/<version>."""
    return {k: Path(getattr(cfg, f"{k}_path")) / cfg.version for k in OUTPUT_FOLDERS}


def run_lock_path(root, version) -> Path:
    """The lock file in an output root that makes one process a run's only writer (run.lock_run)."""
    return Path(root) / f".{version}.lock"


def checkpoint_path(model_folder, step: int) -> Path:
    """Where the checkpoint of `step` goes in a run's model folder."""
    return Path(model_folder) / f"{step}.pt"


def checkpoints(folder) -> dict:
    """{step: path} of the checkpoints in a run's model folder."""
    folder = Path(folder)
    return {int(p.stem): p for p in folder.glob("*.pt") if p.stem.isdigit()} if folder.is_dir() else {}


def resumed_config(log_folder, step: int) -> Path:
    """Where a run resumed at `step` records its config, beside the config.json of its start."""
    return Path(log_folder) / f"config_resumed_at_{step}.json"


def run_configs(log_folder) -> list:
    """The configs a run recorded: config.json (its start), then those of its resumed starts by
    step; the ones that exist."""
    folder = Path(log_folder)
    resumed = {int(p.stem.rsplit("_", 1)[1]): p for p in folder.glob("config_resumed_at_*.json")
               if p.stem.rsplit("_", 1)[1].isdigit()}
    return [p for p in [folder / "config.json", *(resumed[s] for s in sorted(resumed))] if p.is_file()]


def run_started(cfg) -> bool:
    """Whether run cfg.version has begun: checkpoints, or a config or logs it wrote (a run
    stopped before its first checkpoint). Such a run is continued, never started over."""
    dirs = run_dirs(cfg)
    return bool(checkpoints(dirs["model_save"])) or any((dirs["log"] / f).exists()
                                                         for f in ("config.json", "metrics.csv"))
