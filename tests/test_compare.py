"""The span experiment's comparison: grouping over seeds, statistics against numbers
computed here by hand, and the CSV / plots."""
import csv
import json
import math

import pytest
from scipy import stats

import fid
from conftest import full_disk_at, run_main

BASE = {"model": "sagan", "imsize": 32, "g_span": 0, "d_span": 0, "d_lr": 4e-4, "adv_loss": "hinge",
        "dataset": "emoji", "batch_size": 32, "diffaug": ""}


def make_run(root, name, fids, **config):
    """A run folder as training writes it: config.json and fid.csv ({step: fid})."""
    d = root / name
    d.mkdir(parents=True)
    cfg = {**BASE, **config, "version": name, "log_path": str(root), "git_commit": name * 2}
    (d / "config.json").write_text(json.dumps(cfg))
    with open(d / "fid.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "fid", "fid_ema", "samples", "seconds"])
        for step, v in fids.items():
            w.writerow([step, v, "", 1000, 1.0])
    return d


@pytest.fixture
def sweep(tmp_path):
    runs = [make_run(tmp_path, f"s0_seed{i}", {500: 40 + 2 * i, 1000: 30 + 2 * i}, seed=i) for i in range(3)]
    runs += [make_run(tmp_path, f"s3_seed{i}", {500: 35 + i, 1000: 25 + i}, g_span=3, d_span=3, seed=i)
             for i in range(3)]
    runs.append(make_run(tmp_path, "s4_alone", {500: 50, 1000: 60}, g_span=4, d_span=4, seed=0))
    return tmp_path, runs


def test_groups_statistics_welch_reach_and_csv(sweep):
    root, runs = sweep
    out_csv = root / "table.csv"
    r = run_main(["compare", *runs, "--out", root / "cmp.png", "--csv", out_csv, "--reach", "36"], entry=fid.main)
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(open(out_csv)))
    assert list(rows[0]) == ["group", "g_span", "d_span", "step", "n", "mean", "std", "ci95_low", "ci95_high"]
    by = {(row["group"], int(row["step"])): row for row in rows}
    assert sorted({g for g, _ in by}) == ["s4_alone (span 4)", "span 0", "span 3"]
    # span 0 at step 1000: 30, 32, 34 -> mean 32, std 2, CI 32 ± t(0.975, 2)·2/√3 with t = 4.302652729911275
    row = by[("span 0", 1000)]
    half = 4.302652729911275 * 2 / math.sqrt(3)
    assert (row["g_span"], row["d_span"], row["n"]) == ("0", "0", "3")
    assert float(row["mean"]) == pytest.approx(32) and float(row["std"]) == pytest.approx(2)
    assert float(row["ci95_low"]) == pytest.approx(32 - half, rel=1e-5)
    assert float(row["ci95_high"]) == pytest.approx(32 + half, rel=1e-5)
    alone = by[("s4_alone (span 4)", 1000)]
    assert alone["n"] == "1" and alone["std"] == alone["ci95_low"] == alone["ci95_high"] == ""
    # Welch at the last common step (1000): span 3 (25, 26, 27) vs span 0 (30, 32, 34)
    se2 = 1 / 3 + 4 / 3
    t = (26 - 32) / math.sqrt(se2)
    dof = se2 ** 2 / ((1 / 3) ** 2 / 2 + (4 / 3) ** 2 / 2)
    p = 2 * stats.t.sf(abs(t), dof)
    line = next(l for l in r.stdout.splitlines() if l.strip().startswith("p vs span 0"))
    assert f"{p:.3g} @1000" in line and "n<2" in line  # the lone span-4 run has no spread
    # first step with mean <= 36: span 0 at 1000 (42 at 500), span 3 at 500 (36), span 4 never
    reach = next(l for l in r.stdout.splitlines() if "reach" in l).split()[2:]
    assert reach == ["1000", "500", "never"]
    best = next(l for l in r.stdout.splitlines() if l.strip().startswith("best fid")).split()[2:]
    assert best == ["32.00", "26.00", "50.00"]
    assert (root / "cmp.png").stat().st_size > 1000


def test_other_settings_split_groups_and_find_their_own_baseline(tmp_path):
    runs = [make_run(tmp_path, f"a{i}", {100: 10 + i}, seed=i) for i in range(2)]
    runs += [make_run(tmp_path, f"b{i}", {100: 20 + 3 * i}, seed=i, d_lr=1e-4) for i in range(2)]
    runs += [make_run(tmp_path, f"c{i}", {100: 30 + i}, seed=i, d_lr=1e-4, g_span=2, d_span=2) for i in range(2)]
    r = run_main(["compare", *runs, "--out", tmp_path / "x.png", "--csv", tmp_path / "t.csv"], entry=fid.main)
    assert r.returncode == 0, r.stderr
    groups = [row["group"] for row in csv.DictReader(open(tmp_path / "t.csv"))]
    assert groups == ["span 0, d_lr=0.0004", "span 0, d_lr=0.0001", "span 2, d_lr=0.0001"]
    p = stats.ttest_ind([30, 31], [20, 23], equal_var=False).pvalue  # c against b, not against a
    assert f"{p:.3g} @100" in next(l for l in r.stdout.splitlines() if l.strip().startswith("p vs span 0"))


def test_runs_without_seeds_to_group_compare_as_before(tmp_path):
    runs = [make_run(tmp_path, "x", {10: 5.0}, seed=1), make_run(tmp_path, "y", {10: 7.0}, seed=2, g_span=1, d_span=1)]
    r = run_main(["compare", *runs, "--out", tmp_path / "p.png"], entry=fid.main)
    assert r.returncode == 0, r.stderr
    head, first = r.stdout.splitlines()[:2]
    assert "x (span 0)" in head and "y (span 1)" in head and first.split() == ["10", "5.00", "7.00"]


@pytest.mark.parametrize("name, content, message", [
    ("fid.csv", b"step,fid\n\xff\xfe,1\n", "cannot read"),
    ("fid.csv", b"step,fid\n10,abc\n", "malformed row"),
    ("fid.csv", b"step,fid\nten,1.0\n", "malformed row"),
    ("attention.csv", b"step,network,layer,map,distance,uniform\n10,G,attn8,8x8,abc,1\n", "malformed row"),
])
def test_malformed_csv_is_one_line(tmp_path, name, content, message):
    d = make_run(tmp_path, "bad", {10: 1.0})
    (d / name).write_bytes(content)
    r = run_main(["compare", d], entry=fid.main)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_edge_cases_empty_runs_repeated_folders_uneven_seeds_and_old_configs(tmp_path):
    empty = make_run(tmp_path, "empty", {}, seed=0)  # header only: a run stopped before its first FID
    r = run_main(["compare", empty, empty, "--out", tmp_path / "e.png"], entry=fid.main)
    assert r.returncode == 0, r.stderr
    # span 0: seed 2 went on to step 200; span 3 stopped at 100. The p-value and the CI use the last
    # step every run logged (100), not a step only some seeds reached.
    a = [make_run(tmp_path, "a0", {100: 10, 200: 5}, seed=0), make_run(tmp_path, "a1", {100: 12}, seed=1)]
    b = [make_run(tmp_path, "b0", {100: 20}, seed=0, g_span=3, d_span=3),
         make_run(tmp_path, "b1", {100: 23}, seed=1, g_span=3, d_span=3)]
    r = run_main(["compare", *a, *b, a[0], "--out", tmp_path / "u.png", "--csv", tmp_path / "u.csv"], entry=fid.main)
    assert r.returncode == 0, r.stderr
    p = stats.ttest_ind([20, 23], [10, 12], equal_var=False).pvalue
    assert f"{p:.3g} @100" in next(l for l in r.stdout.splitlines() if l.strip().startswith("p vs span 0"))
    n = {(row["group"], row["step"]): row["n"] for row in csv.DictReader(open(tmp_path / "u.csv"))}
    assert n[("span 0", "100")] == "2" and n[("span 0", "200")] == "1"  # a0 given twice counts once
    # a config.json from before --diffaug existed (its runs had none) groups with its equal of today
    old, new = make_run(tmp_path, "old", {100: 11}, seed=5), make_run(tmp_path, "new", {100: 13}, seed=6)
    cfg = json.loads((old / "config.json").read_text())
    del cfg["diffaug"]
    (old / "config.json").write_text(json.dumps(cfg))
    r = run_main(["compare", old, new, "--out", tmp_path / "o.png", "--csv", tmp_path / "o.csv"], entry=fid.main)
    assert [row["n"] for row in csv.DictReader(open(tmp_path / "o.csv"))] == ["2"]


@pytest.mark.parametrize("argv, message", [
    (["--bogus"], "fid.py: error: unrecognized arguments: --bogus (see python fid.py compare --help)"),
    ([], "the following arguments are required: RUN_LOG_DIR"),
    (["--reach", "x"], "argument --reach: invalid float value: 'x'"),
])
def test_compare_bad_flags_are_one_line(tmp_path, capsys, argv, message):
    run = make_run(tmp_path, "r", {10: 1.0})
    with pytest.raises(SystemExit) as e:
        fid.main(["compare", *([str(run)] if argv != [] else []), *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and message in err, err


def test_compare_outputs_it_cannot_write_are_one_line_before_any_work(tmp_path):
    run = make_run(tmp_path, "r", {10: 1.0})
    (tmp_path / "a_file").write_text("mine")
    cases = [(["--csv", tmp_path / "a_file" / "t.csv"], f"--csv: {tmp_path / 'a_file'} is a file"),
             (["--out", tmp_path / "a_file" / "p.png"], f"--out: {tmp_path / 'a_file'} is a file"),
             (["--csv", tmp_path], f"--csv {tmp_path} is a folder; give a file name"),
             (["--out", tmp_path / "p.v2"], "--out " + str(tmp_path / "p.v2") + ": cannot draw a .v2 file; end the "
                                                                               "name in one of")]
    for extra, message in cases:
        r = run_main(["compare", run, *extra], entry=fid.main)
        assert r.returncode == 2 and message in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
        assert r.stdout == ""  # refused before the report: nothing read, nothing drawn
    assert (tmp_path / "a_file").read_text() == "mine"
    # a name without a suffix gets .png, as matplotlib would add, and the report names that file
    r = run_main(["compare", run, "--out", tmp_path / "plain"], entry=fid.main)
    assert r.returncode == 0 and f"plot: {tmp_path / 'plain.png'}" in r.stdout
    assert (tmp_path / "plain.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # folders that do not exist yet are made (they used to end in a FileNotFoundError traceback)
    r = run_main(["compare", run, "--out", tmp_path / "new" / "p.pdf", "--csv", tmp_path / "new2" / "t.csv"],
                 entry=fid.main)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "new" / "p.pdf").read_bytes()[:4] == b"%PDF" and (tmp_path / "new2" / "t.csv").is_file()


@pytest.mark.parametrize("which", ["--csv", "--out"])
def test_compare_on_a_full_disk_is_one_line_and_keeps_the_earlier_file(tmp_path, monkeypatch, which):
    run = make_run(tmp_path, "r", {10: 1.0, 20: 2.0})
    out = tmp_path / "results" / ("table.csv" if which == "--csv" else "plot.png")
    out.parent.mkdir()
    out.write_bytes(b"an earlier file")
    full_disk_at(monkeypatch, out)
    other = ["--out", tmp_path / "p.png"] if which == "--csv" else []
    r = run_main(["compare", run, which, out, *other], entry=fid.main)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == (f"fid.py: error: cannot write {which} {out}: the disk is full; free some space or "
                                f"pick another {which} (any earlier file there is unchanged)")
    assert out.read_bytes() == b"an earlier file" and sorted(p.name for p in out.parent.iterdir()) == [out.name]




def test_runs_without_attention_layers_group_by_themselves_and_plot(tmp_path):
    # --span none (-1 in config.json), G without attention only, and span 0; the runs
    # without attention layers have an attention.csv with no rows
    header = "step,network,layer,map,distance,uniform\n"
    runs = [make_run(tmp_path, f"n{i}", {100: 40 + i}, seed=i, g_span=-1, d_span=-1) for i in range(2)]
    runs += [make_run(tmp_path, f"g{i}", {100: 35 + i}, seed=i, g_span=-1, d_span=3) for i in range(2)]
    runs += [make_run(tmp_path, f"z{i}", {100: 30 + i}, seed=i) for i in range(2)]
    for d in runs:
        rows = "" if d.name.startswith("n") else "100,D,attn4,4x4,1.5,1.6\n"
        (d / "attention.csv").write_text(header + rows)
    r = run_main(["compare", *runs, "--out", tmp_path / "a.png", "--csv", tmp_path / "a.csv"], entry=fid.main)
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(open(tmp_path / "a.csv")))
    assert {(row["group"], row["g_span"], row["d_span"]) for row in rows} == {
        ("span none", "none", "none"), ("span Gnone/D3", "none", "3"), ("span 0", "0", "0")}
    assert (tmp_path / "a_attention.png").stat().st_size > 1000
    for d in runs[:2]:  # no attention rows in any run: no attention plot, and no error either
        (d / "attention.csv").write_text(header)
    r = run_main(["compare", *runs[:2], "--out", tmp_path / "b.png"], entry=fid.main)
    assert r.returncode == 0 and not (tmp_path / "b_attention.png").exists(), r.stderr
