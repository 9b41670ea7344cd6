"""The training step: D's loss against separate forwards, --d_iters, the EMA recurrence,
wgan-gp's double backward, Adam state in the parameters' layout, every CPU speed option
against the reference losses, DiffAugment on everything D sees."""
import subprocess
import sys

import pytest
import torch

from batches import make_batches
from conftest import REPO, make_trainer, out_dirs, run_main, TINY, train_args
from data_loader import build_dataset
from run import configure
from sagan_models import attention_layers
from trainer import Trainer


@pytest.mark.parametrize("adv_loss", ["hinge", "wgan-gp"])
def test_discriminator_loss_matches_separate_forwards(tmp_path, adv_loss):
    import copy
    t = make_trainer(tmp_path, "--adv_loss", adv_loss, "--lambda_gp", "7", "--diffaug", "none")
    t.D.eval()  # freeze D's spectral-norm vectors so separate forwards see the same weights
    G0, D0 = copy.deepcopy(t.G), copy.deepcopy(t.D)
    real = torch.rand(4, 3, 32, 32) * 2 - 1
    torch.manual_seed(11)
    loss, d_real_mean, d_fake_mean, rt = t.gan.d_step(real)
    # Replay the same random draws with separate forwards.
    torch.manual_seed(11)
    with torch.no_grad():
        fake = G0(torch.randn(4, 32))
    d_real, d_fake = D0(real), D0(fake)
    if adv_loss == "hinge":
        expected = torch.relu(1 - d_real).mean() + torch.relu(1 + d_fake).mean()
    else:
        alpha = torch.rand(4, 1, 1, 1)
        interp = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
        grad, = torch.autograd.grad(D0(interp).sum(), interp)
        expected = d_fake.mean() - d_real.mean() + 7 * ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(d_real_mean, d_real.mean().detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(d_fake_mean, d_fake.mean().detach(), rtol=1e-5, atol=1e-6)
    assert rt.item() == (d_real > 0).float().mean().item() - (d_real < 0).float().mean().item()  # ADA's r_t


@pytest.mark.slow
def test_d_iters_steps_discriminator_more_often(tmp_path):
    t = make_trainer(tmp_path, "--d_iters", "3", "--total_step", "2", "--sample_step", "100",
                     "--model_save_step", "100")
    t.train()
    assert t.d_opt.state_dict()["state"][0]["step"] == 6
    assert t.g_opt.state_dict()["state"][0]["step"] == 2


@pytest.mark.slow
def test_ema_follows_its_recurrence(tmp_path):
    t = make_trainer(tmp_path, "--ema_decay", "0.75", "--total_step", "1", "--sample_step", "100")
    before = [p.detach().clone() for p in t.G_ema.parameters()]
    t.train()
    for e0, e1, g in zip(before, t.G_ema.parameters(), t.G.parameters()):
        torch.testing.assert_close(e1, 0.75 * e0 + 0.25 * g.detach())
    for (n, b), (_, bg) in zip(t.G_ema.named_buffers(), t.G.named_buffers()):
        assert torch.equal(b, bg), n


def test_wgan_gp_keeps_the_discriminator_on_the_double_differentiable_path():
    from sagan_models import build_discriminator, build_generator
    cfg = configure(["--adv_loss", "wgan-gp", "--span", "2"])
    assert not any(m.fused for _, m in attention_layers(build_discriminator(cfg)))
    assert all(m.fused for _, m in attention_layers(build_generator(cfg)))
    cfg = configure(["--span", "2"])
    assert all(m.fused for _, m in attention_layers(build_discriminator(cfg)))


@pytest.mark.slow
def test_resume_with_channels_last_keeps_adam_state_in_the_parameter_layout(tmp_path):
    assert run_main(train_args(tmp_path, "--total_step", "10", "--version", "cl"), cwd=tmp_path).returncode == 0
    t = make_trainer(tmp_path, "--version", "cl", "--resume", "--channels_last", "--total_step", "12")
    for opt in (t.g_opt, t.d_opt):
        for p, state in opt.state.items():
            for v in state.values():
                if torch.is_tensor(v) and v.shape == p.shape:
                    assert v.stride() == p.stride()
    assert any(p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
               for p in t.G.parameters())
    t.train()
    assert t.step == 12


def _first_steps(tmp_path, image_folder, flags, n=2):
    cfg = configure([*TINY, *out_dirs(tmp_path), "--dataset", "folder", "--image_path", str(image_folder),
                          "--span", "2", "--version", "v" + str(abs(hash(tuple(flags)))), *flags])
    t = Trainer(cfg)
    batches = iter(make_batches(build_dataset(cfg), cfg, 0, t.device))
    return torch.stack([t.train_step(batches) for _ in range(n)])


@pytest.mark.slow
def test_every_cpu_speed_option_gives_the_reference_losses(tmp_path, image_folder):
    ref = _first_steps(tmp_path, image_folder, REFERENCE)
    fast = _first_steps(tmp_path, image_folder, ["--attn_impl", "fused", "--channels_last", "--cache",
                                                 "--compile", "default"])
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)
    # bfloat16 autocast: same losses to bf16 precision
    bf16 = _first_steps(tmp_path, image_folder, ["--attn_impl", "fused", "--amp", "bf16", "--cache"])
    torch.testing.assert_close(bf16, ref, rtol=0.05, atol=0.02)


@pytest.mark.slow
def test_a_cpu_run_with_compile_does_not_show_torchs_cuda_home_warning(tmp_path):
    # a process of its own: the warning comes once per process, when inductor first imports
    # torch.utils.cpp_extension (here right after the Trainer, as compiling the first step would)
    code = (f"import sys; sys.path[:0] = [{str(REPO)!r}, {str(REPO / 'tests')!r}]\n"
            f"from pathlib import Path; from conftest import make_trainer\n"
            f"make_trainer(Path({str(tmp_path)!r}), '--compile', 'default')\n"
            f"import torch.utils.cpp_extension")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "CUDA_HOME" not in r.stderr and "No CUDA runtime" not in r.stderr, r.stderr


def test_trainer_augments_what_d_sees_in_both_steps_and_never_when_sampling(tmp_path):
    from trainer import Trainer
    t = Trainer(configure([*TINY, *out_dirs(tmp_path), "--diffaug", "cutout"]))
    seen = []
    t.D.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].detach().clone()))
    real = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    t.gan.step(real)
    d_input, g_input = seen  # one D forward in D's step (real + fake), one in G's step
    holes = lambda imgs: (imgs == 0).all(dim=1).flatten(1).sum(1)  # zero pixels per image
    # uint8 → [-1, 1] never gives exactly 0: every zero pixel is a cutout
    assert (holes(d_input[:8]) >= 64).all() and (holes(d_input[8:]) >= 64).all()
    assert (holes(g_input) >= 64).all()
    seen.clear()
    t.write_samples()  # sampling and FID use G alone
    assert seen == []


REFERENCE = ["--attn_impl", "dense", "--amp", "none", "--compile", "none"]
