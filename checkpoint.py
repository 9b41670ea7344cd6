"""The checkpoint: its schema, written and read here only (every other module asks this one),
with the migrations of older checkpoints in one place.

A checkpoint is `<model_save_path>/<version>/<step>.pt`, a torch.save archive of a dict
holding tensors and plain Python values only, so that it loads with weights_only=True:
unpickling an arbitrary .pt can run code hidden in it."""
import argparse
import errno
import json
import random
import zipfile
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from choices import METRICS
from files import atomic_open
from sagan_models import build_generator
from utils import TRUST_FLAG, UserError, __version__

# Run settings that checkpoints and config.json files saved before the flag existed lack:
# what those runs trained with. (fully_masked: runs from before the flag attended to nothing;
# runs that recorded "mean", the default before "seed", keep "mean" since it is recorded.)
LEGACY_SETTINGS = {"fully_masked": "skip", "diffaug": "", "original_attention": False}


@dataclass
class Checkpoint:
    """Everything a run needs to continue exactly where it stopped."""
    step: int
    config: dict  # the run's settings (vars of its config), migrated to today's flags on load
    G: dict  # state dicts
    D: dict
    G_ema: dict = None
    g_opt: dict = None  # optimizer state dicts: only needed to train on
    d_opt: dict = None
    rng: dict = None  # host and device RNG states (rng_state())
    fixed_z: torch.Tensor = None  # the sample grid's latents
    interval: dict = None  # runlog.Interval.state(): a stop between two log steps
    elapsed: float = 0.0  # wall seconds trained before
    world_size: int = 1
    version: str = __version__  # of this package

    REQUIRED = ("step", "config", "G", "D")
    FOR_TRAINING = ("g_opt", "d_opt", "rng")


def save(ck: Checkpoint, path) -> None:
    """torch.save through a temp file renamed over `path`: never half a file. torch.save
    reports a failed write (ENOSPC) as a RuntimeError; it is raised as an OSError here."""
    try:
        with atomic_open(path) as f:
            torch.save({f_.name: getattr(ck, f_.name) for f_ in fields(ck)}, f)
    except RuntimeError as e:
        first = str(e).splitlines()[0][:100]
        if "unexpected pos" in first:  # torch's zip writer wrote fewer bytes than it gave: the disk or quota is full
            raise OSError(errno.ENOSPC, f"no space left on the device, or the quota is used up; torch: {first}") \
                from None
        raise OSError(first) from None


def load(path, mmap=False, trust=False, training=False) -> Checkpoint:
    """The checkpoint at `path` on the CPU; mmap=True reads tensors lazily (cheap when only
    the config is needed); training=True also requires what training on needs.

    Loaded with weights_only=True. Checkpoints of versions before 0.2 pickled numpy's RNG
    state and need `trust` (the --trust_checkpoint flag), an explicit statement that the
    file is the user's own. Every failure is one UserError line."""
    unreadable = UserError(f"cannot read checkpoint {path} (not a checkpoint file, or cut short); use another "
                           f"step or re-copy the file")
    if not Path(path).exists() or Path(path).is_dir():  # (a checkpoint is a file: <model_save_path>/<run>/<step>.pt)
        raise UserError(f"no checkpoint file {path}" + (": it is a folder; pass one of its <step>.pt files"
                                                         if Path(path).is_dir() else ""))
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; anything else is not ours
        raise unreadable
    try:
        raw = torch.load(path, map_location="cpu", weights_only=not trust, mmap=mmap)
    except Exception as e:
        if "weights only" in str(e).lower():
            raise UserError(f"{path} holds pickled Python objects, which a safe load refuses: a checkpoint saved "
                            f"before version 0.2, or a file that runs code when opened. Only if you made it "
                            f"yourself, add {TRUST_FLAG} to load it unsafely") from None
        raise unreadable from None  # an archive cut short, damaged, or a garbled pickle
    needs = Checkpoint.REQUIRED + (Checkpoint.FOR_TRAINING if training else ())
    missing = [k for k in needs if k not in raw] if isinstance(raw, dict) else None
    if missing is None or missing or not isinstance(raw.get("config"), dict):
        what = f"it lacks {', '.join(missing)}" if missing else "not a dict with a config"
        raise UserError(f"{path} is not a training checkpoint of this package ({what}); pass a <step>.pt "
                        f"that main.py wrote")
    known = {f.name for f in fields(Checkpoint)}
    ck = Checkpoint(**{k: v for k, v in raw.items() if k in known})
    ck.config = migrate_config(ck.config)
    return ck


def migrate_config(config: dict) -> dict:
    """A saved config (checkpoint or config.json) in today's terms: settings that did not
    exist yet get the value those runs trained with."""
    config = {**LEGACY_SETTINGS, **config}
    if isinstance(config.get("metrics"), (str, list)):  # a string before af542ff, a list in the order given
        given = [m.strip() for m in config["metrics"].split(",")] if isinstance(config["metrics"], str) \
            else config["metrics"]
        config["metrics"] = [m for m in METRICS if m in given]  # before 15ff3b8; today in the registry's
    return config


def read_config(path, fix="is it a file this package wrote?") -> dict:
    """A run's config.json (or config_resumed_at_<step>.json) in today's terms (migrate_config);
    UserError (one line, ending in `fix`) for a file that is no JSON object."""
    try:
        saved = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"cannot read {path} ({type(e).__name__}); {fix}") from None
    if not isinstance(saved, dict):
        raise UserError(f"{path} holds no run's settings (a JSON object); {fix}")
    return migrate_config(saved)


def generator_from_checkpoint(path, ema=False, trust=False):
    """(G, its config) from a training checkpoint, built with the checkpoint's own settings
    (size, spans, mask mode, BatchNorm mode, seed). UserError for anything else."""
    ck = load(path, trust=trust)
    cfg = argparse.Namespace(**ck.config)
    if ema and ck.G_ema is None:
        raise UserError(f"{path} has no EMA generator (trained without --ema_decay); drop --ema (in the API: "
                        f"ema=False)")
    try:
        G = build_generator(cfg)
        G.load_state_dict(ck.G_ema if ema else ck.G)
    except (RuntimeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise UserError(f"{path}: its generator does not fit the config stored with it ({type(e).__name__}); "
                        f"pass a checkpoint main.py wrote") from None
    return G, cfg


# ---------------------------------------------------------------------------- RNG state
def rng_state() -> dict:
    """The host and device RNG states as tensors and plain values, which a weights_only
    load accepts (numpy's own state holds an ndarray)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():  # this process's GPU: under torchrun every rank holds the same state
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    n = state["numpy"]
    if isinstance(n, dict):
        np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    else:  # the tuple of checkpoints before version 0.2 (loaded with --trust_checkpoint)
        np.random.set_state(n)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # Every rank draws the same global z, so rank 0's state serves any number of GPUs.
        torch.cuda.set_rng_state(state["cuda"])
