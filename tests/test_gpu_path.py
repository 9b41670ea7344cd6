"""The CUDA path's safety, checked on the CPU (issue 25): loader workers that cannot inherit a
CUDA context and cannot wait for ever, datasets that travel to spawned workers, a graph capture
that ignores other threads, a resumed run's optimizer settings, and the device script's tools."""
import contextlib
import pickle
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import torch

import batches
import data_loader
import features
import main
from batches import LOADER_TIMEOUT_S, LoaderBatches, decode_all
from conftest import REPO, TINY, out_dirs, small_data
from data_loader import ArrayDataset, FileDataset, load_array
from gan_step import CUDAGraphStep
from run import configure
from trainer import Trainer

sys.path.insert(0, str(REPO / "tools"))
import gpu_check  # noqa: E402  (tools/gpu_check.py)


class Stop(Exception):
    pass


def spy_dataloader(monkeypatch, module):
    """module.DataLoader replaced by one that records its keyword arguments and stops."""
    seen = {}

    def spy(*args, **kwargs):
        seen.update(kwargs)
        raise Stop
    monkeypatch.setattr(module, "DataLoader", spy)
    return seen


# ---------------------------------------------------------------------------- loader workers
def test_loader_workers_of_a_cuda_run_are_spawned_and_have_a_timeout(image_folder):
    ds = FileDataset(image_folder, 16, "square", {"path": str(image_folder)})
    cuda = LoaderBatches(ds, 4, 0, 0, torch.device("cuda"), num_workers=2).loader  # built, never iterated
    assert cuda.multiprocessing_context.get_start_method() == "spawn"
    assert cuda.timeout == LOADER_TIMEOUT_S > 0
    cpu = LoaderBatches(ds, 4, 0, 0, torch.device("cpu"), num_workers=2).loader
    assert cpu.multiprocessing_context is None and cpu.timeout == LOADER_TIMEOUT_S  # fork: no CUDA to inherit
    assert LoaderBatches(ds, 4, 0, 0, torch.device("cuda"), num_workers=0).loader.timeout == 0


def test_decoding_and_the_fid_reference_start_their_workers_alike(monkeypatch, image_folder):
    ds = FileDataset(image_folder, 16, "square", {"path": str(image_folder)})
    seen = spy_dataloader(monkeypatch, batches)
    with pytest.raises(Stop):
        decode_all(ds, 2, device="cuda")
    assert (seen["multiprocessing_context"], seen["timeout"]) == ("spawn", LOADER_TIMEOUT_S)
    seen = spy_dataloader(monkeypatch, features)
    with pytest.raises(Stop):
        features._compute_reference(ds, None, 8, 4, torch.device("cuda"), 2, False, None, None, None, {}, False, "")
    assert (seen["multiprocessing_context"], seen["timeout"]) == ("spawn", LOADER_TIMEOUT_S)


@pytest.mark.slow
def test_spawned_workers_give_the_batches_of_the_main_process(monkeypatch, image_folder, tmp_path):
    # as after CUDA started in this process: the workers are spawned and get the dataset pickled
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    files = FileDataset(image_folder, 16, "square", {"path": str(image_folder)})
    spawned = LoaderBatches(files, 4, 5, 3, torch.device("cpu"), num_workers=2)
    assert spawned.loader.multiprocessing_context.get_start_method() == "spawn"
    inline = LoaderBatches(files, 4, 5, 3, torch.device("cpu"), num_workers=0)
    for a, b in zip(spawned, [x for x, _ in zip(inline, range(5))]):
        assert torch.equal(a, b)
    array = np.random.default_rng(0).integers(0, 256, (10, 3, 24, 24), dtype=np.uint8)  # (N, 3, H, W), resized
    np.save(tmp_path / "a.npy", array)
    mapped = ArrayDataset(load_array(tmp_path / "a.npy"), 16, None, {"path": str(tmp_path / "a.npy")})
    assert torch.equal(decode_all(mapped, 2, device="cuda"), decode_all(mapped, 0))


class _Stuck(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        time.sleep(30)
        return torch.zeros(3)


def test_a_stuck_loader_worker_is_one_line_naming_the_cause_and_the_fix(monkeypatch):
    monkeypatch.setattr(batches, "LOADER_TIMEOUT_S", 1)
    start = time.monotonic()
    stream = LoaderBatches(_Stuck(), 2, 0, 0, torch.device("cpu"), num_workers=1)
    with pytest.raises(batches.UserError) as e:
        next(iter(stream))
    assert time.monotonic() - start < 20
    message = str(e.value)
    assert "\n" not in message and "in 1 s" in message and "--num_workers 0" in message and "--cache" in message
    del stream, e
    import gc
    gc.collect()  # the stuck worker was ended at the error: nothing waits for it (torch would, 5 s)
    assert time.monotonic() - start < 4


@pytest.mark.slow
def test_a_stuck_worker_stops_training_with_one_line(tmp_path, image_folder, monkeypatch, capsys):
    monkeypatch.setattr(batches, "LOADER_TIMEOUT_S", 1)
    decode = FileDataset.raw

    def stuck_in_workers(self, i):  # the main process reads a few images too (attention pictures)
        if torch.utils.data.get_worker_info() is not None:
            time.sleep(30)
        return decode(self, i)
    monkeypatch.setattr(FileDataset, "raw", stuck_in_workers)
    with pytest.raises(SystemExit) as e:
        main.main([*TINY, *out_dirs(tmp_path), "--dataset", "folder", "--image_path", str(image_folder),
                   "--num_workers", "1", "--total_step", "2"])
    err = capsys.readouterr().err  # after the folder scan's own warning (one broken file), one line
    assert e.value.code == 2 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("main.py: error: no batch from the 1 image-decoding worker") and "--num_workers 0" in last


# ---------------------------------------------------------------------------- datasets travel
def test_a_memory_mapped_array_travels_as_its_file_name(tmp_path):
    array = np.random.default_rng(1).integers(0, 256, (300, 3, 32, 32), dtype=np.uint8)
    np.save(tmp_path / "big.npy", array)
    ds = ArrayDataset(load_array(tmp_path / "big.npy"), 32, None, {"path": str(tmp_path / "big.npy")})
    data = pickle.dumps(ds)
    assert len(data) < 10_000 < array.nbytes
    copy = pickle.loads(data)
    base = copy.array
    while not isinstance(base, np.memmap) and base.base is not None:
        base = base.base
    assert isinstance(base, np.memmap) and copy.array.shape == (300, 32, 32, 3)  # still mapped, not read
    assert all(torch.equal(copy[i], torch.from_numpy(array[i])) for i in (0, 299))
    in_memory = ArrayDataset(array, 32, None, {"path": "x"})  # no file behind it: pickled whole
    assert torch.equal(pickle.loads(pickle.dumps(in_memory))[7], in_memory[7])


def test_an_lsun_dataset_travels_without_its_open_database(monkeypatch, tmp_path):
    opened = []

    class FakeLSUN:  # torchvision's LSUN holds an open lmdb environment, which cannot be pickled
        def __init__(self, root, classes):
            opened.append(root)
            self.env = contextlib.nullcontext(open(__file__))  # an open file does not pickle either

        def __len__(self):
            return 3

        def __getitem__(self, i):
            from PIL import Image
            return Image.new("RGB", (20, 30), (i, 2 * i, 3 * i)), 0
    monkeypatch.setitem(sys.modules, "lmdb", types.ModuleType("lmdb"))
    import torchvision.datasets  # where LsunDataset takes it from, when it first opens the folder
    monkeypatch.setattr(torchvision.datasets, "LSUN", FakeLSUN)
    ds = data_loader.LsunDataset(tmp_path, 16, {"path": str(tmp_path)})
    copy = pickle.loads(pickle.dumps(ds))
    assert torch.equal(copy[2], ds[2]) and copy[2].shape == (3, 16, 16)
    assert opened == [str(tmp_path)] * 2  # the copy opened the folder again


# ---------------------------------------------------------------------------- the CUDA graph
def test_the_graph_is_captured_thread_local_and_replays_each_new_input(monkeypatch):
    captures = []

    class FakeGraph:  # replay runs what was captured on the static inputs, as a graph does
        def replay(self):
            step.static_out.copy_(step.fn(*step.static_in))

    @contextlib.contextmanager
    def capture(g, **kwargs):
        captures.append(kwargs)
        yield

    fakes = {"Stream": lambda: types.SimpleNamespace(wait_stream=lambda other: None),
             "stream": lambda s: contextlib.nullcontext(), "current_stream": lambda: None,
             "synchronize": lambda: None, "CUDAGraph": FakeGraph, "graph": capture}
    for name, fake in fakes.items():
        monkeypatch.setattr(torch.cuda, name, fake)
    calls = []

    def fn(x, y):
        calls.append(1)
        return torch.stack([x.sum(), (x * y).sum()])
    step = CUDAGraphStep(fn)
    for i in range(8):
        x, y = torch.full((3,), float(i)), torch.arange(3.0) + i
        assert torch.equal(step(x, y), torch.stack([x.sum(), (x * y).sum()])), i
    # other threads (a DataLoader's pin-memory thread) may call CUDA while the step is captured
    assert captures == [{"capture_error_mode": "thread_local"}]
    assert len(calls) == 3 + 1 + 5  # three eager steps, the capture, a replay for each of the last five


# ---------------------------------------------------------------------------- resume
@pytest.mark.slow
def test_a_resumed_run_takes_new_learning_rates_and_betas_and_keeps_adams_state(tmp_path):
    import checkpoint
    args = [*TINY, *out_dirs(tmp_path), "--log_step", "1", "--sample_step", "100", "--model_save_step", "2",
            "--version", "r"]
    assert main.main([*args, "--total_step", "2"]) in (0, None)
    new = ["--g_lr", "3e-4", "--d_lr", "2e-4", "--beta1", "0.5", "--beta2", "0.95"]
    t = Trainer(configure([*args, "--total_step", "4", "--resume", *new]))
    assert [g["lr"] for g in t.g_opt.param_groups] == [3e-4] and [g["lr"] for g in t.d_opt.param_groups] == [2e-4]
    assert all(g["betas"] == (0.5, 0.95) for opt in (t.g_opt, t.d_opt) for g in opt.param_groups)
    saved = checkpoint.load(tmp_path / "models" / "r" / "2.pt")
    for opt, state in ((t.g_opt, saved.g_opt), (t.d_opt, saved.d_opt)):
        own = opt.state_dict()["state"]
        assert own.keys() == state["state"].keys()
        assert all(torch.equal(own[i][k], v) for i in own for k, v in state["state"][i].items())


# ---------------------------------------------------------------------------- tools/gpu_check
def test_the_checkpoint_comparison_finds_one_changed_bit(tmp_path):
    args = [*TINY, *out_dirs(tmp_path), *small_data(), "--log_step", "1", "--sample_step", "100",
            "--model_save_step", "1", "--version", "c", "--total_step", "1"]
    assert main.main(args) in (0, None)
    path = tmp_path / "models" / "c" / "1.pt"
    ck = torch.load(path, weights_only=True)
    torch.save(ck, tmp_path / "same.pt")
    assert gpu_check.same_checkpoints(path, tmp_path / "same.pt") == []
    w = next(iter(ck["D"].values()))
    w.view(-1)[0] = torch.nextafter(w.view(-1)[0], torch.tensor(float("inf")))
    ck["d_opt"]["state"][0]["step"] += 1
    ck["config"]["version"] = "other"  # names the run: not compared
    torch.save(ck, tmp_path / "changed.pt")
    found = [where for where, _ in gpu_check.same_checkpoints(path, tmp_path / "changed.pt")]
    assert found == [f"/D/{next(iter(ck['D']))}", "/d_opt/state/0/step"]


def test_the_precision_summary_compares_bf16_with_fp32_per_span(tmp_path):
    rows = ["group,g_span,d_span,step,n,mean,std,ci95_low,ci95_high",
            "\"span 0, amp=bf16\",0,0,1000,3,200,5,,", "\"span 0, amp=bf16\",0,0,2000,3,180,4,,",
            "\"span 0, amp=none\",0,0,1000,3,210,5,,", "\"span 0, amp=none\",0,0,2000,3,170,2,,",
            "\"span 3, amp=bf16\",3,3,1000,3,150,1,,", "\"span 3, amp=none\",3,3,1000,2,160,1,,"]
    (tmp_path / "p.csv").write_text("\n".join(rows) + "\n")
    table = gpu_check.precision_rows(tmp_path / "p.csv")
    from scipy import stats
    p0 = stats.ttest_ind([176, 180, 184], [168, 170, 172], equal_var=False).pvalue  # means 180/170, std 4/2
    assert table[0][:5] == ["0", 2000, "180.0 ± 4.0 (3)", "170.0 ± 2.0 (3)", "+10.0"]
    assert float(table[0][5]) == pytest.approx(p0, rel=5e-3)  # printed with 3 digits
    assert table[1][:2] == ["3", 1000] and table[1][4] == "-10.0"


@pytest.mark.slow
def test_the_device_script_dry_run_of_the_resume_phase(tmp_path):
    env = {"DRY_RUN": "1", "PHASES": "resume", "OUT": str(tmp_path / "out"), "TMPDIR": str(tmp_path),
           "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    r = subprocess.run(["bash", str(REPO / "tools" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "resume (plain): resume check: EXACT" in summary and "| resume_plain | ok " in summary
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["env.txt", "results.tgz", "summary.txt"]
