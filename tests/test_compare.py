"""The span experiment's comparison: grouping over seeds, every run started counted (failed
and stopped early ones too), statistics and tests against scipy and numbers worked here by
hand, the CSV and the plots."""
import csv
import json
import math

import pytest
from scipy import stats

import fid
import plots
from conftest import full_disk_at, one_line, run_main

BASE = {"model": "sagan", "imsize": 32, "g_span": 0, "d_span": 0, "d_lr": 4e-4, "adv_loss": "hinge",
        "dataset": "emoji", "batch_size": 32, "diffaug": ""}


def make_run(root, name, fids, status=None, **config):
    """A run folder as training writes it: config.json, fid.csv ({step: fid}; None: no file)
    and, if given, status.json ({"status", "step"}); --total_step is its last FID step unless
    given."""
    d = root / name
    d.mkdir(parents=True)
    total = config.pop("total_step", max(fids or [0]))
    cfg = {**BASE, **config, "total_step": total, "version": name, "log_path": str(root), "git_commit": name * 2}
    (d / "config.json").write_text(json.dumps(cfg))
    if fids is not None:
        with open(d / "fid.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", "fid", "fid_ema", "samples", "seconds"])
            for step, v in fids.items():
                w.writerow([step, v, "", 1000, 1.0])
    if status is not None:
        (d / "status.json").write_text(json.dumps({"total_step": total, "reason": "", **status}))
    return d


def compare_csv(root, runs, *extra):
    """Run `fid.py compare` on the runs; (its stdout, {(group, step): CSV row})."""
    r = run_main(["compare", *runs, "--out", root / "cmp.png", "--csv", root / "t.csv", *extra], entry=fid.main)
    assert r.returncode == 0, r.stderr
    return r.stdout, {(row["group"], int(row["step"]) if row["step"] else None): row
                      for row in csv.DictReader(open(root / "t.csv"))}


def line(stdout, name):
    """The report's row `name`, its cells split on the two spaces between columns."""
    row = next(l for l in stdout.splitlines() if l.strip().startswith(name))
    return [c.strip() for c in row.strip()[len(name):].split("  ") if c.strip()]


@pytest.fixture
def sweep(tmp_path):
    runs = [make_run(tmp_path, f"s0_seed{i}", {500: 40 + 2 * i, 1000: 30 + 2 * i}, seed=i) for i in range(3)]
    runs += [make_run(tmp_path, f"s3_seed{i}", {500: 35 + i, 1000: 25 + i}, g_span=3, d_span=3, seed=i)
             for i in range(3)]
    runs.append(make_run(tmp_path, "s4_alone", {500: 50, 1000: 60}, g_span=4, d_span=4, seed=0))
    return tmp_path, runs


def test_groups_statistics_paired_test_reach_and_csv(sweep):
    root, runs = sweep
    out, by = compare_csv(root, runs, "--reach", "36")
    assert list(next(iter(by.values()))) == fid_compare_columns()
    assert sorted({g for g, _ in by}) == ["s4_alone (span 4)", "span 0", "span 3"]
    # span 0 at step 1000: 30, 32, 34 -> mean 32, std 2, CI 32 ± t(0.975, 2)·2/√3, t in closed form at 2 dof
    row = by[("span 0", 1000)]
    half = 0.95 / math.sqrt(2 * 0.975 * 0.025) * 2 / math.sqrt(3)
    assert (row["g_span"], row["d_span"], row["n_started"], row["n"]) == ("0", "0", "3", "3")
    assert float(row["mean"]) == pytest.approx(32) and float(row["std"]) == pytest.approx(2)
    assert float(row["ci95_low"]) == pytest.approx(32 - half, rel=1e-5)
    assert float(row["ci95_high"]) == pytest.approx(32 + half, rel=1e-5)
    # n = 1 is said, not printed as a bare number
    alone = by[("s4_alone (span 4)", 1000)]
    assert alone["n"] == "1" and alone["std"] == alone["ci95_low"] == alone["ci95_high"] == ""
    assert alone["note"] == "n = 1: no interval" and alone["test"] == "none: n < 2 in an arm"
    assert line(out, "1000")[2] == "60.00 (n = 1: no interval)"
    assert line(out, "95% CI, last step")[2] == "n = 1: no interval @1000"
    # span 3 (25, 26, 27) against span 0 (30, 32, 34), seed by seed: paired, differences -5, -6, -7
    row = by[("span 3", 1000)]
    p = stats.ttest_rel([25, 26, 27], [30, 32, 34]).pvalue
    assert (row["test"], row["n_baseline"], row["baseline"], row["holm_m"]) == ("paired", "3", "span 0", "1")
    assert float(row["p"]) == pytest.approx(p, rel=1e-5) and float(row["p_holm"]) == pytest.approx(p, rel=1e-5)
    assert float(row["diff"]) == pytest.approx(-6)
    assert -7 <= float(row["diff_boot95_low"]) < -6 < float(row["diff_boot95_high"]) <= -5  # within the pairs' range
    assert line(out, "vs span 0") == ["-", "paired, 3 vs 3 @1000", "no test: n < 2 in an arm"]
    assert line(out, "p")[1] == f"{p:.3g}" and line(out, "p Holm")[1] == f"{p:.3g} (m=1)"
    # reach 36 per run: span 0 at 1000 (40-44 at 500); span 3 at 500, 500 and 1000 (37 at 500); span 4 never
    assert line(out, "reach fid≤36") == ["1000 [1000, 1000], never 0/3", "500 [500, 1000], never 0/3",
                                         "never (1/1)"]
    assert by[("span 3", 500)]["reach_per_run"] == "seed0:500;seed1:500;seed2:1000"
    assert line(out, "best fid") == ["32.00 (3/3)", "26.00 (3/3)", "50.00 (1/1)"]
    assert (root / "cmp.png").stat().st_size > 1000


def fid_compare_columns():
    return ["group", "g_span", "d_span", "step", "n_started", "n", "mean", "std", "ci95_low", "ci95_high", "note",
            "n_failed", "failed_at", "n_stopped_early", "stopped_at", "baseline", "test", "n_baseline", "p", "p_holm",
            "holm_m", "diff", "diff_boot95_low", "diff_boot95_high", "reach_target", "reach_median", "reach_min",
            "reach_max", "reach_never", "reach_per_run"]


def test_failed_and_stopped_runs_are_counted_with_their_step(tmp_path, monkeypatch):
    base = [make_run(tmp_path, f"a{i}", {500: 40 + i, 1000: 30 + i}, seed=i) for i in range(6)]
    span3 = [make_run(tmp_path, "b0", {500: 35, 1000: 25}, seed=0, g_span=3, d_span=3),
             # a loss turned NaN at step 700: status.json says so, fid.csv ends at 500
             make_run(tmp_path, "b1", {500: 36}, {"status": "diverged", "step": 700}, seed=1, g_span=3, d_span=3,
                      total_step=1000),
             # a NaN FID in a run with no status.json (trained before it existed)
             make_run(tmp_path, "b2", {500: 34, 1000: math.nan}, seed=2, g_span=3, d_span=3),
             # crashed before its first FID: config.json only
             make_run(tmp_path, "b3", None, {"status": "failed", "step": 200}, seed=3, g_span=3, d_span=3,
                      total_step=1000),
             # stopped by a signal at 600; and one that left "running" (killed, or still at it)
             make_run(tmp_path, "b4", {500: 37}, {"status": "stopped", "step": 600}, seed=4, g_span=3, d_span=3,
                      total_step=1000),
             make_run(tmp_path, "b5", {500: 38}, {"status": "running", "step": 0}, seed=5, g_span=3, d_span=3,
                      total_step=1000)]
    # a group whose one run failed before any FID: a column of its own, and a CSV row without a step
    span3.append(make_run(tmp_path, "c0", None, {"status": "diverged", "step": 40}, seed=0, g_span=4, d_span=4,
                          total_step=1000))
    drawn = []
    monkeypatch.setattr(plots, "_save_figure", lambda fig, path, dpi: drawn.append(fig))
    out, by = compare_csv(tmp_path, base + span3, "--reach", "36")
    assert line(out, "runs started") == ["6", "6", "1"]
    assert line(out, "failed") == ["0", "3: seed1 diverged @700, seed2 diverged @1000, seed3 failed @200",
                                   "1: seed0 diverged @40"]
    assert line(out, "stopped early") == ["0", "2: seed4 interrupted @600, seed5 running or killed @500", "0"]
    row = by[("c0 (span 4)", None)]
    assert (row["n_started"], row["n"], row["mean"], row["failed_at"]) == ("1", "0", "", "seed0:diverged@40")
    row = by[("span 3", 1000)]
    assert (row["n_started"], row["n"], row["n_failed"], row["n_stopped_early"]) == ("6", "1", "3", "2")
    assert row["failed_at"] == "seed1:diverged@700;seed2:diverged@1000;seed3:failed@200"
    assert row["stopped_at"] == "seed4:interrupted@600;seed5:running or killed@500"
    assert row["note"] == "n = 1: no interval" and line(out, "1000")[1] == "25.00 (n = 1: no interval)"
    assert by[("span 3", 500)]["n"] == "5"  # b0, b1, b2, b4, b5 reached 500
    # reach 36: b0 and b2 (34 at 500) got there, but b2 diverged later: it counts as never, as do the others
    assert row["reach_per_run"] == "seed0:500;seed1:failed;seed2:failed;seed3:failed;seed4:never;seed5:never"
    assert (row["reach_median"], row["reach_never"]) == ("never", "5")
    # the plot: an × at the last finite value of each failed run that has one (b1 at 500: 36; b2 at 500: 34)
    ax = drawn[0].axes[0]
    crosses = [tuple(zip(l.get_xdata(), l.get_ydata())) for l in ax.lines if l.get_marker() == "x"]
    assert sorted(p for c in crosses for p in c) == [(500, 34.0), (500, 36.0)]
    assert "span 3 (n=6, 3 failed)" in [t.get_text() for t in ax.get_legend().get_texts()]


def test_paired_welch_and_holm_equal_scipy_and_the_closed_form(tmp_path):
    seeds = range(4)
    runs = [make_run(tmp_path, f"a{i}", {500: 40 + i, 1000: 30 + 2 * i}, seed=i) for i in seeds]
    runs += [make_run(tmp_path, f"b{i}", {500: 39 + i * 1.1, 1000: 28 + 2.5 * i}, seed=i, g_span=2, d_span=2)
             for i in seeds]
    runs += [make_run(tmp_path, f"c{i}", {500: 38 + i ** 1.5, 1000: 29.5 + 1.9 * i}, seed=i, g_span=3, d_span=3)
             for i in seeds]
    runs += [make_run(tmp_path, f"d{i}", {1000: 20 + 3 * i}, seed=10 + i, g_span=4, d_span=4) for i in seeds]
    out, by = compare_csv(tmp_path, runs)
    a = [30 + 2 * i for i in seeds]
    p = {"span 2": stats.ttest_rel([28 + 2.5 * i for i in seeds], a).pvalue,
         "span 3": stats.ttest_rel([29.5 + 1.9 * i for i in seeds], a).pvalue,
         "span 4": stats.ttest_ind([20 + 3 * i for i in seeds], a, equal_var=False).pvalue}  # other seeds: Welch
    # Holm by hand over the 3 comparisons at step 1000
    order = sorted(p, key=p.get)
    holm, running = {}, 0
    for k, g in enumerate(order):
        running = max(running, min(1, (3 - k) * p[g]))
        holm[g] = running
    for g in p:
        row = by[(g, 1000)]
        assert row["test"] == ("welch" if g == "span 4" else "paired") and row["holm_m"] == "3"
        assert float(row["p"]) == pytest.approx(p[g], rel=1e-5)
        assert float(row["p_holm"]) == pytest.approx(holm[g], rel=1e-5)
    assert holm["span 3"] != p["span 3"]  # the adjustment did something here
    # at step 500 span 4 has no runs: the family is the two others
    assert by[("span 2", 500)]["holm_m"] == "2"
    assert float(by[("span 2", 500)]["p"]) == pytest.approx(stats.ttest_rel([39 + i * 1.1 for i in seeds],
                                                                             [40 + i for i in seeds]).pvalue, rel=1e-5)
    assert line(out, "vs span 0")[1:] == ["paired, 4 vs 4 @1000", "paired, 4 vs 4 @1000", "welch, 4 vs 4 @1000"]
    assert line(out, "p Holm")[1:] == [f"{holm[g]:.3g} (m=3)" for g in ("span 2", "span 3", "span 4")]


def test_a_seed_twice_in_a_group_is_refused(tmp_path):
    runs = [make_run(tmp_path, "a", {10: 5.0}, seed=1), make_run(tmp_path, "b", {10: 5.0}, seed=2),
            make_run(tmp_path, "a_copy", {10: 5.0}, seed=1)]
    r = run_main(["compare", *runs, "--out", tmp_path / "p.png"], entry=fid.main)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and r.stdout == ""
    assert f"span 0: seed 1 twice ({runs[0]} and {runs[2]})" in r.stderr and "pass only one of them" in r.stderr


def test_other_settings_split_groups_and_find_their_own_baseline(tmp_path):
    runs = [make_run(tmp_path, f"a{i}", {100: 10 + i}, seed=i) for i in range(2)]
    runs += [make_run(tmp_path, f"b{i}", {100: 20 + 3 * i}, seed=i, d_lr=1e-4) for i in range(2)]
    runs += [make_run(tmp_path, f"c{i}", {100: 30 + 2 * i}, seed=i, d_lr=1e-4, g_span=2, d_span=2) for i in range(2)]
    out, by = compare_csv(tmp_path, runs)
    assert [g for g, _ in by] == ["span 0, d_lr=0.0004", "span 0, d_lr=0.0001", "span 2, d_lr=0.0001"]
    p = stats.ttest_rel([30, 32], [20, 23]).pvalue  # c against b, not against a
    assert line(out, "p")[2] == f"{p:.3g}" and by[("span 2, d_lr=0.0001", 100)]["baseline"] == "span 0, d_lr=0.0001"


def test_fid_weights_group_by_their_content_not_their_path(tmp_path):
    w1, w2 = "6726825d00000001", "0123456789abcdef"  # the ids config.json records (inception.weights_id)
    runs = [make_run(tmp_path, "a0", {100: 10}, seed=0, fid_weights="/cluster/w.pth", fid_weights_id=w1),
            make_run(tmp_path, "a1", {100: 12}, seed=1, fid_weights=None, fid_weights_id=w1),  # the same file here
            make_run(tmp_path, "a2", {100: 11}, seed=2, fid_weights="/cluster/w.pth"),  # recorded no id: a0's
            make_run(tmp_path, "b0", {100: 30}, seed=0, fid_weights="/other/w.pth", fid_weights_id=w2),
            make_run(tmp_path, "c0", {100: 50}, seed=0, fid_weights="/old/w.pth")]  # no id, no run to tell it
    _, by = compare_csv(tmp_path, runs)
    groups = list(dict.fromkeys(g for g, _ in by))
    assert groups == [f"span 0, fid_weights={w1}", f"b0 (span 0, fid_weights={w2})", "c0 (span 0, fid_weights=/old/w.pth)"]
    assert by[(groups[0], 100)]["n"] == "3"
    # two ids for one path (the file replaced between runs): a run of that path without an id stays apart
    more = runs[:4] + [make_run(tmp_path, "d0", {100: 70}, seed=3, fid_weights="/cluster/w.pth", fid_weights_id=w2)]
    _, by = compare_csv(tmp_path, more)
    groups = list(dict.fromkeys(g for g, _ in by))
    assert {g: by[(g, 100)]["n"] for g in groups} == {f"span 0, fid_weights={w1}": "2",
                                                      "a2 (span 0, fid_weights=/cluster/w.pth)": "1",
                                                      f"span 0, fid_weights={w2}": "2"}


def test_runs_without_seeds_to_group_compare_as_before(tmp_path):
    runs = [make_run(tmp_path, "x", {10: 5.0}, seed=1), make_run(tmp_path, "y", {10: 7.0}, seed=2, g_span=1, d_span=1)]
    r = run_main(["compare", *runs, "--out", tmp_path / "p.png"], entry=fid.main)
    assert r.returncode == 0, r.stderr
    head = r.stdout.splitlines()[0]
    assert "x (span 0)" in head and "y (span 1)" in head
    assert line(r.stdout, "10") == ["5.00 (n = 1: no interval)", "7.00 (n = 1: no interval)"]



def test_a_run_without_config_json_beside_others_leaves_their_labels_short(tmp_path):
    # a folder holding fid.csv only (config.json lost, or logged by other code) is a group of
    # its own, named by its folder; the settings that label the others are those that vary
    # among the runs that have a config, not every setting they hold
    runs = [make_run(tmp_path, "x", {10: 5.0}, seed=1), make_run(tmp_path, "y", {10: 7.0}, seed=2, g_span=1, d_span=1)]
    bare = make_run(tmp_path, "bare", {10: 9.0})
    (bare / "config.json").unlink()
    r = run_main(["compare", *runs, bare, "--out", tmp_path / "p.png"], entry=fid.main)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].split() == ["step", "x", "(span", "0)", "y", "(span", "1)", "bare"]

@pytest.mark.parametrize("name, content, message", [
    ("fid.csv", b"step,fid\n\xff\xfe,1\n", "cannot read"),
    ("fid.csv", b"step,fid\n10,abc\n", "malformed row"),
    ("fid.csv", b"step,fid\nten,1.0\n", "malformed row"),
    ("attention.csv", b"step,network,layer,map,distance,uniform\n10,G,attn8,8x8,abc,1\n", "malformed row"),
    ("attention.csv", b"step,network,layer,map,distance,uniform,share,fixed\n10,G,attn8,8x8,1,1,abc,0\n",
     "malformed row"),
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
    # span 0: seed 0 went on to step 200; seed 1 stopped at 100 of 200. At 100 both spans hold
    # seeds 0 and 1: paired there; at 200 one run is left, and no test is made.
    a = [make_run(tmp_path, "a0", {100: 10, 200: 5}, seed=0),
         make_run(tmp_path, "a1", {100: 12}, seed=1, total_step=200)]
    b = [make_run(tmp_path, "b0", {100: 20}, seed=0, g_span=3, d_span=3),
         make_run(tmp_path, "b1", {100: 23}, seed=1, g_span=3, d_span=3)]
    out, by = compare_csv(tmp_path, [*a, *b, a[0]])
    p = stats.ttest_rel([20, 23], [10, 12]).pvalue
    assert line(out, "vs span 0")[1] == "paired, 2 vs 2 @100" and line(out, "p")[1] == f"{p:.3g}"
    assert line(out, "stopped early")[0] == "1: seed1 ended early @100"  # no status.json: no why
    assert by[("span 0", 100)]["n"] == "2" and by[("span 0", 200)]["n"] == "1"  # a0 given twice counts once
    assert by[("span 0", 200)]["n_started"] == "2"
    # a config.json from before --diffaug existed (its runs had none) groups with its equal of today
    old, new = make_run(tmp_path, "old", {100: 11}, seed=5), make_run(tmp_path, "new", {100: 13}, seed=6)
    cfg = json.loads((old / "config.json").read_text())
    del cfg["diffaug"]
    (old / "config.json").write_text(json.dumps(cfg))
    _, by = compare_csv(tmp_path, [old, new])
    assert [row["n"] for row in by.values()] == ["2"]


def test_a_metric_column_where_higher_is_better(tmp_path):
    # --column recall (fid.csv as training writes it with --metrics fid,prdc): the best mean
    # is the highest and --reach asks for >=
    runs = []
    for span, per_seed in ((0, [{500: 0.2, 1000: 0.5}, {500: 0.3, 1000: 0.6}]),
                           (3, [{500: 0.4, 1000: 0.3}, {500: 0.5, 1000: 0.2}])):
        for seed, recalls in enumerate(per_seed):
            d = make_run(tmp_path, f"s{span}_seed{seed}", None, seed=seed, g_span=span, d_span=span, total_step=1000)
            with open(d / "fid.csv", "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["step", "fid", "fid_ema", "samples", "seconds", "precision", "recall", "density", "coverage"])
                for step, v in recalls.items():
                    w.writerow([step, 50, "", 1000, 1.0, 0.9, v, 1.0, 0.5])
            runs.append(d)
    out, by = compare_csv(tmp_path, runs, "--column", "recall", "--reach", "0.35")
    assert [c.split()[0] for c in line(out, "best recall")] == ["0.55", "0.45"]
    assert line(out, "at step") == ["1000", "500"]
    assert [c.split()[0] for c in line(out, "reach recall≥0.35")] == ["1000", "500"]
    assert [by[g, 1000]["reach_median"] for g in ("span 0", "span 3")] == ["1000", "500"]
    # a metric no run logged is one line naming the flag that logs it
    r = run_main(["compare", *runs, "--column", "kid", "--out", tmp_path / "c.png"], entry=fid.main)
    assert r.returncode == 2 and "--metrics fid,kid" in one_line(r)
    (runs[0] / "fid.csv").write_text("step,recall\n1000,0.5\n")  # FID itself is not a --metrics choice
    r = run_main(["compare", runs[0], "--out", tmp_path / "c.png"], entry=fid.main)
    assert "no run logged fid; runs trained with --fid_step N log it" in one_line(r)


def test_runs_trained_without_fid_are_told_which_column_they_logged(tmp_path):
    # --metrics is: fid.csv keeps its fid columns, empty; the report was a table of dashes
    runs = []
    for seed in (0, 1):
        d = make_run(tmp_path, f"is_seed{seed}", None, seed=seed, metrics=["is"], total_step=100)
        (d / "fid.csv").write_text(f"step,fid,fid_ema,samples,seconds,is,is_std\n100,,,1000,1.0,{3 + seed},0.1\n")
        runs.append(d)
    r = run_main(["compare", *runs, "--out", tmp_path / "c.png"], entry=fid.main)
    assert "no run logged fid: they trained with --metrics is; pass --column is" in one_line(r)
    out, by = compare_csv(tmp_path, runs, "--column", "is")
    assert line(out, "best is")[0].split()[0] == "3.50"


@pytest.mark.parametrize("argv, message", [
    (["--bogus"], "fid.py: error: unrecognized arguments: --bogus (see python fid.py compare --help)"),
    ([], "the following arguments are required: RUN_LOG_DIR"),
    (["--reach", "x"], "argument --reach: invalid float value: 'x'"),
    (["--column", "nope"], "argument --column: invalid choice: 'nope'"),
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
                                                                               "name in one of"),
             (["--csv", ""], "--csv is empty; give a file name"), (["--html", ""], "--html is empty"),
             # two outputs in one file: one would be lost
             (["--out", tmp_path / "s.png", "--csv", tmp_path / "s.png"], f"--out and --csv both name {tmp_path}"),
             (["--csv", tmp_path / "s.x", "--html", tmp_path / "." / "s.x"], "--csv and --html both name"),
             (["--out", tmp_path / "f.png", "--html", tmp_path / "f_attention.png"],
              "the attention plot beside --out and --html both name"),
             (["--reach", "nan"], "argument --reach: expected a finite number, got 'nan'"),
             (["--reach", "inf"], "expected a finite number"),
             (["--ema"], "no run logged fid_ema: they trained without an EMA generator (--ema_decay); drop --ema (in the API: ema=False)")]
    for extra, message in cases:
        r = run_main(["compare", run, *extra], entry=fid.main)
        assert r.returncode == 2 and message in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
        assert r.stdout == ""  # refused before the report: nothing read, nothing drawn
    assert (tmp_path / "a_file").read_text() == "mine"
    # a run's own files, of a run compared or not (--csv taken for an input), are never written over
    other = make_run(tmp_path, "other", {10: 2.0})
    (other / "fid.png").write_bytes(b"the run's plot")
    before = {f: (other / f).read_bytes() for f in ("fid.csv", "config.json", "fid.png")}
    for flag, target in (("--csv", other / "fid.csv"), ("--html", other / "config.json"),
                         ("--out", other / "fid.png")):
        r = run_main(["compare", run, flag, target], entry=fid.main)
        assert f"{flag} {target} is a file of the run in {target.parent}; give another file name" in one_line(r)
    assert {f: (other / f).read_bytes() for f in before} == before
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
