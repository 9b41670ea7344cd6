"""fid.py's command line: FID / IS / KID of folders, arrays and statistics files against
torch-fidelity and pytorch-fid; bad flags and junk inputs in one line, never numpy's or
torch's advice to unpickle; a warning for weights other than the published file; write
errors of --save-stats. Where the network is not what is tested, a tiny stand-in replaces
it (features are pixels), so no Inception forward runs."""

import errno
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import compare
import features
import inception
import metrics
import utils
import fid  # noqa: E402
from conftest import IS_SPLITS, KID_SUBSET_SIZE, KID_SUBSETS, N_IMAGES, make_trainer, rel_err  # noqa: E402


REPO = Path(__file__).resolve().parents[1]
# -----------------------------------------------------------------------------
# metrics against the peers


# -----------------------------------------------------------------------------
# closed forms and independent references


# -----------------------------------------------------------------------------
# weights resolution


# -----------------------------------------------------------------------------
# inputs and stats files


# -----------------------------------------------------------------------------
# CLI


def _cli(capsys, *argv):
    assert fid.main([*map(str, argv), "--no_progress"]) == 0
    return capsys.readouterr().out


def _value(out, name):
    line = next(l for l in out.splitlines() if l.startswith(f"{name}: "))
    return float(line.split()[1])


@pytest.mark.slow
def test_cli_fid_is_kid_and_saved_stats(env, capsys, fidelity_metrics, tmp_path, monkeypatch):
    out = _cli(capsys, env["A"], env["B"], "--metrics", "fid,is,kid", "--batch_size", 7, "--isc_splits", IS_SPLITS,
               "--kid_subsets", KID_SUBSETS, "--kid_subset_size", KID_SUBSET_SIZE, "--device", "cpu")
    ref_fid = fidelity_metrics["frechet_inception_distance"]
    assert rel_err(_value(out, "FID"), ref_fid) < 1e-4
    assert rel_err(_value(out, "IS"), fidelity_metrics["inception_score_mean"]) < 1e-5
    assert rel_err(_value(out, "KID"), fidelity_metrics["kernel_inception_distance_mean"]) < 1e-4
    stats = tmp_path / "a_stats.npz"
    assert "saved" in _cli(capsys, "--save-stats", env["A"], stats)
    mu, sigma, meta = metrics.load_stats(stats)
    assert meta["n"] == N_IMAGES and meta["key"]["resize"] == "tf1" and mu.shape == (2048,)
    assert rel_err(_value(_cli(capsys, stats, env["B"]), "FID"), ref_fid) < 1e-4
    # stats of the other pipeline are refused rather than silently compared, before the other
    # side's features are extracted (minutes for a real set)
    def no_network(*args, **kwargs):
        raise AssertionError("the network was loaded for an input that is refused")
    monkeypatch.setattr(inception, "load_inception", no_network)
    for inputs in ([stats, env["B"]], [env["B"], stats]):
        with pytest.raises(SystemExit) as e:
            fid.main([*map(str, inputs), "--fid_resize", "pytorch"])
        assert e.value.code == 2 and "--fid_resize tf1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        fid.main([str(stats), str(env["B"]), "--metrics", "kid"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "KID needs per-image features" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_cli_user_errors_are_one_line(env, capsys, tmp_path, monkeypatch):
    with pytest.raises(SystemExit) as e:
        fid.main([str(tmp_path / "missing"), str(env["B"])])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("fid.py: error:") and len(err.strip().splitlines()) == 1
    # no weights anywhere and offline: the error says what to download and where to put it
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the CLI must not add a warning on top of its error line
        with pytest.raises(SystemExit) as e:
            fid.main([str(env["A"]), str(env["B"]), "--no_progress"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1
    assert inception.FID_WEIGHTS_URL in err and str(tmp_path / "hub" / "checkpoints" / inception.WEIGHT_FILENAMES[0]) in err
    # stats-only inputs need no weights at all
    metrics.save_stats(tmp_path / "s.npz", np.zeros(3), np.eye(3))
    assert _value(_cli(capsys, tmp_path / "s.npz", tmp_path / "s.npz"), "FID") == 0


def test_generator_flags_without_a_checkpoint_input_are_refused_and_a_cpu_checkpoint_gets_a_note(tmp_path, capsys,
                                                                                                  monkeypatch):
    images = tmp_path / "a.npy"
    np.save(images, np.zeros((4, 8, 8, 3), np.uint8))
    for flags, named in ((["--fid_samples", "100"], "--fid_samples only shapes"), (["--ema"], "--ema only shapes"),
                         (["--fid_samples", "9", "--ema"], "--fid_samples and --ema only shape")):
        for argv in ([images, images], ["--save-stats", images, tmp_path / "s.npz"]):
            with pytest.raises(SystemExit) as e:  # before any image is read: no weights needed
                fid.main([*map(str, argv), *flags, "--device", "cpu"])
            err = capsys.readouterr().err
            assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and named in err, err
            assert "no input is one" in err and "drop " + " and ".join(f for f in flags if f.startswith("--")) in err
    assert not (tmp_path / "s.npz").exists()
    (tmp_path / "run").mkdir()  # a run's checkpoint folder where its checkpoint was meant: the hint naming it
    (tmp_path / "run" / "4.pt").write_bytes(b"")
    with pytest.raises(SystemExit):
        fid.main([str(tmp_path / "run"), str(images), "--ema", "--device", "cpu"])
    assert f"a checkpoint is given as its file, e.g. {tmp_path / 'run' / '4.pt'}" in capsys.readouterr().err
    # a checkpoint input on the CPU at the default 10,000 images: a note before the work starts
    # (here it stops at once: no FID weights, offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    ck = make_trainer(tmp_path).save_checkpoint()
    for extra, note in (([], True), (["--fid_samples", "50"], False), (["--no_progress"], False)):
        with pytest.raises(SystemExit):
            fid.main([str(ck), str(images), "--device", "cpu", *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 + note and err[-1].startswith("fid.py: error: no FID Inception weights found"), err
        assert not note or err[0].startswith(f"note: generating and measuring 10000 images of {ck.name} on the CPU")
    # ... and no note (nor minutes of generating) where another input is missing
    with pytest.raises(SystemExit):
        fid.main([str(ck), str(tmp_path / "missing"), "--device", "cpu"])
    assert capsys.readouterr().err.strip() == f"fid.py: error: {tmp_path / 'missing'} does not exist"


def test_cli_subcommand_dispatch(monkeypatch):
    seen = []
    monkeypatch.setattr(compare, "compare", lambda argv: seen.append(argv) or 0)
    assert fid.main(["compare", "x", "--y"]) == 0 and seen == [["x", "--y"]]


@pytest.mark.slow
def test_cli_subprocess_bad_path(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "fid.py"), str(tmp_path / "x"), str(tmp_path / "y")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("fid.py: error:") and "Traceback" not in r.stderr


# ---------------------------------------------------------------------------- bad input, weights, write errors
UNSAFE_ADVICE = ("allow_pickle", "weights_only", "pickle.load")


def run(capsys, argv):
    """fid.main(argv) -> (exit code, stdout, stderr)."""
    try:
        code = fid.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fid.py: error:") and "Traceback" not in err, err
    return lines[0]


def pixel_inception(weights, resize="tf1", device="cpu", precision="fp32"):
    # stands in for load_inception: 8 pixel values as "pool3", the next 8 as logits
    return lambda b: (b.float().flatten(1)[:, :8], b.float().flatten(1)[:, 8:16])


@pytest.fixture
def inputs(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "imgs.npy", rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8))
    metrics.save_stats(tmp_path / "s.npz", np.zeros(3), np.eye(3))
    (tmp_path / "w.pth").write_bytes(rng.bytes(256))  # never the published weights
    return tmp_path


def published(monkeypatch, weights):
    """Make `weights` count as the published file (its own sha256 prefix expected)."""
    monkeypatch.setattr(inception, "PUBLISHED_SHA256_PREFIX", inception.weights_id(weights)[:8], raising=False)


# -----------------------------------------------------------------------------
# (10) bad flags and junk inputs


def test_bad_flag_values_are_refused_in_one_line(inputs, capsys):
    stats = inputs / "s.npz"
    cases = [("--isc_splits", "0"), ("--kid_subsets", "0"), ("--kid_subset_size", "0"), ("--kid_subset_size", "1"),
             ("--fid_samples", "0"), ("--fid_samples", "-3"), ("--batch_size", "0"), ("--isc_splits", "x"),
             ("--prdc_k", "0")]
    for flag, value in cases:  # stats inputs, FID only: today 0 splits went unnoticed and exited 0
        code, out, err = run(capsys, [stats, stats, flag, value])
        line = assert_one_line_error(code, err)
        assert f"argument {flag}:" in line and "--help" in line and not out, (flag, value, line)
    line = assert_one_line_error(*run(capsys, [stats, stats, "--bogus"])[::2])
    assert "unrecognized arguments: --bogus" in line  # argparse's usage block is not printed
    code, out, err = run(capsys, ["--help"])
    assert code == 0 and "--isc_splits" in out and "--save-stats" in out and not err


def test_junk_inputs_are_one_line_without_unpickling_advice(inputs, capsys):
    junk = np.random.default_rng(1).bytes(4000)
    for name in ("junk.npz", "junk.npy", "pics/a.png"):
        (inputs / name).parent.mkdir(exist_ok=True)
        (inputs / name).write_bytes(junk)
    np.save(inputs / "obj.npy", np.array([{"a": 1}], dtype=object))
    np.savez(inputs / "obj.npz", images=np.array([{"a": 1}], dtype=object))
    np.savez(inputs / "objstats.npz", mu=np.array([0, "x"], dtype=object), sigma=np.eye(2))
    (inputs / "junk.pth").write_bytes(junk)
    s = inputs / "s.npz"
    cases = [([inputs / "junk.npz", s], "is not a NumPy .npy/.npz file"),
             ([inputs / "junk.npy", s], "is not a NumPy .npy/.npz file"),
             ([inputs / "pics", s], "1 file(s) with an image name could not be read"),
             ([inputs / "obj.npy", s], "holds Python objects"),
             ([inputs / "obj.npz", s], "holds Python objects (array images)"),
             ([inputs / "objstats.npz", s], "holds Python objects (array mu)"),
             ([s, inputs / "objstats.npz"], "holds Python objects (array mu)"),
             ([inputs / "imgs.npy", s, "--fid_weights", inputs / "junk.pth", "--no_progress"],
              "is not an FID Inception (2015-12-05) weights file")]
    for argv, message in cases:
        line = assert_one_line_error(*run(capsys, argv)[::2])
        assert message in line, (argv, line)
        assert not any(a in line for a in UNSAFE_ADVICE), line


def test_the_wrong_number_of_inputs_names_what_each_metric_takes(inputs, capsys):
    imgs = inputs / "imgs.npy"
    line = assert_one_line_error(*run(capsys, [imgs, imgs, "--metrics", "is"])[::2])
    assert "expected 1 input(s), got 2; --metrics is takes one set of images" in line
    line = assert_one_line_error(*run(capsys, [imgs])[::2])
    assert "expected 2 input(s), got 1; FID, KID and PRDC compare two sets: give INPUT1 INPUT2" in line


def test_half_a_statistics_file_or_another_networks_is_one_line_naming_why(inputs, capsys):
    np.savez(inputs / "mu_only.npz", mu=np.zeros(3))
    line = assert_one_line_error(*run(capsys, [inputs / "mu_only.npz", inputs / "s.npz"])[::2])
    assert "mu_only.npz holds mu but no sigma: statistics files hold both" in line  # not "expected a uint8 image"
    metrics.save_stats(inputs / "s10.npz", np.zeros(10), np.eye(10))
    line = assert_one_line_error(*run(capsys, [inputs / "s10.npz", inputs / "s.npz"])[::2])
    assert "statistics do not match: mu (10,) vs (3,)" in line and "same network's features" in line


def test_one_image_is_too_few_for_statistics_in_one_line(inputs, capsys, monkeypatch):
    monkeypatch.setattr(inception, "load_inception", pixel_inception)
    published(monkeypatch, inputs / "w.pth")
    np.save(inputs / "one.npy", np.zeros((1, 8, 8, 3), dtype=np.uint8))
    line = assert_one_line_error(*run(capsys, [inputs / "one.npy", inputs / "imgs.npy", "--fid_weights",
                                               inputs / "w.pth", "--no_progress"])[::2])
    assert "statistics need at least 2 images, got 1" in line


def test_object_arrays_are_refused_before_numpy_reads_them(inputs, monkeypatch):
    np.save(inputs / "obj.npy", np.array([None, 1], dtype=object))
    monkeypatch.setattr(features, "load_array", lambda *a: pytest.fail("the file must not be loaded"))
    with pytest.raises(utils.UserError, match="holds Python objects") as e:
        features.load_images(inputs / "obj.npy")
    assert "allow_pickle" not in str(e.value)


def test_cli_prdc_of_two_arrays_matches_the_prdc_package(inputs, capsys, monkeypatch):
    import contextlib
    import io

    from prdc import compute_prdc
    monkeypatch.setattr(inception, "load_inception", pixel_inception)
    rng = np.random.default_rng(3)
    a, b = rng.integers(0, 256, (24, 8, 8, 3), dtype=np.uint8), rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    np.save(inputs / "a.npy", a), np.save(inputs / "b.npy", b)
    code, out, err = run(capsys, [inputs / "a.npy", inputs / "b.npy", "--metrics", "fid,prdc", "--prdc_k", 3,
                                  "--fid_weights", inputs / "w.pth", "--no_progress"])
    assert code == 0, err
    line = next(l for l in out.splitlines() if l.startswith("PRDC: "))
    assert line.split()[1::2] == ["precision", "recall", "density", "coverage"]
    pixels = lambda x: x.transpose(0, 3, 1, 2).reshape(len(x), -1)[:, :8].astype(np.float64)  # pixel_inception's
    real = pixels(b)[np.sort(np.random.default_rng(0).choice(40, 24, replace=False))]  # as many as generated
    with contextlib.redirect_stdout(io.StringIO()):
        ref = compute_prdc(real, pixels(a), 3)
    expected = [float(ref[c]) for c in ("precision", "recall", "density", "coverage")]
    np.testing.assert_allclose([float(v) for v in line.split()[2::2]], expected, atol=5e-5)  # printed to 4 places
    line = assert_one_line_error(*run(capsys, [inputs / "a.npy", inputs / "s.npz", "--metrics", "prdc"])[::2])
    assert "PRDC needs per-image features" in line


# -----------------------------------------------------------------------------
# (14) weights other than the published file


def test_other_weights_warn_once_naming_file_and_fingerprint(inputs, capsys, monkeypatch):
    monkeypatch.setattr(inception, "load_inception", pixel_inception)
    w = inputs / "w.pth"
    code, out, err = run(capsys, [inputs / "imgs.npy", inputs / "imgs.npy", "--fid_weights", w, "--metrics",
                                  "fid,is,kid", "--isc_splits", 2, "--kid_subset_size", 3, "--no_progress"])
    assert code == 0 and "FID: " in out, err
    warnings = [l for l in err.splitlines() if "not comparable with published" in l]
    assert len(warnings) == 1, err  # one for the file, though both inputs needed the network
    assert str(w) in warnings[0] and inception.weights_id(w) in warnings[0]
    assert inception.check_published_weights(w) == inception.weights_id(w)  # the fingerprint is still what is recorded
    assert "not comparable" not in capsys.readouterr().err  # once per process


def test_published_weights_do_not_warn(inputs, capsys, monkeypatch):
    w = inputs / "w.pth"
    published(monkeypatch, w)
    assert inception.check_published_weights(w) == inception.weights_id(w)
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(inception, "load_inception", pixel_inception)
    code, out, err = run(capsys, [inputs / "imgs.npy", inputs / "imgs.npy", "--fid_weights", w, "--no_progress"])
    assert code == 0 and "FID: " in out and err == "", err


def test_statistics_of_other_weights_are_refused_before_any_feature_is_extracted(inputs, capsys, monkeypatch):
    # FIDs across weights differ by orders of magnitude (a run's stats with other weights gave
    # 51226 against the logged 1432): refused, as statistics of another --fid_resize are
    other = inputs / "other.pth"
    other.write_bytes(b"other weights" * 20)
    monkeypatch.setattr(inception, "load_inception", pixel_inception)
    published(monkeypatch, inputs / "w.pth")
    stats = inputs / "w_stats.npz"
    code, out, err = run(capsys, ["--save-stats", inputs / "imgs.npy", stats, "--fid_weights", inputs / "w.pth"])
    assert code == 0, err
    assert metrics.load_stats(stats)[2]["key"]["weights"] == inception.weights_id(inputs / "w.pth")
    monkeypatch.setattr(inception, "load_inception", lambda *a, **k: pytest.fail("features extracted"))
    line = assert_one_line_error(*run(capsys, [inputs / "imgs.npy", stats, "--fid_weights", other])[::2])
    assert f"{stats} was computed with FID weights {inception.weights_id(inputs / 'w.pth')}..." in line
    assert f"the FID weights {other} with {inception.weights_id(other)}..." in line
    other_stats = inputs / "other_stats.npz"  # two statistics files: compared with each other
    metrics.save_stats(other_stats, np.zeros(8), np.eye(8), key={"resize": "tf1", "weights": inception.weights_id(other)})
    assert "FIDs across weights are not comparable" in assert_one_line_error(*run(capsys, [stats, other_stats])[::2])
    # statistics that name their weights by file name (before fingerprints) are taken as they are
    metrics.save_stats(other_stats, np.zeros(8), np.eye(8), key={"resize": "tf1", "weights": "other.pth"})
    code, out, err = run(capsys, [stats, other_stats])
    assert code == 0 and "FID: " in out, err


# -----------------------------------------------------------------------------
# (6) --save-stats write errors


def _fail_in_savez(monkeypatch):
    def savez(f, *a, **k):  # half the file written, then the disk is full
        f.write(b"PK\x03\x04 partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(np, "savez", savez)


def _fail_in_replace(monkeypatch):
    def replace(src, dst):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("fail, message", [(_fail_in_savez, "the disk is full; free some space"), (_fail_in_replace, "the file system is read-only")])
def test_save_stats_write_error_is_one_line_and_keeps_the_earlier_file(inputs, capsys, monkeypatch, fail, message):
    monkeypatch.setattr(inception, "load_inception", pixel_inception)
    published(monkeypatch, inputs / "w.pth")
    out = inputs / "out" / "stats.npz"
    out.parent.mkdir()
    metrics.save_stats(out, np.ones(2), np.eye(2), n=5)
    earlier = out.read_bytes()
    fail(monkeypatch)
    code, stdout, err = run(capsys, ["--save-stats", inputs / "imgs.npy", out, "--fid_weights", inputs / "w.pth",
                                     "--no_progress"])
    line = assert_one_line_error(code, err)
    assert str(out) in line and message in line and "saved" not in stdout, line
    assert out.read_bytes() == earlier and os.listdir(out.parent) == ["stats.npz"]  # no temp file left either


def test_save_stats_never_writes_over_a_file_that_holds_no_statistics(inputs, capsys, monkeypatch):
    monkeypatch.setattr(inception, "load_inception", pixel_inception)
    published(monkeypatch, inputs / "w.pth")
    images, checkpoint = inputs / "images.npz", inputs / "run.pt"
    np.savez(images, images=np.zeros((4, 8, 8, 3), np.uint8))
    checkpoint.write_bytes(b"a checkpoint")
    for out, message in ((images, "exists and holds no statistics"), (checkpoint, "give a name ending in .npz"),
                         (inputs / "new.npy", "give a name ending in .npz")):
        before = out.read_bytes() if out.exists() else None
        code, stdout, err = run(capsys, ["--save-stats", inputs / "imgs.npy", out, "--fid_weights", inputs / "w.pth",
                                         "--no_progress"])
        assert message in assert_one_line_error(code, err)
        assert (out.read_bytes() if out.exists() else None) == before
    stats = inputs / "stats.npz"  # statistics are written over: computing them again is what was asked
    metrics.save_stats(stats, np.ones(2), np.eye(2), n=5)
    code, stdout, err = run(capsys, ["--save-stats", inputs / "imgs.npy", stats, "--fid_weights", inputs / "w.pth",
                                     "--no_progress"])
    assert code == 0 and "saved" in stdout and metrics.load_stats(stats)[2]["n"] != 5


def test_save_stats_write_error_is_a_user_error(tmp_path, monkeypatch):
    (tmp_path / "s.npz").write_bytes(b"earlier")
    _fail_in_savez(monkeypatch)
    with pytest.raises(utils.UserError, match="cannot write statistics .*s.npz: the disk is full; free some space"):
        metrics.save_stats(tmp_path / "s.npz", np.zeros(2), np.eye(2))
    assert (tmp_path / "s.npz").read_bytes() == b"earlier" and os.listdir(tmp_path) == ["s.npz"]
