"""No run's data lost (issue 20): metrics.csv rewritten atomically, the resume hint that
runs when pasted, one writer per run whatever the folders, write errors in one line,
config.json of the run that really ran, no FID step without its row, --train false into
a fresh folder."""
import csv
import errno
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch

import trainer
from conftest import REPO, TINY, out_dirs, random_fid_state_dict, run_main
from parameter import resume_command
from run import configure


def args_for(tmp, *extra):
    return [*TINY, *out_dirs(tmp), "--log_step", "1", "--sample_step", "100", "--model_save_step", "2", *extra]


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def one_line(r):
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    return r.stderr


def stop_at(monkeypatch, at):
    """Send this process SIGTERM during step `at` (the run saves and prints the hint)."""
    step = trainer.Trainer.train_step

    def signalled(self, batches):
        if self.step == at - 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return step(self, batches)

    monkeypatch.setattr(trainer.Trainer, "train_step", signalled)
    return step


# ---------------------------------------------------------------------------- metrics.csv
def test_a_write_error_while_resuming_keeps_every_row(tmp_path, monkeypatch):
    assert run_main(args_for(tmp_path, "--version", "m", "--total_step", "6"), cwd=tmp_path).returncode == 0
    metrics = tmp_path / "logs/m/metrics.csv"
    before = metrics.read_bytes()
    for step in (4, 6):
        (tmp_path / f"models/m/{step}.pt").unlink()  # resume from step 2: rows 3-6 are to go

    def disk_full(self, rowdicts):
        raise OSError(errno.ENOSPC, "No space left on device", str(metrics))

    monkeypatch.setattr(csv.DictWriter, "writerows", disk_full)
    err = one_line(run_main(args_for(tmp_path, "--version", "m", "--total_step", "6", "--resume"), cwd=tmp_path))
    assert "No space left on device" in err and str(metrics) in err
    assert metrics.read_bytes() == before  # today's truncate-then-write lost every row here


def test_broken_last_lines_are_dropped_with_a_warning(tmp_path):
    assert run_main(args_for(tmp_path, "--version", "b", "--total_step", "4"), cwd=tmp_path).returncode == 0
    metrics = tmp_path / "logs/b/metrics.csv"
    good = rows(metrics)
    with open(metrics, "ab") as f:  # a kill mid-line, then a crash's NUL-filled tail
        f.write(b"5,0.1,2\n" + b"\x00" * 64)
    r = run_main(args_for(tmp_path, "--version", "b", "--total_step", "6", "--resume"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "dropped 2 broken line(s)" in r.stderr
    after = rows(metrics)
    assert [int(x["step"]) for x in after] == [1, 2, 3, 4, 5, 6]
    assert after[:4] == good and "\x00" not in metrics.read_text()


def test_a_metrics_csv_of_another_network_is_refused_before_anything_is_touched(tmp_path):
    assert run_main(args_for(tmp_path, "--version", "c", "--total_step", "2"), cwd=tmp_path).returncode == 0
    metrics = tmp_path / "logs/c/metrics.csv"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0] + ",d_attn2_gamma"] + [x + ",0.5" for x in lines[1:]]) + "\n")
    before = {p: p.read_bytes() for p in (tmp_path / "logs/c").iterdir()}
    err = one_line(run_main(args_for(tmp_path, "--version", "c", "--total_step", "4", "--resume"), cwd=tmp_path))
    assert "columns of another network" in err
    assert {p: p.read_bytes() for p in (tmp_path / "logs/c").iterdir()} == before


# ---------------------------------------------------------------------------- resume hint
@pytest.mark.parametrize("start", [["--resume", "false"], ["--pretrained_model=2"], ["--resume", "true"]],
                         ids=["resume_false", "pretrained_model_eq", "resume_true"])
def test_the_resume_hint_is_built_from_the_config(tmp_path, start):
    from run import unlock_run
    first = start == ["--resume", "false"]  # a new run; the others continue one
    if first:
        cfg = configure(args_for(tmp_path, "--version", "h", "--total_step", "6", "--g_lr", "3e-4", *start))
        unlock_run()
    assert run_main(args_for(tmp_path, "--version", "h", "--total_step", "2"), cwd=tmp_path).returncode == 0
    if not first:
        cfg = configure(args_for(tmp_path, "--version", "h", "--total_step", "6", "--g_lr", "3e-4", *start))
        unlock_run()
    for world, launcher in ((1, ["python"]), (2, ["torchrun", "--nproc_per_node", "2"])):
        words = shlex.split(resume_command(cfg, world))
        assert words[:len(launcher)] == launcher
        assert os.path.samefile(words[len(launcher)], REPO / "main.py")
        again = configure(words[len(launcher) + 1:])
        unlock_run()
        for key in ("version", "total_step", "g_lr", "seed", "log_path", "model_save_path", "imsize", "batch_size"):
            assert getattr(again, key) == getattr(cfg, key), key
        assert again.resume and again.pretrained_model is None
        assert words.count("--resume") == 1 and not any(w.startswith("--pretrained_model") for w in words)


@pytest.mark.slow
def test_the_printed_resume_hint_runs_when_pasted(tmp_path, monkeypatch):
    """Started as `python path/to/main.py` from another folder with --pretrained_model=N, stopped by
    a signal: the printed command, pasted into a shell in the same folder, finishes the run."""
    run = tmp_path / "elsewhere"
    run.mkdir()
    assert run_main(args_for(run, "--version", "p", "--total_step", "2"), cwd=run).returncode == 0
    step = stop_at(monkeypatch, 3)
    r = run_main(args_for(run, "--version", "p", "--total_step", "6", "--pretrained_model=2"), cwd=run)
    monkeypatch.setattr(trainer.Trainer, "train_step", step)
    assert r.returncode == 0 and "stopped by signal at step 3" in r.stdout, r.stderr
    hint = r.stdout.strip().splitlines()[-1].strip()
    assert hint.startswith("python ")
    pasted = subprocess.run(["bash", "-c", hint.replace("python", shlex.quote(sys.executable), 1)], cwd=run,
                            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert pasted.returncode == 0, pasted.stderr
    assert (run / "models/p/6.pt").exists()
    assert [int(x["step"]) for x in rows(run / "logs/p/metrics.csv")] == [1, 2, 3, 4, 5, 6]


# ---------------------------------------------------------------------------- one writer
@pytest.mark.slow
def test_runs_sharing_the_checkpoint_folder_are_refused_whatever_their_log_path(tmp_path):
    first = args_for(tmp_path, "--version", "same")
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


# ---------------------------------------------------------------------------- write errors
def test_a_checkpoint_that_cannot_be_written_is_one_line_and_the_last_one_stays(tmp_path, monkeypatch):
    assert run_main(args_for(tmp_path, "--version", "w", "--total_step", "2"), cwd=tmp_path).returncode == 0
    last = tmp_path / "models/w/2.pt"
    before = last.read_bytes()

    def full(obj, f, *a, **k):  # what torch.save raises on ENOSPC: a RuntimeError, not an OSError
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1216 vs 1102")

    monkeypatch.setattr(torch, "save", full)
    err = one_line(run_main(args_for(tmp_path, "--version", "w", "--total_step", "4", "--resume"), cwd=tmp_path))
    assert "cannot write checkpoint" in err and "4.pt" in err and "2.pt is the last one saved" in err
    assert last.read_bytes() == before and sorted(p.name for p in last.parent.iterdir()) == ["2.pt"]


def test_a_config_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    real = trainer.atomic_open

    def no_config(path, *a, **k):
        if path.name.startswith("config"):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(trainer, "atomic_open", no_config)
    err = one_line(run_main(args_for(tmp_path, "--version", "ro", "--total_step", "2"), cwd=tmp_path))
    assert "Read-only file system" in err and "config.json" in err and "--resume" in err


# ---------------------------------------------------------------------------- config.json
def test_a_folder_holding_only_a_config_is_a_run_and_a_fresh_start_writes_its_own(tmp_path):
    log = tmp_path / "logs/cfg"
    log.mkdir(parents=True)
    (log / "config.json").write_text(json.dumps({"seed": 99, "g_span": 5, "d_span": 5}))  # an interrupted start
    err = one_line(run_main(args_for(tmp_path, "--version", "cfg", "--total_step", "2", "--span", "2"), cwd=tmp_path))
    assert "already exists" in err and "--resume" in err
    r = run_main(args_for(tmp_path, "--version", "cfg", "--total_step", "2", "--span", "2", "--resume"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    saved = json.loads((log / "config.json").read_text())
    assert (saved["seed"], saved["g_span"], saved["d_span"]) == (3, 2, 2)
    assert not list(log.glob("config_resumed_at_*"))


# ---------------------------------------------------------------------------- FID rows
@pytest.mark.slow
def test_a_fid_step_killed_before_its_row_gets_it_on_resume(tmp_path):
    weights = tmp_path / "w.pth"
    torch.save(random_fid_state_dict(), weights)
    fid_flags = ["--fid_step", "2", "--fid_samples", "8", "--fid_batch_size", "8", "--fid_ref_samples", "8",
                 "--fid_weights", weights]
    assert run_main(args_for(tmp_path, "--version", "f", "--total_step", "2", *fid_flags), cwd=tmp_path).returncode == 0
    fid_csv = tmp_path / "logs/f/fid.csv"
    logged = rows(fid_csv)
    assert [r["step"] for r in logged] == ["2"]
    fid_csv.write_text(fid_csv.read_text().splitlines()[0] + "\n")  # as if killed between checkpoint and FID
    r = run_main(args_for(tmp_path, "--version", "f", "--total_step", "2", "--resume", *fid_flags), cwd=tmp_path)
    assert r.returncode == 0, r.stderr  # a finished run too: its last step gets its row
    assert [(x["step"], x["fid"]) for x in rows(fid_csv)] == [("2", logged[0]["fid"])]
    fid_csv.write_text(fid_csv.read_text().splitlines()[0] + "\n")
    r = run_main(args_for(tmp_path, "--version", "f", "--total_step", "4", "--resume", *fid_flags), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    again = rows(fid_csv)
    assert [x["step"] for x in again] == ["2", "4"] and again[0]["fid"] == logged[0]["fid"]


def test_a_signal_during_fid_says_the_fid_is_finished_first(capsys):
    with trainer.StopSignals() as stop:
        with stop.busy("the FID of step 10"):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
        assert stop.received
    assert "finishing the FID of step 10 first, then saving a checkpoint" in capsys.readouterr().err


# ---------------------------------------------------------------------------- --train false
def test_sampling_again_replaces_the_earlier_samples(tmp_path):
    assert run_main(args_for(tmp_path, "--version", "s", "--total_step", "2"), cwd=tmp_path).returncode == 0
    sample = [*TINY, *out_dirs(tmp_path), "--version", "s", "--train", "false"]
    assert run_main([*sample, "--n_samples", "10"], cwd=tmp_path).returncode == 0
    r = run_main([*sample, "--n_samples", "4"], cwd=tmp_path)
    assert r.returncode == 0 and "replacing the earlier samples" in r.stdout
    folder = tmp_path / "samples/s/eval_2"
    assert sorted(p.name for p in folder.iterdir()) == [f"{i:05d}.png" for i in range(4)]
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(".")] == []


# ---------------------------------------------------------------------------- input checks
@pytest.mark.parametrize("seed", ["18446744073709551616", "-1"])
def test_a_seed_out_of_range_is_one_line(tmp_path, seed):
    err = one_line(run_main(args_for(tmp_path, "--version", "x", "--total_step", "2", "--seed", seed), cwd=tmp_path))
    assert "--seed" in err and "out of range" in err
