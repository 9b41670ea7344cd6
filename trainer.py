"""The Trainer: builds G and D from the config, trains them, and writes samples,
attention pictures, metrics, checkpoints and FID. Read `train()` top to bottom."""
import copy
import csv
import json
import math
import random
import shlex
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import matplotlib
from matplotlib.patches import Rectangle
from tqdm import tqdm

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

import fid  # noqa: E402
from data_loader import build_dataset, make_batches
from sagan_models import attention_layers, build_discriminator, build_generator
from utils import (UserError, __version__, atomic_open, atomic_save, checkpoints, convert_sync_bn, csv_rows_until,
                   dist_info, fixed_latents, git_commit, image_grid, is_tty, load_checkpoint, pick_device, rng_state,
                   run_dirs, sampling_mode, save_png, seed_everything, set_rng_state, to_uint8, uint8_batches, warn)

def persistent_buffers(model):
    """BatchNorm statistics and spectral-norm vectors (not the span masks)."""
    keys = model.state_dict(keep_vars=True).keys()
    return [b for n, b in model.named_buffers() if n in keys]


def d_hinge_or_wgan(adv_loss, d_real, d_fake):
    if adv_loss == "hinge":
        return F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()
    return d_fake.mean() - d_real.mean()


class Trainer:
    def __init__(self, cfg):
        self.cfg = cfg
        self.rank, self.world, local_rank = dist_info()
        self.main = self.rank == 0
        self.device = pick_device(cfg.device)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", local_rank)
            torch.cuda.set_device(self.device)
        self.dirs = run_dirs(cfg)
        # parameter.py chose the checkpoint and took its run settings; the state is read here
        self.ckpt = load_checkpoint(cfg.start_checkpoint) if cfg.start_checkpoint else None
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
        # Fused Adam on CUDA; capturable keeps its step counts on the GPU so that a CUDA
        # graph can replay the update.
        impl = {"fused": True, "capturable": cfg.cuda_graph} if self.device.type == "cuda" else {}
        self.g_opt = torch.optim.Adam(self.G.parameters(), cfg.g_lr, (cfg.beta1, cfg.beta2), **impl)
        self.d_opt = torch.optim.Adam(self.D.parameters(), cfg.d_lr, (cfg.beta1, cfg.beta2), **impl)
        # The sample grid's z: fixed for the whole run, across resumes.
        self.fixed_z = fixed_latents(cfg.seed, "grid", 64, cfg.z_dim)
        self.step, self.elapsed = 0, 0.0
        if self.ckpt is not None:
            self._load(self.ckpt)
        self.fixed_z = self.fixed_z.to(self.device)
        if cfg.train:
            self._wrap_models()
        # One training step, as a CUDA graph replayed every step (--cuda_graph) or eagerly.
        self.step_fn = CUDAGraphStep(self._step) if cfg.cuda_graph else self._step

    # ------------------------------------------------------------------ run bookkeeping
    def _state(self) -> dict:
        return {"step": self.step, "elapsed": self.elapsed, "G": self.G.state_dict(), "D": self.D.state_dict(),
                "G_ema": self.G_ema.state_dict() if self.G_ema is not None else None,
                "g_opt": self.g_opt.state_dict(), "d_opt": self.d_opt.state_dict(),
                "fixed_z": self.fixed_z.cpu(), "rng": rng_state(), "config": vars(self.cfg),
                "world_size": self.world, "version": __version__}

    def _load(self, ck: dict):
        # SyncBatchNorm2d is a BatchNorm2d with the same keys, so any world size loads.
        self.G.load_state_dict(ck["G"])
        self.D.load_state_dict(ck["D"])
        if self.G_ema is not None and ck.get("G_ema") is not None:
            self.G_ema.load_state_dict(ck["G_ema"])
        if self.cfg.train:
            for opt, key in ((self.g_opt, "g_opt"), (self.d_opt, "d_opt")):
                # The saved param_groups carry the implementation of the run that saved them
                # (fused, capturable, foreach); this run's device decides those.
                impl = {k: opt.defaults[k] for k in ("fused", "capturable", "foreach")}
                saved = {**ck[key], "param_groups": [{**g, **impl} for g in ck[key]["param_groups"]]}
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
        path = self.dirs["model_save"] / f"{self.step}.pt"
        if self.main:
            atomic_save(self._state(), path)
        return path

    def _write_config(self, n_images):
        info = {**vars(self.cfg), "package_version": __version__, "git_commit": git_commit(),
                "dataset_size": n_images, "world_size": self.world, "torch": torch.__version__,
                "device": str(self.device) if self.device.type == "cpu" else torch.cuda.get_device_name()}
        path = self.dirs["log"] / "config.json"
        if path.exists():  # a resumed run: keep the original, record this part beside it
            path = path.with_name(f"config_resumed_at_{self.step}.json")
        with atomic_open(path, "w") as f:
            f.write(json.dumps(info, indent=2, default=str))

    def _resume_hint(self):
        args = [a for a in sys.argv[1:] if a not in ("--resume",)]
        if "--pretrained_model" in args:
            i = args.index("--pretrained_model")
            del args[i:i + 2]
        launcher = "python" if self.world == 1 else f"torchrun --nproc_per_node {self.world}"
        return f"{launcher} main.py " + " ".join(shlex.quote(a) for a in args + ["--resume"])

    # ------------------------------------------------------------------ the steps
    def _mine(self, x):
        """This rank's slice of a global batch of random numbers: every rank draws the same
        global batch and keeps its part, so K processes see exactly what one process would."""
        n = len(x) // self.world
        return x[self.rank * n:(self.rank + 1) * n]

    def _z(self, n):
        return self._mine(torch.randn(n * self.world, self.cfg.z_dim, device=self.device))

    def d_step(self, real):
        cfg, b = self.cfg, real.shape[0]
        with torch.no_grad(), self.autocast():
            fake = self.G_train(self._z(b))
        x = torch.cat([real, fake.to(real.dtype)])
        if cfg.adv_loss == "wgan-gp":
            alpha = self._mine(torch.rand(b * self.world, 1, 1, 1, device=self.device))
            interp = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
            x = torch.cat([x, interp])
        with self.autocast():
            out = self.D_train(x).float()  # one forward for real, fake (and interpolates)
        d_real, d_fake = out[:b], out[b:2 * b]
        loss = d_hinge_or_wgan(cfg.adv_loss, d_real, d_fake)
        if cfg.adv_loss == "wgan-gp":
            grad, = torch.autograd.grad(out[2 * b:].sum(), interp, create_graph=True)
            loss = loss + cfg.lambda_gp * ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()
        self.d_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.d_opt.step()
        return loss.detach(), d_real.detach().mean(), d_fake.detach().mean()

    def g_step(self, b):
        self.D.requires_grad_(False)  # G's step needs no D weight gradients
        with self.autocast():
            loss = -self.D_frozen(self.G_train(self._z(b))).float().mean()
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
        """--d_iters D steps and one G step; returns [d_loss, g_loss, D(real), D(fake)] as a
        device tensor (no host sync)."""
        return self.step_fn(*[next(batches) for _ in range(self.cfg.d_iters)])

    def _step(self, *reals):
        """The step itself, on uint8 batches already on the device (what a graph captures)."""
        for real in reals:
            real = real.float().div_(127.5).sub_(1)  # uint8 → [-1, 1] on the device
            if self.cfg.channels_last:
                real = real.contiguous(memory_format=torch.channels_last)
            d_loss, d_real, d_fake = self.d_step(real)
        g_loss = self.g_step(real.shape[0])
        return torch.stack([d_loss, g_loss, d_real, d_fake])

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.amp == "bf16")

    def _wrap_models(self):
        """DDP and torch.compile wrappers for training; self.G / self.D stay the plain modules
        that checkpoints, sampling and EMA use."""
        G, D = self.G, self.D
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            ids = [self.device.index] if self.device.type == "cuda" else None
            # No buffer broadcast: spectral-norm vectors follow identical weights on every
            # rank anyway, BatchNorm keeps per-rank statistics, masks are constants.
            G, D = (DDP(m, device_ids=ids, broadcast_buffers=False) for m in (G, D))
        D_frozen = self.D
        if self.cfg.compile == "default":
            G, D, D_frozen = (torch.compile(m) for m in (G, D, D_frozen))
        self.G_train, self.D_train, self.D_frozen = G, D, D_frozen
        if self.G_ema is not None:
            self.ema_params, self.g_params = list(self.G_ema.parameters()), list(self.G.parameters())
            self.ema_buffers, self.g_buffers = persistent_buffers(self.G_ema), persistent_buffers(self.G)

    # ------------------------------------------------------------------ training
    def train(self):
        cfg = self.cfg
        if self.step >= cfg.total_step:
            if self.main:
                print(f"run '{cfg.version}' is already at step {self.step} >= --total_step {cfg.total_step}; "
                      f"raise --total_step to train further")
            return
        dataset = build_dataset(cfg)
        if len(dataset) < cfg.batch_size:
            raise UserError(f"the dataset has {len(dataset)} images, fewer than --batch_size {cfg.batch_size}")
        if self.main:
            self._write_config(len(dataset))
        stream = make_batches(dataset, cfg, self.step * cfg.d_iters, self.device, self.rank, self.world)
        batches = iter(stream)
        fid = self._fid_monitor(dataset, getattr(stream, "images", None))
        log = MetricsLog(self.dirs["log"], [f"{net}_{n}_gamma" for net, m in (("g", self.G), ("d", self.D))
                                            for n, _ in attention_layers(m)], self.step, cfg.use_tensorboard) \
            if self.main else None

        stop = {"signal": None}
        handlers = {s: signal.signal(s, lambda sig, _: stop.update(signal=sig)) for s in (signal.SIGINT, signal.SIGTERM)}
        acc = torch.zeros(4, device=self.device)  # Σ d_loss, g_loss, D(real), D(fake) since last log
        bar = tqdm(total=cfg.total_step, initial=self.step, disable=not (self.main and is_tty()),
                   dynamic_ncols=True, desc=cfg.version)
        t_last, step_last, last_print = time.perf_counter(), self.step, 0.0
        last_good = max(checkpoints(self.dirs["model_save"]), default=None)
        try:
            while self.step < cfg.total_step:
                acc += self.train_step(batches)
                self.step += 1
                bar.update(1)

                # Under torchrun a signal may reach ranks at different steps: they agree at
                # log steps, so all of them stop together.
                interrupted = stop["signal"] is not None and self.world == 1
                last = self.step == cfg.total_step
                save_now = self.step % cfg.model_save_step == 0 or last or interrupted
                fid_now = fid is not None and (self.step % cfg.fid_step == 0 or last)
                if self.step % cfg.log_step == 0 or save_now or fid_now:
                    now = time.perf_counter()
                    self.elapsed += now - t_last
                    n = self.step - step_last
                    stats = acc / n
                    if self.world > 1:  # global means, and whether any rank got a signal
                        stats = torch.cat([stats / self.world, stats.new_tensor([stop["signal"] is not None])])
                        dist.all_reduce(stats)
                        interrupted = interrupted or bool(stats[-1] > 0)
                        save_now = save_now or interrupted
                    values = stats[:4].tolist()  # the only host sync of the interval
                    if not all(math.isfinite(v) for v in values):
                        where = f"the last good checkpoint is {last_good}.pt in {self.dirs['model_save']}" \
                            if last_good is not None else "no checkpoint was saved yet"
                        raise UserError(f"loss became NaN/inf by step {self.step}; {where}. Try a lower "
                                        f"--d_lr/--g_lr or --adv_loss hinge")
                    if self.main:
                        it_s = n / max(now - t_last, 1e-9)
                        gammas = torch.cat([m.gamma.detach() for net in (self.G, self.D)
                                            for _, m in attention_layers(net)]).tolist()
                        log.write(self.step, self.elapsed, it_s, it_s * cfg.batch_size * cfg.d_iters, values, gammas)
                        bar.set_postfix(d=f"{values[0]:.3f}", g=f"{values[1]:.3f}", refresh=False)
                        if not is_tty() and (now - last_print > 5 or last or last_print == 0):
                            print(f"step {self.step}/{cfg.total_step}  {it_s:.1f} it/s  d_loss {values[0]:.4f}  "
                                  f"g_loss {values[1]:.4f}  D(real) {values[2]:.3f}  D(fake) {values[3]:.3f}",
                                  flush=True)
                            last_print = now
                    acc.zero_()
                    t_last, step_last = now, self.step

                t_out = time.perf_counter()  # outputs count in "seconds", not in it/s
                if self.step % cfg.sample_step == 0 or last:
                    self.write_samples()
                if save_now:
                    saved = self.save_checkpoint()
                    last_good = self.step
                if fid_now:
                    fid.evaluate(self.step, self.G, self.G_ema)
                spent = time.perf_counter() - t_out
                t_last += spent
                self.elapsed += spent
                if interrupted:
                    if self.main:
                        print(f"\nstopped by signal at step {self.step}; checkpoint saved to {saved}. "
                              f"Resume with:\n  {self._resume_hint()}")
                    break
        finally:
            bar.close()
            for s, h in handlers.items():
                signal.signal(s, h)
            if log is not None:
                log.close()

    # ------------------------------------------------------------------ outputs
    def write_samples(self):
        """An 8×8 grid from the fixed z, and the attention picture (rank 0 only)."""
        if not self.main:
            return
        for name, G in (("", self.G), ("_ema", self.G_ema)):
            if G is None:
                continue
            with sampling_mode(G, self.cfg.fid_g_mode):
                captured = {}
                hooks = [m.register_forward_hook(lambda mod, inp, out, key=n: captured.update({key: inp[0][:1]}))
                         for n, m in attention_layers(G)]
                images = G(self.fixed_z)
                for h in hooks:
                    h.remove()
                save_png(image_grid(to_uint8(images)), self.dirs["sample"] / f"{self.step}_fake{name}.png")
                if not name:
                    save_attention_picture(G, to_uint8(images[0]), captured,
                                           self.dirs["attn"] / f"{self.step}_attn.png", self.cfg.g_span)

    def sample(self):
        """--train false: write --n_samples PNGs from the checkpoint's generator(s)."""
        cfg = self.cfg
        if not self.main:
            return
        z = fixed_latents(cfg.seed, "eval", cfg.n_samples, cfg.z_dim)
        written = []
        for suffix, G in (("", self.G), ("_ema", self.G_ema)):
            if G is None:
                continue
            out = self.dirs["sample"] / f"eval_{self.step}{suffix}"
            out.mkdir(parents=True, exist_ok=True)
            starts = range(0, cfg.n_samples, cfg.batch_size)
            for i, batch in zip(starts, uint8_batches(G, z, starts, cfg.batch_size, self.device, cfg.fid_g_mode)):
                for j, im in enumerate(batch.permute(0, 2, 3, 1).cpu().numpy()):
                    save_png(im, out / f"{i + j:05d}.png")
            written.append(out)
        print(f"wrote {cfg.n_samples} samples of step {self.step} to " + " and ".join(map(str, written)))

    def _fid_monitor(self, dataset, images=None):
        """The FID monitor, or None when FID is off or its weights are missing (then
        fid.resolve_weights has warned once, naming the URL and the path, and training goes on)."""
        cfg = self.cfg
        if cfg.fid_step == 0:
            return None
        weights = fid.resolve_weights(cfg.fid_weights) if self.main else None
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


class MetricsLog:
    """metrics.csv (one row per --log_step interval), optional TensorBoard scalars."""

    COLUMNS = ["step", "seconds", "it_per_s", "images_per_s", "d_loss", "g_loss", "d_real", "d_fake"]

    def __init__(self, folder: Path, gamma_names, start_step, tensorboard=False):
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "metrics.csv"
        header = self.COLUMNS + gamma_names
        rows = csv_rows_until(self.path, start_step)
        self.file = open(self.path, "w", newline="")
        writer = csv.DictWriter(self.file, header)
        writer.writeheader()
        writer.writerows(rows)
        self.file.flush()
        self.csv = csv.writer(self.file)
        self.names, self.tb = header, None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(folder))
            except ImportError:
                warn("--use_tensorboard: tensorboard is not installed (pip install tensorboard); "
                     "metrics.csv is still written")

    def write(self, step, seconds, it_s, img_s, values, gammas):
        row = [step, f"{seconds:.2f}", f"{it_s:.3f}", f"{img_s:.1f}"] + [f"{v:.6g}" for v in values + gammas]
        self.csv.writerow(row)
        self.file.flush()
        if self.tb is not None:
            for name, v in zip(self.names[2:], [it_s, img_s] + values + gammas):
                self.tb.add_scalar(name, v, step)

    def close(self):
        self.file.close()
        if self.tb is not None:
            self.tb.close()


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
