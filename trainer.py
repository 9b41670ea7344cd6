"""The Trainer: builds G and D from the config, trains them (the step itself is gan_step's),
and writes samples, attention pictures, metrics, checkpoints and FID. Read `train()` top
to bottom."""
import copy
import json
import math
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import checkpoint
from batches import make_batches, source_digest
from data_loader import training_set
from device import pick_device
from distributed import convert_sync_bn, dist_info
from files import atomic_open, csv_rows_until, remove_stale_temp_files
from folders import checkpoint_path, resumed_config, run_dirs
from gan_step import GANStep
from parameter import resume_command
from runs import saved_configs
from runlog import AttentionLog, Diverged, Interval, RunLog, RunStatus, StopSignals, TensorBoard
from sagan_models import (attention_layers, build_discriminator, build_generator, forward_capturing_attention_inputs,
                          layer_distances)
from sampling import fixed_latents, image_grid, sampling_mode, save_png, to_uint8, uint8_batches, whole_batches
from utils import UserError, __version__, git_commit, warn


class Trainer:
    def __init__(self, cfg):
        self.cfg = cfg
        self.rank, self.world, local_rank = dist_info()
        self.is_main = self.rank == 0
        self.device = pick_device(cfg.device)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", local_rank)
            torch.cuda.set_device(self.device)
        self.dirs = run_dirs(cfg)
        # run.configure chose the checkpoint and took its settings; its state is read here, once
        ck = checkpoint.load(cfg.start_checkpoint, trust=cfg.trust_checkpoint) if cfg.start_checkpoint else None
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        torch.manual_seed(cfg.seed)

        self.G = build_generator(cfg).to(self.device)
        self.D = build_discriminator(cfg).to(self.device)
        if cfg.sync_bn and self.world > 1:
            convert_sync_bn(self.G)
        if cfg.channels_last:
            self.G.to(memory_format=torch.channels_last)
            self.D.to(memory_format=torch.channels_last)
        self.G_ema = copy.deepcopy(self.G).requires_grad_(False) if cfg.ema_decay > 0 else None
        # The sample grid's z: fixed for the whole run, across resumes.
        self.fixed_z = fixed_latents(cfg.seed, "grid", 64, cfg.z_dim)
        self.step, self.elapsed = 0, 0.0
        self.interval = None  # the steps since the last metrics row (Interval), while training
        self.attn_real, self.attention_log = None, None  # D's attention-distance batch and its log, with the data
        self.board = TensorBoard()  # the run's TensorBoard while training (--use_tensorboard), else nothing
        # From the start checkpoint, what the run needs later (the rest is in the networks):
        # the partial sums of a stop between log steps, and the step its run was to end at
        # (a FID of that step may be missing).
        self.resumed_interval, self.resumed_total = None, None
        # named if a loss turns NaN: the checkpoint this run started from (not a newer unreadable one)
        self.last_saved = ck.step if ck is not None else None
        if ck is not None:
            self._load(ck)
        self.fixed_z = self.fixed_z.to(self.device)
        self.gan = None
        if cfg.train:
            self.gan = GANStep(cfg, self.G, self.D, self.G_ema, self.device, self.rank, self.world,
                               *((ck.g_opt, ck.d_opt) if ck is not None else ()))
            self.g_opt, self.d_opt = self.gan.g_opt, self.gan.d_opt
            if self.is_main:
                self._note_keyless_layers()

    def _note_keyless_layers(self):
        """Say once if a span leaves some attention layer no key for any query."""
        # each masked layer keeps its map's "live" rows (queries with a key left) as a buffer
        names = [f"{net} {name}" for net, model in (("G", self.G), ("D", self.D)) for name, m in attention_layers(model)
                 if any(n.endswith("_live") and not live.any() for n, live in m.named_buffers())]
        if names:
            pre = self.cfg.mask_mode == "pre"
            what = "the original code's float32 arithmetic (-1e9 added to every energy: uniform while |energy| < 32, " \
                "q and k still train)" if self.cfg.original_attention or (pre and self.cfg.fully_masked == "seed") \
                else "the mean of the map (--fully_masked mean)" if pre and self.cfg.fully_masked == "mean" \
                else "nothing: x passes through"
            print(f"note: the span leaves no key for any query of {', '.join(names)} (maps no larger than "
                  f"2·span+1); there attention takes {what}")

    def _load(self, ck):
        try:
            # SyncBatchNorm2d is a BatchNorm2d with the same keys, so any world size loads.
            self.G.load_state_dict(ck.G)
            self.D.load_state_dict(ck.D)
            if self.G_ema is not None and ck.G_ema is not None:
                self.G_ema.load_state_dict(ck.G_ema)
        except (RuntimeError, KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
            raise UserError(f"{self.cfg.start_checkpoint} does not fit the networks its own config describes "
                            f"({type(e).__name__}: {str(e).splitlines()[0][:120]}); use another step") from None
        if self.cfg.train:
            checkpoint.set_rng_state(ck.rng)
        self.fixed_z, self.step, self.elapsed = ck.fixed_z, ck.step, ck.elapsed
        self.resumed_interval, self.resumed_total = ck.interval, ck.config.get("total_step")

    def train_step(self, batches):
        """--d_iters D steps and one G step (gan_step.GANStep); [d_loss, g_loss, D(real),
        D(fake), r_t] as a device tensor."""
        return self.gan(batches)

    # ------------------------------------------------------------------ run bookkeeping
    def save_checkpoint(self) -> Path:
        """<step>.pt (rank 0). A NaN/inf weight stops the run instead: a checkpoint that
        cannot train on is never written, and the error names the last one that can."""
        weights = [p for net in (self.G, self.D) for p in net.parameters()]
        if not bool(torch.stack([torch.isfinite(p).all() for p in weights]).all()):  # one sync per save
            raise self._diverged("a weight")
        path = checkpoint_path(self.dirs["model_save"], self.step)
        if self.is_main:
            ck = checkpoint.Checkpoint(
                step=self.step, config=vars(self.cfg), G=self.G.state_dict(), D=self.D.state_dict(),
                G_ema=self.G_ema.state_dict() if self.G_ema is not None else None,
                g_opt=self.g_opt.state_dict(), d_opt=self.d_opt.state_dict(), rng=checkpoint.rng_state(),
                fixed_z=self.fixed_z.cpu(), interval=self.interval.state() if self.interval is not None else None,
                elapsed=self.elapsed, world_size=self.world)
            try:
                checkpoint.save(ck, path)
            except OSError as e:  # disk full, folder removed: the last good checkpoint stays as it was
                where = f"{self.last_saved}.pt is the last one saved" if self.last_saved is not None else "none saved yet"
                raise UserError(f"cannot write checkpoint {path} ({e.strerror or e}); {where}. Free space or fix the "
                                f"folder, then continue with --resume") from None
        self.last_saved = self.step
        return path

    def _diverged(self, what) -> Diverged:
        where = f"the last good checkpoint is {self.last_saved}.pt in {self.dirs['model_save']}" \
            if self.last_saved is not None else "no checkpoint was saved yet"
        other_loss = " or --adv_loss hinge" if self.cfg.adv_loss != "hinge" else ""
        return Diverged(f"{what} became NaN/inf by step {self.step}; {where}. Try a lower --d_lr/--g_lr{other_loss}")

    def _write_config(self, dataset, fid_monitor):
        info = {**vars(self.cfg), "package_version": __version__, "git_commit": git_commit(),
                "dataset_size": len(dataset), "dataset_files": source_digest(dataset), "world_size": self.world,
                "fid_weights_id": fid_monitor.weights_id if fid_monitor else None, "torch": torch.__version__,
                "device": str(self.device) if self.device.type == "cpu" else torch.cuda.get_device_name()}
        path = self.dirs["log"] / "config.json"
        if self.cfg.start_checkpoint:  # a resumed run: keep the original, record this part beside it
            path = resumed_config(path.parent, self.step)
        # else the run starts at step 0 and writes its own, also over the config of an earlier
        # start that stopped before its first checkpoint (its seed and span may differ)
        text = json.dumps(info, indent=2, default=str)
        with atomic_open(path, "w") as f:
            f.write(text)
        self.board.text("config", text, self.step)

    def _resume_hint(self):
        return resume_command(self.cfg, self.world)

    # ------------------------------------------------------------------ training
    def train(self):
        try:
            self._train()
        except (BrokenPipeError, ConnectionError):  # stdout closed (`| head`): not a disk problem
            raise
        except OSError as e:  # a log or config that cannot be written (disk full, folder gone)
            raise UserError(f"cannot write {e.filename or 'an output file'} ({e.strerror or e}); free space or "
                            f"fix the folder, then continue with: {self._resume_hint()}") from None

    def _train(self):
        cfg = self.cfg
        if self.step >= cfg.total_step and not self._fid_missing():
            if self.is_main:
                print(f"run '{cfg.version}' is already at step {self.step} >= --total_step {cfg.total_step}; "
                      f"raise --total_step to train further")
            return
        if self.is_main:  # before anything of the run is touched
            RunLog.check_columns(self)
        # one writer for the whole run, rank 0's
        with TensorBoard(self.dirs["log"] if self.is_main and cfg.use_tensorboard else None, self.step) as self.board:
            self._train_steps()

    def _train_steps(self):
        cfg = self.cfg
        batches, fid_monitor = self._prepare_data_and_fid()
        if fid_monitor is not None and self._fid_missing():
            # killed after the checkpoint of a FID step and before its row: the row is made now,
            # from the same weights, so no step of the run lacks its FID
            self._evaluate_fid(fid_monitor)
        if self.step >= cfg.total_step:
            return
        with RunStatus(self), StopSignals() as stop, RunLog(self) as log:
            self.interval = Interval(self.device, self.step, self.resumed_interval)
            while self.step < cfg.total_step:
                self.interval.add(self.train_step(batches))
                self.step += 1
                last = self.step == cfg.total_step
                fid_now = fid_monitor is not None and (self.step % cfg.fid_step == 0 or last)
                save_now = self.step % cfg.model_save_step == 0 or last
                stopping = stop.received and self.world == 1  # under torchrun: decided at log steps
                # Rows fall at the same steps in every run; a signal between them saves the
                # interval's partial sums in the checkpoint instead, so a resumed run logs
                # exactly the rows of an uninterrupted one.
                if self.step % cfg.log_step == 0 or save_now or fid_now:
                    stopping = self._close_interval(log, stop.received) or stopping
                with self.interval.paused():  # outputs count in "seconds", not in it/s
                    if save_now or stopping:  # first: a failing picture never costs a checkpoint
                        self.save_checkpoint()
                    if self.step % cfg.sample_step == 0 or last:
                        try:
                            self.write_samples()
                        except OSError as e:  # pictures are not worth a run: say so, train on
                            warn(f"could not write the samples of step {self.step} ({e}); training goes on")
                    if fid_now:
                        with stop.busy(f"the FID of step {self.step}"):
                            self._evaluate_fid(fid_monitor)
                        if stop.received and not stopping and self.world == 1:  # as it said: this step's checkpoint
                            stopping = True
                            if not save_now:
                                self.save_checkpoint()
                if stopping:
                    self._announce_stop()
                    break

    def _fid_missing(self) -> bool:
        """Whether the checkpoint this run started from is a FID step without its fid.csv row."""
        cfg = self.cfg
        if not cfg.fid_step or not cfg.start_checkpoint or self.step == 0:
            return False
        if self.step % cfg.fid_step and self.step != self.resumed_total:
            return False
        return all(int(r["step"]) != self.step for r in csv_rows_until(self.dirs["log"] / "fid.csv", self.step))

    def _prepare_data_and_fid(self):
        """The batch stream from the current step on, and the FID monitor (or None); clears
        what a killed earlier process left half-written, and writes config.json last: a start
        that fails its checks (the data, the FID weights) leaves no config that would make the
        same command, corrected, a run to --resume."""
        cfg = self.cfg
        if self.is_main:
            stale = sum(remove_stale_temp_files(self.dirs[k]) for k in ("model_save", "log", "sample", "attn")
                        if self.dirs[k].is_dir())
            if stale:
                warn(f"removed {stale} half-written file(s) of an interrupted earlier run of '{cfg.version}'")
        dataset = training_set(cfg)
        if self.is_main and cfg.start_checkpoint:
            self._note_other_data(dataset)
        # the real images D's attention distance is measured on: the same 64 for every run on this data
        pick = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:64]
        self.attn_real = torch.stack([dataset[int(i)] for i in pick]).float().div_(127.5).sub_(1)
        self.attention_log = AttentionLog(self.dirs["log"] / "attention.csv", self.step)
        stream = make_batches(dataset, cfg, self.step * cfg.d_iters, self.device, self.rank, self.world)
        fid_monitor = self._fid_monitor(dataset, getattr(stream, "images", None))
        if self.is_main:
            self._write_config(dataset, fid_monitor)
            if cfg.fid_step == 0 and self.device.type == "cpu":
                asked = "" if cfg.metrics == ["fid"] else f" (and with it --metrics {','.join(cfg.metrics)})"
                print(f"note: FID{asked} is off on CPU unless asked for: --fid_step N (--fid_samples M)")
        return iter(stream), fid_monitor

    def _note_other_data(self, dataset):
        """A resumed run whose training set changed since its last start: said, not refused
        (images added on purpose continue the run)."""
        try:
            configs = saved_configs(self.dirs["log"])
        except UserError:  # a damaged config is the report's to refuse, not the resume's
            return
        before = configs[-1][1] if configs else {}
        if before.get("dataset_size") not in (None, len(dataset)):
            warn(f"the training set has {len(dataset)} images; the run trained on {before['dataset_size']} until "
                 f"step {self.step}")
        elif before.get("dataset_files") not in (None, source_digest(dataset)):  # (runs from before it: unknown)
            warn(f"the training set's files changed since the run's last start (a file changed, added or removed, "
                 f"by name, size and mtime, or another --image_path): it trained on the earlier ones until step "
                 f"{self.step}")

    def _close_interval(self, log, signalled):
        """At a log step: the interval's mean losses (global under torchrun), the NaN check,
        the metrics.csv row. Returns whether a signal reached any rank."""
        means, steps, train_s, wall_s = self.interval.close(self.step)
        self.elapsed += wall_s
        if self.world > 1:  # global means, and whether any rank got a signal
            means = torch.cat([means / self.world, means.new_tensor([signalled])])
            dist.all_reduce(means)
            signalled = bool(means[-1] > 0)
        values = means[:5].tolist()  # the only host sync of the interval
        if not all(math.isfinite(v) for v in values):
            raise self._diverged("a loss")
        if self.is_main:
            gammas = [m.gamma.detach() for net in (self.G, self.D) for _, m in attention_layers(net)]
            gammas = torch.cat(gammas).tolist() if gammas else []  # none without attention layers
            log.write(self.step, self.elapsed, steps / max(train_s, 1e-9), values, gammas)
        return signalled

    def _evaluate_fid(self, monitor):
        """The metrics of this step: fid.csv's row, and every metric column on the board."""
        self._share_running_statistics()
        row = monitor.evaluate(self.step, self.G, self.G_ema)
        if row is not None:
            print(monitor.summary(row), flush=True)
            self.board.scalars(self.step, {k: row[k] for k in monitor.metric_columns if k in row}, "metrics/")

    def _share_running_statistics(self):
        """Under torchrun without --sync_bn each rank's BatchNorm keeps running statistics of its
        own slices, and checkpoints hold rank 0's. FID in --fid_g_mode eval samples on every
        rank, so every rank takes rank 0's first: the logged FID is the checkpoint's. (Training
        normalises by batch statistics, so this changes no training step.)"""
        if self.world == 1 or self.cfg.fid_g_mode != "eval":
            return
        for G in (self.G, self.G_ema):
            for m in G.modules() if G is not None else ():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    dist.broadcast(m.running_mean, 0)
                    dist.broadcast(m.running_var, 0)

    def _announce_stop(self):
        if self.is_main:
            print(f"\nstopped by signal at step {self.step}; checkpoint saved to {self.dirs['model_save']}/"
                  f"{self.step}.pt. Resume with:\n  {self._resume_hint()}")

    # ------------------------------------------------------------------ outputs
    def write_samples(self):
        """An 8×8 grid from the fixed z, the attention picture, and the attention distances
        (rank 0 only)."""
        if not self.is_main:
            return
        for name, G in (("", self.G), ("_ema", self.G_ema)):
            if G is None:
                continue
            with sampling_mode(G, self.cfg.fid_g_mode):
                images, inputs = forward_capturing_attention_inputs(G, self.fixed_z)
                grid = image_grid(to_uint8(images))
                save_png(grid, self.dirs["sample"] / f"{self.step}_fake{name}.png")
                self.board.image(f"samples/fixed_z{name}", grid, self.step)
                if not name:
                    g_inputs = inputs
                if not name and inputs:  # a G without attention layers has no picture
                    from plots import save_attention_picture  # here: matplotlib, 0.4 s, for runs that draw
                    picture = save_attention_picture(G, to_uint8(images[0]), {k: v[:1] for k, v in inputs.items()},
                                                     self.dirs["attn"] / f"{self.step}_attn.png", self.cfg.g_span)
                    self.board.image("samples/attention", picture, self.step)
        if self.attn_real is not None:  # set when training starts
            # G on the fixed z, D on a fixed batch of real images (D has no BatchNorm; eval keeps
            # its spectral-norm vectors)
            with sampling_mode(self.D):
                _, d_inputs = forward_capturing_attention_inputs(self.D, self.attn_real.to(self.device))
            layers = {"G": layer_distances(self.G, g_inputs), "D": layer_distances(self.D, d_inputs)}
            self.attention_log.write(self.step, layers)
            self.board.attention(self.step, layers)

    def sample(self):
        """--train false: write --n_samples PNGs from the checkpoint's generator(s)."""
        cfg = self.cfg
        if not self.is_main:
            return
        nets = [(self.dirs["sample"] / f"eval_{self.step}{suffix}", G)
                for suffix, G in (("", self.G), ("_ema", self.G_ema)) if G is not None]
        for out, _ in nets:  # replaced whole below: only if it holds nothing but samples
            others = sorted(p.name for p in out.iterdir() if not re.fullmatch(r"\d{5,}\.png", p.name)) \
                if out.is_dir() else []
            if others:
                raise UserError(f"{out} holds files that are not samples ({', '.join(others[:3])}); move them out, "
                                f"then sample again (its samples are replaced)")
        if self.dirs["sample"].is_dir():  # the temp folder of a sampling killed mid-way
            remove_stale_temp_files(self.dirs["sample"])
        z = fixed_latents(cfg.seed, "eval", whole_batches(cfg.n_samples, cfg.batch_size), cfg.z_dim)
        written, replaced = [], []
        for out, G in nets:
            # Written into a fresh folder that then takes the name: an earlier, larger set of
            # samples of this step never survives beside the new one (fid.py on the folder
            # would measure both).
            tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            starts = range(0, cfg.n_samples, cfg.batch_size)
            for i, batch in zip(starts, uint8_batches(G, z, starts, cfg.batch_size, self.device, cfg.fid_g_mode,
                                                           cfg.n_samples)):
                for j, im in enumerate(batch.permute(0, 2, 3, 1).cpu().numpy()):
                    save_png(im, tmp / f"{i + j:05d}.png")
            if out.exists():
                replaced.append(out)
                shutil.rmtree(out)
            os.replace(tmp, out)
            written.append(out)
        print(f"wrote {cfg.n_samples} samples of step {self.step} to " + " and ".join(map(str, written)))
        if replaced:
            print("(replacing the earlier samples in " + " and ".join(map(str, replaced)) + ")")

    def _fid_monitor(self, dataset, images=None):
        """The FID monitor, or None when FID is off or its weights are missing (then
        inception.resolve_weights has warned once, naming the URL and the path, and training
        goes on)."""
        cfg = self.cfg
        if cfg.fid_step == 0:
            return None
        # imported here: they bring torchvision, a second's import that a run without FID skips
        from features import FIDMonitor
        from inception import resolve_weights
        weights = resolve_weights(cfg.fid_weights) if self.is_main else None
        if self.world > 1:  # one decision for all ranks, or some would wait for FID forever
            box = [weights]
            dist.broadcast_object_list(box, src=0)
            weights = box[0]
        if weights is None:
            return None
        monitor = FIDMonitor(cfg, dataset, weights, self.device, self.dirs["log"], self.step, self.rank, self.world,
                             images=images)
        if monitor.ref.computed:
            print(f"FID reference statistics of {monitor.ref.n:,} real images saved to {monitor.ref.path}", flush=True)
        return monitor
