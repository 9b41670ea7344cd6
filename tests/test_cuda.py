"""The GPU fast path (issue 9). These need CUDA: `pytest -m cuda` on a GPU machine; where no
GPU is visible (CI) conftest deselects them."""
import itertools

import pytest
import torch

from conftest import out_dirs
from batches import make_batches
from data_loader import build_dataset
from run import configure
from sagan_models import Self_Attn
from trainer import Trainer
from device import configure_backends, set_tf32
from checkpoint import load as load_checkpoint

pytestmark = pytest.mark.cuda

SMALL = ["--imsize", "32", "--batch_size", "16", "--g_conv_dim", "16", "--d_conv_dim", "16", "--z_dim", "32",
         "--seed", "3", "--device", "cuda", "--num_workers", "0", "--fid_step", "0"]
PLAIN = ["--amp", "none", "--compile", "none", "--channels_last", "false", "--cuda_graph", "false"]


def make_trainer(tmp_path, *flags):
    cfg = configure([*SMALL, *out_dirs(tmp_path), "--version", f"v{abs(hash(flags))}", *flags])
    configure_backends(cfg)
    return Trainer(cfg)


def losses(t, n):
    """[d_loss, g_loss, D(real), D(fake)] of the first n steps. A graphed step returns the same
    static tensor every time, hence the clone."""
    batches = iter(make_batches(build_dataset(t.cfg), t.cfg, 0, t.device))
    return torch.stack([t.train_step(batches).clone() for _ in range(n)]).cpu()


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_fused_attention_matches_dense_in_values_and_gradients():
    set_tf32(False, False)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        for span, hw, cl in itertools.product(range(5), [(4, 4), (8, 8), (16, 16), (32, 32)], (False, True)):
            torch.manual_seed(span)
            layer = Self_Attn(64, span).cuda()
            torch.nn.init.constant_(layer.gamma, 0.8)
            x = torch.randn(4, 64, *hw, device="cuda")
            if cl:
                x = x.contiguous(memory_format=torch.channels_last)
            up = torch.randn_like(x)
            results = []
            for fused in (False, True):
                layer.fused = fused
                layer.zero_grad()
                xi = x.clone().requires_grad_(True)
                with torch.autocast("cuda", torch.bfloat16, enabled=dtype == torch.bfloat16):
                    out = layer(xi)
                (out.float() * up).sum().backward()
                grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
                # The key bias shifts every energy of a query's row by the same amount, which the
                # softmax ignores: its gradient is 0 in exact arithmetic, so both paths give
                # rounding noise there; it is checked against the query bias gradient's scale.
                key_bias = grads.pop("key_conv.bias")
                assert key_bias.norm() <= tol * grads["query_conv.bias"].norm(), (dtype, span, hw, cl)
                results.append([out.detach().float(), xi.grad, *grads.values()])
            for d, f in zip(*results):
                assert torch.isfinite(f).all()
                assert rel(f, d) < tol, (dtype, span, hw, cl)


def test_graphed_step_equals_eager_step(tmp_path):
    # Same kernels, captured or not: a graph that skipped an update, reused a z draw or read
    # a stale buffer would part from the eager losses at the first replay (step 4).
    # Deterministic kernels only (dense attention, no cuDNN autotuning, deterministic cuDNN):
    # with atomics in a conv's weight gradient, Adam's first steps (close to sign descent)
    # turn 1e-7 differences into full-size updates of near-zero gradient components.
    flags = (*PLAIN, "--attn_impl", "dense", "--span", "2")
    saved = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    try:
        runs = []
        for graph in ("false", "true"):
            t = make_trainer(tmp_path, *flags, "--cuda_graph", graph)
            torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
            runs.append(losses(t, 10))
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-5, atol=1e-6)


def test_default_fast_step_matches_the_reference_step(tmp_path):
    set_tf32(False, True)
    ref = losses(make_trainer(tmp_path, *PLAIN, "--attn_impl", "dense", "--span", "3"), 6)
    t = make_trainer(tmp_path, "--span", "3")  # defaults on CUDA: bf16, compile, channels_last, graph
    assert (t.cfg.amp, t.cfg.compile, t.cfg.channels_last, t.cfg.cuda_graph) == ("bf16", "default", True, True)
    fast = losses(t, 6)
    torch.testing.assert_close(fast, ref, rtol=0.05, atol=0.05)


def test_graphed_run_resumes_exactly(tmp_path):
    import main
    common = [*SMALL, *out_dirs(tmp_path), "--span", "3", "--model_save_step", "6", "--sample_step", "100",
              "--log_step", "2"]
    main.main([*common, "--version", "straight", "--total_step", "12"])
    main.main([*common, "--version", "resumed", "--total_step", "6"])
    main.main([*common, "--version", "resumed", "--total_step", "12", "--resume"])
    a = load_checkpoint(tmp_path / "models" / "straight" / "12.pt")
    b = load_checkpoint(tmp_path / "models" / "resumed" / "12.pt")
    for net in ("G", "D"):
        for k in a[net]:
            assert torch.equal(a[net][k], b[net][k]), (net, k)
    straight = (tmp_path / "logs" / "straight" / "metrics.csv").read_text().splitlines()
    resumed = (tmp_path / "logs" / "resumed" / "metrics.csv").read_text().splitlines()
    cols = lambda rows: [r.split(",")[:1] + r.split(",")[4:] for r in rows]  # all but timings
    assert cols(straight) == cols(resumed)


def test_data_stays_on_the_gpu(tmp_path, image_folder):
    from torch.profiler import ProfilerActivity, profile
    t = make_trainer(tmp_path, "--dataset", "folder", "--image_path", str(image_folder), "--compile", "none",
                     "--batch_size", "4")
    stream = make_batches(build_dataset(t.cfg), t.cfg, 0, t.device)
    assert stream.images.is_cuda
    batches = iter(stream)
    for _ in range(4):  # warm-up and capture
        t.train_step(batches)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(2):  # 14 images, batch 4: these two stay inside one epoch
            t.train_step(batches)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events()]
    assert not [n for n in names if "HtoD" in n], names


@pytest.mark.parametrize("amp,cl,attn,graph,loss", list(itertools.product(
    ["none", "bf16"], ["true", "false"], ["fused", "dense"], ["true", "false"], ["hinge", "wgan-gp"])))
def test_every_eager_speed_combination_trains(tmp_path, amp, cl, attn, graph, loss):
    t = make_trainer(tmp_path, "--amp", amp, "--channels_last", cl, "--attn_impl", attn, "--cuda_graph", graph,
                     "--adv_loss", loss, "--compile", "none", "--span", "2")
    assert torch.isfinite(losses(t, 5)).all()


@pytest.mark.parametrize("amp,cl,attn,graph,span", [("bf16", "true", "fused", "true", 0),
                                                    ("none", "false", "fused", "false", 3),
                                                    ("bf16", "true", "dense", "true", 3),
                                                    ("none", "true", "fused", "true", 3)])
def test_compiled_speed_combinations_train(tmp_path, amp, cl, attn, graph, span):
    # the combinations with which torch.compile crashed before (issue 9): fused attention
    # with and without channels_last at span 3, channels_last at span 0
    t = make_trainer(tmp_path, "--amp", amp, "--channels_last", cl, "--attn_impl", attn, "--cuda_graph", graph,
                     "--compile", "default", "--span", str(span))
    assert torch.isfinite(losses(t, 5)).all()
