"""A run on disk: never overwritten, one writer per run whatever its folders, where a run starts
(the newest checkpoint that loads, a named step, step 0 after an interrupted start) and
which settings the start checkpoint brings."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import main
from conftest import (main_args, one_line, one_line_exit_2, out_dirs, read_csv, REPO, run_main, small_data, step_args, TINY,
                      train_args)
from run import configure


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
    assert "a file it does not write again stays: delete it" in r.stderr
    again = torch.load(tmp_path / "models/t/10.pt", weights_only=False)
    assert all(torch.equal(good["G"][k], again["G"][k]) for k in good["G"])  # resume is exact
    rows = read_csv(tmp_path / "logs/t/metrics.csv")
    assert [r["step"] for r in rows] == ["5", "10"]


# ---------------------------------------------------------------------------- one writer
@pytest.mark.slow
def test_runs_sharing_the_checkpoint_folder_are_refused_whatever_their_log_path(tmp_path):
    first = step_args(tmp_path, "--version", "same")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); "
                               "from run import configure; configure(sys.argv[2:]); "
                               "print('locked', flush=True); time.sleep(120)", str(REPO), *first],
                              cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        other = [*first, "--log_path", tmp_path / "other_logs"]  # the later --log_path wins
        err = one_line(run_main(other, cwd=tmp_path))
        assert f"run 'same' is being written by process {holder.pid}" in err
        assert not (tmp_path / "models/same").exists() and not (tmp_path / "other_logs/same").exists()
    finally:
        holder.kill()
        holder.wait()


# ---------------------------------------------------------------------------- config.json
@pytest.mark.slow
def test_a_folder_holding_only_a_config_is_a_run_and_a_fresh_start_writes_its_own(tmp_path):
    log = tmp_path / "logs/cfg"
    log.mkdir(parents=True)
    (log / "config.json").write_text(json.dumps({"seed": 99, "g_span": 5, "d_span": 5}))  # an interrupted start
    err = one_line(run_main(step_args(tmp_path, "--version", "cfg", "--total_step", "2", "--span", "2"), cwd=tmp_path))
    assert "already exists" in err and "--resume" in err
    r = run_main(step_args(tmp_path, "--version", "cfg", "--total_step", "2", "--span", "2", "--resume"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    saved = json.loads((log / "config.json").read_text())
    assert (saved["seed"], saved["g_span"], saved["d_span"]) == (3, 2, 2)
    assert not list(log.glob("config_resumed_at_*"))


@pytest.mark.slow
def test_a_start_refused_at_its_checks_is_no_run_and_the_corrected_command_starts_it(tmp_path, fid_weights):
    fid = ["--total_step", "2", "--fid_step", "2", "--fid_samples", "4", "--fid_batch_size", "8", "--fid_ref_samples",
           "4", "--version", "typo", "--fid_weights"]
    (tmp_path / "notes.pth").write_text("not weights")
    # refused by run.configure (no file), then by the trainer's FID monitor (no weights in the file)
    for wrong, message in (("no_such_weights.pth", "does not exist"), ("notes.pth", "is not an FID Inception")):
        err = one_line(run_main(step_args(tmp_path, *fid, tmp_path / wrong), cwd=tmp_path))
        assert message in err
        assert not (tmp_path / "logs/typo/config.json").exists()
    r = run_main(step_args(tmp_path, *fid, fid_weights), cwd=tmp_path)  # the path fixed, nothing else
    assert r.returncode == 0, r.stderr
    assert [row["step"] for row in read_csv(tmp_path / "logs/typo/fid.csv")] == ["2"]


@pytest.mark.slow
def test_pretrained_model_refuses_to_overwrite_later_checkpoints(tmp_path, capsys):
    main.main(main_args(tmp_path, "--version", "p", "--total_step", "20"))
    saved = tmp_path / "models" / "p" / "20.pt"
    before = saved.stat().st_mtime_ns
    err = one_line_exit_2(capsys, main.main, main_args(tmp_path, "--version", "p", "--total_step", "30",
                                                   "--pretrained_model", "10"))
    assert "has checkpoints after step 10 ([20])" in err and "would overwrite them" in err
    assert saved.stat().st_mtime_ns == before


@pytest.mark.slow
def test_checkpoints_keep_the_fully_masked_mode_they_trained_with(tmp_path, capsys):
    from run import unlock_run
    main.main(main_args(tmp_path, "--version", "old", "--total_step", "10", "--span", "3"))
    path = tmp_path / "models" / "old" / "10.pt"
    ck = torch.load(path, weights_only=False)
    # a new run records the new default, in its checkpoint and its config.json
    assert (ck["config"]["fully_masked"], ck["config"]["original_attention"]) == ("seed", False)
    saved = json.loads((tmp_path / "logs" / "old" / "config.json").read_text())
    assert (saved["fully_masked"], saved["original_attention"]) == ("seed", False)
    # saved before "seed" was the default: "mean" recorded, no original_attention key
    ck["config"]["fully_masked"] = "mean"
    del ck["config"]["original_attention"]
    torch.save(ck, path)
    cfg = configure(main_args(tmp_path, "--version", "old", "--total_step", "12", "--resume"))
    assert (cfg.fully_masked, cfg.original_attention, cfg.d_span) == ("mean", False, 3)
    unlock_run()
    del ck["config"]["fully_masked"]  # as saved before the flag existed: those runs attended to nothing
    torch.save(ck, path)
    cfg = configure(main_args(tmp_path, "--version", "old", "--total_step", "12", "--resume"))
    assert cfg.fully_masked == "skip" and cfg.d_span == 3


@pytest.mark.slow
def test_the_settings_note_appears_only_when_a_given_flag_differs_from_the_checkpoint(tmp_path, capsys):
    from run import unlock_run
    main.main(main_args(tmp_path, "--version", "n", "--total_step", "10", "--span", "3"))
    capsys.readouterr()
    note = "note: using the checkpoint's settings"
    # main_args gives --imsize, --z_dim, ... again, all as saved: nothing differs, no note
    configure(main_args(tmp_path, "--version", "n", "--total_step", "12", "--resume"))
    assert note not in capsys.readouterr().out
    unlock_run()
    configure(main_args(tmp_path, "--version", "n", "--total_step", "12", "--resume", "--span", "3"))
    assert note not in capsys.readouterr().out
    unlock_run()
    cfg = configure(main_args(tmp_path, "--version", "n", "--total_step", "12", "--resume", "--span", "0"))
    out = capsys.readouterr().out
    assert f"{note} g_span=3, d_span=3 (flags given differ)" in out and (cfg.g_span, cfg.d_span) == (3, 3)


@pytest.mark.slow
def test_resume_keeps_the_optimizer_settings_unless_new_ones_are_given(tmp_path):
    import json
    from trainer import Trainer
    from run import configure
    main.main(main_args(tmp_path, "--version", "lr", "--total_step", "10", "--g_lr", "2e-4", "--beta2", "0.95"))
    t = Trainer(configure(main_args(tmp_path, "--version", "lr", "--total_step", "12", "--resume", "--d_lr", "1e-4")))
    assert [g["lr"] for g in t.g_opt.param_groups] == [2e-4] and [g["lr"] for g in t.d_opt.param_groups] == [1e-4]
    assert all(g["betas"] == (0.0, 0.95) for opt in (t.g_opt, t.d_opt) for g in opt.param_groups)
    t.train()
    used = json.loads((tmp_path / "logs" / "lr" / "config_resumed_at_10.json").read_text())
    assert (used["g_lr"], used["d_lr"], used["beta2"]) == (2e-4, 1e-4, 0.95)
    assert [g["lr"] for g in t.d_opt.param_groups] == [1e-4]  # the Adam steps ran with it


@pytest.mark.slow
def test_a_resume_on_changed_files_of_as_many_images_says_so(tmp_path, capsys):
    data = tmp_path / "data" / "emoji64.npz"
    data.parent.mkdir()
    np.savez(data, images=np.zeros((8, 64, 64, 3), np.uint8))
    run = [*TINY, *out_dirs(tmp_path), "--image_path", str(data.parent), "--version", "c", "--log_step", "1",
           "--sample_step", "100"]
    main.main([*run, "--total_step", "2"])
    np.savez(data, images=np.full((8, 64, 64, 3), 9, np.uint8))  # the array replaced: the same count
    os.utime(data, ns=(data.stat().st_atime_ns, data.stat().st_mtime_ns + 5_000_000_000))  # whatever the clock
    capsys.readouterr()
    main.main([*run, "--total_step", "3", "--resume"])
    assert "warning: the training set's files changed since the run's last start (a file changed, added or " \
           "removed, by name, size and mtime, or another --image_path): it trained on the earlier ones until step 2" \
        in capsys.readouterr().err
    main.main([*run, "--total_step", "4", "--resume"])  # the same files as at its last start: nothing to say
    assert "warning" not in capsys.readouterr().err


@pytest.mark.slow
def test_a_bare_resume_keeps_every_setting_of_the_run_and_sampling_draws_as_it_did(tmp_path, capsys,
                                                                                    monkeypatch):
    from run import unlock_run
    ran = {"batch_size": 4, "d_iters": 2, "lambda_gp": 5.0, "fid_samples": 16, "metrics": ["fid", "is", "kid"],
           "fid_g_mode": "eval", "attn_impl": "dense", "g_lr": 2e-4, "total_step": 4, "channels_last": True}
    main.main(main_args(tmp_path, "--version", "k", "--total_step", "4", "--batch_size", "4", "--d_iters", "2",
                        "--lambda_gp", "5", "--fid_samples", "16", "--metrics", "kid,is,fid", "--fid_g_mode", "eval",
                        "--attn_impl", "dense", "--g_lr", "2e-4", "--channels_last"))
    bare = [*out_dirs(tmp_path), "--version", "k", "--device", "cpu"]  # no data, sizes or FID flags: the run's
    cfg = configure([*bare, "--resume", "--d_lr", "1e-4"])
    unlock_run()
    assert {k: getattr(cfg, k) for k in ran} == ran and cfg.d_lr == 1e-4  # given: the new value
    assert (cfg.image_path, cfg.dataset, cfg.num_workers) == (small_data()[-1], "emoji", 0)
    # ... and so on: what the run's first command gave, also past a resume that did not repeat it
    # (which here trains on other images: said, not refused)
    (tmp_path / "other").mkdir()
    np.savez(tmp_path / "other" / "emoji64.npz", images=np.zeros((6, 64, 64, 3), np.uint8))
    capsys.readouterr()
    main.main([*bare, "--resume", "--total_step", "6", "--image_path", str(tmp_path / "other")])
    assert "warning: the training set has 6 images; the run trained on 64 until step 4" in capsys.readouterr().err
    cfg = configure([*bare, "--resume"])
    unlock_run()
    assert {k: getattr(cfg, k) for k in ran} == {**ran, "total_step": 6}
    # sampling draws in the run's batches and BatchNorm mode, as its FID did
    cfg = configure([*bare, "--train", "false", "--n_samples", "3"])
    assert (cfg.batch_size, cfg.fid_g_mode) == (4, "eval")
    # under torchrun the batch that must split over the processes is the run's, given or inherited
    from utils import UserError
    monkeypatch.setenv("WORLD_SIZE", "3")
    for argv, size in (([*bare, "--resume"], 4), ([*bare, "--resume", "--batch_size", "6"], None),
                       ([*bare, "--resume", "--batch_size", "8"], 8), (main_args(tmp_path, "--version", "k3"), 8)):
        if size is None:
            assert configure(argv).batch_size == 6
        else:
            with pytest.raises(UserError, match=f"--batch_size {size} must divide evenly over the 3 torchrun"):
                configure(argv)
        unlock_run()
    monkeypatch.delenv("WORLD_SIZE")
    # a flag given now is checked with the run's other settings: its IS needs 10 images
    with pytest.raises(UserError, match="--fid_samples 4 is too few: FID needs >= 2 images, IS >= 10"):
        configure([*bare, "--resume", "--fid_samples", "4"])
    unlock_run()
    # what the run's command gave that cannot run here (a CUDA graph on a CPU), or that this
    # version no longer offers, is left to the device / the default
    path = tmp_path / "models" / "k" / "6.pt"
    ck = torch.load(path, weights_only=True)
    ck["config"].update(cuda_graph=True, compile="max-autotune", given=ck["config"]["given"] + ["cuda_graph", "compile"])
    torch.save(ck, path)
    capsys.readouterr()
    for extra in (["--resume"], ["--train", "false", "--n_samples", "3"]):
        cfg = configure([*bare, *extra])
        unlock_run()
        assert (cfg.cuda_graph, cfg.compile) == (False, "none")
    assert "warning: the run's --compile max-autotune is no longer a choice" in capsys.readouterr().err
    # FID weights the run's command named, not on this machine: omitting the flag cannot help
    ck["config"].update(compile="none", fid_step=2, fid_weights=str(tmp_path / "moved.pth"),
                        given=ck["config"]["given"] + ["fid_step", "fid_weights"])
    torch.save(ck, path)
    with pytest.raises(UserError, match=f"the run measured FID with --fid_weights {tmp_path / 'moved.pth'}, which "
                                        f"is not here; give --fid_weights PATH of the same weights"):
        configure([*bare, "--resume"])
    unlock_run()
    configure([*bare, "--resume", "--fid_step", "0"])  # the way on without FID
    unlock_run()


@pytest.mark.slow
def test_a_run_stopped_before_its_first_checkpoint_can_be_resumed(tmp_path, capsys):
    main.main(main_args(tmp_path, "--version", "early", "--total_step", "5", "--model_save_step", "100"))
    (tmp_path / "models" / "early" / "5.pt").unlink()  # as if it died before saving
    err = one_line_exit_2(capsys, main.main, main_args(tmp_path, "--version", "early", "--total_step", "5"))
    assert f"a config or logs in {tmp_path / 'logs' / 'early'}, no checkpoint yet" in err and "--resume" in err
    main.main(main_args(tmp_path, "--version", "early", "--total_step", "5", "--resume"))  # the one way forward works
    assert (tmp_path / "models" / "early" / "5.pt").exists()
    # ... and a bare --resume starts it over with the flags given and, for the rest, the
    # settings of its config.json, not the parser's defaults
    main.main(main_args(tmp_path, "--version", "e2", "--total_step", "3", "--model_save_step", "100",
                        "--batch_size", "4", "--g_lr", "2e-4", "--seed", "7"))
    (tmp_path / "models" / "e2" / "3.pt").unlink()
    main.main([*out_dirs(tmp_path), "--version", "e2", "--resume", "--device", "cpu", "--seed", "8"])
    again = json.loads((tmp_path / "logs" / "e2" / "config.json").read_text())
    assert (again["batch_size"], again["g_lr"], again["seed"], again["total_step"]) == (4, 2e-4, 8, 3)
    assert (tmp_path / "models" / "e2" / "3.pt").exists()


# ---------------------------------------------------------------------------- --config FILE
def from_config(tmp_path, saved, *argv):
    """run.with_config of `saved` written as a config.json, under argv (parsed, not run)."""
    from parameter import parse_flags
    from run import with_config
    (tmp_path / "config.json").write_text(json.dumps(saved))
    argv = ["--config", str(tmp_path / "config.json"), *argv]
    return with_config(parse_flags(argv), argv)


SAVED = {"span": 3, "g_span": 3, "d_span": 3, "seed": 5, "g_lr": 0.0002, "imsize": 32, "diffaug": "", "metrics": ["fid", "kid"],
         "use_tensorboard": True, "fully_masked": "mean", "version": "old", "log_path": "/old/logs", "resume": True,
         "device": "NVIDIA H100 80GB HBM3", "amp": "bf16", "cuda_graph": True, "fid_step": 10000, "compile": "none",
         "given": ["compile"], "git_commit": "abc", "dataset_size": 1432}


def test_config_gives_its_settings_under_the_flags_given(tmp_path):
    f = from_config(tmp_path, SAVED)
    assert (f.g_span, f.d_span, f.seed, f.g_lr, f.imsize, f.diffaug, f.metrics, f.use_tensorboard) == \
        (3, 3, 5, 0.0002, 32, "", ["fid", "kid"], True)
    # never its name, output roots, start or device; device-chosen values only where its command line gave them
    assert (f.version, f.log_path, f.resume, f.device) == ("sagan_emoji_span3_mean_nodiffaug_32px", "./logs", False, "auto")
    assert (f.amp, f.cuda_graph, f.fid_step, f.compile) == ("auto", "auto", None, "none")
    f = from_config(tmp_path, SAVED, "--g_lr", "0.001", "--span", "1", "--seed", "0,1")
    assert (f.g_lr, f.g_span, f.d_span, f.sweep[0][:3]) == (0.001, 1, 1, (1, 1, 0))
    f = from_config(tmp_path, {**SAVED, "span": None, "g_span": 1, "d_span": 2})  # G and D apart
    assert (f.g_span, f.d_span) == (1, 2)
    f = from_config(tmp_path, {**SAVED, "span": None, "g_span": 1, "d_span": 2}, "--g_span", "4")
    assert (f.g_span, f.d_span) == (4, 2)
    f = from_config(tmp_path, {**SAVED, "span": None, "g_span": 1, "d_span": 2}, "--span", "2")
    assert (f.g_span, f.d_span) == (2, 2)
    old = {k: v for k, v in SAVED.items() if k not in ("fully_masked", "diffaug")}  # saved before those flags
    f = from_config(tmp_path, old)
    assert (f.fully_masked, f.diffaug) == ("skip", "")  # what such runs trained with (checkpoint.migrate_config)


@pytest.mark.parametrize("content, message", [
    (None, "no such file"), ("{not json", "cannot read it as JSON"), ("[1, 2]", "holds none of main.py's settings"),
    ('{"git_commit": "abc"}', "holds none of main.py's settings"),
    ('{"imsize": "big"}', "argument --imsize: invalid int value: 'big'"), ('{"imsize": 48}', "--imsize 48 is not supported"),
    ('{"status": "finished", "step": 6, "total_step": 6}', "no imsize: no run's config.json")])  # a run's status.json
def test_a_bad_or_missing_config_file_is_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "config.json"
    if content is not None:
        path.write_text(content)
    err = one_line_exit_2(capsys, main.main, ["--config", path, "--total_step", "2"])
    assert f"--config {path}: " in err and message in err, err


@pytest.mark.parametrize("start", [["--resume"], ["--pretrained_model", "2"], ["--train", "false"]])
def test_config_with_a_start_from_a_checkpoint_is_one_line(tmp_path, capsys, start):
    # --resume with another run's config.json silently trained on with that run's learning rates
    path = tmp_path / "config.json"
    path.write_text(json.dumps(SAVED))
    err = one_line_exit_2(capsys, main.main, ["--config", path, "--version", "a", *start])
    assert f"--config starts a new run from a saved config, and {' '.join(start[:1])}" in err
    assert "drop one of them" in err and not list(tmp_path.rglob("*.pt"))


def test_image_path_without_dataset_folder_is_refused_and_leaves_no_run(tmp_path):
    # the likeliest first mistake: --image_path of one's own images without --dataset folder;
    # --dataset emoji (the default) would have trained the whole run on the bundled emoji
    (tmp_path / "mine").mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "mine" / "a.png")
    err = one_line(run_main([*TINY, *out_dirs(tmp_path), "--image_path", tmp_path / "mine", "--total_step", "1"],
                            cwd=tmp_path))
    assert f"{tmp_path / 'mine'} holds none: add --dataset folder" in err
    assert not list(tmp_path.rglob("config.json"))


@pytest.mark.slow
def test_a_run_from_another_runs_config_differs_only_in_the_flag_given(tmp_path):
    tiny = [*TINY, *small_data()]  # and the default output roots, in tmp_path
    assert run_main([*tiny, "--total_step", "2", "--log_step", "1", "--version", "a", "--g_lr", "3e-4"],
                    cwd=tmp_path).returncode == 0
    r = run_main(["--config", "logs/a/config.json", "--d_lr", "1e-4", "--version", "b"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    a, b = (json.loads((tmp_path / f"logs/{v}/config.json").read_text()) for v in "ab")
    assert sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k)) == ["config", "d_lr", "given", "version"]
    assert (b["d_lr"], b["g_lr"], b["config"]) == (1e-4, 3e-4, "logs/a/config.json")
    assert [r["step"] for r in read_csv(tmp_path / "logs/b/metrics.csv")] == ["1", "2"]
    # a name taken from the settings that is an existing run's: refused, that run untouched
    assert run_main([*tiny, "--total_step", "2"], cwd=tmp_path).returncode == 0
    before = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/sagan_emoji_span0_32px/*")}
    err = one_line(run_main(["--config", "logs/sagan_emoji_span0_32px/config.json", "--d_lr", "1e-4"], cwd=tmp_path))
    assert "run 'sagan_emoji_span0_32px' already exists" in err and "--version" in err
    assert "--resume" not in err  # which --config refuses: the line offered it, and the next command failed
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/sagan_emoji_span0_32px/*")} == before
