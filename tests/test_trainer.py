"""Training from the command line, end to end (issue 3)."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, main_args, make_trainer, out_dirs, read_csv, run_main, train_args
from sagan_models import attention_layers
from conftest import one_line_exit_2
import main
from conftest import TINY, small_data
from conftest import one_line
from conftest import step_args
from conftest import stop_at
import errno
import shlex
import trainer


@pytest.mark.slow
def test_lambda_gp_without_wgan_gp_is_noted_as_changing_nothing(tmp_path):
    note = "note: --lambda_gp weights wgan-gp's gradient penalty; this run's --adv_loss hinge has none"
    r = run_main([*TINY, *out_dirs(tmp_path), *small_data(), "--total_step", "1", "--lambda_gp", "5"], cwd=tmp_path)
    assert r.returncode == 0 and note in r.stdout, r.stdout + r.stderr
    r = run_main([*TINY, *out_dirs(tmp_path), *small_data(), "--total_step", "1", "--lambda_gp", "5", "--adv_loss",
                  "wgan-gp", "--version", "w"], cwd=tmp_path)
    assert r.returncode == 0 and "--lambda_gp" not in r.stdout, r.stdout + r.stderr


@pytest.mark.slow
def test_metrics_asked_for_on_a_cpu_without_fid_step_are_named_in_the_note(tmp_path):
    r = run_main([*TINY, *out_dirs(tmp_path), *small_data(), "--total_step", "1", "--metrics", "fid,is"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "note: FID (and with it --metrics fid,is) is off on CPU unless asked for: --fid_step N" in r.stdout


@pytest.mark.slow
def test_tiny_run_on_bundled_data_writes_every_output(tmp_path):
    r = run_main(train_args(tmp_path, "--total_step", "20", "--span", "2", "--ema_decay", "0.9", bundled=True),
                 cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "note: FID is off on CPU unless asked for: --fid_step N" in r.stdout
    v = "sagan_emoji_span2_32px"
    for path in [f"samples/{v}/10_fake.png", f"samples/{v}/20_fake.png", f"samples/{v}/20_fake_ema.png",
                 f"attn/{v}/10_attn.png", f"attn/{v}/20_attn.png"]:
        with Image.open(tmp_path / path) as im:
            im.load()
            assert im.size[0] > 32
    grid = np.asarray(Image.open(tmp_path / f"samples/{v}/20_fake.png"))
    assert grid.shape == (8 * 34 + 2, 8 * 34 + 2, 3)  # 8x8 images of 32 px, 2 px frame
    rows = read_csv(tmp_path / f"logs/{v}/metrics.csv")
    assert [int(r["step"]) for r in rows] == [5, 10, 15, 20]
    assert {"d_loss", "g_loss", "d_real", "d_fake", "images_per_s", "g_attn8_gamma", "d_attn4_gamma"} <= set(rows[0])
    assert all(np.isfinite(float(r["d_loss"])) for r in rows)
    attn = read_csv(tmp_path / f"logs/{v}/attention.csv")  # every sample step, every attention layer
    assert [(r["step"], r["network"], r["layer"], r["map"]) for r in attn[:4]] == [
        ("10", "G", "attn8", "8x8"), ("10", "G", "attn16", "16x16"), ("10", "D", "attn8", "8x8"), ("10", "D", "attn4", "4x4")]
    assert len(attn) == 8 and all(0 < float(r["distance"]) < 16 * 2 ** 0.5 for r in attn)
    # γ has moved from 0 in 10 steps; at span 2 D's 4 centre queries of 4x4 keep no key, and
    # under the default --fully_masked seed their weights still follow the energies: none fixed
    assert all(0 < float(r["share"]) < 1 for r in attn)
    assert [r["fixed"] for r in attn[:4]] == ["0", "0", "0", "0"]
    cfg = json.loads((tmp_path / f"logs/{v}/config.json").read_text())
    assert cfg["dataset_size"] == 1432 and cfg["g_span"] == 2 and cfg["seed"] == 3
    assert cfg["fid_weights_id"] is None  # no FID measured: no weights to name
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
    ra = [[r[k] for k in keys] for r in read_csv(a / "logs/sagan_emoji_span1_32px/metrics.csv")]
    rb = [[r[k] for k in keys] for r in read_csv(b / "logs/sagan_emoji_span1_32px/metrics.csv")]
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
def test_a_signal_during_a_fid_saves_that_steps_checkpoint_as_it_says(tmp_path, monkeypatch):
    # the FID stands in as a step that takes long, and gets the Ctrl-C; before, the run said
    # "finishing the FID of step 2 first, then saving a checkpoint" and trained step 3 first
    import trainer
    from types import SimpleNamespace  # a stand-in monitor: config.json asks it for its weights' id
    monkeypatch.setattr(trainer.Trainer, "_fid_monitor", lambda self, *a, **k: SimpleNamespace(weights_id=None))
    monkeypatch.setattr(trainer.Trainer, "_evaluate_fid", lambda self, m: os.kill(os.getpid(), signal.SIGINT))
    r = run_main(step_args(tmp_path, "--total_step", "6", "--model_save_step", "5", "--fid_step", "2"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "finishing the FID of step 2 first, then saving a checkpoint" in r.stderr
    assert "stopped by signal at step 2" in r.stdout
    assert sorted(p.name for p in (tmp_path / "models").rglob("*.pt")) == ["2.pt"]


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
    r = run_main(train_args(tmp_path, "--total_step", str(ck["step"] + 2), "--version", "s", "--resume"),
                 cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / f"models/s/{ck['step'] + 2}.pt").exists()


@pytest.mark.parametrize("args, message", [
    (["--dataset", "celeb", "--image_path", "nowhere"], "kaggle.com/datasets/jessicali9530/celeba-dataset"),
    (["--spna", "3"], "unknown argument --spna; did you mean --span?"),
])
@pytest.mark.slow
def test_bad_input_is_one_line_without_traceback(tmp_path, args, message):
    r = run_main([*out_dirs(tmp_path), "--total_step", "2", "--device", "cpu", *args], cwd=tmp_path)
    assert r.returncode == 2  # (an exception main.py did not turn into its one line would end the test here)
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


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


@pytest.mark.slow
def test_corrupt_checkpoint_and_finished_run_are_reported_in_one_line(tmp_path):
    assert run_main(train_args(tmp_path, "--total_step", "10", "--version", "c"), cwd=tmp_path).returncode == 0
    r = run_main(train_args(tmp_path, "--total_step", "10", "--version", "c", "--resume"), cwd=tmp_path)
    assert r.returncode == 0 and "already at step 10 >= --total_step 10" in r.stdout
    (tmp_path / "models/c/10.pt").write_bytes(b"truncated")
    r = run_main(train_args(tmp_path, "--total_step", "20", "--version", "c", "--resume"), cwd=tmp_path)
    assert r.returncode == 2 and "cannot read checkpoint" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
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


@pytest.mark.slow
def test_nan_stops_the_run_naming_the_last_good_checkpoint(tmp_path, capsys):
    from run import configure
    from trainer import Trainer
    from utils import UserError
    t = Trainer(configure(main_args(tmp_path, "--version", "n", "--total_step", "2", "--model_save_step", "1",
                                     "--log_step", "1")))
    t.train()
    t.cfg = t.cfg.replace(total_step=4)  # the config is frozen: a changed copy
    with torch.no_grad():  # what a diverging step leaves behind
        next(t.D.parameters()).fill_(float("nan"))
    with pytest.raises(UserError) as e:
        t.train()
    assert str(e.value).startswith("a loss became NaN/inf by step 3; the last good checkpoint is 2.pt")
    assert str(e.value).endswith("Try a lower --d_lr/--g_lr")  # the run's loss is hinge already
    assert sorted(p.name for p in (tmp_path / "models" / "n").glob("*.pt")) == ["1.pt", "2.pt"]


def test_a_diverged_step_writes_no_checkpoint(tmp_path, capsys):
    # A learning rate this large sends the weights to inf at the first step, whose losses
    # (computed before the update) are still finite: the checkpoint of that step must not
    # be written, and the one-line error must not call anything good.
    err = one_line_exit_2(capsys, main.main, main_args(tmp_path, "--version", "d", "--total_step", "10",
                                                   "--model_save_step", "1", "--log_step", "1", "--g_lr", "1e8",
                                                   "--d_lr", "1e8"))
    assert "a weight became NaN/inf by step 1; no checkpoint was saved yet" in err
    assert not list((tmp_path / "models").glob("*/*.pt"))
    status = json.loads((tmp_path / "logs/d/status.json").read_text())  # what the compare report counts
    assert (status["status"], status["step"], status["total_step"]) == ("diverged", 1, 10)
    assert status["reason"].startswith("a weight became NaN/inf by step 1")


@pytest.mark.slow
def test_stale_half_written_files_of_a_killed_process_are_removed(tmp_path, capsys):
    import os
    folder = tmp_path / "models" / "k"
    main.main(main_args(tmp_path, "--version", "k", "--total_step", "5"))
    dead, alive = folder / ".10.pt.tmp999999999", folder / f".10.pt.tmp{os.getpid()}"
    dead.write_bytes(b"half"), alive.write_bytes(b"being written")
    capsys.readouterr()
    main.main(main_args(tmp_path, "--version", "k", "--total_step", "6", "--resume"))
    assert not dead.exists() and alive.exists()
    assert "removed 1 half-written file(s)" in capsys.readouterr().err


@pytest.mark.slow
def test_the_printed_resume_hint_runs_when_pasted(tmp_path, monkeypatch):
    """Started as `python path/to/main.py` from another folder with --pretrained_model=N, stopped by
    a signal: the printed command, pasted into a shell in the same folder, finishes the run."""
    run = tmp_path / "elsewhere"
    run.mkdir()
    assert run_main(step_args(run, "--version", "p", "--total_step", "2"), cwd=run).returncode == 0
    step = stop_at(monkeypatch, 3)
    r = run_main(step_args(run, "--version", "p", "--total_step", "6", "--pretrained_model=2"), cwd=run)
    monkeypatch.setattr(trainer.Trainer, "train_step", step)
    assert r.returncode == 0 and "stopped by signal at step 3" in r.stdout, r.stderr
    hint = r.stdout.strip().splitlines()[-1].strip()
    assert hint.startswith("python ")
    pasted = subprocess.run(["bash", "-c", hint.replace("python", shlex.quote(sys.executable), 1)], cwd=run,
                            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert pasted.returncode == 0, pasted.stderr
    assert (run / "models/p/6.pt").exists()
    assert [int(x["step"]) for x in read_csv(run / "logs/p/metrics.csv")] == [1, 2, 3, 4, 5, 6]


# ---------------------------------------------------------------------------- write errors
@pytest.mark.slow
def test_a_checkpoint_that_cannot_be_written_is_one_line_and_the_last_one_stays(tmp_path, monkeypatch):
    assert run_main(step_args(tmp_path, "--version", "w", "--total_step", "2"), cwd=tmp_path).returncode == 0
    last = tmp_path / "models/w/2.pt"
    before = last.read_bytes()

    def full(obj, f, *a, **k):  # what torch.save raises on ENOSPC: a RuntimeError, not an OSError
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1216 vs 1102")

    monkeypatch.setattr(torch, "save", full)
    err = one_line(run_main(step_args(tmp_path, "--version", "w", "--total_step", "4", "--resume"), cwd=tmp_path))
    assert "cannot write checkpoint" in err and "4.pt" in err and "2.pt is the last one saved" in err
    assert "no space left on the device, or the quota is used up" in err  # not only torch's "unexpected pos"
    assert last.read_bytes() == before and sorted(p.name for p in last.parent.iterdir()) == ["2.pt"]


def test_a_config_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    real = trainer.atomic_open

    def no_config(path, *a, **k):
        if path.name.startswith("config"):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(trainer, "atomic_open", no_config)
    err = one_line(run_main(step_args(tmp_path, "--version", "ro", "--total_step", "2"), cwd=tmp_path))
    assert "Read-only file system" in err and "config.json" in err and "--resume" in err


# ---------------------------------------------------------------------------- FID rows
@pytest.mark.slow
def test_a_fid_step_killed_before_its_row_gets_it_on_resume(tmp_path, fid_weights):
    weights = fid_weights
    fid_flags = ["--fid_step", "2", "--fid_samples", "4", "--fid_batch_size", "8", "--fid_ref_samples", "4",
                 "--fid_weights", weights]
    assert run_main(step_args(tmp_path, "--version", "f", "--total_step", "2", *fid_flags), cwd=tmp_path).returncode == 0
    fid_csv = tmp_path / "logs/f/fid.csv"
    logged = read_csv(fid_csv)
    assert [r["step"] for r in logged] == ["2"]
    fid_csv.write_text(fid_csv.read_text().splitlines()[0] + "\n")  # as if killed between checkpoint and FID
    r = run_main(step_args(tmp_path, "--version", "f", "--total_step", "2", "--resume", *fid_flags), cwd=tmp_path)
    assert r.returncode == 0, r.stderr  # a finished run too: its last step gets its row
    assert [(x["step"], x["fid"]) for x in read_csv(fid_csv)] == [("2", logged[0]["fid"])]
    fid_csv.write_text(fid_csv.read_text().splitlines()[0] + "\n")
    r = run_main(step_args(tmp_path, "--version", "f", "--total_step", "4", "--resume", *fid_flags), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    again = read_csv(fid_csv)
    assert [x["step"] for x in again] == ["2", "4"] and again[0]["fid"] == logged[0]["fid"]


# ---------------------------------------------------------------------------- --train false
@pytest.mark.slow
def test_sampling_again_replaces_the_earlier_samples(tmp_path):
    assert run_main(step_args(tmp_path, "--version", "s", "--total_step", "2"), cwd=tmp_path).returncode == 0
    sample = [*TINY, *out_dirs(tmp_path), "--version", "s", "--train", "false"]
    assert run_main([*sample, "--n_samples", "10"], cwd=tmp_path).returncode == 0
    r = run_main([*sample, "--n_samples", "4"], cwd=tmp_path)
    assert r.returncode == 0 and "replacing the earlier samples" in r.stdout
    folder = tmp_path / "samples/s/eval_2"
    assert sorted(p.name for p in folder.iterdir()) == [f"{i:05d}.png" for i in range(4)]
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(".")] == []
    # the temp folder of a sampling killed mid-way (its process gone) is removed by the next
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (folder.parent / f".eval_2.tmp{dead.pid}").mkdir()
    (folder.parent / f".eval_2.tmp{dead.pid}" / "00000.png").write_bytes(b"half")
    # files of the user's own in the folder are never deleted with the samples it replaces
    (folder / "notes.txt").write_text("mine")
    err = one_line(run_main([*sample, "--n_samples", "4"], cwd=tmp_path))
    assert f"{folder} holds files that are not samples (notes.txt); move them out" in err
    assert (folder / "notes.txt").read_text() == "mine" and len(list(folder.glob("*.png"))) == 4
    (folder / "notes.txt").unlink()
    assert run_main([*sample, "--n_samples", "4"], cwd=tmp_path).returncode == 0
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(".")] == []


def test_a_generator_without_attention_trains_beside_a_masked_discriminator(tmp_path):
    # --g_span none --d_span 2: G has no attention layer (no picture, no G rows), D has two
    r = run_main(train_args(tmp_path, "--total_step", "4", "--sample_step", "2", "--g_span", "none", "--d_span", "2",
                            "--ema_decay", "0.5"), cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    v = "sagan_emoji_gnone_d2_32px"
    header = list(read_csv(tmp_path / f"logs/{v}/metrics.csv")[0])
    assert [k for k in header if k.endswith("_gamma")] == ["d_attn8_gamma", "d_attn4_gamma"]
    rows = read_csv(tmp_path / f"logs/{v}/attention.csv")
    assert {(row["network"], row["layer"]) for row in rows} == {("D", "attn8"), ("D", "attn4")}
    assert not list((tmp_path / "attn").glob(f"{v}/*.png"))
    assert (tmp_path / f"samples/{v}/4_fake_ema.png").exists()
    t = make_trainer(tmp_path, "--version", v, "--train", "false")  # its checkpoint builds the same networks
    assert attention_layers(t.G) == [] and [n for n, _ in attention_layers(t.D)] == ["attn8", "attn4"]
