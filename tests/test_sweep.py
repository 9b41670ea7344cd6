"""One command for the span experiment: `--span` / `--seed` lists run a grid of ordinary
runs; the same command again continues unfinished cells and skips finished ones."""
import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY, one_line, out_dirs, read_csv, run_main, small_data
from run import configure
from sweep import cell_argv, check_start
from utils import UserError

SWEEP = [a for a in TINY if a not in ("--seed", "3")]


def fid_sweep_args(tmp_path, fid_weights, span, seed, total_step, log_step, fid_step):
    """A tiny sweep on the small emoji set, two cells at a time, samples and checkpoints every
    2 steps, FID of 4 images against 4."""
    return [*SWEEP, *out_dirs(tmp_path), *small_data(), "--span", span, "--seed", seed, "--total_step", total_step,
            "--log_step", log_step, "--fid_step", fid_step, "--sample_step", "2", "--model_save_step", "2",
            "--fid_samples", "4", "--fid_batch_size", "8", "--fid_ref_samples", "4", "--fid_weights", fid_weights,
            "--jobs", "2"]


def test_cells_are_named_by_span_and_seed_and_keep_every_other_flag():
    cfg = configure([*SWEEP, "--span", "0,3", "--seed", "1,2"])
    assert cfg.sweep == [(0, 0, 1, "sagan_emoji_span0_32px_seed1"), (0, 0, 2, "sagan_emoji_span0_32px_seed2"),
                         (3, 3, 1, "sagan_emoji_span3_32px_seed1"), (3, 3, 2, "sagan_emoji_span3_32px_seed2")]
    assert configure([*SWEEP, "--span", "2,4", "--version", "x"]).sweep == [(2, 2, None, "x_span2"),
                                                                                 (4, 4, None, "x_span4")]
    assert configure([*SWEEP, "--span", "1", "--seed", "0,1"]).sweep[1] == (1, 1, 1, "sagan_emoji_span1_32px_seed1")
    assert configure([*SWEEP, "--span", "3"]).sweep is None
    argv = ["--span=0,3", "--d_lr", "1e-4", "--seed", "1,2", "--jobs", "2", "--version", "v"]
    assert cell_argv(argv, 3, 3, 2, "v_span3_seed2", resume=True, total_step=500) == [
        "--d_lr", "1e-4", "--span", "3", "--version", "v_span3_seed2", "--seed", "2", "--total_step", "500", "--resume"]


def test_no_attention_and_one_network_sweeps_form_the_documented_cells():
    none = -1  # choices.NO_ATTENTION, as configs hold it
    cfg = configure([*SWEEP, "--span", "none,0,3", "--seed", "0,1,2"])
    assert [c[:3] for c in cfg.sweep] == [(g, g, s) for g in (none, 0, 3) for s in (0, 1, 2)]
    assert cfg.sweep[0][3] == "sagan_emoji_spannone_32px_seed0" and len({c[3] for c in cfg.sweep}) == 9
    # --g_span / --d_span lists: their product, the one not given following --span
    assert [c[:2] for c in configure([*SWEEP, "--g_span", "none,0,3", "--d_span", "3"]).sweep] == \
        [(none, 3), (0, 3), (3, 3)]
    cells = configure([*SWEEP, "--span", "0,3", "--d_span", "none", "--version", "v"]).sweep
    assert [c[:2] for c in cells] == [(0, none), (3, none)] and [c[3] for c in cells] == ["v_g0_dnone", "v_g3_dnone"]
    assert [c[:2] for c in configure([*SWEEP, "--g_span", "0,2", "--d_span", "1,4"]).sweep] == \
        [(0, 1), (0, 4), (2, 1), (2, 4)]
    # one cell: a plain run, G and D spans as plain values; "none" is never the None of "G and D differ"
    cfg = configure([*SWEEP, "--g_span", "none", "--d_span", "2"])
    assert (cfg.sweep, cfg.g_span, cfg.d_span, cfg.span) == (None, none, 2, None)
    assert cfg.version == "sagan_emoji_gnone_d2_32px"
    cfg = configure([*SWEEP, "--span", "none"])
    assert (cfg.g_span, cfg.d_span, cfg.span, cfg.version) == (none, none, none, "sagan_emoji_spannone_32px")
    # a cell's command line names its spans as the user would
    assert cell_argv(["--g_span", "none,0", "--d_span=3"], none, 3, 1, "c", resume=False, total_step=9) == [
        "--g_span", "none", "--d_span", "3", "--version", "c", "--seed", "1"]
    assert cell_argv(["--span", "none,0"], none, none, None, "c", False, 9) == ["--span", "none", "--version", "c"]


@pytest.mark.parametrize("args, message", [
    (["--jobs", "2"], "--jobs runs the cells of a sweep at once"),
    (["--span", "0,3", "--g_span", "1", "--d_span", "1,2"], "--span would go unused; drop --span"),
    (["--span", "0,-1"], "expected a span (an integer >= 0, 0 = plain SAGAN, or none"),
    (["--g_span", "none,nonee"], "argument --g_span: expected a span"),
    (["--d_span", "2,2"], "repeats a value"),
    (["--span", "0,3", "--resume"], "run the same command again to continue it"),
    (["--span", "0,x"], "or a comma list of them, got '0,x'"),
    (["--seed", "1,1"], "repeats a value"),
    (["--span", "0,3", "--fid_step", "2", "--fid_weights", "no_such.pth"], "no_such.pth does not exist"),  # no cell runs
    (["--span", "0,3", "--dataset", "folder", "--image_path", "no_such_dir"], "there is no --image_path no_such_dir"),
    (["--span", "0,3", "--batch_size", "9999"], "fewer than --batch_size 9999"),
])
def test_sweep_mistakes_are_one_line(tmp_path, args, message):
    r = run_main([*SWEEP, *args], cwd=tmp_path)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_a_no_attention_arm_sweeps_and_compares_as_its_own_group(tmp_path, fid_weights):
    import fid
    from checkpoint import generator_from_checkpoint
    from sagan_models import attention_layers
    # (that the seeds of an arm pool into one group is test_compare's; here: the arm is a group of its own)
    r = run_main(fid_sweep_args(tmp_path, fid_weights, "none,0", "0", total_step=2, log_step=1, fid_step=2),
                 cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2/2 cells finished" in r.stdout and "cells (span [none, 0] × seed" in r.stdout
    none, span0 = [tmp_path / "logs/sagan_emoji_spannone_32px_seed0"], [tmp_path / "logs/sagan_emoji_span0_32px_seed0"]
    for d in none:  # no attention layer: no gamma columns, no attention rows, no attention picture
        assert not any("gamma" in k for k in read_csv(d / "metrics.csv")[0])
        assert read_csv(d / "attention.csv") == []
        assert json.loads((d / "config.json").read_text())["g_span"] == -1
    assert not (tmp_path / "attn/sagan_emoji_spannone_32px_seed0").exists() or \
        not list((tmp_path / "attn/sagan_emoji_spannone_32px_seed0").iterdir())
    out = run_main(["compare", *none, *span0, "--out", tmp_path / "c.png", "--csv", tmp_path / "c.csv"],
                   cwd=tmp_path, entry=fid.main)
    assert out.returncode == 0, out.stderr
    # (the report's format is not this test's subject: only that the two arms are two groups)
    groups = {(row["group"], row["g_span"], row["d_span"]) for row in read_csv(tmp_path / "c.csv")}
    assert groups == {(f"{none[0].name} (span none)", "none", "none"), (f"{span0[0].name} (span 0)", "0", "0")}
    assert "span none" in out.stdout.splitlines()[0] and "span 0" in out.stdout.splitlines()[0]
    # the checkpoint of a network without attention loads as one, for fid.py and sampling
    ckpt = tmp_path / "models/sagan_emoji_spannone_32px_seed0/2.pt"
    G, cfg = generator_from_checkpoint(ckpt)
    assert attention_layers(G) == [] and cfg.g_span == -1
    stats = next((tmp_path / "logs/fid_stats").glob("*.npz"))
    r = run_main([ckpt, stats, "--fid_weights", fid_weights, "--fid_samples", "4", "--batch_size", "8", "--device",
                  "cpu", "--no_progress"], cwd=tmp_path, entry=fid.main)
    assert r.returncode == 0 and "fid" in r.stdout.lower(), r.stdout + r.stderr


@pytest.mark.slow
def test_sweep_runs_the_grid_and_continues_an_interrupted_cell_exactly(tmp_path, fid_weights):
    args = fid_sweep_args(tmp_path, fid_weights, "0,2", "5", total_step=4, log_step=2, fid_step=4)
    first = run_main(args, cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    cells = ["sagan_emoji_span0_32px_seed5", "sagan_emoji_span2_32px_seed5"]
    for c in cells:
        assert sorted(p.name for p in (tmp_path / "models" / c).iterdir()) == ["2.pt", "4.pt"]
    # the end-of-sweep comparison, one column per cell, against one set of reference statistics
    assert "2/2 cells finished" in first.stdout and "best fid" in first.stdout
    assert len(list((tmp_path / "logs/fid_stats").glob("*.npz"))) == 1
    assert (tmp_path / "logs/sagan_emoji_sweep_fid_compare.png").stat().st_size > 1000
    # and its page beside it, showing each cell's sample grid and attention picture of step 4
    page = (tmp_path / "logs/sagan_emoji_sweep_report.html").read_text(encoding="utf-8")
    assert "Sample grids at step 4" in page and page.count('class="sample"') == page.count('class="attention"') == 2
    # Interrupt the span-2 cell after its step-2 checkpoint: what it wrote later is gone.
    done = torch.load(tmp_path / f"models/{cells[1]}/4.pt", weights_only=False)
    (tmp_path / f"models/{cells[1]}/4.pt").unlink()
    again = run_main(args, cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "1 already finished, 1 to run" in again.stdout and f"continuing {cells[1]}" in again.stdout
    assert f"starting {cells[0]}" not in again.stdout and f"continuing {cells[0]}" not in again.stdout
    redone = torch.load(tmp_path / f"models/{cells[1]}/4.pt", weights_only=False)
    for net in ("G", "D"):
        assert all(torch.equal(done[net][k], redone[net][k]) for k in done[net])
    rows = list(csv.DictReader(open(tmp_path / f"logs/{cells[1]}/metrics.csv")))
    assert [r["step"] for r in rows] == ["2", "4"]
    # the same sweep with another setting that shapes the result: refused before any cell
    # starts (the finished cells would pass for the new setting), naming a cell and the setting
    other = run_main([*args, "--g_lr", "3e-4"], cwd=tmp_path)
    assert other.returncode == 2 and len(other.stderr.strip().splitlines()) == 1, other.stdout + other.stderr
    assert f"its cell {cells[0]} ran (config.json) with --g_lr 0.0001, where this command gives --g_lr 0.0003" \
        in other.stderr
    assert "starting" not in other.stdout and "continuing" not in other.stdout
    # ... also where only a resumed start of a cell (config_resumed_at_2.json) ran with it; and
    # settings shown as the flags that give them
    resumed = tmp_path / f"logs/{cells[1]}/config_resumed_at_2.json"
    saved = json.loads(resumed.read_text())
    resumed.write_text(json.dumps({**saved, "d_lr": 1e-3, "diffaug": "", "ema_decay": 0.9}))
    with pytest.raises(UserError, match=re.escape(
            f"its cell {cells[1]} ran (config_resumed_at_2.json) with --diffaug none, --d_lr 0.001, --ema_decay 0.9, "
            f"where this command gives --diffaug color,translation,cutout, --d_lr 0.0004, --ema_decay 0.0;")):
        check_start(configure(list(map(str, args))))
    # ... and other training images (here: one image fewer)
    resumed.write_text(json.dumps({**saved, "dataset_size": saved["dataset_size"] + 1}))
    with pytest.raises(UserError, match=f"with {saved['dataset_size'] + 1} training images, where this command "
                                        f"gives {saved['dataset_size']} training images"):
        check_start(configure(list(map(str, args))))
    resumed.write_text(json.dumps(saved))
    # the same FID weights at another path (another machine's): the same experiment; other weights are not
    import shutil
    moved = tmp_path / "elsewhere" / "w.pth"
    moved.parent.mkdir()
    shutil.copyfile(fid_weights, moved)
    at = [str(a) for a in args].index(str(fid_weights))
    with_weights = lambda path: [*map(str, args[:at]), str(path), *map(str, args[at + 1:])]
    check_start(configure(with_weights(moved)))
    other = moved.with_name("other.pth")
    other.write_bytes(moved.read_bytes()[:-1] + b"x")  # one byte other: other weights
    with pytest.raises(UserError, match=f"where this command gives --fid_weights {other}"):
        check_start(configure(with_weights(other)))
    # more steps, another FID batch size: the same experiment, continued
    check_start(configure([*map(str, args), "--total_step", "6", "--fid_batch_size", "4", "--log_step", "1"]))


def test_a_slurm_sweep_leaves_what_the_device_resolves_to_its_nodes(tmp_path):
    from sweep import cell_settings
    args = [*SWEEP, *out_dirs(tmp_path), *small_data(), "--span", "0,3", "--seed", "1"]
    cfg = configure([*args, "--launcher", "slurm"])
    cell = tmp_path / "logs" / cfg.sweep[0][3]
    cell.mkdir(parents=True)  # a cell that ran on a GPU node with the GPU's defaults
    gpu = {"amp": "bf16", "compile": "default", "channels_last": True, "cuda_graph": True, "fid_step": 10000}
    (cell / "config.json").write_text(json.dumps({**cell_settings(cfg, 0, 0, 1), **gpu}))
    check_start(cfg)  # submitted from a login node without a GPU: not a difference
    with pytest.raises(UserError, match="ran \\(config.json\\) with --amp bf16, where this command gives --amp none"):
        check_start(configure([*args, "--launcher", "slurm", "--amp", "none"]))  # given: every node runs it
    with pytest.raises(UserError, match="with --amp bf16, --compile default, --channels_last true, --cuda_graph true, "
                                        "--fid_step 10000, where"):
        check_start(configure(args))  # local cells resolve them on this machine, as this command does


def test_a_folder_of_a_cells_name_trained_with_another_seed_is_refused(tmp_path):
    # it would join the report as the cell's seed (and be paired as that seed): wrong numbers
    from sweep import cell_settings
    cfg = configure([*SWEEP, *out_dirs(tmp_path), *small_data(), "--span", "0,3", "--seed", "1,2"])
    g_span, d_span, seed, version = cfg.sweep[0]
    (tmp_path / "logs" / version).mkdir(parents=True)
    config = tmp_path / "logs" / version / "config.json"
    config.write_text(json.dumps({**cell_settings(cfg, g_span, d_span, seed), "seed": 5}))
    with pytest.raises(UserError, match=f"its cell {version} ran \\(config.json\\) with --seed 5, where this command "
                                        f"gives --seed {seed};"):
        check_start(cfg)
    config.write_text(json.dumps(cell_settings(cfg, g_span, d_span, seed)))
    check_start(cfg)  # its own seed: the cell, continued
    # without --seed every cell draws its own: nothing to compare
    check_start(configure([*SWEEP, *out_dirs(tmp_path), *small_data(), "--span", "0,3"]))


def test_a_sweep_under_torchrun_is_one_line(tmp_path, monkeypatch):
    # each rank started the whole sweep, and the second found the first's lock
    monkeypatch.setenv("WORLD_SIZE", "2")
    r = run_main([*SWEEP, *out_dirs(tmp_path), *small_data(), "--span", "0,3", "--seed", "1"], cwd=tmp_path)
    assert "a sweep, which starts each cell as its own process: run it with python main.py, not under torchrun" \
        in one_line(r)
    assert not (tmp_path / "logs").exists()


def test_cell_results_and_the_summary_agree_with_the_cells():
    from sweep import cell_result, sweep_summary
    # a cell that stopped cleanly on a SIGTERM of its own (checkpoint saved, exit 0) before --total_step
    assert cell_result(done=False, returncode=0) == "interrupted"
    assert cell_result(False, 130) == cell_result(False, -signal.SIGTERM) == "interrupted"  # stopped while starting
    assert cell_result(False, 1) == "failed (exit 1)"
    assert cell_result(False, -signal.SIGKILL) == "failed (killed by SIGKILL)"  # e.g. the OOM killer
    assert cell_result(True, 0) == cell_result(True, -signal.SIGTERM) == "ok"
    assert cell_result(True, 1) == "failed (exit 1, after its last checkpoint)"
    results = [("a", "done before"), ("b", "ok"), ("c", "interrupted"), ("d", "failed (exit 1)"),
               ("e", "failed (killed by SIGKILL)"), ("f", None)]
    line, code = sweep_summary(results)
    assert line == ("sweep: 2/6 cells finished; interrupted: 1 (c); failed: 2 (d, e), their output above says why; "
                    "not started: 1 (f); run the same command again to continue the rest")
    assert code == 1
    assert sweep_summary([("a", "ok"), ("b", "interrupted")]) == (
        "sweep: 1/2 cells finished; interrupted: 1 (b); run the same command again to continue the rest", 0)
    assert sweep_summary([("a", "ok"), ("b", "done before")]) == ("sweep: 2/2 cells finished", 0)


def test_the_report_compares_the_cells_that_started_and_says_why_no_fid(tmp_path, capsys):
    from sweep import report
    cfg = configure([*SWEEP, *out_dirs(tmp_path), "--span", "0,3", "--fid_step", "2"])
    cells = [version for *_, version in cfg.sweep]
    (tmp_path / "logs" / cells[0]).mkdir(parents=True)
    (tmp_path / "logs" / cells[0] / "config.json").write_text("{}")  # started; the other was refused at its start
    assert report(cfg, [(cells[0], "ok"), (cells[1], "failed (exit 2)")]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == "sweep: no FID logged (no cell wrote a row of fid.csv; the cells' output says why)"
    assert lines[2] == f"compare again with: python fid.py compare {tmp_path / 'logs' / cells[0]}"
    report(configure([*SWEEP, *out_dirs(tmp_path), "--span", "0,3"]), [(c, "failed (exit 2)") for c in cells[1:]])
    lines = capsys.readouterr().out.splitlines()  # nothing started: nothing to compare
    assert lines[1:] == ["sweep: no FID logged (FID is off: --fid_step 0, the default on a CPU; give --fid_step N)"]


def test_the_report_of_a_sweep_without_fid_or_with_ema_compares_what_it_logged(tmp_path, capsys):
    # --metrics is: the report's table and command were of the empty fid column; --ema_decay:
    # the EMA generators' numbers were not pointed to
    from sweep import report
    cfg = configure([*SWEEP, *out_dirs(tmp_path), "--span", "0,3", "--seed", "0", "--fid_step", "2",
                     "--metrics", "is", "--ema_decay", "0.9"])
    cells = [version for *_, version in cfg.sweep]
    for i, cell in enumerate(cells):
        d = tmp_path / "logs" / cell
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps({"g_span": cfg.sweep[i][0], "d_span": cfg.sweep[i][1], "seed": 0,
                                                   "metrics": ["is"], "ema_decay": 0.9, "total_step": 2}))
        (d / "fid.csv").write_text(f"step,fid,fid_ema,samples,seconds,is,is_std,is_ema,is_std_ema\n"
                                   f"2,,,8,1.0,{3 + i},0.1,{4 + i},0.1\n")
    assert report(cfg, [(c, "ok") for c in cells]) == 0
    out = capsys.readouterr().out
    best = next(l for l in out.splitlines() if l.strip().startswith("best is"))
    assert best.split()[2:4] == ["3.00", "(1/1)"]
    again = "python fid.py compare " + " ".join(str(tmp_path / "logs" / c) for c in cells) + " --column is"
    assert f"compare again with: {again}\n(of the EMA generators: {again} --ema)" in out
    # a finished cell whose log folder was moved away is named, not silently left out
    (tmp_path / "logs" / cells[1]).rename(tmp_path / "moved")
    report(cfg, [(c, "done before") for c in cells])
    out = capsys.readouterr().out
    assert f"sweep: not in the report: {cells[1]}: finished (its checkpoints say) but its log folder is not in " \
        f"{tmp_path / 'logs'}; move it back there to count it" in out


FAKE_CELL = """import json, os, signal, sys
from pathlib import Path
args = sys.argv[1:]
log = Path(args[args.index("--log_path") + 1]) / args[args.index("--version") + 1]
log.mkdir(parents=True)
(log / "config.json").write_text(json.dumps({"total_step": 10}))
(log / "status.json").write_text(json.dumps({"status": "running", "step": 0, "total_step": 10, "reason": ""}))
(log / "metrics.csv").write_text("step,seconds\\n3,0.1\\n6,0.2\\n")
os.kill(os.getpid(), signal.SIGKILL if "span0" in str(log) else signal.SIGTERM)
"""


def test_a_cell_killed_without_a_word_is_failed_in_the_report_as_in_the_summary(tmp_path, capsys):
    # A cell killed outright (kill -9, the OOM killer) leaves status.json at "running": the
    # compare report called it "running or killed" where the sweep's summary said failed. The
    # sweep saw it die, and records why. (A stand-in for main.py: a cell that logged steps 3
    # and 6, then was killed; the span-2 cell by SIGTERM before any checkpoint.)
    from files import read_status
    from runs import load_run
    from sweep import run_sweep
    fake = tmp_path / "fake_main.py"
    fake.write_text(FAKE_CELL)
    argv = [*SWEEP, *out_dirs(tmp_path), "--span", "0,2", "--seed", "1", "--total_step", "10"]
    assert run_sweep(configure(argv), argv, str(fake)) == 1
    out = capsys.readouterr().out
    killed, stopped = tmp_path / "logs/sagan_emoji_span0_32px_seed1", tmp_path / "logs/sagan_emoji_span2_32px_seed1"
    assert f"sweep: {killed.name} failed (killed by SIGKILL)" in out and f"failed: 1 ({killed.name})" in out
    status = read_status(killed)
    assert (status["status"], status["step"]) == ("failed", 6)
    assert status["reason"] == "killed by SIGKILL; the sweep saw its process end"
    run = load_run(killed, "fid")
    assert run.outcome.failed and run.outcome.step == 6
    # a stop by signal is the cell's own to record (here it could not: the sweep leaves it as it was)
    assert f"sweep: {stopped.name} interrupted" in out and read_status(stopped)["status"] == "running"


def test_the_sweep_leaves_the_status_of_a_live_run_and_of_a_finished_cell(tmp_path):
    # record_unseen_end never writes over a run a live process holds (its run lock: another
    # start of the cell, a resumed job), nor marks failed a cell killed after its last checkpoint
    from files import read_status, record_unseen_end, write_status
    from run import lock_run, unlock_run
    from sweep import cell_end
    log = tmp_path / "logs" / "v"
    log.mkdir(parents=True)
    write_status(log, "running", 3, 10)
    lock_run(tmp_path / "logs" / ".v.lock", "run 'v'")
    try:
        record_unseen_end(log, "killed")
        assert read_status(log)["status"] == "running"
    finally:
        unlock_run()
    record_unseen_end(log, "killed")
    assert (read_status(log)["status"], read_status(log)["reason"]) == ("failed", "killed")
    cfg = configure([*SWEEP, *out_dirs(tmp_path), "--span", "0,2", "--seed", "1", "--total_step", "10"])
    done = tmp_path / "logs" / "sagan_emoji_span0_32px_seed1"
    done.mkdir()
    write_status(done, "running", 0, 10)
    (tmp_path / "models" / done.name).mkdir(parents=True)
    (tmp_path / "models" / done.name / "10.pt").write_bytes(b"")
    assert cell_end(cfg, done.name, -signal.SIGKILL) == "failed (killed by SIGKILL, after its last checkpoint)"
    assert read_status(done)["status"] == "running"  # compare: finished by its steps, as the sweep's "done before"


def _cell_pid(lock):
    """The process named in a run lock ("process PID (main.py ...)"), or None before it is written."""
    m = re.match(r"process (\d+) ", lock.read_text()) if lock.is_file() else None
    return int(m.group(1)) if m else None


def _gone(pid):
    """Ended (a zombie nobody reaped counts: it holds no lock and runs nothing)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def _wait(condition, seconds, what):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="cells die with the sweep through Linux's prctl")
def test_a_cell_stopped_alone_is_interrupted_and_cells_stop_with_a_killed_sweep(tmp_path):
    args = [*SWEEP, *out_dirs(tmp_path), *small_data(), "--span", "0,2", "--seed", "5", "--jobs", "2",
            "--total_step", "100000", "--log_step", "1", "--sample_step", "100000", "--model_save_step", "100000"]
    cells = ["sagan_emoji_span0_32px_seed5", "sagan_emoji_span2_32px_seed5"]
    locks = [tmp_path / "logs" / f".{c}.lock" for c in cells]
    output = tmp_path / "sweep.out"
    with open(output, "w") as out:
        sweep = subprocess.Popen([sys.executable, str(REPO / "main.py"), *map(str, args)], cwd=tmp_path, stdout=out,
                                 stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    pids = []
    try:
        metrics = [tmp_path / "logs" / c / "metrics.csv" for c in cells]
        # both cells in their training loops: a lock naming the process, a metrics row (header + 1)
        _wait(lambda: all(_cell_pid(lock) for lock in locks) and
              all(m.is_file() and len(m.read_text().splitlines()) > 1 for m in metrics), 180, "both cells to train")
        pids = [_cell_pid(lock) for lock in locks]
        # a second copy of the sweep is refused in one line: it would find the cells locked and
        # report them failed
        second = run_main(args, cwd=tmp_path)
        assert second.returncode == 2 and len(second.stderr.strip().splitlines()) == 1, second.stdout + second.stderr
        assert f"sweep 'sagan_emoji_sweep' is being written by process {sweep.pid} " in second.stderr
        # a SIGTERM to one cell alone (a scheduler, a user): it saves a checkpoint, exits 0, and the
        # sweep reports it as interrupted, not as a failure
        os.kill(pids[0], signal.SIGTERM)
        _wait(lambda: f"sweep: {cells[0]} " in output.read_text(), 60, "the sweep to report the cell")
        assert f"sweep: {cells[0]} interrupted" in output.read_text()
        assert list((tmp_path / "models" / cells[0]).glob("*.pt"))
        # the sweep killed outright: its other cell stops too, at a checkpoint, and frees its run lock
        os.kill(sweep.pid, signal.SIGKILL)
        sweep.wait(timeout=30)
        _wait(lambda: _gone(pids[1]), 60, "the orphaned cell to stop")
        assert list((tmp_path / "models" / cells[1]).glob("*.pt")), output.read_text()
        import fcntl
        with open(locks[1], "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if a process still holds the run
    finally:
        for pid in pids:
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)
        if sweep.poll() is None:
            sweep.kill()
        sweep.wait()
