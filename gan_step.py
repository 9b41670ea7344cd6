"""One GAN training step: --d_iters D steps and one G step on uint8 batches already on the
device, with DiffAugment on everything D sees, the EMA of G, and the optimizers; on CUDA
the whole step can be one CUDA graph. Everything around the step (data, logs, outputs,
checkpoints) is the Trainer's."""
import inspect
import logging

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from diffaug import augment

NO_BUFFER_SYNC = {"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters \
    else {"broadcast_buffers": False}


class _NoCudaRuntimeNote(logging.Filter):
    def filter(self, record):
        return not record.getMessage().startswith("No CUDA runtime is found")


def quiet_cuda_home_warning():
    """Inductor compiles CPU kernels through torch.utils.cpp_extension, whose import warns "No
    CUDA runtime is found, using CUDA_HOME=..." on a machine without CUDA: nothing a CPU run
    needs, so a CPU run with --compile default does not show it (that line only: the module's
    other warnings, a wrong compiler, stay)."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    if not any(isinstance(f, _NoCudaRuntimeNote) for f in logger.filters):
        logger.addFilter(_NoCudaRuntimeNote())


def persistent_buffers(model):
    """BatchNorm statistics and spectral-norm vectors (not the span masks)."""
    keys = model.state_dict(keep_vars=True).keys()
    return [b for n, b in model.named_buffers() if n in keys]


def discriminator_loss(adv_loss, d_real, d_fake):
    if adv_loss == "hinge":
        return F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()
    return d_fake.mean() - d_real.mean()


class GANStep:
    """The optimizers of G and D and the step that trains both. self.G / self.D are the plain
    modules that checkpoints, sampling and the EMA use; the step runs through their DDP and
    torch.compile wrappers when those are on."""

    def __init__(self, cfg, G, D, G_ema, device, rank=0, world=1, g_opt_state=None, d_opt_state=None):
        self.cfg, self.G, self.D, self.G_ema = cfg, G, D, G_ema
        self.device, self.rank, self.world = device, rank, world
        if G_ema is not None:  # what g_step averages: weights, and BatchNorm/spectral-norm state copied
            self.ema_params, self.g_params = list(G_ema.parameters()), list(G.parameters())
            self.ema_buffers, self.g_buffers = persistent_buffers(G_ema), persistent_buffers(G)
        # Fused Adam on CUDA; capturable keeps its step counts on the GPU so that a CUDA
        # graph can replay the update.
        impl = {"fused": True, "capturable": cfg.cuda_graph} if device.type == "cuda" else {}
        self.g_opt = torch.optim.Adam(G.parameters(), cfg.g_lr, (cfg.beta1, cfg.beta2), **impl)
        self.d_opt = torch.optim.Adam(D.parameters(), cfg.d_lr, (cfg.beta1, cfg.beta2), **impl)
        for opt, state in ((self.g_opt, g_opt_state), (self.d_opt, d_opt_state)):
            if state is not None:
                load_optimizer(opt, state)
        self.G_train, self.D_train, self.D_frozen = self._wrapped()
        # One training step, as a CUDA graph replayed every step (--cuda_graph) or eagerly.
        self.step_fn = CUDAGraphStep(self.step) if cfg.cuda_graph else self.step

    def _wrapped(self):
        """(G, D, D without gradients) as training runs them: DDP under torchrun, compiled
        with --compile default."""
        G, D = self.G, self.D
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            # No buffer broadcast: spectral-norm vectors follow identical weights on every
            # rank anyway, BatchNorm keeps per-rank statistics, masks are constants. (torch 2.13
            # renamed the flag and warns at the old name; 2.11 knows only the old one.)
            G, D = (DDP(m, device_ids=ids, **NO_BUFFER_SYNC) for m in (G, D))
        D_frozen = self.D
        if self.cfg.compile == "default":
            if self.device.type == "cpu":
                quiet_cuda_home_warning()
            G, D, D_frozen = (torch.compile(m) for m in (G, D, D_frozen))
        return G, D, D_frozen

    def __call__(self, batches):
        """--d_iters D steps and one G step; returns [d_loss, g_loss, D(real), D(fake), r_t] as
        a device tensor (no host sync)."""
        return self.step_fn(*[next(batches) for _ in range(self.cfg.d_iters)])

    def step(self, *reals):
        """The step itself, on uint8 batches already on the device (what a graph captures)."""
        for real in reals:
            real = real.float().div_(127.5).sub_(1)  # uint8 → [-1, 1] on the device
            if self.cfg.channels_last:
                real = real.contiguous(memory_format=torch.channels_last)
            d_loss, d_real, d_fake, rt = self.d_step(real)
        g_loss = self.g_step(real.shape[0])
        return torch.stack([d_loss, g_loss, d_real, d_fake, rt])

    def rank_slice(self, x):
        """This rank's slice of a global batch of random numbers: every rank draws the same
        global batch and keeps its part, so K processes see exactly what one process would."""
        n = len(x) // self.world
        return x[self.rank * n:(self.rank + 1) * n]

    def z(self, n):
        return self.rank_slice(torch.randn(n * self.world, self.cfg.z_dim, device=self.device))

    def augment(self, x):
        """--diffaug on what D sees in training (real and generated, D's and G's step), each
        image with its own draw; the draws are this rank's slice of a global draw."""
        if not self.cfg.diffaug:
            return x
        x = augment(x, self.cfg.diffaug, lambda n, k: self.rank_slice(torch.rand(n * self.world, k, device=x.device)))
        return x.contiguous(memory_format=torch.channels_last) if self.cfg.channels_last else x

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.amp == "bf16")

    def d_step(self, real):
        cfg, b = self.cfg, real.shape[0]
        with torch.no_grad(), self.autocast():
            fake = self.G_train(self.z(b))
        x = torch.cat([self.augment(real), self.augment(fake.to(real.dtype))])
        if cfg.adv_loss == "wgan-gp":
            alpha = self.rank_slice(torch.rand(b * self.world, 1, 1, 1, device=self.device))
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
            loss = -self.D_frozen(self.augment(self.G_train(self.z(b)))).float().mean()
        self.g_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.g_opt.step()
        self.D.requires_grad_(True)
        if self.G_ema is not None:
            with torch.no_grad():
                torch._foreach_lerp_(self.ema_params, self.g_params, 1 - self.cfg.ema_decay)
                torch._foreach_copy_(self.ema_buffers, self.g_buffers)
        return loss.detach()


def load_optimizer(opt, saved):
    """Adam state from a checkpoint. The saved param_groups carry the settings of the run that
    saved them; this run's take over: its device's implementation (fused, capturable,
    foreach) and its learning rate and betas (the checkpoint's unless new ones were given,
    see run.resolve_start)."""
    own = {k: opt.defaults[k] for k in ("fused", "capturable", "foreach", "lr", "betas")}
    opt.load_state_dict({**saved, "param_groups": [{**g, **own} for g in saved["param_groups"]]})
    # Adam's moments must share their parameter's memory layout (fused kernels index both
    # flat), also when --channels_last differs from the saved run.
    for p, state in opt.state.items():
        for k, v in state.items():
            if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                state[k] = torch.empty_like(p).copy_(v)


class CUDAGraphStep:
    """A training step replayed as one CUDA graph: what costs the CPU ~900 kernel launches
    per step in eager mode becomes one launch.

    The first `warmup` calls run eagerly (real training steps) on a side stream, as capture
    requires: they build the lazy state (cuDNN plans, compiled kernels, Adam moments). The
    next call captures the step into the graph with its inputs copied into static buffers,
    and it and every later call replays it. Everything the step changes lives in tensors
    the graph writes in place (weights, Adam state, BatchNorm statistics, spectral-norm
    vectors, the CUDA RNG offset), so checkpoints, sampling and resume see the same state
    as in eager mode. What the step reads as Python numbers (Adam's lr and betas) is fixed
    at capture: a resumed run's new --g_lr/--d_lr/--beta1/--beta2 count because its graph
    is captured in its own process, after the checkpoint is loaded.

    The capture is thread-local: what other threads do meanwhile (the DataLoader's
    pin-memory thread, with --cache false) is theirs; in the default global mode their
    CUDA calls would break the capture."""

    capture_error_mode = "thread_local"

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
            with torch.cuda.graph(self.graph, capture_error_mode=self.capture_error_mode):
                self.static_out = self.fn(*self.static_in)
        self.graph.replay()
        return self.static_out
