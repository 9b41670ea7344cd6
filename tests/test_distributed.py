"""torchrun / DistributedDataParallel on CPU with gloo (issue 6): K processes with the same
global batch train the same model as one process, write one set of outputs, compute the
same FID, and checkpoints resume on any K."""
import csv
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import REPO, TINY, out_dirs, small_data
from sagan_models import Generator
from sampling import sampling_mode

pytestmark = pytest.mark.slow  # training runs and multi-process launches

FID_SAMPLES = 10  # drawn in whole generation batches of --batch_size 8: rank 0 draws 8, rank 1 8 and keeps 2
STEPS = ["--log_step", "1", "--sample_step", "4", "--model_save_step", "2", "--span", "1", "--sync_bn",
         "--ema_decay", "0.5", "--fid_samples", str(FID_SAMPLES), "--fid_batch_size", "6", "--fid_ref_samples", "8",
         *small_data()]
V = "sagan_emoji_span1_32px"


def launch(root, nproc, *args):
    cmd = [sys.executable, str(REPO / "main.py")] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
         str(REPO / "main.py")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    r = subprocess.run([*cmd, *TINY, *out_dirs(root), *STEPS, *map(str, args)], cwd=root, capture_output=True,
                       text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def rows(root, name="metrics.csv"):
    with open(root / "logs" / V / name, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, fid_weights):
    """Every launch of this module, the independent ones at the same time (one process
    rarely keeps both cores busy): one process; two, then that checkpoint continued by one
    and by four; and two with --fid_g_mode eval (for the last test)."""
    base = tmp_path_factory.mktemp("ddp")
    fid = ["--fid_step", "4", "--fid_weights", fid_weights]
    single, k2, k4, ev = base / "single", base / "k2", base / "k4", base / "eval"
    single.mkdir(), k2.mkdir(), ev.mkdir()
    k2_only = []

    def k2_then_resumed():
        launch(k2, 2, "--total_step", "4", *fid)
        k2_only.extend(sorted(p.relative_to(k2) for p in k2.rglob("*") if p.is_file()))
        shutil.copytree(k2, k4)
        with ThreadPoolExecutor(2) as pool:  # a K=2 checkpoint continued by one process, and by four
            done = [pool.submit(launch, k2, 1, "--total_step", "6", "--resume", *fid),
                    pool.submit(launch, k4, 4, "--total_step", "5", "--resume", "--fid_step", "0")]
            for d in done:
                d.result()

    with ThreadPoolExecutor(3) as pool:
        done = [pool.submit(launch, single, 1, "--total_step", "6", *fid), pool.submit(k2_then_resumed),
                pool.submit(launch, ev, 2, "--total_step", "4", "--fid_step", "4", "--fid_weights", fid_weights,
                            "--sync_bn", "false", "--fid_g_mode", "eval", "--ema_decay", "0")]
        for d in done:
            d.result()
    return dict(single=single, k2=k2, k4=k4, k2_files=k2_only, eval=ev)


def test_two_processes_log_the_losses_of_one(runs):
    one, two = rows(runs["single"]), rows(runs["k2"])
    assert [r["step"] for r in one] == [r["step"] for r in two] == [str(s) for s in range(1, 7)]
    for a, b in zip(one, two):
        for k in ("d_loss", "g_loss", "d_real", "d_fake"):
            # float noise, amplified by Adam's sign-like first steps (see the next test)
            assert float(b[k]) == pytest.approx(float(a[k]), rel=2e-3, abs=1e-5), (a["step"], k)
    # steps 5-6 ran in one process from the K=2 checkpoint; K=4 resumed it too
    k4 = rows(runs["k4"])
    assert float(k4[4]["d_loss"]) == pytest.approx(float(one[4]["d_loss"]), rel=2e-3)


def test_parameters_after_n_steps_equal_a_single_process_run(runs):
    a = torch.load(runs["single"] / "models" / V / "4.pt", weights_only=False)
    b = torch.load(runs["k2"] / "models" / V / "4.pt", weights_only=False)
    assert b["world_size"] == 2 and a["world_size"] == 1
    # Adam with beta1 = 0 moves every weight by about ±lr per step whatever the size of its
    # gradient, so a gradient that is zero in exact arithmetic (a conv bias before
    # BatchNorm, hinge terms of real and fake that cancel) is float noise whose sign
    # differs between 1 and 2 processes. Such weights may drift by up to steps·lr; all
    # others must agree to float precision. A real fault (no gradient averaging, a wrong
    # batch slice) moves most weights, not a few.
    for net, lr in (("G", 1e-4), ("D", 4e-4)):
        close = total = 0
        for k, v in a[net].items():
            if not v.is_floating_point():
                assert torch.equal(b[net][k], v), k
                continue
            diff = (b[net][k] - v).abs()
            assert diff.max() <= 4 * lr * 1.01 + 1e-5, (net, k, diff.max())
            close += int((diff <= 1e-5 + 1e-4 * v.abs()).sum())
            total += v.numel()
        assert close / total > 0.99, (net, close / total)
    # ... and the two generators make the same images
    z = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    imgs = []
    for ck in (a, b):
        G = Generator(32, 32, 16, span=1)
        G.load_state_dict(ck["G"])
        with sampling_mode(G, "batch"):
            imgs.append(G(z))
    torch.testing.assert_close(imgs[1], imgs[0], rtol=0, atol=1e-3)


def test_fid_split_over_ranks_equals_the_single_process_fid(runs):
    one, two = rows(runs["single"], "fid.csv"), rows(runs["k2"], "fid.csv")
    assert [r["step"] for r in one] == [r["step"] for r in two] == ["4", "6"]
    for a, b in zip(one, two):
        for k in ("fid", "fid_ema"):
            assert float(b[k]) == pytest.approx(float(a[k]), rel=1e-3), (a["step"], k)


def test_only_rank_zero_writes_one_set_of_outputs(runs):
    files = {str(p) for p in runs["k2_files"]}
    expected = {f"logs/{V}/metrics.csv", f"logs/{V}/config.json", f"logs/{V}/fid.csv", f"logs/{V}/fid.png",
                f"logs/{V}/attention.csv", f"logs/{V}/status.json", f"logs/.{V}.lock", f"models/.{V}.lock", f"samples/.{V}.lock",
                f"attn/.{V}.lock",
                f"models/{V}/2.pt", f"models/{V}/4.pt", f"samples/{V}/4_fake.png", f"samples/{V}/4_fake_ema.png",
                f"attn/{V}/4_attn.png"}
    stats = {f for f in files if f.startswith("logs/fid_stats/")}
    assert files - stats == expected
    assert len([f for f in stats if f.endswith(".npz")]) == 1


def test_fid_in_eval_mode_uses_the_checkpoints_statistics_on_every_rank(runs, fid_weights):
    # Without --sync_bn each rank's BatchNorm has running statistics of its own data; the
    # FID logged by 2 processes with --fid_g_mode eval must be the checkpoint's FID.
    import re
    import fid
    from conftest import run_main
    root = runs["eval"]  # 2 processes, --sync_bn false --fid_g_mode eval --ema_decay 0, FID at step 4
    logged = float(rows(root, "fid.csv")[-1]["fid"])
    stats = next((root / "logs/fid_stats").glob("*.npz"))
    r = run_main([root / "models" / V / "4.pt", stats, "--fid_samples", FID_SAMPLES, "--batch_size", 6,
                  "--fid_weights", fid_weights, "--device", "cpu", "--no_progress"], entry=fid.main)
    assert r.returncode == 0, r.stderr
    # rank 1's own statistics would move it by about 1e-5 relative here (measured without the fix)
    assert float(re.search(r"FID: (\S+)", r.stdout).group(1)) == pytest.approx(logged, rel=1e-6)


def _sync_bn_rank(rank, world, store, x, up, out):
    import torch.distributed as dist
    from distributed import SyncBatchNorm2d
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.manual_seed(0)
    bn = SyncBatchNorm2d(x.shape[1])
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.5, 0.5)
    part = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
    xi = x[part].clone().requires_grad_(True)
    y = bn(xi)
    (y * up[part]).sum().backward()
    torch.save({"y": y.detach(), "x_grad": xi.grad, "w_grad": bn.weight.grad,
                "b_grad": bn.bias.grad, "mean": bn.running_mean, "var": bn.running_var}, out / f"{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_sync_batchnorm_over_two_ranks_equals_batchnorm_of_the_global_batch(tmp_path):
    # Each of 2 gloo processes normalises its half of a batch; statistics, input gradients,
    # summed weight gradients and running statistics must be those of torch's BatchNorm2d
    # on the whole batch.
    import torch.multiprocessing as mp
    g = torch.Generator().manual_seed(1)
    x, up = torch.randn(6, 5, 3, 4, generator=g) * 3 + 1, torch.randn(6, 5, 3, 4, generator=g)
    mp.spawn(_sync_bn_rank, args=(2, tmp_path / "store", x, up, tmp_path), nprocs=2)
    parts = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(5)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.5, 0.5)
    xr = x.clone().requires_grad_(True)
    y = bn(xr)
    (y * up).sum().backward()
    torch.testing.assert_close(torch.cat([p["y"] for p in parts]), y.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([p["x_grad"] for p in parts]), xr.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts[0]["w_grad"] + parts[1]["w_grad"], bn.weight.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts[0]["b_grad"] + parts[1]["b_grad"], bn.bias.grad, rtol=1e-5, atol=1e-6)
    for p in parts:
        torch.testing.assert_close(p["mean"], bn.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(p["var"], bn.running_var, rtol=1e-5, atol=1e-6)
