"""One command for the span experiment: `--span` / `--seed` lists run a grid of ordinary
runs; the same command again continues unfinished cells and skips finished ones."""
import csv

import pytest
import torch

from conftest import TINY, out_dirs, random_fid_state_dict, run_main
from experiment import cell_argv
from parameter import get_parameters

SWEEP = [a for a in TINY if a not in ("--seed", "3")]


def test_cells_are_named_by_span_and_seed_and_keep_every_other_flag():
    cfg = get_parameters([*SWEEP, "--span", "0,3", "--seed", "1,2"])
    assert cfg.sweep == [(0, 1, "sagan_emoji_span0_32px_seed1"), (0, 2, "sagan_emoji_span0_32px_seed2"),
                         (3, 1, "sagan_emoji_span3_32px_seed1"), (3, 2, "sagan_emoji_span3_32px_seed2")]
    assert get_parameters([*SWEEP, "--span", "2,4", "--version", "x"]).sweep == [(2, None, "x_span2"),
                                                                                 (4, None, "x_span4")]
    assert get_parameters([*SWEEP, "--span", "1", "--seed", "0,1"]).sweep[1] == (1, 1, "sagan_emoji_span1_32px_seed1")
    assert get_parameters([*SWEEP, "--span", "3"]).sweep is None
    argv = ["--span=0,3", "--d_lr", "1e-4", "--seed", "1,2", "--jobs", "2", "--version", "v"]
    assert cell_argv(argv, 3, 2, "v_span3_seed2", resume=True) == [
        "--d_lr", "1e-4", "--span", "3", "--version", "v_span3_seed2", "--seed", "2", "--resume"]


@pytest.mark.parametrize("args, message", [
    (["--jobs", "2"], "--jobs runs the cells of a sweep at once"),
    (["--span", "0,3", "--d_span", "1"], "drop --g_span/--d_span"),
    (["--span", "0,3", "--resume"], "run the same command again to continue it"),
    (["--span", "0,x"], "expected an integer or a comma list"),
    (["--seed", "1,1"], "repeats a value"),
])
def test_sweep_mistakes_are_one_line(tmp_path, args, message):
    r = run_main([*SWEEP, *args], cwd=tmp_path)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_sweep_runs_the_grid_and_continues_an_interrupted_cell_exactly(tmp_path):
    weights = tmp_path / "w.pth"
    torch.save(random_fid_state_dict(), weights)
    args = [*SWEEP, *out_dirs(tmp_path), "--span", "0,2", "--seed", "5", "--total_step", "4", "--log_step", "2",
            "--sample_step", "2", "--model_save_step", "2", "--fid_step", "4", "--fid_samples", "8",
            "--fid_batch_size", "8", "--fid_ref_samples", "8", "--fid_weights", weights, "--jobs", "2"]
    first = run_main(args, cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    cells = ["sagan_emoji_span0_32px_seed5", "sagan_emoji_span2_32px_seed5"]
    for c in cells:
        assert sorted(p.name for p in (tmp_path / "models" / c).iterdir()) == ["2.pt", "4.pt"]
    # the end-of-sweep comparison, one column per cell, against one set of reference statistics
    assert "2/2 cells finished" in first.stdout and "best fid" in first.stdout
    assert len(list((tmp_path / "logs/fid_stats").glob("*.npz"))) == 1
    assert (tmp_path / "logs/sagan_emoji_sweep_fid_compare.png").stat().st_size > 1000
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
