import atexit
import contextlib
import functools
import io
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def pytest_configure(config):
    worker = hasattr(config, "workerinput")
    # checked before any collection, in the process the user started: raised in a pytest-xdist
    # worker, the error would reach the user as the controller's INTERNALERROR naming a test
    if os.environ.get("SAGAN_REQUIRE_SLURM") == "1" and not worker:
        why = slurm_missing()
        if why:
            raise pytest.UsageError(f"SAGAN_REQUIRE_SLURM=1, but {why}: start one with tools/slurm_local.sh start")
    # pytest-xdist's controller loads this file too, but only hands tests to the workers:
    # importing torch there (2-3 s) would delay every worker's start, so torch is imported
    # where tests run (the test modules import it anyway), and by the functions below
    if getattr(config.option, "numprocesses", None) and not worker:
        return
    import torch
    torch.set_num_threads(1)  # two cores: one intra-op thread keeps parallel test processes from thrashing


TINY = ["--imsize", "32", "--batch_size", "8", "--num_workers", "0", "--g_conv_dim", "16", "--d_conv_dim", "16",
        "--z_dim", "32", "--device", "cpu", "--seed", "3"]


@functools.lru_cache(maxsize=None)
def small_emoji():
    """A folder holding an emoji64.npz of the first 64 bundled emoji, for `--image_path`:
    --dataset emoji as ever (64 px images resized to --imsize, DiffAugment on), without
    resizing all 1,432 bundled images in every run. For runs whose data is incidental;
    tests of the bundled data itself leave --image_path at its default."""
    folder = Path(tempfile.mkdtemp(prefix="sagan_test_emoji_"))
    atexit.register(shutil.rmtree, folder, True)
    with np.load(REPO / "data" / "emoji64.npz") as z:
        np.savez(folder / "emoji64.npz", images=z["images"][:64])
    return str(folder)


def small_data():
    """["--image_path", small_emoji()]: the flags that make a run train on the small emoji set."""
    return ["--image_path", small_emoji()]


def once_per_session(tmp_path_factory, name, make):
    """make(folder) once for the whole test session, its value shared by every pytest-xdist
    worker through a pickle in the session's temp folder (each worker's basetemp is a folder
    below it): the peers' and our Inception features are not computed again per worker."""
    from files import file_lock
    root = tmp_path_factory.getbasetemp()
    root = root.parent if "PYTEST_XDIST_WORKER" in os.environ else root
    done = root / f"{name}.pickle"
    with file_lock(root / f".{name}.lock"):
        if not done.exists():
            value = make(root / name)
            done.write_bytes(pickle.dumps(value))
            return value
    return pickle.loads(done.read_bytes())


@pytest.fixture(scope="session")
def fid_weights(tmp_path_factory):
    """Random FID Inception weights in the real key layout (random_fid_state_dict; the real
    file cannot be downloaded here), written once for the whole session."""
    def make(folder):
        import torch
        folder.mkdir()
        torch.save(random_fid_state_dict(), folder / "random_fid_inception.pth")
        return folder / "random_fid_inception.pth"
    return once_per_session(tmp_path_factory, "fid_weights", make)


def run_cli(args, cwd, script="main.py", timeout=300, env=None):
    """Run one of the repo's scripts as a user would; returns the CompletedProcess."""
    e = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default", **(env or {})}
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=e)


def run_main(args, cwd=None, entry=None):
    """main.main(args) (or another entry point's main) in this process, answered like run_cli:
    a CompletedProcess with the exit code and what was printed (a subprocess costs seconds of
    imports per call)."""
    import main
    entry = entry or main.main
    out, err, code = io.StringIO(), io.StringIO(), 0
    old = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = entry([str(a) for a in args]) or 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
    finally:
        os.chdir(old)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def out_dirs(tmp):
    return ["--log_path", f"{tmp}/logs", "--model_save_path", f"{tmp}/models", "--sample_path", f"{tmp}/samples",
            "--attn_path", f"{tmp}/attn"]


def read_csv(path):
    """The rows of a log CSV as dicts."""
    import csv
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def main_args(tmp, *extra):
    """A tiny run on the small emoji set: rows every 5 steps, checkpoints every 10, no samples
    before its end."""
    return [*TINY, *out_dirs(tmp), *small_data(), "--log_step", "5", "--sample_step", "100", "--model_save_step",
            "10", *extra]


def train_args(tmp, *extra, bundled=False):
    """A tiny run with rows every 5 steps, samples and checkpoints every 10; on the small emoji
    set, or on the 1,432 bundled emoji with bundled=True."""
    data = [] if bundled else small_data()
    return [*TINY, *out_dirs(tmp), *data, "--log_step", "5", "--sample_step", "10", "--model_save_step", "10", *extra]


def step_args(tmp, *extra):
    """A tiny run on the small emoji set with a row every step and a checkpoint every 2."""
    return [*TINY, *out_dirs(tmp), *small_data(), "--log_step", "1", "--sample_step", "100", "--model_save_step", "2",
            *extra]


def make_trainer(tmp_path, *extra):
    from run import configure
    from trainer import Trainer
    return Trainer(configure([*TINY, *out_dirs(tmp_path), *small_data(), *extra]))


def one_line(r):
    """A CompletedProcess of run_main/run_cli that is one error line and exit code 2."""
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    return r.stderr


def stop_at(monkeypatch, at):
    """Send this process SIGTERM during step `at` (the run saves and prints the hint);
    returns the real train_step, to put back."""
    import signal
    import trainer
    step = trainer.Trainer.train_step

    def signalled(self, batches):
        if self.step == at - 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return step(self, batches)

    monkeypatch.setattr(trainer.Trainer, "train_step", signalled)
    return step


def one_line_exit_2(capsys, entry, argv):
    """entry(argv) (an entry point's main) ends in exit code 2 and one stderr line, no
    traceback: how every entry point answers a user mistake. Returns the line."""
    with pytest.raises(SystemExit) as e:
        entry([str(a) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def full_disk_at(monkeypatch, path):
    """Writes that end in a rename onto `path` (utils' atomic_open) fail as on a full disk."""
    import errno
    real_replace = os.replace

    def replace(src, dst):
        if os.fspath(dst) == os.fspath(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)


@pytest.fixture(autouse=True)
def isolated_cwd(tmp_path, monkeypatch):
    """Each test runs in its own empty folder: the default output roots (./logs, ./models)
    never see runs of the developer's checkout."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def image_folder(tmp_path):
    """Nested folder of mixed images: RGB JPEGs of two sizes, a greyscale PNG, an RGBA PNG,
    a palette GIF and one corrupt file."""
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    (root / "a" / "b").mkdir(parents=True)
    for i in range(12):
        arr = rng.integers(0, 256, (40 + 8 * (i % 2), 36, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / ("a" if i % 2 else "a/b") / f"rgb{i}.jpg")
    Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8), "L").save(root / "grey.png")
    Image.fromarray(rng.integers(0, 256, (32, 32, 4), dtype=np.uint8), "RGBA").save(root / "rgba.png")
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).convert("P").save(root / "pal.gif")
    (root / "a" / "broken.jpg").write_bytes(b"this is not a jpeg")
    return root


def random_fid_state_dict(seed=0):
    # He-scaled convs and non-trivial BN statistics keep activations O(1) through the ~95
    # layers (default init shrinks them towards 0 and makes every image look alike)
    import torch
    g = torch.Generator().manual_seed(seed)
    import inception
    m = inception.FIDInception()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.Conv2d):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * (2 / mod.weight[0].numel()) ** 0.5)
            elif isinstance(mod, torch.nn.BatchNorm2d):
                c = mod.num_features
                mod.weight.copy_(0.5 + torch.rand(c, generator=g))
                mod.bias.copy_(0.2 * torch.randn(c, generator=g))
                mod.running_mean.copy_(0.2 * torch.randn(c, generator=g))
                mod.running_var.copy_(0.5 + torch.rand(c, generator=g))
        # pool3 features share a large common part; project it out of the classifier so the
        # logits follow the per-image differences (else every image gets the same class: IS = 1)
        x = torch.from_numpy(structured_images(4, 99, 0)).permute(0, 3, 1, 2)
        mean = m.eval()(x)[0].mean(0)
        w = 0.3 * torch.randn(m.fc.weight.shape, generator=g)  # IS ~3 of at most 4 per split: unsaturated
        m.fc.weight.copy_(w - (w @ mean)[:, None] * mean[None] / mean.dot(mean))
        m.fc.bias.copy_(torch.randn(1008, generator=g))
    return m.state_dict()


def structured_images(n, seed, hue_shift):
    # gradients + a rectangle + a disc, so images differ in ways a conv net notices
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:48, 0:48] / 47.0
    out = []
    for _ in range(n):
        c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        t = (xx if rng.random() < 0.5 else yy)[..., None]
        img = c0 * (1 - t) + c1 * t
        y0, x0 = rng.integers(0, 32, 2)
        h, w = rng.integers(6, 16, 2)
        img[y0:y0 + h, x0:x0 + w] = rng.uniform(0, 255, 3)
        cy, cx, r = rng.uniform(8, 40), rng.uniform(8, 40), rng.uniform(3, 10)
        img[(yy * 47 - cy) ** 2 + (xx * 47 - cx) ** 2 < r * r] = np.clip(rng.uniform(0, 255, 3) + hue_shift, 0, 255)
        img += rng.normal(0, 8, img.shape)
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return np.stack(out)


def pytest_collection_modifyitems(config, items):
    """CUDA tests are deselected (not skipped) where no GPU is visible: CI runs none. Slurm
    tests likewise where no Slurm answers, unless SAGAN_REQUIRE_SLURM=1 (CI, which starts
    one): then pytest_configure has stopped the run with an error, never a silent pass."""
    import torch
    gone = {"cuda"} if not torch.cuda.is_available() else set()
    if os.environ.get("SAGAN_REQUIRE_SLURM") != "1" and any("slurm" in item.keywords for item in items):
        gone |= {"slurm"} if slurm_missing() else set()
    out = [item for item in items if gone & set(item.keywords)]
    if out:
        config.hook.pytest_deselected(items=out)
        items[:] = [item for item in items if not gone & set(item.keywords)]


def slurm_missing():
    """Why the slurm tests cannot run here (no Slurm commands, no controller, no usable
    node, no submitit), or None."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "no Slurm commands on PATH"
    try:
        out = subprocess.run(["sinfo", "--noheader", "--format", "%t"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer in 30 s"
    if out.returncode or not {s.strip("*~#$@^-") for s in out.stdout.split()} & {"idle", "mix", "alloc"}:
        said = (out.stderr or out.stdout).strip().splitlines()
        return f"no Slurm node is up ({said[-1] if said else 'sinfo lists none'})"
    import importlib.util
    if importlib.util.find_spec("submitit") is None:
        return "submitit is not installed (requirements-dev.txt)"
    return None


N_IMAGES = 16
KID_SUBSETS, KID_SUBSET_SIZE, IS_SPLITS = 20, 10, 4

# ---------------------------------------------------------------------------- the FID peers


@pytest.fixture(scope="session")
def peer_files(tmp_path_factory, fid_weights):
    """Random FID weights under pytorch-fid's cached file name + two folders of images,
    made once for every test that compares with the peers."""
    return once_per_session(tmp_path_factory, "peer_files", lambda root: _peer_files(root, fid_weights))


def _peer_files(root, fid_weights):
    root.mkdir()
    ckpt_dir = root / "torch_home" / "hub" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    from inception import WEIGHT_FILENAMES
    weights = ckpt_dir / WEIGHT_FILENAMES[0]
    shutil.copyfile(fid_weights, weights)
    dirs = {}
    for name, seed, shift in (("A", 1, 0), ("B", 2, 90)):
        d = root / name
        d.mkdir()
        for i, img in enumerate(structured_images(N_IMAGES, seed, shift)):
            Image.fromarray(img).save(d / f"{i:03d}.png")
        dirs[name] = d
    return dict(root=root, weights=weights, A=dirs["A"], B=dirs["B"])


@pytest.fixture
def env(peer_files, monkeypatch):
    """peer_files, with TORCH_HOME pointing at their weights for the test (where pytorch-fid
    looks for its file)."""
    import torch
    monkeypatch.setenv("TORCH_HOME", str(peer_files["root"] / "torch_home"))
    assert Path(torch.hub.get_dir()) == peer_files["root"] / "torch_home" / "hub", "torch.hub.set_dir() overrides TORCH_HOME"
    return peer_files


def _ours(env, resize):
    import features
    import inception
    model = inception.load_inception(env["weights"], resize=resize)
    out = {}
    for name in ("A", "B"):
        imgs = features.load_images(env[name])
        out[name] = features.extract_features(model, features.batches_from_array(imgs, 8), progress=False)
    return out


@pytest.fixture(scope="session")
def ours_tf1(tmp_path_factory, peer_files):
    return once_per_session(tmp_path_factory, "ours_tf1", lambda _: _ours(peer_files, "tf1"))


@pytest.fixture(scope="session")
def ours_pytorch(tmp_path_factory, peer_files):
    return once_per_session(tmp_path_factory, "ours_pytorch", lambda _: _ours(peer_files, "pytorch"))


@pytest.fixture(scope="session")
def fidelity_metrics(tmp_path_factory, peer_files):
    return once_per_session(tmp_path_factory, "fidelity_metrics", lambda _: _fidelity_metrics(peer_files))


def _fidelity_metrics(env):
    from torch_fidelity import calculate_metrics  # a test dependency: imported by the tests that use it
    return calculate_metrics(input1=str(env["A"]), input2=str(env["B"]), cuda=False, fid=True, isc=True, kid=True,
                             isc_splits=IS_SPLITS, kid_subsets=KID_SUBSETS, kid_subset_size=KID_SUBSET_SIZE,
                             feature_extractor_weights_path=str(env["weights"]), batch_size=8, cache=False,
                             verbose=False, save_cpu_ram=True)


def rel_err(a, b):
    return abs(a - b) / max(abs(b), 1e-300)


def reference_files(root, unreadable=()):
    """Independent listing: every file under root (os.walk) with an image suffix in any
    case, minus the known-bad ones, sorted as Paths (component by component)."""
    found = []
    for folder, _, names in os.walk(root):
        found += [Path(folder) / n for n in names if os.path.splitext(n)[1].lower() in EXTS]
    bad = {Path(root) / u for u in unreadable}
    return sorted(p for p in found if p not in bad)


def save(path, size=(8, 8), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*size, 3), 77, np.uint8)).save(path, format=fmt)


# ---------------------------------------------------------------------------- --cache (issue 20, item 9)
def direct(path, size, box=None):
    """Independent decode: PIL RGB, a centred square crop computed here (the shorter side,
    or `box`), PIL bilinear resize; CHW uint8. The test images have even size differences,
    so the centre needs no rounding."""
    with Image.open(path) as im:
        im = im.convert("RGB")
    if box is None:
        w, h = im.size
        s = min(w, h)
        box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
    return np.asarray(im.crop(box).resize((size, size), Image.BILINEAR)).transpose(2, 0, 1)


def folder_cfg(root, size, dataset="folder"):
    from types import SimpleNamespace
    return SimpleNamespace(dataset=dataset, image_path=str(root), imsize=size, cache=True, batch_size=4, seed=0,
                           num_workers=0)


GOOD = ["a/broken.jpg"]  # image_folder's one unreadable file


# Written out here rather than imported, so a change to IMAGE_EXTS shows up as a failure.
EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
