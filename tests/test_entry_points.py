"""Every entry point answers a user mistake with one line and exit code 2, never a
traceback (issue 11). In-process through main.main / fid.main; the subprocess cases in
test_training.py and test_fid.py keep the no-traceback guarantee of the real scripts."""
import numpy as np
import pytest
import torch

import fid
import main
from conftest import TINY, out_dirs


def one_line_exit_2(capsys, entry, argv):
    with pytest.raises(SystemExit) as e:
        entry(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


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
    fid.save_stats(tmp_path / "s.npz", np.zeros(3), np.eye(3))
    cases = [([tmp_path / "bad.npz", tmp_path / "s.npz"], "bad.npz"),
             ([tmp_path / "bad.pt", tmp_path / "s.npz"], "cannot read checkpoint"),
             ([tmp_path / "other.pt", tmp_path / "s.npz"], "not a checkpoint of this package"),
             ([tmp_path / "floats.npz", tmp_path / "s.npz"], "expected a uint8 image array"),
             ([tmp_path / "missing", tmp_path / "s.npz"], "does not exist"),
             (["compare", tmp_path / "nothing_here"], "has no fid.csv"),
             ([tmp_path / "s.npz", tmp_path / "s.npz", "--metrics", "fid,ssim"], "choose a comma list")]
    for argv, message in cases:
        err = one_line_exit_2(capsys, fid.main, [*map(str, argv), "--fid_weights", str(tmp_path / "s.npz")]
                              if argv[0] != "compare" else list(map(str, argv)))
        assert message in err and err.startswith("fid.py: error:"), err


def test_nan_loss_stops_the_run_naming_the_last_good_checkpoint(tmp_path, capsys):
    # A learning rate this large sends the weights to inf at the second step: the run must
    # stop at the next log step, with one line naming the checkpoint saved before.
    err = one_line_exit_2(capsys, main.main, train(tmp_path, "--version", "n", "--total_step", "400",
                                                   "--model_save_step", "1", "--log_step", "1", "--g_lr", "1e8",
                                                   "--d_lr", "1e8"))
    assert "loss became NaN/inf by step" in err and "the last good checkpoint is" in err
    step = int(err.split("by step ")[1].split(";")[0])
    assert f"{step - 1}.pt" in err and (tmp_path / "models" / "n" / f"{step - 1}.pt").exists()


def test_pretrained_model_refuses_to_overwrite_later_checkpoints(tmp_path, capsys):
    main.main(train(tmp_path, "--version", "p", "--total_step", "20"))
    saved = tmp_path / "models" / "p" / "20.pt"
    before = saved.stat().st_mtime_ns
    err = one_line_exit_2(capsys, main.main, train(tmp_path, "--version", "p", "--total_step", "30",
                                                   "--pretrained_model", "10"))
    assert "has checkpoints after step 10 ([20])" in err and "would overwrite them" in err
    assert saved.stat().st_mtime_ns == before
