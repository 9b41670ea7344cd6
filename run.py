"""A run on disk and where it starts: its output folders, the lock that makes one process
its only writer, and the resolution of the command line into the run's one frozen Config
(device defaults, the start checkpoint and the settings it brings, the random seed)."""
import json
import os
import random
import sys
from pathlib import Path

import checkpoint
from device import pick_device
from files import check_writable
from folders import OUTPUT_FOLDERS, checkpoints, run_dirs, run_lock_path, run_started
from parameter import (Config, build_parser, check_metric_samples, default_diffaug, flag_words, parse_flags,
                       resolve_device_defaults)
from utils import UserError, warn


_run_locks = {}  # path -> open file: the run locks this process holds


def lock_run(path, what: str) -> None:
    """Make this process the only writer of a run: an exclusive lock on `path`, kept until
    unlock_run or the process ends (the OS releases it then, also after kill -9, so a
    lock of a dead process is never in the way). UserError naming the holder if another
    live process has it. Taking it again in the same process is a no-op."""
    path = Path(path)
    if path in _run_locks:
        return
    try:
        import fcntl
    except ImportError:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise UserError(f"{what} is being written by {holder}; wait for it to end or stop it "
                        f"(it saves a checkpoint), or pick another --version") from None
    f.seek(0)
    f.truncate()
    f.write(f"process {os.getpid()} ({' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])})")
    f.flush()
    _run_locks[path] = f


def unlock_run() -> None:
    """Release the run locks this process holds."""
    while _run_locks:
        _run_locks.popitem()[1].close()


# Settings that define a run: on resume they come from the checkpoint.
RUN_KEYS = ("model", "imsize", "z_dim", "g_conv_dim", "d_conv_dim", "g_span", "d_span", "mask_mode",
            "fully_masked", "original_attention", "adv_loss", "diffaug", "dataset", "seed", "ema_decay")


# What --config never takes from a config.json, nor a resumed run from its checkpoint
# (run.inherited): the run's name and output roots (a run started
# from another's settings must not write into that run's folders), how that run started (a
# sweep's launcher and its Slurm resources included), and the device (the file holds the
# device's name, not the flag).
NOT_FROM_CONFIG = {"version", "log_path", "model_save_path", "sample_path", "attn_path", "resume", "pretrained_model",
                   "train", "n_samples", "trust_checkpoint", "parallel", "jobs", "config", "device", "launcher",
                   "wait"}
# Flags whose default the device resolves (resolve_device_defaults): a file holds what its
# device chose, so these are taken only where that run's command line gave them.
DEVICE_RESOLVED = {"amp", "compile", "channels_last", "cache", "cuda_graph", "fid_step", "fid_batch_size"}


def _flag_dests() -> set:
    return {a.dest for a in build_parser()._actions if a.option_strings and a.dest != "help"}


def inherited(saved: dict, given, dests) -> set:
    """The settings (of `dests`) a run takes from a saved config (a run's config.json, a
    checkpoint's): all it holds but those the command line gave itself, where this process
    runs and writes (NOT_FROM_CONFIG, Slurm's), and what the device decided unless that
    run's command line gave it (DEVICE_RESOLVED)."""
    skip = NOT_FROM_CONFIG | {k for k in dests if k.startswith("slurm_")} | set(given) | \
        (DEVICE_RESOLVED - set(saved.get("given") or ()))
    return set(dests) & set(saved) - skip


def config_argv(saved: dict, given=()) -> list:
    """The flags (command-line words) that give a run the settings of `saved`, a run's
    config.json, under the flags the command line gave itself (`given`, which parse_flags
    reads after these). UserError if it holds none of them."""
    dests = _flag_dests()
    if not isinstance(saved, dict) or not dests & set(saved):
        raise UserError("it holds none of main.py's settings; pass the config.json a run wrote "
                        "(<log_path>/<version>/config.json)")
    if "imsize" not in saved:  # e.g. a run's status.json: a setting or two, where a run's config holds all
        raise UserError("it holds some of main.py's settings but no imsize: no run's config.json; pass the "
                        "config.json a run wrote (<log_path>/<version>/config.json)")
    saved = checkpoint.migrate_config(saved)  # settings that did not exist yet: what such runs trained with
    settings = {k: saved[k] for k in sorted(inherited(saved, given, dests))}
    # one span for both networks is --span (so that a --span given overrides both); the
    # spans of G and D apart only where they differ, and not under a --span given
    spans = {k: settings.pop(k, None) for k in ("span", "g_span", "d_span")}
    if spans["span"] is not None:
        settings["span"] = spans["span"]
    elif "span" not in given:
        settings.update({k: spans[k] for k in ("g_span", "d_span")})
    return flag_words(settings)


def with_config(flags, argv):
    """`flags` (parse_flags(argv)), or with --config FILE the flags of that file's settings
    (config_argv) under those argv gives. UserError (one line) for a file that is missing,
    unreadable or not a run's config.json."""
    if flags.config is None:
        return flags
    path = Path(flags.config)
    existing = [f for f, on in (("--resume", flags.resume), ("--pretrained_model", flags.pretrained_model is not None),
                                ("--train false", not flags.train)) if on]
    if existing:  # which settings win would be a puzzle: the checkpoint's, or another run's file?
        raise UserError(f"--config starts a new run from a saved config, and {existing[0]} goes on from a run's "
                        f"checkpoint with its own settings: drop one of them")
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"--config {path}: no such file; pass a run's <log_path>/<version>/config.json") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:  # a folder, unreadable, not JSON
        raise UserError(f"--config {path}: cannot read it as JSON ({getattr(e, 'strerror', None) or type(e).__name__}); "
                        f"pass a run's config.json") from None
    try:
        return parse_flags([*config_argv(saved, flags.given), *argv])
    except UserError as e:  # the flags alone parsed: the file's values are the problem
        raise UserError(f"--config {path}: {e}") from None


def configure(argv=None, flags=None) -> Config:
    """The run's one config, resolved once and frozen: the flags (parsed from argv unless
    given), the device's defaults, and for one run its start: the lock that makes this
    process the run's only writer, the checkpoint it continues (its settings where the flags
    do not give them; see resolve_start), and the random seed (drawn when none is given; the same on every torchrun rank).
    UserError (one line) for anything a user can fix."""
    cfg = with_config(parse_flags(argv), argv) if flags is None else flags
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.sweep:  # the cells resolve their own start, each in its own process
        resolve_device_defaults(cfg, pick_device(cfg.device).type, world)
        for key in OUTPUT_FOLDERS:
            check_writable(getattr(cfg, f"{key}_path"), f"--{key}_path")
        _check_fid_weights(cfg)  # once, not in every cell
        return Config(**vars(cfg))
    for key, folder in run_dirs(cfg).items():  # at start, not at the first sample step hours later
        if cfg.train or key == "sample":
            check_writable(folder, f"--{key}_path")
    if cfg.train and int(os.environ.get("RANK", "0")) == 0:  # one writer per run, before anything is read or written
        # a lock in every output root: two runs that share any one of the run's folders
        # (same --version and --model_save_path, other --log_path) cannot both write
        for root in dict.fromkeys(Path(getattr(cfg, f"{k}_path")).resolve() for k in OUTPUT_FOLDERS):
            lock_run(run_lock_path(root, cfg.version), f"run '{cfg.version}'")
    given_now = set(cfg.given)
    resolve_start(cfg)
    # after the start's settings: what the run's command gave (a --cuda_graph) may not run
    # here, and its checkpoint's --adv_loss decides --compile's auto
    resolve_device_defaults(cfg, pick_device(cfg.device).type, world)
    _check_fid_weights(cfg, inherited="fid_weights" in set(cfg.given) - given_now)
    if cfg.train and "lambda_gp" in given_now and cfg.adv_loss != "wgan-gp" and int(os.environ.get("RANK", "0")) == 0:
        print(f"note: --lambda_gp weights wgan-gp's gradient penalty; this run's --adv_loss {cfg.adv_loss} has none, "
              f"so it changes nothing (add --adv_loss wgan-gp for the penalty)")
    if cfg.batch_size % world:  # the run's batch size: given, or its checkpoint's
        raise UserError(f"--batch_size {cfg.batch_size} must divide evenly over the {world} torchrun processes")
    if cfg.diffaug is None:  # not given and not from a checkpoint
        cfg.diffaug = default_diffaug(cfg)
    if cfg.seed is None:
        cfg.seed = _drawn_seed()
    return Config(**vars(cfg))


def _check_fid_weights(cfg, inherited=False):
    """A --fid_weights file that is not there: one line before any network is built or any
    cell launched (the trainer resolves the weights for its FID monitor, the default ones
    included, which it may download). `inherited`: the path came from the run's start."""
    if cfg.train and cfg.fid_step > 0 and cfg.fid_weights is not None:
        if inherited and not Path(cfg.fid_weights).is_file():  # "omit it" would not help: the run's FID needs them
            raise UserError(f"the run measured FID with --fid_weights {cfg.fid_weights}, which is not here; give "
                            f"--fid_weights PATH of the same weights (or --fid_step 0 to continue without FID)")
        from inception import resolve_weights
        resolve_weights(cfg.fid_weights)


def _drawn_seed() -> int:
    """A fresh seed (saved in config.json and the checkpoints); under torchrun rank 0's, so
    that every rank draws the same z and data order."""
    import torch.distributed as dist
    box = [random.SystemRandom().randrange(2**31)]
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    return box[0]


def resolve_start(cfg):
    """The checkpoint the run starts from (cfg.start_checkpoint: its path, or None for a new
    run), refusing what would overwrite a run; a checkpoint's architecture, data and seed
    (RUN_KEYS) replace the flags', and so does every other setting it holds that the command
    line did not give again (inherited; given ones apply from its step on). Raises UserError."""
    folder = run_dirs(cfg)["model_save"]
    found = checkpoints(folder)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    cfg.start_checkpoint = None
    if not cfg.train:
        if not found:
            raise UserError(f"no checkpoint in {folder}{_unnamed(folder)}: train first, or pass the --version "
                            f"(and --model_save_path) of a trained run")
        step, ck = (cfg.pretrained_model, None) if cfg.pretrained_model is not None else \
            _newest_loadable(found, cfg, "sampling")
    elif cfg.resume:
        if not found:
            if run_started(cfg):  # it stopped before its first checkpoint: from step 0, as it started
                started = run_dirs(cfg)["log"] / "config.json"
                if started.is_file():
                    _continue_with(cfg, checkpoint.read_config(started, "move it away to start the run over"),
                                   rank0, binding=False)
                return
            raise UserError(f"--resume: no checkpoint in {folder}{_unnamed(folder)}; drop --resume to start run "
                            f"'{cfg.version}' from scratch")
        step, ck = _newest_loadable(found, cfg, "--resume")
    elif cfg.pretrained_model is not None:
        step, ck = cfg.pretrained_model, None
        newer = sorted(s for s in found if s > step and _read_checkpoint(found[s], cfg)[0] is not None)
        if step in found and newer:
            raise UserError(f"{folder} has checkpoints after step {step} ({newer}); continuing from "
                            f"{step} would overwrite them. Move them away first, or use --resume")
    else:
        if run_started(cfg):
            where = f"checkpoints up to step {max(found)} in {folder}" if found else \
                f"a config or logs in {run_dirs(cfg)['log']}, no checkpoint yet"
            if cfg.config is not None:  # a new run from another's config: --resume is refused with --config
                raise UserError(f"run '{cfg.version}' already exists ({where}); give this run its own --version "
                                f"(its name comes from the dataset, span and size, not from the flags changed), or "
                                f"delete that run's folders to start over")
            raise UserError(f"run '{cfg.version}' already exists ({where}); add --resume to continue it "
                            f"(from step 0 when it has no checkpoint), pick another --version, or delete "
                            f"its folders to start over")
        return
    if step not in found:
        raise UserError(f"no checkpoint for step {step} in {folder}; available: {sorted(found) or 'none'}")
    if ck is None:  # a step the command line named: read it here
        ck, why = _read_checkpoint(found[step], cfg)
        if ck is None:
            raise UserError(why)
    _continue_with(cfg, ck.config, rank0)
    cfg.start_checkpoint = str(found[step])


def _continue_with(cfg, saved, rank0, binding=True):
    """A continued run's settings from `saved`: a checkpoint's config, whose architecture,
    data and seed (RUN_KEYS, binding) replace the flags' (a note names a flag given that
    differs); or the config.json of a start that saved no checkpoint, which trains again
    from step 0 with the flags given. Every setting the command line did not give is the
    run's, not the parser's default (a bare `--resume` must not swap in other data, batch
    size or FID settings), checked as the flags are."""
    given = set(cfg.given) | ({"g_span", "d_span"} if "span" in cfg.given else set())
    keys = [k for k in RUN_KEYS if k in saved] if binding else []
    differ = [f"{k}={saved[k]}" for k in keys if k in given and getattr(cfg, k) != saved[k]]
    for k in keys:
        setattr(cfg, k, saved[k])
    actions = [a for a in build_parser()._actions if a.option_strings and a.dest != "help"]
    taken = inherited(saved, given, {a.dest for a in actions}) - set(keys) - {"span"}
    choices = {a.dest: a.choices for a in actions if a.choices}
    for k in sorted(taken):
        if k in choices and saved[k] not in choices[k]:  # a value an older version offered: the flag's default
            taken.discard(k)
            if rank0:
                warn(f"the run's --{k} {saved[k]} is no longer a choice ({', '.join(map(str, choices[k]))}); "
                     f"using the default")
        else:
            setattr(cfg, k, saved[k])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if "cuda_graph" in taken and cfg.cuda_graph is True and \
            (not cfg.train or world > 1 or pick_device(cfg.device).type != "cuda"):
        cfg.cuda_graph = "auto"  # what the run's GPU could replay, this start cannot: the device decides
        taken.discard("cuda_graph")
    check_metric_samples(cfg)  # the flags given now with the run's others
    cfg.given = sorted(set(cfg.given) | taken)  # set by the run's command: kept by its next resume too
    cfg.span = cfg.g_span if cfg.g_span == cfg.d_span else None
    if differ and rank0:
        print(f"note: using the checkpoint's settings {', '.join(differ)} (flags given differ)")


def _unnamed(folder) -> str:
    """For a folder without checkpoints: its .pt files that main.py would not take for one."""
    other = sorted(p.name for p in Path(folder).glob("*.pt")) if Path(folder).is_dir() else []
    return (f" (main.py takes <step>.pt files, as it writes them, not {', '.join(other[:3])}"
            f"{', ...' if len(other) > 3 else ''}: rename one to its step, e.g. 1000.pt)") if other else ""


def _newest_loadable(found, cfg, what):
    """(step, checkpoint) of the newest checkpoint that loads: one cut short (a full disk, a
    bad copy) is skipped, with one warning saying which and why. UserError if none loads."""
    skipped = []
    for step in sorted(found, reverse=True):
        ck, why = _read_checkpoint(found[step], cfg)
        if ck is not None:
            if skipped and int(os.environ.get("RANK", "0")) == 0:
                warn(f"{what}: using step {step}, skipping {'; '.join(skipped)}"
                     + (" (training writes the later steps again; a file it does not write again stays: delete "
                        "it)" if what == "--resume" else ""))
            return step, ck
        skipped.append(why)
    raise UserError(f"{what}: {skipped[0]}; nor can any older checkpoint be used")


def _read_checkpoint(path, cfg):
    """(checkpoint loaded lazily, None), or (None, why it cannot be used)."""
    try:
        return checkpoint.load(path, mmap=True, trust=cfg.trust_checkpoint, training=cfg.train), None
    except UserError as e:
        return None, str(e)
