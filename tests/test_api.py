"""The Python API (api.py): its numbers against hand computations, every kind of input
giving the same number, `fid.py --json` giving the API's numbers, images of a checkpoint
equal to `main.py --train false`'s, the compare rows, nothing printed and no exit; and the
README's "From Python" snippets run as written. fid.py is the API's command line, so
test_fid.py's comparison of its numbers with torch-fidelity covers the API's too."""
import csv
import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg

import api
import fid
import inception
import metrics
import utils
from conftest import REPO, TINY, out_dirs, rel_err, run_main, step_args
from test_compare import make_run


def pixel_inception(weights, resize="tf1", device="cpu", precision="fp32"):
    # stands in for load_inception: 8 pixel values (channel-first order) as "pool3", the next 8 as logits
    return lambda b: (b.float().flatten(1)[:, :8], b.float().flatten(1)[:, 8:16])


@pytest.fixture
def two_sets(tmp_path, monkeypatch):
    """Two different uint8 image sets (N, H, W, 3) as .npy files, measured by the pixel stand-in."""
    monkeypatch.setattr(inception, "load_inception", pixel_inception)
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8)
    b = np.clip(rng.integers(0, 256, (12, 8, 8, 3)) // 2 + 60, 0, 255).astype(np.uint8)
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    (tmp_path / "w.pth").write_bytes(b"stand-in weights")
    return tmp_path, a, b


def features_by_hand(images):
    """The stand-in's features, computed here: the first 8 values of each image, channel-first."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)[:, :8].astype(np.float64)


def fid_by_hand(f1, f2):
    """FID the textbook way (scipy's sqrtm), not the package's eigenvalue form."""
    mu1, mu2, s1, s2 = f1.mean(0), f2.mean(0), np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2).real))


OPTIONS = dict(fid_weights="w.pth", isc_splits=3, kid_subsets=5, kid_subset_size=6, device="cpu")


def test_every_kind_of_input_gives_the_fid_computed_by_hand(two_sets, capsys):
    root, a, b = two_sets
    folder = root / "a_pngs"
    folder.mkdir()
    for i, im in enumerate(a):
        Image.fromarray(im).save(folder / f"{i:02d}.png")
    expected = fid_by_hand(features_by_hand(a), features_by_hand(b))
    stats_b = api.statistics(b, root / "b_stats.npz", fid_weights="w.pth")
    assert stats_b["n"] == 12 and np.allclose(stats_b["mu"], features_by_hand(b).mean(0))
    for first in (root / "a.npy", str(folder), a, torch.from_numpy(a).permute(0, 3, 1, 2)):
        for second in (root / "b.npy", b, stats_b, root / "b_stats.npz"):
            assert rel_err(api.metrics(first, second, fid_weights="w.pth")["fid"], expected) < 1e-9
    assert capsys.readouterr().out == ""  # the API prints nothing


def test_fid_py_json_holds_the_api_numbers_and_the_text_shows_them(two_sets, capsys):
    root, a, b = two_sets
    argv = [root / "a.npy", root / "b.npy", "--metrics", "fid,is,kid", "--fid_weights", root / "w.pth",
            "--isc_splits", 3, "--kid_subsets", 5, "--kid_subset_size", 6, "--device", "cpu", "--no_progress"]
    ours = api.metrics(root / "a.npy", root / "b.npy", "fid,is,kid", **{**OPTIONS, "fid_weights": root / "w.pth"})
    assert sorted(ours) == ["fid", "is", "is_std", "kid", "kid_std"]
    assert rel_err(ours["fid"], fid_by_hand(features_by_hand(a), features_by_hand(b))) < 1e-9
    capsys.readouterr()
    assert fid.main([*map(str, argv), "--json"]) == 0
    out = capsys.readouterr().out
    assert len(out.strip().splitlines()) == 1 and json.loads(out) == ours
    assert fid.main(list(map(str, argv))) == 0
    text = dict(line.split(": ", 1) for line in capsys.readouterr().out.strip().splitlines())
    assert float(text["FID"]) == pytest.approx(ours["fid"], abs=1e-6)
    assert [float(x) for x in text["IS"].split(" +- ")] == pytest.approx([ours["is"], ours["is_std"]], abs=1e-6)
    assert [float(x) for x in text["KID"].split(" +- ")] == pytest.approx([ours["kid"], ours["kid_std"]], rel=1e-5)
    # IS alone takes one input; --save-stats reports its file and count
    assert fid.main([str(root / "a.npy"), "--metrics", "is", "--isc_splits", "3", "--fid_weights", str(root / "w.pth"),
                     "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {k: ours[k] for k in ("is", "is_std")}
    assert fid.main(["--save-stats", str(root / "a.npy"), str(root / "s.npz"), "--fid_weights", str(root / "w.pth"),
                     "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"statistics": str(root / "s.npz"), "n": 12}
    assert np.allclose(metrics.load_stats(root / "s.npz")[0], features_by_hand(a).mean(0))


def test_user_mistakes_raise_user_error_never_exit(two_sets, capsys):
    root, a, _ = two_sets
    cases = [(lambda: api.metrics(root / "missing", a), "does not exist"),
             (lambda: api.metrics(a), "FID compares two image sets: pass b"),
             (lambda: api.metrics(a, {"mu": 0}), "mu and sigma"),
             (lambda: api.metrics(a, a.astype(np.float32), fid_weights="w.pth"), "expected a uint8 image array"),
             (lambda: api.metrics(a, {"mu": np.zeros(8), "sigma": np.eye(8)}, "kid"), "KID needs per-image features"),
             (lambda: api.metrics(a, a, "fid,ssim"), "choose a comma list"),
             (lambda: api.statistics({"mu": np.zeros(8), "sigma": np.eye(8)}), "holds statistics already"),
             (lambda: api.generate(root / "a.npy", 4), "cannot read checkpoint"),
             (lambda: api.generate(root / "models" / "99.pt", 4), f"no checkpoint file {root / 'models' / '99.pt'}"),
             (lambda: api.generate(root, 4), f"no checkpoint file {root}: it is a folder; pass one of its <step>.pt"),
             (lambda: api.generate(root / "a.npy", 0), "n must be an integer >= 1, got 0"),
             # counts are checked before the checkpoint is read; these were torch's TypeErrors or ran
             (lambda: api.generate(root / "a.npy", 2.7), "n must be an integer >= 1, got 2.7"),
             (lambda: api.generate(root / "a.npy", None), "n must be an integer >= 1, got None"),
             (lambda: api.generate(root / "a.npy", "5"), "n must be an integer >= 1, got '5'"),
             (lambda: api.generate(root / "a.npy", 4, batch_size=-3), "batch_size must be an integer >= 1, got -3"),
             (lambda: api.generate(root / "a.npy", 4, batch_size=0), "batch_size must be an integer >= 1, got 0"),
             (lambda: api.metrics(a, a, metrics=None), "metrics is a comma list or a list of names"),
             (lambda: api.metrics(a, {"mu": np.zeros(8), "sigma": np.eye(8)}, fid_resize="nearest"),
              "fid_resize 'nearest': choose one of tf1, pytorch"),
             (lambda: api.statistics(a, fid_precision="fp16"), "fid_precision 'fp16': choose one of"),
             (lambda: api.compare_runs([root]), "has no fid.csv"),
             (lambda: api.compare_runs(5), "runs is a list of run folders"),
             (lambda: api.compare_runs([]), "runs is a list of run folders"),
             (lambda: api.compare_runs([root], reach="5000"), "reach is a finite number"),
             (lambda: api.compare_runs([root], reach=float("nan")), "reach is a finite number"),
             (lambda: api.metrics(a, a, device="gpu"), "device 'gpu': choose auto, cpu or cuda"),
             (lambda: api.metrics(a, a, batch_size=0), "batch_size must be an integer >= 1, got 0"),
             (lambda: api.metrics(a, a, kid_subsets=2.5), "kid_subsets must be an integer >= 1, got 2.5"),
             (lambda: api.statistics(list(a)), "a uint8 image array or tensor, or a dict of statistics; got a list"),
             # out= is named as the API spells it (fid.py's own messages say --save-stats)
             (lambda: api.statistics(a, root), f"out={root} is a folder; give a file name"),
             (lambda: api.statistics(a, root / "s.txt"), f"out={root / 's.txt'}: statistics are an .npz file"),
             (lambda: api.statistics(a, root / "junk.npz"), f"out={root / 'junk.npz'} exists and holds no statistics"),
             (lambda: api.metrics(a, tuple(a)), "got a tuple")]
    (root / "junk.npz").write_bytes(b"not statistics")
    for call, message in cases:
        with pytest.raises(utils.UserError, match=re.escape(message)):
            call()
    assert capsys.readouterr().out == ""
    api._check_counts(batch_size=np.int64(8))  # numpy's integers are integers


@pytest.mark.slow
def test_generate_draws_the_images_of_train_false(tmp_path):
    assert run_main(step_args(tmp_path, "--version", "g", "--total_step", "2", "--ema_decay", "0.5"),
                    cwd=tmp_path).returncode == 0
    assert run_main([*TINY, *out_dirs(tmp_path), "--version", "g", "--train", "false", "--n_samples", "10"],
                    cwd=tmp_path).returncode == 0
    for suffix, ema in (("", False), ("_ema", True)):
        written = np.stack([np.asarray(Image.open(p)) for p in sorted((tmp_path / f"samples/g/eval_2{suffix}").iterdir())])
        drawn = api.generate(tmp_path / "models/g/2.pt", 10, ema=ema, device="cpu")
        assert drawn.dtype == np.uint8 and drawn.shape == (10, 32, 32, 3) and (drawn == written).all()
    G, settings = api.load_generator(tmp_path / "models/g/2.pt")
    assert settings["seed"] == 3 and settings["imsize"] == 32 and isinstance(G, torch.nn.Module)


def test_compare_runs_gives_the_numbers_of_fid_py_compare(tmp_path, capsys):
    runs = [make_run(tmp_path, f"s0_seed{i}", {500: 40 + 2 * i, 1000: 30 + 2 * i}, seed=i) for i in range(3)]
    runs.append(make_run(tmp_path, "s3_alone", {500: 35, 1000: 25}, g_span=3, d_span=3, seed=0))
    rows = api.compare_runs(runs, reach=41)
    assert capsys.readouterr().out == ""
    with pytest.raises(utils.UserError, match=re.escape("no run logged fid_ema: they trained without an EMA "
                                                        "generator (--ema_decay); drop --ema (in the API: ema=False)")):
        api.compare_runs(runs, ema=True)  # as fid.py compare --ema: not rows of n = 0
    one = api.compare_runs(str(runs[-1]))  # one folder as a string: a list of one, not its characters
    assert one == api.compare_runs([runs[-1]]) and {r["group"] for r in one} == {"s3_alone (span 3)"}
    by = {(r["group"], r["step"]): r for r in rows}
    # span 0 at step 1000: 30, 32, 34 -> mean 32, std 2 (ddof 1), CI 32 ± t(0.975, 2)·2/√3
    half = 4.302652729911275 * 2 / 3 ** 0.5
    row = by[("span 0", 1000)]
    assert (row["g_span"], row["d_span"], row["n_started"], row["n"], row["n_failed"]) == (0, 0, 3, 3, 0)
    assert (row["mean"], row["std"], row["ci95_low"], row["ci95_high"]) == \
        pytest.approx((32, 2, 32 - half, 32 + half))
    assert row["reach_target"] == 41 and row["reach_median"] == 1000 and row["reach_never"] == 0
    alone = by[("s3_alone (span 3)", 1000)]
    assert alone["n"] == 1 and alone["std"] is None and alone["ci95_low"] is None and alone["p"] is None
    assert alone["reach_median"] == 500 and by[("span 0", 500)]["mean"] == pytest.approx(42)
    # the CSV holds the same numbers, and --json the same rows
    out_csv = tmp_path / "t.csv"
    assert fid.main(["compare", *map(str, runs), "--out", str(tmp_path / "c.png"), "--reach", "41", "--csv",
                     str(out_csv), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rows"] == rows and report["column"] == "fid"
    assert report["files"] == {"plot": str(tmp_path / "c.png"), "csv": str(out_csv)}
    with open(out_csv, newline="") as f:
        written = list(csv.DictReader(f))
    assert [{k: "" if v is None else v for k, v in r.items()} for r in written] == \
        [{k: "" if v is None else f"{v:.6g}" if isinstance(v, float) else str(v) for k, v in r.items()} for r in rows]


# ---------------------------------------------------------------------------- the README runs as written
def readme_python(section="From Python"):
    """The ```python fences of a README section, in order."""
    text = (REPO / "README.md").read_text()
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, re.S)


@pytest.mark.slow
def test_the_readme_from_python_snippets_run_as_written(env, tmp_path):
    """In an empty folder holding what the snippets name: images, the bundled emoji (10 of
    them: IS takes 10), a trained run and a small sweep's logs; FID weights: random, found in
    the torch hub cache as a user's would be."""
    (tmp_path / "my_images").mkdir()
    for p in sorted(env["A"].iterdir())[:10]:
        shutil.copy(p, tmp_path / "my_images")
    (tmp_path / "data").mkdir()
    with np.load(REPO / "data" / "emoji64.npz") as z:
        np.savez(tmp_path / "data" / "emoji64.npz", images=z["images"][:10])
    assert run_main(step_args(tmp_path, "--version", "my_run", "--total_step", "2"), cwd=tmp_path).returncode == 0
    (tmp_path / "models/my_run/2.pt").rename(tmp_path / "models/my_run/2000.pt")
    for span in (0, 3):
        for seed in (0, 1):
            make_run(tmp_path / "logs", f"my_sweep_span{span}_seed{seed}", {1000: 100 + 10 * span + seed},
                     g_span=span, d_span=span, seed=seed)
    snippets = readme_python()
    assert len(snippets) >= 3
    namespace = {}
    for i, code in enumerate(snippets):
        exec(compile(code, f"README.md, From Python, snippet {i + 1}", "exec"), namespace)
    assert sorted(namespace["scores"]) == ["fid", "is", "is_std", "kid", "kid_std"]
    assert all(np.isfinite(v) for v in namespace["scores"].values())
    assert namespace["stats"]["n"] == 10 and metrics.load_stats("emoji_stats.npz")[2]["n"] == 10
    assert namespace["images"].dtype == np.uint8 and namespace["images"].shape[1:] == (32, 32, 3)
    assert {(r["group"], r["mean"]) for r in namespace["rows"]} == {("span 0", 100.5), ("span 3", 130.5)}
