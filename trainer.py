"""The Trainer: builds G and D from the config, trains them, and writes samples,
attention pictures, metrics, checkpoints and FID. Read `train()` top to bottom."""
import copy
import csv
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
import matplotlib
from matplotlib.patches import Rectangle
from tqdm import tqdm

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

import fid  # noqa: E402
from diffaug import augment
from data_loader import build_dataset, make_batches
from parameter import resume_command
from sagan_models import attention_distance, attention_layers, build_discriminator, build_generator
from utils import (UserError, __version__, atomic_open, atomic_save, convert_sync_bn, csv_header, csv_rows_until,
                   dist_info, fixed_latents, git_commit, image_grid, is_tty, load_checkpoint, pick_device,
                   remove_stale_temp_files, rng_state, run_dirs, sampling_mode, save_png, seed_everything, set_rng_state,
                   to_uint8, uint8_batches, warn)

def persistent_buffers(model):
    """BatchNorm statistics and spectral-norm vectors (not the span masks)."""
    keys = model.state_dict(keep_vars=True).keys()
    return [b for n, b in model.named_buffers() if n in keys]


def discriminator_loss(adv_loss, d_real, d_fake):
    if adv_loss == "hinge":
        return F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()
    return d_fake.mean() - d_real.mean()


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
        # parameter.py chose the checkpoint and took its run settings; the state is read here
        self.ckpt = load_checkpoint(cfg.start_checkpoint, trust=cfg.trust_checkpoint) \
            if cfg.start_checkpoint else None
        # Drawn here, not with the other settings: under torchrun every rank needs rank 0's.
        if cfg.seed is None:
            cfg.seed = random.SystemRandom().randrange(2**31)
            if self.world > 1:  # every rank must draw the same z and data order
                box = [cfg.seed]
                dist.broadcast_object_list(box, src=0)
                cfg.seed = box[0]
        seed_everything(cfg.seed)

        self.G = build_generator(cfg).to(self.device)
        self.D = build_discriminator(cfg).to(self.device)
        if cfg.sync_bn and self.world > 1:
            convert_sync_bn(self.G)
        if cfg.channels_last:
            self.G.to(memory_format=torch.channels_last)
            self.D.to(memory_format=torch.channels_last)
        self.G_ema = copy.deepcopy(self.G).requires_grad_(False) if cfg.ema_decay > 0 else None
        if self.G_ema is not None:  # what g_step averages: weights, and BatchNorm/spectral-norm state copied
            self.ema_params, self.g_params = list(self.G_ema.parameters()), list(self.G.parameters())
            self.ema_buffers, self.g_buffers = persistent_buffers(self.G_ema), persistent_buffers(self.G)
        # Fused Adam on CUDA; capturable keeps its step counts on the GPU so that a CUDA
        # graph can replay the update.
        impl = {"fused": True, "capturable": cfg.cuda_graph} if self.device.type == "cuda" else {}
        self.g_opt = torch.optim.Adam(self.G.parameters(), cfg.g_lr, (cfg.beta1, cfg.beta2), **impl)
        self.d_opt = torch.optim.Adam(self.D.parameters(), cfg.d_lr, (cfg.beta1, cfg.beta2), **impl)
        # The sample grid's z: fixed for the whole run, across resumes.
        self.fixed_z = fixed_latents(cfg.seed, "grid", 64, cfg.z_dim)
        self.step, self.elapsed = 0, 0.0
        self.interval = None  # the steps since the last metrics row (Interval), while training
        self.attn_real, self.attention_rows = None, []  # D's attention-distance batch, set with the data
        # named if a loss turns NaN: the checkpoint this run started from (not a newer unreadable one)
        self.last_saved = self.ckpt["step"] if self.ckpt is not None else None
        if self.ckpt is not None:
            self._load(self.ckpt)
        self.fixed_z = self.fixed_z.to(self.device)
        if cfg.train:
            if self.is_main:
                self._note_keyless_layers()
            self._wrap_models()
        # One training step, as a CUDA graph replayed every step (--cuda_graph) or eagerly.
        self.step_fn = CUDAGraphStep(self._step) if cfg.cuda_graph else self._step

    def _note_keyless_layers(self):
        """Say once if a span leaves some attention layer no key for any query."""
        # each masked layer keeps its map's "live" rows (queries with a key left) as a buffer
        names = [f"{net} {name}" for net, model in (("G", self.G), ("D", self.D)) for name, m in attention_layers(model)
                 if any(n.endswith("_live") and not live.any() for n, live in m.named_buffers())]
        if names:
            what = "the mean of the map (--fully_masked mean)" if self.cfg.mask_mode == "pre" and \
                self.cfg.fully_masked == "mean" else "nothing: x passes through"
            print(f"note: the span leaves no key for any query of {', '.join(names)} (maps no larger than "
                  f"2·span+1); there attention takes {what}")

    # ------------------------------------------------------------------ run bookkeeping
    def _state(self) -> dict:
        return {"step": self.step, "elapsed": self.elapsed, "G": self.G.state_dict(), "D": self.D.state_dict(),
                "G_ema": self.G_ema.state_dict() if self.G_ema is not None else None,
                "g_opt": self.g_opt.state_dict(), "d_opt": self.d_opt.state_dict(),
                "fixed_z": self.fixed_z.cpu(), "rng": rng_state(), "config": vars(self.cfg),
                "interval": self.interval.state() if self.interval is not None else None,
                "world_size": self.world, "version": __version__}

    def _load(self, ck: dict):
        try:
            self._load_state(ck)
        except (RuntimeError, KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
            raise UserError(f"{self.cfg.start_checkpoint} does not fit the networks its own config describes "
                            f"({type(e).__name__}: {str(e).splitlines()[0][:120]}); use another step") from None

    def _load_state(self, ck: dict):
        # SyncBatchNorm2d is a BatchNorm2d with the same keys, so any world size loads.
        self.G.load_state_dict(ck["G"])
        self.D.load_state_dict(ck["D"])
        if self.G_ema is not None and ck.get("G_ema") is not None:
            self.G_ema.load_state_dict(ck["G_ema"])
        if self.cfg.train:
            for opt, key in ((self.g_opt, "g_opt"), (self.d_opt, "d_opt")):
                # The saved param_groups carry the settings of the run that saved them; this run's
                # take over: its device's implementation (fused, capturable, foreach) and its
                # learning rate and betas (the checkpoint's unless new ones were given, see
                # parameter.resolve_start).
                own = {k: opt.defaults[k] for k in ("fused", "capturable", "foreach", "lr", "betas")}
                saved = {**ck[key], "param_groups": [{**g, **own} for g in ck[key]["param_groups"]]}
                opt.load_state_dict(saved)
                # Adam's moments must share their parameter's memory layout (fused kernels
                # index both flat), also when --channels_last differs from the saved run.
                for p, state in opt.state.items():
                    for k, v in state.items():
                        if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                            state[k] = torch.empty_like(p).copy_(v)
            set_rng_state(ck["rng"])
        self.fixed_z, self.step, self.elapsed = ck["fixed_z"], ck["step"], ck.get("elapsed", 0.0)

    def save_checkpoint(self) -> Path:
        """<step>.pt (rank 0). A NaN/inf weight stops the run instead: a checkpoint that
        cannot train on is never written, and the error names the last one that can."""
        weights = [p for net in (self.G, self.D) for p in net.parameters()]
        if not bool(torch.stack([torch.isfinite(p).all() for p in weights]).all()):  # one sync per save
            raise self._diverged("a weight")
        path = self.dirs["model_save"] / f"{self.step}.pt"
        if self.is_main:
            try:
                atomic_save(self._state(), path)
            # disk full, folder removed: the last good checkpoint stays as it was. torch.save
            # reports a failed write (ENOSPC) as a RuntimeError, not an OSError.
            except (OSError, RuntimeError) as e:
                where = f"{self.last_saved}.pt is the last one saved" if self.last_saved is not None else "none saved yet"
                why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0][:100]
                raise UserError(f"cannot write checkpoint {path} ({why}); {where}. Free space or fix the "
                                f"folder, then continue with --resume") from None
        self.last_saved = self.step
        return path

    def _diverged(self, what) -> UserError:
        where = f"the last good checkpoint is {self.last_saved}.pt in {self.dirs['model_save']}" \
            if self.last_saved is not None else "no checkpoint was saved yet"
        return UserError(f"{what} became NaN/inf by step {self.step}; {where}. Try a lower --d_lr/--g_lr or "
                         f"--adv_loss hinge")

    def _write_config(self, n_images):
        info = {**vars(self.cfg), "package_version": __version__, "git_commit": git_commit(),
                "dataset_size": n_images, "world_size": self.world, "torch": torch.__version__,
                "device": str(self.device) if self.device.type == "cpu" else torch.cuda.get_device_name()}
        path = self.dirs["log"] / "config.json"
        if self.ckpt is not None:  # a resumed run: keep the original, record this part beside it
            path = path.with_name(f"config_resumed_at_{self.step}.json")
        # else the run starts at step 0 and writes its own, also over the config of an earlier
        # start that stopped before its first checkpoint (its seed and span may differ)
        with atomic_open(path, "w") as f:
            f.write(json.dumps(info, indent=2, default=str))

    def _resume_hint(self):
        return resume_command(self.cfg, self.world)

    # ------------------------------------------------------------------ the steps
    def _rank_slice(self, x):
        """This rank's slice of a global batch of random numbers: every rank draws the same
        global batch and keeps its part, so K processes see exactly what one process would."""
        n = len(x) // self.world
        return x[self.rank * n:(self.rank + 1) * n]

    def _z(self, n):
        return self._rank_slice(torch.randn(n * self.world, self.cfg.z_dim, device=self.device))

    def augment(self, x):
        """--diffaug on what D sees in training (real and generated, D's and G's step), each
        image with its own draw; the draws are this rank's slice of a global draw."""
        if not self.cfg.diffaug:
            return x
        x = augment(x, self.cfg.diffaug, lambda n, k: self._rank_slice(torch.rand(n * self.world, k, device=x.device)))
        return x.contiguous(memory_format=torch.channels_last) if self.cfg.channels_last else x

    def d_step(self, real):
        cfg, b = self.cfg, real.shape[0]
        with torch.no_grad(), self.autocast():
            fake = self.G_train(self._z(b))
        x = torch.cat([self.augment(real), self.augment(fake.to(real.dtype))])
        if cfg.adv_loss == "wgan-gp":
            alpha = self._rank_slice(torch.rand(b * self.world, 1, 1, 1, device=self.device))
            interp = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
            x = torch.cat([x, self.augment(interp)])  # the penalty is on D as it is trained: D∘augment
        with self.autocast():
            out = self.D_train(x).float()  # one forward for real, fake (and interpolates)
        d_real, d_fake = out[:b], out[b:2 * b]
        loss = discriminator_loss(cfg.adv_loss, d_real, d_fake)
        if cfg.adv_loss == "wgan-gp":
            grad, = torch.autograd.grad(out[2 * b:].sum(), interp, create_graph=True)
            loss = loss + cfg.lambda_gp * ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()
        self.d_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.d_opt.step()
        # ADA's overfitting signal r_t: the mean sign of D's logits on real images (free here)
        return loss.detach(), d_real.detach().mean(), d_fake.detach().mean(), d_real.detach().sign().mean()

    def g_step(self, b):
        self.D.requires_grad_(False)  # G's step needs no D weight gradients
        with self.autocast():
            loss = -self.D_frozen(self.augment(self.G_train(self._z(b)))).float().mean()
        self.g_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.g_opt.step()
        self.D.requires_grad_(True)
        if self.G_ema is not None:
            with torch.no_grad():
                torch._foreach_lerp_(self.ema_params, self.g_params, 1 - self.cfg.ema_decay)
                torch._foreach_copy_(self.ema_buffers, self.g_buffers)
        return loss.detach()

    def train_step(self, batches):
        """--d_iters D steps and one G step; returns [d_loss, g_loss, D(real), D(fake), r_t] as
        a device tensor (no host sync)."""
        return self.step_fn(*[next(batches) for _ in range(self.cfg.d_iters)])

    def _step(self, *reals):
        """The step itself, on uint8 batches already on the device (what a graph captures)."""
        for real in reals:
            real = real.float().div_(127.5).sub_(1)  # uint8 → [-1, 1] on the device
            if self.cfg.channels_last:
                real = real.contiguous(memory_format=torch.channels_last)
            d_loss, d_real, d_fake, rt = self.d_step(real)
        g_loss = self.g_step(real.shape[0])
        return torch.stack([d_loss, g_loss, d_real, d_fake, rt])

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.amp == "bf16")

    def _wrap_models(self):
        """DDP and torch.compile wrappers for training; self.G / self.D stay the plain modules
        that checkpoints, sampling and EMA use."""
        G, D = self.G, self.D
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            # No buffer broadcast: spectral-norm vectors follow identical weights on every
            # rank anyway, BatchNorm keeps per-rank statistics, masks are constants.
            G, D = (DDP(m, device_ids=ids, broadcast_buffers=False) for m in (G, D))
        D_frozen = self.D
        if self.cfg.compile == "default":
            G, D, D_frozen = (torch.compile(m) for m in (G, D, D_frozen))
        self.G_train, self.D_train, self.D_frozen = G, D, D_frozen

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
        batches, fid_monitor = self._prepare_data_and_fid()
        if fid_monitor is not None and self._fid_missing():
            # killed after the checkpoint of a FID step and before its row: the row is made now,
            # from the same weights, so no step of the run lacks its FID
            self._share_running_statistics()
            fid_monitor.evaluate(self.step, self.G, self.G_ema)
        if self.step >= cfg.total_step:
            return
        with StopSignals() as stop, RunLog(self) as log:
            self.interval = Interval(self.device, self.step, self.ckpt.get("interval") if self.ckpt else None)
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
                        self._share_running_statistics()
                        with stop.busy(f"the FID of step {self.step}"):
                            fid_monitor.evaluate(self.step, self.G, self.G_ema)
                if stopping:
                    self._announce_stop()
                    break

    def _fid_missing(self) -> bool:
        """Whether the checkpoint this run started from is a FID step without its fid.csv row."""
        cfg, ck = self.cfg, self.ckpt
        if not cfg.fid_step or ck is None or self.step == 0:
            return False
        if self.step % cfg.fid_step and self.step != ck["config"].get("total_step"):
            return False
        return all(int(r["step"]) != self.step for r in csv_rows_until(self.dirs["log"] / "fid.csv", self.step))

    def _prepare_data_and_fid(self):
        """The batch stream from the current step on, and the FID monitor (or None); writes
        config.json and clears what a killed earlier process left half-written."""
        cfg = self.cfg
        if self.is_main:
            stale = sum(remove_stale_temp_files(self.dirs[k]) for k in ("model_save", "log") if self.dirs[k].is_dir())
            if stale:
                warn(f"removed {stale} half-written file(s) of an interrupted earlier run of '{cfg.version}'")
        dataset = build_dataset(cfg)
        if len(dataset) < cfg.batch_size:
            raise UserError(f"the dataset has {len(dataset)} images, fewer than --batch_size {cfg.batch_size}")
        # the real images D's attention distance is measured on: the same 64 for every run on this data
        pick = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:64]
        self.attn_real = torch.stack([dataset[int(i)] for i in pick]).float().div_(127.5).sub_(1)
        self.attention_rows = csv_rows_until(self.dirs["log"] / "attention.csv", self.step)
        if self.is_main:
            self._write_config(len(dataset))
            if cfg.fid_step == 0 and self.device.type == "cpu":
                print("note: FID is off on CPU unless asked for: --fid_step N (--fid_samples M)")
        stream = make_batches(dataset, cfg, self.step * cfg.d_iters, self.device, self.rank, self.world)
        return iter(stream), self._fid_monitor(dataset, getattr(stream, "images", None))

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
            gammas = torch.cat([m.gamma.detach() for net in (self.G, self.D)
                                for _, m in attention_layers(net)]).tolist()
            log.write(self.step, self.elapsed, steps / max(train_s, 1e-9), values, gammas)
        return signalled

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
                save_png(image_grid(to_uint8(images)), self.dirs["sample"] / f"{self.step}_fake{name}.png")
                if not name:
                    save_attention_picture(G, to_uint8(images[0]), {k: v[:1] for k, v in inputs.items()},
                                           self.dirs["attn"] / f"{self.step}_attn.png", self.cfg.g_span)
                    g_inputs = inputs
        if self.attn_real is not None:  # set when training starts
            self._log_attention_distance(g_inputs)

    @torch.no_grad()
    def _log_attention_distance(self, g_inputs):
        """attention.csv: per attention layer of G (on the fixed z) and of D (on a fixed batch
        of real images), the mean attention distance (sagan_models.attention_distance), and
        what uniform weights over the keys the span leaves would give, for reference."""
        with sampling_mode(self.D):  # D has no BatchNorm; eval keeps its spectral-norm vectors
            _, d_inputs = forward_capturing_attention_inputs(self.D, self.attn_real.to(self.device))
        inputs = {"G": g_inputs, "D": d_inputs}
        for net, model in (("G", self.G), ("D", self.D)):
            for name, m in attention_layers(model):
                x = inputs[net][name]
                H, W = x.shape[2:]
                # in chunks: the (B, N, N) weights of a 64×64 map are 64 MB per image
                chunk = max(1, 2 ** 24 // (H * W) ** 2)
                d = torch.cat([attention_distance(m(x[i:i + chunk], return_attention=True)[1], H, W)
                               for i in range(0, len(x), chunk)])
                uniform = attention_distance(m.attention_weights(x.new_zeros(1, H * W, H * W), H, W), H, W)
                self.attention_rows.append({"step": self.step, "network": net, "layer": name, "map": f"{H}x{W}",
                                            "distance": f"{d.mean().item():.5g}", "uniform": f"{uniform.item():.5g}"})
        with atomic_open(self.dirs["log"] / "attention.csv", "w", newline="") as f:
            w = csv.DictWriter(f, ["step", "network", "layer", "map", "distance", "uniform"])
            w.writeheader()
            w.writerows(self.attention_rows)

    def sample(self):
        """--train false: write --n_samples PNGs from the checkpoint's generator(s)."""
        cfg = self.cfg
        if not self.is_main:
            return
        z = fixed_latents(cfg.seed, "eval", cfg.n_samples, cfg.z_dim)
        written, replaced = [], []
        for suffix, G in (("", self.G), ("_ema", self.G_ema)):
            if G is None:
                continue
            out = self.dirs["sample"] / f"eval_{self.step}{suffix}"
            # Written into a fresh folder that then takes the name: an earlier, larger set of
            # samples of this step never survives beside the new one (fid.py on the folder
            # would measure both).
            tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            starts = range(0, cfg.n_samples, cfg.batch_size)
            for i, batch in zip(starts, uint8_batches(G, z, starts, cfg.batch_size, self.device, cfg.fid_g_mode)):
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
        fid.resolve_weights has warned once, naming the URL and the path, and training goes on)."""
        cfg = self.cfg
        if cfg.fid_step == 0:
            return None
        weights = fid.resolve_weights(cfg.fid_weights) if self.is_main else None
        if self.world > 1:  # one decision for all ranks, or some would wait for FID forever
            box = [weights]
            dist.broadcast_object_list(box, src=0)
            weights = box[0]
        if weights is None:
            return None
        return fid.FIDMonitor(cfg, dataset, weights, self.device, self.dirs["log"], self.step, self.rank, self.world,
                              images=images)


class CUDAGraphStep:
    """A training step replayed as one CUDA graph: what costs the CPU ~900 kernel launches
    per step in eager mode becomes one launch.

    The first `warmup` calls run eagerly (real training steps) on a side stream, as capture
    requires: they build the lazy state (cuDNN plans, compiled kernels, Adam moments). The
    next call captures the step into the graph with its inputs copied into static buffers,
    and it and every later call replays it. Everything the step changes lives in tensors
    the graph writes in place (weights, Adam state, BatchNorm statistics, spectral-norm
    vectors, the CUDA RNG offset), so checkpoints, sampling and resume see the same state
    as in eager mode."""

    def __init__(self, fn, warmup=3):
        self.fn, self.warmup, self.calls = fn, warmup, 0
        self.graph = self.static_in = self.static_out = None

    def __call__(self, *inputs):
        if self.graph is not None:
            for buf, x in zip(self.static_in, inputs):
                buf.copy_(x)
        elif self.calls < self.warmup:
            self.calls += 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.fn(*inputs)
            torch.cuda.synchronize()  # three times per run: no cross-stream lifetime questions
            return out
        else:
            self.static_in = [x.clone() for x in inputs]
            torch.cuda.synchronize()
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.static_out = self.fn(*self.static_in)
        self.graph.replay()
        return self.static_out


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


class RunLog:
    """Rank 0's record of training: metrics.csv (one row per --log_step interval; a resumed
    run drops the rows after its checkpoint), optional TensorBoard scalars, and progress:
    a tqdm bar on a terminal, else a plain line at most every 5 s. Other ranks write nothing."""

    COLUMNS = ["step", "seconds", "it_per_s", "images_per_s", "d_loss", "g_loss", "d_real", "d_fake", "rt"]

    def __init__(self, trainer):
        t, cfg = trainer, trainer.cfg
        self.total = cfg.total_step
        self.images_per_step = cfg.batch_size * cfg.d_iters
        self.bar = tqdm(total=cfg.total_step, initial=t.step, disable=not (t.is_main and is_tty()),
                        dynamic_ncols=True, desc=cfg.version)
        self.file = self.tb = None
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
        if cfg.use_tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # optional dependency
                self.tb = SummaryWriter(str(folder))
            except ImportError:
                warn("--use_tensorboard: tensorboard is not installed (pip install tensorboard); "
                     "metrics.csv is still written")

    @classmethod
    def columns(cls, t):
        return cls.COLUMNS + [f"{net}_{n}_gamma" for net, m in (("g", t.G), ("d", t.D)) for n, _ in attention_layers(m)]

    @classmethod
    def check_columns(cls, t):
        """UserError, before the run touches anything, if the metrics.csv it would keep rows of
        has other columns (another network's attention layers: not this run's log)."""
        path = t.dirs["log"] / "metrics.csv"
        header = csv_header(path)
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
        if self.tb is not None:
            for name, v in zip(self.names[2:], [it_s, img_s] + values + gammas):
                self.tb.add_scalar(name, v, step)
        self.bar.set_postfix(d=f"{values[0]:.3f}", g=f"{values[1]:.3f}", refresh=False)
        now = time.perf_counter()
        if not is_tty() and (now - self.last_print > 5 or step == self.total or self.last_print == 0):
            print(f"step {step}/{self.total}  {it_s:.1f} it/s  d_loss {values[0]:.4f}  g_loss {values[1]:.4f}  "
                  f"D(real) {values[2]:.3f}  D(fake) {values[3]:.3f}", flush=True)
            self.last_print = now

    def __exit__(self, *exc):
        self.bar.close()
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def forward_capturing_attention_inputs(model, x):
    """model(x), and {layer name: the input of that attention layer}."""
    inputs = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, key=n: inputs.update({key: inp[0]}))
             for n, m in attention_layers(model)]
    try:
        return model(x), inputs
    finally:
        for h in hooks:
            h.remove()


def save_attention_picture(G, image_u8, attn_inputs, path, span, queries=((0.25, 0.25), (0.25, 0.75),
                                                                         (0.5, 0.5), (0.75, 0.4))):
    """For a few query pixels of one generated image, each G attention layer's weights as
    a heat map over the image, with the query marked and its masked square outlined."""

    layers = dict(attention_layers(G))
    img = image_u8.permute(1, 2, 0).cpu().numpy()
    S = img.shape[0]
    fig, axes = plt.subplots(len(attn_inputs), 1 + len(queries), figsize=(2.2 * (1 + len(queries)),
                                                                          2.3 * len(attn_inputs)), squeeze=False)
    for row, (name, x) in enumerate(attn_inputs.items()):
        _, w = layers[name](x, return_attention=True)  # (1, N, N) for this one image
        H, W = x.shape[2:]
        cell = S / H
        axes[row, 0].imshow(img)
        axes[row, 0].set_title(f"{name} ({H}×{W})", fontsize=9)
        for k, (fy, fx) in enumerate(queries):
            i, j = int(fy * H), int(fx * W)
            heat = w[0, i * W + j].float().view(H, W).cpu().numpy()
            ax = axes[row, k + 1]
            ax.imshow(img.mean(axis=2), cmap="gray", vmin=0, vmax=255)
            ax.imshow(np.kron(heat, np.ones((int(cell), int(cell)))), cmap="inferno", alpha=0.65)
            ax.plot((j + 0.5) * cell - 0.5, (i + 0.5) * cell - 0.5, "c+", ms=9, mew=2)
            axes[row, 0].plot((j + 0.5) * cell - 0.5, (i + 0.5) * cell - 0.5, "c+", ms=7, mew=1.5)
            if span > 0:
                r0, r1, c0, c1 = max(i - span, 0), min(i + span, H - 1), max(j - span, 0), min(j + span, W - 1)
                ax.add_patch(Rectangle((c0 * cell - 0.5, r0 * cell - 0.5), (c1 - c0 + 1) * cell,
                                       (r1 - r0 + 1) * cell, fill=False, ec="cyan", lw=1.2, ls="--"))
            ax.set_title(f"query ({i},{j})  max {heat.max():.2f}", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"generator attention, span {span} (dashed: masked square)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
