"""Every entry point answers a user mistake with one line and exit code 2, never a
traceback (issue 11). In-process through main.main / fid.main; the subprocess cases in
test_training.py and test_fid.py keep the no-traceback guarantee of the real scripts."""
import numpy as np
import pytest
import torch

import metrics
import fid
import main
from conftest import TINY, one_line_exit_2, out_dirs


def train(tmp_path, *extra):
    return [*TINY, *out_dirs(tmp_path), "--log_step", "5", "--sample_step", "100", "--model_save_step", "10", *extra]


@pytest.mark.parametrize("args, message", [
    (["--dataset", "celeb", "--image_path", "nowhere"], "kaggle.com/datasets/jessicali9530/celeba-dataset"),
    (["--dataset", "lsun", "--image_path", "nowhere"], "kaggle.com"),
    (["--dataset", "folder", "--image_path", "nowhere"], "no images found under --image_path nowhere"),
    (["--spna", "3"], "unknown argument --spna; did you mean --span?"),
    (["--imsize", "48"], "--imsize 48 is not supported; use 32, 64 or 128"),
    (["--span", "-1"], "--span must be >= 0"),
    (["--batch_size", "0"], "--batch_size must be >= 1"),
    (["--adv_loss", "wgan"], "invalid choice"),
    (["--resume"], "no checkpoint"),
    (["--train", "false"], "no checkpoint"),
    (["--batch_size", "5000"], "fewer than --batch_size 5000"),
    (["--fid_samples", "1"], "--fid_samples 1 is too few"),
    (["--metrics", "fid,is", "--fid_samples", "5"], "IS >= 10"),
    (["--metrics", "fid,ssim"], "--metrics 'fid,ssim': choose a comma list of fid,is,kid"),
    (["--beta2", "1.5"], "--beta2 must be in [0, 1)"),
    (["--g_conv_dim", "2"], "--g_conv_dim must be >= 8"),
    (["--device", "cpu", "--cuda_graph"], "--cuda_graph needs a CUDA device"),
])
def test_main_bad_input_is_one_line(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    err = one_line_exit_2(capsys, main.main, [*out_dirs(tmp_path), "--total_step", "2", "--device", "cpu", *args])
    assert message in err


def test_main_bad_checkpoints_are_one_line(tmp_path, capsys):
    folder = tmp_path / "models" / "c"
    folder.mkdir(parents=True)
    (folder / "10.pt").write_bytes(b"truncated")
    for extra in (["--resume"], ["--train", "false"], ["--pretrained_model", "10"]):
        err = one_line_exit_2(capsys, main.main, train(tmp_path, "--version", "c", *extra))
        assert "cannot read checkpoint" in err


def test_fid_bad_inputs_are_one_line(tmp_path, capsys):
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    np.savez(tmp_path / "floats.npz", images=np.zeros((2, 8, 8, 3), np.float32))
    torch.save({"just": "a dict"}, tmp_path / "other.pt")
    metrics.save_stats(tmp_path / "s.npz", np.zeros(3), np.eye(3))
    metrics.save_stats(tmp_path / "nan.npz", np.array([0, np.nan, 0]), np.eye(3))
    metrics.save_stats(tmp_path / "skew.npz", np.zeros(3), np.eye(3) + np.triu(np.ones((3, 3)), 1))
    metrics.save_stats(tmp_path / "neg.npz", np.zeros(3), -np.eye(3))
    (tmp_path / "a_folder").mkdir()
    cases = [([tmp_path / "nan.npz", tmp_path / "s.npz"], "hold NaN or inf"),
             ([tmp_path / "s.npz", tmp_path / "skew.npz"], "sigma is not symmetric"),
             ([tmp_path / "s.npz", tmp_path / "neg.npz"], "negative eigenvalues"),
             (["--save-stats", tmp_path / "s.npz", tmp_path / "a_folder"], "is a folder; give a file name"),
             (["--save-stats", tmp_path / "s.npz", tmp_path / "s.npz" / "x.npz"], "is a file"),([tmp_path / "bad.npz", tmp_path / "s.npz"], "bad.npz"),
             ([tmp_path / "bad.pt", tmp_path / "s.npz"], "cannot read checkpoint"),
             ([tmp_path / "other.pt", tmp_path / "s.npz"], "not a training checkpoint of this package"),
             ([tmp_path / "floats.npz", tmp_path / "s.npz"], "expected a uint8 image array"),
             ([tmp_path / "missing", tmp_path / "s.npz"], "does not exist"),
             (["compare", tmp_path / "nothing_here"], "has no fid.csv"),
             ([tmp_path / "s.npz", tmp_path / "s.npz", "--metrics", "fid,ssim"], "choose a comma list")]
    for argv, message in cases:
        err = one_line_exit_2(capsys, fid.main, [*map(str, argv), "--fid_weights", str(tmp_path / "s.npz")]
                              if argv[0] != "compare" else list(map(str, argv)))
        assert message in err and err.startswith("fid.py: error:"), err


def test_nan_stops_the_run_naming_the_last_good_checkpoint(tmp_path, capsys):
    from run import configure
    from trainer import Trainer
    from utils import UserError
    t = Trainer(configure(train(tmp_path, "--version", "n", "--total_step", "2", "--model_save_step", "1",
                                     "--log_step", "1")))
    t.train()
    t.cfg = t.cfg.replace(total_step=4)  # the config is frozen: a changed copy
    with torch.no_grad():  # what a diverging step leaves behind
        next(t.D.parameters()).fill_(float("nan"))
    with pytest.raises(UserError) as e:
        t.train()
    assert str(e.value).startswith("a loss became NaN/inf by step 3; the last good checkpoint is 2.pt")
    assert sorted(p.name for p in (tmp_path / "models" / "n").glob("*.pt")) == ["1.pt", "2.pt"]


def test_a_diverged_step_writes_no_checkpoint(tmp_path, capsys):
    # A learning rate this large sends the weights to inf at the first step, whose losses
    # (computed before the update) are still finite: the checkpoint of that step must not
    # be written, and the one-line error must not call anything good.
    err = one_line_exit_2(capsys, main.main, train(tmp_path, "--version", "d", "--total_step", "10",
                                                   "--model_save_step", "1", "--log_step", "1", "--g_lr", "1e8",
                                                   "--d_lr", "1e8"))
    assert "a weight became NaN/inf by step 1; no checkpoint was saved yet" in err
    assert not list((tmp_path / "models").glob("*/*.pt"))


def test_pretrained_model_refuses_to_overwrite_later_checkpoints(tmp_path, capsys):
    main.main(train(tmp_path, "--version", "p", "--total_step", "20"))
    saved = tmp_path / "models" / "p" / "20.pt"
    before = saved.stat().st_mtime_ns
    err = one_line_exit_2(capsys, main.main, train(tmp_path, "--version", "p", "--total_step", "30",
                                                   "--pretrained_model", "10"))
    assert "has checkpoints after step 10 ([20])" in err and "would overwrite them" in err
    assert saved.stat().st_mtime_ns == before


def test_checkpoints_from_before_fully_masked_resume_as_they_trained(tmp_path, capsys):
    from run import configure
    main.main(train(tmp_path, "--version", "old", "--total_step", "10", "--span", "3"))
    path = tmp_path / "models" / "old" / "10.pt"
    ck = torch.load(path, weights_only=False)
    assert ck["config"]["fully_masked"] == "mean"
    del ck["config"]["fully_masked"]  # as saved before the flag existed
    torch.save(ck, path)
    cfg = configure(train(tmp_path, "--version", "old", "--total_step", "12", "--resume"))
    assert cfg.fully_masked == "skip" and cfg.d_span == 3


def test_a_pt_file_that_is_not_a_training_checkpoint_is_one_line(tmp_path, capsys):
    folder = tmp_path / "models" / "x"
    folder.mkdir(parents=True)
    for content in ({"G": {}}, [1, 2], {"G": {}, "D": {}, "config": {}, "step": 1}):  # last: no optimizer states
        torch.save(content, folder / "5.pt")
        err = one_line_exit_2(capsys, main.main, train(tmp_path, "--version", "x", "--resume"))
        assert "is not a training checkpoint of this package" in err


def test_resume_keeps_the_optimizer_settings_unless_new_ones_are_given(tmp_path):
    import json
    from trainer import Trainer
    from run import configure
    main.main(train(tmp_path, "--version", "lr", "--total_step", "10", "--g_lr", "2e-4", "--beta2", "0.95"))
    t = Trainer(configure(train(tmp_path, "--version", "lr", "--total_step", "12", "--resume", "--d_lr", "1e-4")))
    assert [g["lr"] for g in t.g_opt.param_groups] == [2e-4] and [g["lr"] for g in t.d_opt.param_groups] == [1e-4]
    assert all(g["betas"] == (0.0, 0.95) for opt in (t.g_opt, t.d_opt) for g in opt.param_groups)
    t.train()
    used = json.loads((tmp_path / "logs" / "lr" / "config_resumed_at_10.json").read_text())
    assert (used["g_lr"], used["d_lr"], used["beta2"]) == (2e-4, 1e-4, 0.95)
    assert [g["lr"] for g in t.d_opt.param_groups] == [1e-4]  # the Adam steps ran with it


def test_bench_bad_input_is_one_line(tmp_path, capsys):
    import bench
    cases = [["--spans", "x"]] + ([["--device", "cuda"]] if not torch.cuda.is_available() else [])
    for args in cases:
        assert one_line_exit_2(capsys, bench.main, args).startswith("bench.py: error:")


@pytest.mark.parametrize("args, message", [
    (["--g_lr", "nan"], "--g_lr must be a number >= 0, got nan"),
    (["--d_lr", "inf"], "--d_lr must be a number >= 0"),
    (["--version", ""], "--version ''"),
    (["--version", "../../x"], "--version '../../x'"),
    (["--version", "a/b"], "names folders under the output roots"),
])
def test_bad_numbers_and_run_names_are_one_line(tmp_path, capsys, args, message):
    err = one_line_exit_2(capsys, main.main, train(tmp_path, "--total_step", "2", *args))
    assert message in err
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob("*/x"))


def test_a_run_stopped_before_its_first_checkpoint_can_be_resumed(tmp_path, capsys):
    main.main(train(tmp_path, "--version", "early", "--total_step", "5", "--model_save_step", "100"))
    (tmp_path / "models" / "early" / "5.pt").unlink()  # as if it died before saving
    err = one_line_exit_2(capsys, main.main, train(tmp_path, "--version", "early", "--total_step", "5"))
    assert f"a config or logs in {tmp_path / 'logs' / 'early'}, no checkpoint yet" in err and "--resume" in err
    main.main(train(tmp_path, "--version", "early", "--total_step", "5", "--resume"))  # the one way forward works
    assert (tmp_path / "models" / "early" / "5.pt").exists()


def test_stale_half_written_files_of_a_killed_process_are_removed(tmp_path, capsys):
    import os
    folder = tmp_path / "models" / "k"
    main.main(train(tmp_path, "--version", "k", "--total_step", "5"))
    dead, alive = folder / ".10.pt.tmp999999999", folder / f".10.pt.tmp{os.getpid()}"
    dead.write_bytes(b"half"), alive.write_bytes(b"being written")
    capsys.readouterr()
    main.main(train(tmp_path, "--version", "k", "--total_step", "6", "--resume"))
    assert not dead.exists() and alive.exists()
    assert "removed 1 half-written file(s)" in capsys.readouterr().err


def test_a_span_that_leaves_a_layer_no_key_is_named_once_at_start(tmp_path, capsys):
    main.main(train(tmp_path, "--version", "s", "--total_step", "1", "--span", "3"))
    out = capsys.readouterr().out
    assert out.count("note: the span leaves no key for any query of D attn4 (") == 1
    assert "the mean of the map" in out
    main.main(train(tmp_path, "--version", "s10", "--total_step", "1", "--span", "10", "--fully_masked", "skip"))
    out = capsys.readouterr().out
    # 16x16 keeps keys for its corner queries at span 10; 8x8 and 4x4 keep none
    assert "of G attn8, D attn8, D attn4 (" in out and "nothing: x passes through" in out


def test_ctrl_c_during_start_up_exits_quietly(tmp_path, monkeypatch):
    import trainer
    from conftest import run_main

    def interrupted(cfg):
        raise KeyboardInterrupt  # what SIGINT raises before training installs its own handler

    monkeypatch.setattr(trainer, "build_dataset", interrupted)
    r = run_main(train(tmp_path, "--version", "i", "--total_step", "2"), cwd=tmp_path)
    assert r.returncode == 130 and r.stderr.strip() == "main.py: interrupted"
    # the run's lock went with it: the same command starts
    monkeypatch.undo()
    assert run_main(train(tmp_path, "--version", "i", "--total_step", "2"), cwd=tmp_path).returncode == 0
