"""bench.py's command line: counts it cannot run with, and a --out it cannot write, are one
line and exit code 2 before any timing; a table that cannot be written at the end never
costs the one an earlier run left there."""
import json
import os
import tempfile

import numpy as np
import pytest
import scipy.linalg
import torch

import bench
from conftest import full_disk_at, one_line_exit_2, run_cli


def bench_error(capsys, argv):
    err = one_line_exit_2(capsys, bench.main, argv)
    assert err.startswith("bench.py: error:"), err
    return err


@pytest.fixture
def no_timing(monkeypatch):
    """bench.run without the minutes of work: no JPEGs, and canned timings."""
    monkeypatch.setattr(bench, "make_jpegs", lambda folder, n: None)
    monkeypatch.setattr(bench, "time_training", lambda *a, **k: {"it_per_s": 2.0, "images_per_s": 16.0,
                                                                   "warmup_seconds": 0.1})
    fid_row = {"feature_images_per_s": 1.0, "fid_seconds": 1.0, "generate_and_features_s": 1.0, "stats_s": 0.0,
               "distance_device_s": 0.0, "distance_cpu_s": 0.0, "fid": 300.0, "fid_rel_diff_vs_fp32": 0.0}
    monkeypatch.setattr(bench, "time_fid", lambda *a, **k: {"precisions": {"fp32": fid_row, "tf32": fid_row},
                                                            "weights": "random (speed only)"})


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "argument --steps: must be at least 1, got 0"),  # was a ZeroDivisionError at the end
    (["--steps", "-3"], "--steps: must be at least 1"),
    (["--warmup", "-1"], "--warmup: must be at least 0"),
    (["--batch_size", "0"], "--batch_size: must be at least 1"),
    (["--conv_dim", "0"], "--conv_dim: must be at least 1"),
    (["--n_images", "0"], "--n_images: must be at least 1"),
    (["--num_workers", "-1"], "--num_workers: must be at least 0"),
    (["--profile", "-1"], "--profile: must be at least 0"),
    (["--fid_samples", "1"], "--fid_samples: must be at least 2"),
    (["--fid_batch_size", "0"], "--fid_batch_size: must be at least 1"),
    (["--steps", "two"], "--steps: expected an integer, got 'two'"),
    (["--n_images", "4", "--batch_size", "8"], "--n_images 4 is fewer than --batch_size 8"),
    # refused at start, not after the paths were timed (or timed with a batch the table does not name)
    (["--fast_flags=--batch_size=4 --amp none"], "--fast_flags: --batch_size is bench.py's own"),
    # its run folders are temporary and removed: a --log_path there would fill the user's own
    (["--fast_flags", "--amp none --log_path=my_logs"], "--fast_flags: --log_path is bench.py's own"),
    # main.py's own checks, before the reference path is timed (minutes on a GPU)
    (["--fast_flags=--bogus"], "the fast path (--fast_flags): unknown argument --bogus"),
    (["--fast_flags=--cuda_graph"], "the fast path (--fast_flags): --cuda_graph needs a CUDA device"),
    (["--profile", "2"], "--profile counts GPU kernels: it needs a CUDA device"),
    (["--fid_weights", "no_such.pth"], "no_such.pth does not exist"),
])
def test_counts_it_cannot_run_with_are_one_line(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.setattr(bench, "make_jpegs", lambda *a: pytest.fail("refused only after starting the work"))
    err = bench_error(capsys, ["--device", "cpu", "--out", str(tmp_path / "b.json"), *args])
    assert message in err


def test_an_out_it_cannot_write_is_refused_before_any_timing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench, "make_jpegs", lambda *a: pytest.fail("refused only after starting the work"))
    (tmp_path / "a_file").write_text("mine")
    (tmp_path / "a_folder").mkdir()
    err = bench_error(capsys, ["--device", "cpu", "--out", str(tmp_path / "a_file" / "bench.json")])
    assert f"{tmp_path / 'a_file'} is a file" in err and "pick another --out" in err
    err = bench_error(capsys, ["--device", "cpu", "--out", str(tmp_path / "a_folder")])
    assert "is a folder; give a file name" in err
    assert (tmp_path / "a_file").read_text() == "mine"


def test_a_full_disk_at_the_end_is_one_line_and_keeps_the_earlier_table(tmp_path, capsys, monkeypatch, no_timing):
    out = tmp_path / "results" / "bench.json"
    out.parent.mkdir()
    out.write_text('{"an": "earlier run"}')
    real_replace = os.replace
    full_disk_at(monkeypatch, out)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    err = bench_error(capsys, ["--device", "cpu", "--out", str(out), "--spans", "0"])
    assert f"cannot write --out {out}: the disk is full; free some space or pick another --out" in err
    assert out.read_text() == '{"an": "earlier run"}'
    assert sorted(p.name for p in out.parent.iterdir()) == ["bench.json"]  # no temp file left behind
    monkeypatch.setattr(os, "replace", real_replace)  # and with room on the disk, the same run writes it
    assert bench.main(["--device", "cpu", "--out", str(out), "--spans", "0"]) is None
    assert '"training"' in out.read_text()
    assert not any((tmp_path / "tmp").iterdir())  # the synthetic data and run folders went with the runs


def test_spans_are_read_as_main_py_reads_them(tmp_path, capsys, monkeypatch, no_timing):
    seen = []
    monkeypatch.setattr(bench, "time_training", lambda argv, *a, **k: seen.append(argv) or
                        {"it_per_s": 2.0, "images_per_s": 16.0, "warmup_seconds": 0.1})
    assert bench.main(["--device", "cpu", "--out", str(tmp_path / "b.json"), "--spans", "none,3",
                       "--skip_reference"]) is None
    assert [argv[argv.index("--span") + 1] for argv in seen] == ["none", "3"]
    table = capsys.readouterr().out
    assert "span none  fast" in table and "none | fast" in table
    assert [row["span"] for row in json.loads((tmp_path / "b.json").read_text())["training"]] == [-1, 3]
    assert "--spans: expected a span" in bench_error(capsys, ["--spans", "-1"])


def test_each_timed_fid_distance_computes_its_own_square_root_factors(monkeypatch):
    # a CPU bench times the distance twice on the CPU: the second must not reuse the first's factors
    import metrics
    from features import Resolved
    rng = np.random.default_rng(0)
    sides = [Resolved(name, rng.normal(size=8), np.cov(rng.normal(size=(8, 40)))) for name in ("gen", "ref")]
    factors = []
    real = metrics._sqrt_factor
    monkeypatch.setattr(metrics, "_sqrt_factor", lambda sigma: factors.append(1) or real(sigma))
    (a, _), (b, _) = (bench.fid_distance(*sides, "cpu") for _ in range(2))
    assert len(factors) == 4 and a == b
    mu1, s1, mu2, s2 = sides[0].mu, sides[0].sigma, sides[1].mu, sides[1].sigma
    root = scipy.linalg.sqrtm(s1 @ s2).real  # the closed form, independently
    assert a == pytest.approx(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * root), rel=1e-9)


@pytest.mark.slow
def test_cpu_benchmark_runs_and_writes_its_table(tmp_path):
    out = tmp_path / "bench.json"
    r = run_cli(["--device", "cpu", "--spans", "3", "--steps", "2", "--warmup", "1", "--fid_samples", "2",
                 "--fid_batch_size", "2", "--out", out], cwd=tmp_path, script="bench.py")
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert {(row["path"], row["span"]) for row in data["training"]} == {("reference", 3), ("fast", 3)}
    assert all(row["it_per_s"] > 0 and "error" not in row for row in data["training"])
    assert set(data["fid"]["precisions"]) == {"fp32", "tf32"} and data["env"]["torch"] == torch.__version__
    for row in data["fid"]["precisions"].values():
        assert row["fid_seconds"] > 0 and abs(row["fid"] - row["fid_cpu"]) <= 1e-9 * max(1.0, abs(row["fid"]))
    assert "× ref" in r.stdout


def test_bench_bad_input_is_one_line(tmp_path, capsys):
    import bench
    cases = [["--spans", "x"]] + ([["--device", "cuda"]] if not torch.cuda.is_available() else [])
    for args in cases:
        assert one_line_exit_2(capsys, bench.main, args).startswith("bench.py: error:")
