"""Every entry point answers a user mistake with one line and exit code 2, never a
traceback (issue 11). In-process through main.main / fid.main; the subprocess cases in
test_trainer.py and test_fid.py keep the no-traceback guarantee of the real scripts."""
import numpy as np
import pytest
import torch

import metrics
import fid
import main
from conftest import main_args, one_line_exit_2, out_dirs


@pytest.mark.parametrize("args, message", [
    (["--dataset", "celeb", "--image_path", "nowhere"], "kaggle.com/datasets/jessicali9530/celeba-dataset"),
    (["--dataset", "celeb", "--image_path", "x/CelebA"], "is the folder that holds CelebA/; pass --image_path x"),
    (["--dataset", "lsun", "--image_path", "LSUN"], "is the folder that holds LSUN/; pass --image_path ."),
    (["--dataset", "lsun", "--image_path", "nowhere"], "kaggle.com"),
    (["--dataset", "folder", "--image_path", "nowhere"], "there is no --image_path nowhere"),
    (["--spna", "3"], "unknown argument --spna; did you mean --span?"),
    (["--imsize", "48"], "--imsize 48 is not supported; use 32, 64 or 128"),
    (["--span", "-1"], "argument --span: expected a span (an integer >= 0, 0 = plain SAGAN, or none"),
    (["--batch_size", "0"], "--batch_size must be >= 1"),
    (["--adv_loss", "wgan"], "invalid choice"),
    (["--resume"], "no checkpoint"),
    (["--train", "false"], "no checkpoint"),
    (["--batch_size", "5000"], "images, fewer than --batch_size 5000: give --batch_size 1432 or less, or more images"),
    (["--fid_samples", "1"], "--fid_samples 1 is too few"),
    (["--metrics", "fid,is", "--fid_samples", "5"], "IS >= 10"),
    (["--metrics", "fid,ssim"], "--metrics 'fid,ssim': choose a comma list of fid,is,kid,prdc"),
    (["--metrics", "fid,prdc", "--fid_samples", "5"], "--metrics prdc needs more than its 5 nearest neighbours"),
    (["--metrics", "prdc", "--fid_ref_samples", "4"], "raise --fid_samples (10000) and --fid_ref_samples (4)"),
    (["--beta2", "1.5"], "--beta2 must be in [0, 1)"),
    (["--g_conv_dim", "2"], "--g_conv_dim must be >= 8"),
    (["--device", "cpu", "--cuda_graph"], "--cuda_graph needs a CUDA device"),
])
def test_main_bad_input_is_one_line(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    err = one_line_exit_2(capsys, main.main, [*out_dirs(tmp_path), "--total_step", "2", "--device", "cpu", *args])
    assert message in err


def test_pt_files_not_named_by_their_step_are_named_in_the_no_checkpoint_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "flat").mkdir(parents=True)
    (tmp_path / "models" / "flat" / "my_ckpt.pt").write_bytes(b"")
    for extra in (["--train", "false"], ["--resume"]):
        err = one_line_exit_2(capsys, main.main, [*out_dirs(tmp_path), "--version", "flat", "--device", "cpu", *extra])
        assert "no checkpoint in" in err and "(main.py takes <step>.pt files, as it writes them, not my_ckpt.pt: " \
            "rename one to its step, e.g. 1000.pt)" in err
    (tmp_path / "models" / "flat" / "my_ckpt.pt").unlink()  # an empty folder: the line as before
    assert "takes <step>.pt" not in one_line_exit_2(capsys, main.main, [*out_dirs(tmp_path), "--version", "flat",
                                                                        "--device", "cpu", "--train", "false"])


def test_main_bad_checkpoints_are_one_line(tmp_path, capsys):
    folder = tmp_path / "models" / "c"
    folder.mkdir(parents=True)
    (folder / "10.pt").write_bytes(b"truncated")
    for extra in (["--resume"], ["--train", "false"], ["--pretrained_model", "10"]):
        err = one_line_exit_2(capsys, main.main, main_args(tmp_path, "--version", "c", *extra))
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
    (tmp_path / "models").mkdir()  # a run's checkpoint folder given where its newest checkpoint was meant
    for step in (2, 10):
        (tmp_path / "models" / f"{step}.pt").write_bytes(b"")
    cases = [([tmp_path / "models", tmp_path / "s.npz"],
              f"a checkpoint is given as its file, e.g. {tmp_path / 'models' / '10.pt'}"),
             ([tmp_path / "nan.npz", tmp_path / "s.npz"], "hold NaN or inf"),
             ([tmp_path / "s.npz", tmp_path / "skew.npz"], "sigma is not symmetric"),
             ([tmp_path / "s.npz", tmp_path / "neg.npz"], "negative eigenvalues"),
             (["--save-stats", tmp_path / "s.npz", tmp_path / "a_folder"], "is a folder; give a file name"),
             (["--save-stats", tmp_path / "s.npz", tmp_path / "s.npz" / "x.npz"], "is a file"),([tmp_path / "bad.npz", tmp_path / "s.npz"], "bad.npz"),
             ([tmp_path / "bad.pt", tmp_path / "s.npz"], "cannot read checkpoint"),
             ([tmp_path / "other.pt", tmp_path / "s.npz"], "not a training checkpoint of this package"),
             ([tmp_path / "floats.npz", tmp_path / "s.npz"], "expected a uint8 image array"),
             ([tmp_path / "missing", tmp_path / "s.npz"], "does not exist"),
             (["compare", tmp_path / "nothing_here"], "nothing_here does not exist; pass <log_path>/<version>"),
             (["compare", tmp_path / "a_folder"], "has no fid.csv and no config.json"),
             (["compare", tmp_path / "s.npz"], "s.npz is a file; pass the folder of its run"),
             ([tmp_path / "s.npz", tmp_path / "s.npz", "--metrics", "fid,ssim"], "choose a comma list")]
    for argv, message in cases:
        err = one_line_exit_2(capsys, fid.main, [*map(str, argv), "--fid_weights", str(tmp_path / "s.npz")]
                              if argv[0] != "compare" else list(map(str, argv)))
        assert message in err and err.startswith("fid.py: error:"), err


def test_a_pt_file_that_is_not_a_training_checkpoint_is_one_line(tmp_path, capsys):
    folder = tmp_path / "models" / "x"
    folder.mkdir(parents=True)
    for content in ({"G": {}}, [1, 2], {"G": {}, "D": {}, "config": {}, "step": 1}):  # last: no optimizer states
        torch.save(content, folder / "5.pt")
        err = one_line_exit_2(capsys, main.main, main_args(tmp_path, "--version", "x", "--resume"))
        assert "is not a training checkpoint of this package" in err


@pytest.mark.parametrize("args, message", [
    (["--g_lr", "nan"], "--g_lr must be a number >= 0, got nan"),
    (["--d_lr", "inf"], "--d_lr must be a number >= 0"),
    (["--version", ""], "--version ''"),
    (["--version", "../../x"], "--version '../../x'"),
    (["--version", "a/b"], "names folders under the output roots"),
    # its log folder would be the FID statistics every run shares (a later "delete its folders" loses them)
    (["--fid_ref_samples", "1"], "--fid_ref_samples must be a count >= 2 or all, got 1"),
    (["--version", "fid_stats"], "--version fid_stats is the FID statistics folder under --log_path"),
])
def test_bad_numbers_and_run_names_are_one_line(tmp_path, capsys, args, message):
    err = one_line_exit_2(capsys, main.main, main_args(tmp_path, "--total_step", "2", *args))
    assert message in err
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob("*/x"))


@pytest.mark.slow
def test_a_span_that_leaves_a_layer_no_key_is_named_once_at_start(tmp_path, capsys):
    main.main(main_args(tmp_path, "--version", "s", "--total_step", "1", "--span", "3"))
    out = capsys.readouterr().out
    assert out.count("note: the span leaves no key for any query of D attn4 (") == 1
    assert "the original code's float32 arithmetic" in out
    main.main(main_args(tmp_path, "--version", "s10", "--total_step", "1", "--span", "10", "--fully_masked", "skip"))
    out = capsys.readouterr().out
    # 16x16 keeps keys for its corner queries at span 10; 8x8 and 4x4 keep none
    assert "of G attn8, D attn8, D attn4 (" in out and "nothing: x passes through" in out


@pytest.mark.slow
def test_ctrl_c_during_start_up_exits_quietly(tmp_path, monkeypatch):
    import trainer
    from conftest import run_main

    def interrupted(cfg):
        raise KeyboardInterrupt  # what SIGINT raises before training installs its own handler

    monkeypatch.setattr(trainer, "training_set", interrupted)
    r = run_main(main_args(tmp_path, "--version", "i", "--total_step", "2"), cwd=tmp_path)
    assert r.returncode == 130 and r.stderr.strip() == "main.py: interrupted"
    # the run's lock went with it: the same command starts
    monkeypatch.undo()
    assert run_main(main_args(tmp_path, "--version", "i", "--total_step", "2"), cwd=tmp_path).returncode == 0
