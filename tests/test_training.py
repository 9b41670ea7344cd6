"""Training from the command line, end to end (issue 3)."""
import csv
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, TINY, out_dirs, run_cli, run_main
from run import configure
from sagan_models import attention_layers


def read_metrics(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def train_args(tmp, *extra):
    return [*TINY, *out_dirs(tmp), "--log_step", "5", "--sample_step", "10", "--model_save_step", "10", *extra]


@pytest.mark.slow
def test_tiny_run_on_bundled_data_writes_every_output(tmp_path):
    r = run_main(train_args(tmp_path, "--total_step", "20", "--span", "2", "--ema_decay", "0.9"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    v = "sagan_emoji_span2_32px"
    for path in [f"samples/{v}/10_fake.png", f"samples/{v}/20_fake.png", f"samples/{v}/20_fake_ema.png",
                 f"attn/{v}/10_attn.png", f"attn/{v}/20_attn.png"]:
        with Image.open(tmp_path / path) as im:
            im.load()
            assert im.size[0] > 32
    grid = np.asarray(Image.open(tmp_path / f"samples/{v}/20_fake.png"))
    assert grid.shape == (8 * 34 + 2, 8 * 34 + 2, 3)  # 8x8 images of 32 px, 2 px frame
    rows = read_metrics(tmp_path / f"logs/{v}/metrics.csv")
    assert [int(r["step"]) for r in rows] == [5, 10, 15, 20]
    assert {"d_loss", "g_loss", "d_real", "d_fake", "images_per_s", "g_attn8_gamma", "d_attn4_gamma"} <= set(rows[0])
    assert all(np.isfinite(float(r["d_loss"])) for r in rows)
    attn = read_metrics(tmp_path / f"logs/{v}/attention.csv")  # every sample step, every attention layer
    assert [(r["step"], r["network"], r["layer"], r["map"]) for r in attn[:4]] == [
        ("10", "G", "attn8", "8x8"), ("10", "G", "attn16", "16x16"), ("10", "D", "attn8", "8x8"), ("10", "D", "attn4", "4x4")]
    assert len(attn) == 8 and all(0 < float(r["distance"]) < 16 * 2 ** 0.5 for r in attn)
    cfg = json.loads((tmp_path / f"logs/{v}/config.json").read_text())
    assert cfg["dataset_size"] == 1432 and cfg["g_span"] == 2 and cfg["seed"] == 3
    assert {"package_version", "git_commit", "g_lr", "batch_size", "mask_mode", "fid_step"} <= set(cfg)
    ck = torch.load(tmp_path / f"models/{v}/20.pt", weights_only=False)
    assert {"G", "D", "G_ema", "g_opt", "d_opt", "step", "rng", "config", "fixed_z"} <= set(ck)
    assert ck["step"] == 20 and ck["g_opt"]["state"] and ck["d_opt"]["state"]
    assert sorted(p.name for p in (tmp_path / f"models/{v}").iterdir()) == ["10.pt", "20.pt"]


@pytest.mark.slow
def test_image_folder_with_corrupt_greyscale_and_rgba_files(tmp_path, image_folder):
    r = run_main(train_args(tmp_path, "--dataset", "folder", "--image_path", image_folder, "--total_step", "6",
                           "--version", "f"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("skipped 1 unreadable image") == 1
    assert json.loads((tmp_path / "logs/f/config.json").read_text())["dataset_size"] == 15
    assert (tmp_path / "samples/f/6_fake.png").exists()


@pytest.mark.slow
def test_resumed_run_gives_the_same_losses(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for folder in (a, b):
        folder.mkdir()
    full = run_main(train_args(a, "--total_step", "20", "--span", "1"), cwd=a)
    half = run_main(train_args(b, "--total_step", "10", "--span", "1"), cwd=b)
    rest = run_main(train_args(b, "--total_step", "20", "--span", "1", "--resume"), cwd=b)
    assert full.returncode == half.returncode == rest.returncode == 0, rest.stderr
    keys = ["step", "d_loss", "g_loss", "d_real", "d_fake", "g_attn8_gamma", "d_attn8_gamma"]
    ra = [[r[k] for k in keys] for r in read_metrics(a / "logs/sagan_emoji_span1_32px/metrics.csv")]
    rb = [[r[k] for k in keys] for r in read_metrics(b / "logs/sagan_emoji_span1_32px/metrics.csv")]
    assert len(ra) == 4 and ra == rb
    ca = torch.load(a / "models/sagan_emoji_span1_32px/20.pt", weights_only=False)
    cb = torch.load(b / "models/sagan_emoji_span1_32px/20.pt", weights_only=False)
    for k in ca["G"]:
        torch.testing.assert_close(ca["G"][k], cb["G"][k], rtol=0, atol=0)
    # the sample grids of the same step come from the same fixed z
    ga = np.asarray(Image.open(a / "samples/sagan_emoji_span1_32px/20_fake.png"))
    gb = np.asarray(Image.open(b / "samples/sagan_emoji_span1_32px/20_fake.png"))
    assert np.array_equal(ga, gb)


@pytest.mark.slow
def test_refuses_to_overwrite_an_existing_run(tmp_path):
    assert run_main(train_args(tmp_path, "--total_step", "10", "--version", "x"), cwd=tmp_path).returncode == 0
    ckpt = tmp_path / "models/x/10.pt"
    before = ckpt.stat().st_mtime_ns
    r = run_main(train_args(tmp_path, "--total_step", "10", "--version", "x"), cwd=tmp_path)
    assert r.returncode == 2 and "already exists" in r.stderr and "--resume" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert ckpt.stat().st_mtime_ns == before


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_a_loadable_checkpoint_and_exits_0(tmp_path, sig):
    args = train_args(tmp_path, "--total_step", "100000", "--version", "s", "--log_step", "1",
                      "--sample_step", "100000", "--model_save_step", "100000")
    proc = subprocess.Popen([sys.executable, str(REPO / "main.py"), *map(str, args)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "logs/s/metrics.csv"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 4):
        time.sleep(0.2)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    saved = list((tmp_path / "models/s").glob("*.pt"))
    assert len(saved) == 1
    ck = torch.load(saved[0], weights_only=False)
    assert ck["step"] >= 3 and f"{ck['step']}.pt" == saved[0].name
    assert "--resume" in out and "Traceback" not in err
    r = run_cli(train_args(tmp_path, "--total_step", str(ck["step"] + 2), "--version", "s", "--resume"),
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / f"models/s/{ck['step'] + 2}.pt").exists()


@pytest.mark.parametrize("args, message", [
    (["--dataset", "celeb", "--image_path", "nowhere"], "kaggle.com/datasets/jessicali9530/celeba-dataset"),
    (["--spna", "3"], "unknown argument --spna; did you mean --span?"),
])
@pytest.mark.slow
def test_bad_input_is_one_line_without_traceback(tmp_path, args, message):
    r = run_cli([*out_dirs(tmp_path), "--total_step", "2", "--device", "cpu", *args], cwd=tmp_path)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_celeb_layout_crops_160_then_resizes(tmp_path):
    from data_loader import build_dataset
    rng = np.random.default_rng(1)
    folder = tmp_path / "CelebA" / "img_align_celeba"
    folder.mkdir(parents=True)
    arrays = [rng.integers(0, 256, (218, 178, 3), dtype=np.uint8) for _ in range(3)]
    for i, arr in enumerate(arrays):
        Image.fromarray(arr).save(folder / f"{i:06d}.png")
    cfg = configure(["--dataset", "celeb", "--image_path", str(tmp_path), "--imsize", "32"])
    ds = build_dataset(cfg)
    assert len(ds) == 3
    for i, arr in enumerate(arrays):
        # 178x218 → center 160x160 box starts at (9, 29), then PIL bilinear to 32
        ref = np.asarray(Image.fromarray(arr).crop((9, 29, 169, 189)).resize((32, 32), Image.BILINEAR))
        assert np.array_equal(ds[i].permute(1, 2, 0).numpy(), ref)


def test_lsun_array_is_center_cropped_not_stretched(tmp_path):
    from data_loader import build_dataset
    rng = np.random.default_rng(2)
    arr = rng.integers(0, 256, (5, 48, 64, 3), dtype=np.uint8)
    (tmp_path / "LSUN").mkdir()
    np.save(tmp_path / "LSUN" / "church_outdoor_train_lmdb_color_64.npy", arr)
    ds = build_dataset(configure(["--dataset", "lsun", "--image_path", str(tmp_path), "--imsize", "32"]))
    assert len(ds) == 5
    ref = np.asarray(Image.fromarray(arr[4][:, 8:56]).resize((32, 32), Image.BILINEAR))
    assert np.array_equal(ds[4].permute(1, 2, 0).numpy(), ref)


def test_batches_resume_exactly_and_cache_matches_per_step_decoding(tmp_path, image_folder):
    from batches import LoaderBatches, TensorBatches, batch_indices, cached_images
    from data_loader import build_dataset
    stream = batch_indices(10, 3, seed=5)
    first = [next(stream) for _ in range(8)]  # crosses epochs (3 batches per epoch)
    resumed = batch_indices(10, 3, seed=5, start=5)
    assert all(torch.equal(first[5 + i], next(resumed)) for i in range(3))
    assert all(len(set(torch.cat(first[e * 3:e * 3 + 3]).tolist())) == 9 for e in range(2))

    cfg = configure(["--dataset", "folder", "--image_path", str(image_folder), "--imsize", "32", "--cache"])
    ds = build_dataset(cfg)
    cached = cached_images(ds)
    assert len(list(image_folder.glob(".sagan_cache_*.npy"))) == 1
    assert torch.equal(cached_images(ds), cached)  # second call reads the file
    per_step = iter(LoaderBatches(ds, 4, 7, 2, torch.device("cpu"), num_workers=0))
    from_cache = iter(TensorBatches(cached, 4, 7, 2, torch.device("cpu")))
    for _ in range(6):
        assert torch.equal(next(per_step), next(from_cache))
    # a different transform (image size) makes a new cache file instead of reusing
    cfg16 = configure(["--dataset", "folder", "--image_path", str(image_folder), "--imsize", "32", "--cache"])
    cfg16 = cfg16.replace(imsize=16)
    cached_images(build_dataset(cfg16))
    assert len(list(image_folder.glob(".sagan_cache_*.npy"))) == 2


def make_trainer(tmp_path, *extra):
    from trainer import Trainer
    cfg = configure([*TINY, *out_dirs(tmp_path), *extra])
    return Trainer(cfg)


def test_sampling_changes_no_model_state(tmp_path):
    t = make_trainer(tmp_path, "--span", "2", "--ema_decay", "0.5")
    t.G(torch.randn(8, 32))  # non-trivial running stats and u/v
    state = {k: v.clone() for k, v in t.G.state_dict().items()}
    t.write_samples()
    assert all(torch.equal(state[k], v) for k, v in t.G.state_dict().items())
    assert t.G.training
    # batch statistics: the grid equals a train-mode forward of the same z...
    t.G.eval()
    with torch.no_grad():
        eval_imgs = t.G(t.fixed_z)
    t.G.train()
    from sampling import sampling_mode
    with sampling_mode(t.G, "batch"):
        batch_imgs = t.G(t.fixed_z)
    with sampling_mode(t.G, "eval"):
        torch.testing.assert_close(t.G(t.fixed_z), eval_imgs)
    # ... and differs from running statistics
    assert not torch.allclose(batch_imgs, eval_imgs)


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


def test_d_iters_steps_discriminator_more_often(tmp_path):
    t = make_trainer(tmp_path, "--d_iters", "3", "--total_step", "2", "--sample_step", "100",
                     "--model_save_step", "100")
    t.train()
    assert t.d_opt.state_dict()["state"][0]["step"] == 6
    assert t.g_opt.state_dict()["state"][0]["step"] == 2


def test_ema_follows_its_recurrence(tmp_path):
    t = make_trainer(tmp_path, "--ema_decay", "0.75", "--total_step", "1", "--sample_step", "100")
    before = [p.detach().clone() for p in t.G_ema.parameters()]
    t.train()
    for e0, e1, g in zip(before, t.G_ema.parameters(), t.G.parameters()):
        torch.testing.assert_close(e1, 0.75 * e0 + 0.25 * g.detach())
    for (n, b), (_, bg) in zip(t.G_ema.named_buffers(), t.G.named_buffers()):
        assert torch.equal(b, bg), n


@pytest.mark.slow
def test_eval_uses_the_checkpoint_architecture(tmp_path):
    r = run_main(train_args(tmp_path, "--total_step", "10", "--span", "3", "--version", "e"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    # sampling with default flags (span 0, imsize 64): the checkpoint's settings win
    r = run_main([*out_dirs(tmp_path), "--version", "e", "--train", "false", "--pretrained_model", "10",
                 "--n_samples", "10", "--device", "cpu"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    files = sorted((tmp_path / "samples/e/eval_10").glob("*.png"))
    assert len(files) == 10 and Image.open(files[0]).size == (32, 32)
    t = make_trainer(tmp_path, "--version", "e", "--train", "false", "--pretrained_model", "10", "--span", "0",
                     "--imsize", "64")
    assert {m.span for _, m in attention_layers(t.G)} == {3} and t.cfg.imsize == 32


def test_seed_readme_commands_parse_and_every_flag_is_documented():
    cfg = configure("--batch_size 64 --imsize 64 --dataset celeb --adv_loss hinge --version sagan_celeb "
                         "--total_step 100000 --span 3".split())
    assert (cfg.g_span, cfg.d_span, cfg.version, cfg.dataset) == (3, 3, "sagan_celeb", "celeb")
    cfg = configure("--batch_size 64 --imsize 64 --dataset lsun --adv_loss hinge --version sagan_lsun".split())
    assert cfg.dataset == "lsun" and cfg.span == 0
    assert configure(["--span", "2", "--d_span", "0"]).version == "sagan_emoji_g2_d0"
    from parameter import build_parser
    readme = (REPO / "README.md").read_text()
    flags = sorted(set(re.findall(r"(--[a-z0-9_]+)", build_parser().format_help())) - {"--help"})
    assert [f for f in flags if f"`{f}`" not in readme] == []


@pytest.mark.slow
def test_corrupt_checkpoint_and_finished_run_are_reported_in_one_line(tmp_path):
    assert run_main(train_args(tmp_path, "--total_step", "10", "--version", "c"), cwd=tmp_path).returncode == 0
    r = run_main(train_args(tmp_path, "--total_step", "10", "--version", "c", "--resume"), cwd=tmp_path)
    assert r.returncode == 0 and "already at step 10 >= --total_step 10" in r.stdout
    (tmp_path / "models/c/10.pt").write_bytes(b"truncated")
    r = run_main(train_args(tmp_path, "--total_step", "20", "--version", "c", "--resume"), cwd=tmp_path)
    assert r.returncode == 2 and "cannot read checkpoint" in r.stderr and "Traceback" not in r.stderr


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


def test_wgan_gp_keeps_the_discriminator_on_the_double_differentiable_path():
    from sagan_models import build_discriminator, build_generator
    cfg = configure(["--adv_loss", "wgan-gp", "--span", "2"])
    assert not any(m.fused for _, m in attention_layers(build_discriminator(cfg)))
    assert all(m.fused for _, m in attention_layers(build_generator(cfg)))
    cfg = configure(["--span", "2"])
    assert all(m.fused for _, m in attention_layers(build_discriminator(cfg)))


@pytest.mark.slow
def test_one_writer_per_run_and_a_dead_writer_does_not_block(tmp_path):
    args = train_args(tmp_path, "--version", "busy", "--model_save_step", "2", "--log_step", "2")
    proc = subprocess.Popen([sys.executable, str(REPO / "main.py"), *args, "--total_step", "100000"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while not (tmp_path / "models/busy/2.pt").exists() and time.time() < deadline:
            time.sleep(0.2)
        for extra in ([], ["--resume"]):  # a second start, and a resume of the run still training
            r = run_main([*args, "--total_step", "4", *extra], cwd=tmp_path)
            assert r.returncode == 2 and f"run 'busy' is being written by process {proc.pid}" in r.stderr, r.stderr
    finally:
        proc.kill()  # kill -9: its lock dies with it
        proc.wait()
    r = run_main([*args, "--total_step", "6", "--resume"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "models/busy/6.pt").exists()


@pytest.mark.slow
def test_a_stop_between_log_steps_leaves_the_metrics_of_an_uninterrupted_run(tmp_path, monkeypatch):
    import trainer
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    args = train_args(tmp_path, "--total_step", "12", "--log_step", "4", "--sample_step", "100", "--model_save_step",
                      "100", "--version", "v")
    assert run_main([*args, *out_dirs(a)], cwd=a).returncode == 0
    step = trainer.Trainer.train_step

    def signalled_at_6(self, batches):
        if self.step == 5:  # the step that makes it 6: between the rows of steps 4 and 8
            os.kill(os.getpid(), signal.SIGTERM)
        return step(self, batches)

    monkeypatch.setattr(trainer.Trainer, "train_step", signalled_at_6)
    stopped = run_main([*args, *out_dirs(b)], cwd=b)
    assert stopped.returncode == 0 and "stopped by signal at step 6" in stopped.stdout
    monkeypatch.setattr(trainer.Trainer, "train_step", step)
    assert run_main([*args, *out_dirs(b), "--resume"], cwd=b).returncode == 0
    keys = ["step", "d_loss", "g_loss", "d_real", "d_fake", "rt", "g_attn8_gamma", "d_attn4_gamma"]
    ra, rb = ([[r[k] for k in keys] for r in read_metrics(d / "logs/v/metrics.csv")] for d in (a, b))
    assert [r[0] for r in ra] == ["4", "8", "12"] and ra == rb


@pytest.mark.slow
def test_resume_falls_back_to_the_newest_checkpoint_that_loads(tmp_path):
    args = train_args(tmp_path, "--version", "t", "--model_save_step", "5", "--sample_step", "100")
    assert run_main([*args, "--total_step", "10"], cwd=tmp_path).returncode == 0
    good = torch.load(tmp_path / "models/t/10.pt", weights_only=False)
    (tmp_path / "models/t/10.pt").write_bytes(b"cut short")
    # an older step may be continued from when everything after it is unreadable ...
    assert configure([*args, "--pretrained_model", "5"]).start_checkpoint.endswith("5.pt")
    # ... and --resume takes the newest that loads, saying which one it skipped and why
    r = run_main([*args, "--total_step", "10", "--resume"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "--resume: using step 5, skipping cannot read checkpoint" in r.stderr and "10.pt" in r.stderr
    again = torch.load(tmp_path / "models/t/10.pt", weights_only=False)
    assert all(torch.equal(good["G"][k], again["G"][k]) for k in good["G"])  # resume is exact
    rows = read_metrics(tmp_path / "logs/t/metrics.csv")
    assert [r["step"] for r in rows] == ["5", "10"]


def test_output_folders_are_checked_at_start_and_a_failed_picture_costs_no_checkpoint(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("x")
    r = run_main(train_args(tmp_path, "--total_step", "2", "--sample_path", tmp_path / "afile"), cwd=tmp_path)
    assert r.returncode == 2 and "--sample_path" in r.stderr and "is a file" in r.stderr
    assert not (tmp_path / "models").exists()  # nothing trained, nothing written
    import trainer

    def no_space(self):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(trainer.Trainer, "write_samples", no_space)
    r = run_main(train_args(tmp_path, "--total_step", "10", "--version", "p"), cwd=tmp_path)
    assert r.returncode == 0 and "could not write the samples of step 10" in r.stderr
    assert sorted(p.name for p in (tmp_path / "models/p").iterdir()) == ["10.pt"]
