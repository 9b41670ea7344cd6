"""The GPU fast path (issues 9 and 25). These need CUDA: `pytest -m cuda` on a GPU machine; where no
GPU is visible (CI) conftest deselects them."""
import itertools
import threading

import pytest
import torch

from conftest import out_dirs
from batches import make_batches
from data_loader import build_dataset
from run import configure
from sagan_models import Self_Attn
from trainer import Trainer
from device import configure_backends, set_tf32, tf32_flags
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
    """[d_loss, g_loss, D(real), D(fake), r_t] of the first n steps. A graphed step returns the same
    static tensor every time, hence the clone."""
    batches = iter(make_batches(build_dataset(t.cfg), t.cfg, 0, t.device))
    return torch.stack([t.train_step(batches).clone() for _ in range(n)]).cpu()


@pytest.fixture(autouse=True)
def own_backend_settings():
    """Each test starts from and leaves PyTorch's process-wide arithmetic settings as found
    (configure_backends turns TF32 and cuDNN autotuning on): no test depends on the order."""
    saved = tf32_flags(), torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    yield
    set_tf32(*saved[0])
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[1:]


def assert_agree(fast, ref, rtol, atol, what):
    """fast matches ref in relative and absolute terms: rms(fast - ref) <= rtol·rms(ref) + atol.
    A reference that is exactly 0 (no query has a key: q and k get no gradient) must be
    exactly 0 in the fast path too: there a relative error would be 0/0."""
    assert torch.isfinite(fast).all(), what
    if not ref.any() or not fast.any():
        assert not ref.any() and not fast.any(), (what, "exactly 0 in one path only")
        return
    rms = lambda t: t.double().pow(2).mean().sqrt().item()
    err, scale = rms(fast - ref), rms(ref)
    assert err <= rtol * scale + atol, (what, f"rms error {err:.3g} against rms {scale:.3g}")


@pytest.mark.parametrize("cl", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("hw", [4, 8, 16, 32], ids=lambda n: f"{n}x{n}")
@pytest.mark.parametrize("span", range(5), ids=lambda s: f"span{s}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_attention_matches_dense_in_values_and_gradients(dtype, span, hw, cl):
    set_tf32(False, False)
    rtol, atol = (1e-5, 1e-7) if dtype == torch.float32 else (2e-2, 1e-4)
    torch.manual_seed(span)
    # mean: the mode with a fused path for maps with fully masked queries (seed mode computes
    # such a layer densely in float32 on either path; test_seed_mode_on_cuda_is_the_seeds_float32)
    layer = Self_Attn(64, span, fully_masked="mean").cuda()
    torch.nn.init.constant_(layer.gamma, 0.8)
    x = torch.randn(4, 64, hw, hw, device="cuda")
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
        # softmax ignores: its gradient is 0 in exact arithmetic, so both paths give rounding
        # noise there; it is checked against the query bias gradient's scale (both exactly 0
        # where no query has a key).
        key_bias = grads.pop("key_conv.bias")
        assert key_bias.norm() <= rtol * grads["query_conv.bias"].norm() + atol
        results.append({"out": out.detach().float(), "x.grad": xi.grad, **grads})
    dense, fused = results
    if hw == 4 and span >= 3:  # no query of a 4x4 map has a key left: q and k take no part
        assert not any(dense[n].any() or fused[n].any() for n in ("query_conv.weight", "query_conv.bias",
                                                                  "key_conv.weight"))
    # gamma's gradient is one sum of B·C·H·W products (attended · upstream) that cancel: its
    # rounding error is relative to their root sum of squares, not to the (small) sum
    terms = (dense["out"] - x.float()) / 0.8 * up
    for name in dense:
        assert_agree(fused[name], dense[name], rtol, atol + (rtol * terms.norm().item() if name == "gamma" else 0), name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_seed_mode_on_cuda_is_the_seeds_float32(dtype):
    # D's 4x4 map at span 3 (every query fully masked) and its 8x8 map at span 4, energies
    # beyond 32: on CUDA, autocast or not, the layer's weights and gradients are the original code's
    # float32 ones (the reference runs on the CPU; q and k exact in both dtypes, see seed_pair)
    from test_sagan_models import seed_pair, values_and_grads
    set_tf32(False, False)
    for hw, span in ((4, 3), (8, 4)):
        ours, ref, x = seed_pair(16, hw, hw, span, 1)
        with torch.no_grad():
            for conv in (ref.query_conv, ref.key_conv):
                conv.weight.copy_(torch.randint(-1, 2, conv.weight.shape, generator=torch.Generator().manual_seed(hw))
                                  * 4.0)
                conv.bias.zero_()
        ours.load_state_dict(ref.state_dict(), strict=False)
        x = x.sign()  # -1, 0, 1: q, k multiples of 4 up to 64, exact in bfloat16
        up = torch.randn(x.shape)
        _, ref_gx, ref_grads = values_and_grads(ref, x, up)
        assert ref.energy.abs().max() > 32
        ours.cuda()
        with torch.autocast("cuda", torch.bfloat16, enabled=dtype == torch.bfloat16):
            _, w = ours(x.cuda(), return_attention=True)
        torch.testing.assert_close(w.cpu(), ref.attention, rtol=1e-5, atol=1e-6)
        if dtype == torch.float32:  # bf16 rounds v and the output: values only above
            _, gx, grads = values_and_grads(ours, x.cuda(), up.cuda())
            largest = max(g.abs().max().item() for g in ref_grads.values())
            torch.testing.assert_close(gx.cpu(), ref_gx, rtol=1e-4, atol=1e-5)
            for name, grad in grads.items():
                torch.testing.assert_close(grad.cpu(), ref_grads[name], rtol=1e-4, atol=1e-6 * largest, msg=name)


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
    # The reference in IEEE float32: configure_backends (in make_trainer) turns TF32 on, so it
    # is turned off after it, with deterministic cuDNN kernels.
    ref_trainer = make_trainer(tmp_path, *PLAIN, "--attn_impl", "dense", "--span", "3")
    set_tf32(False, False)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    assert tf32_flags() == (False, False)
    ref = losses(ref_trainer, 6)
    t = make_trainer(tmp_path, "--span", "3")  # defaults on CUDA: bf16, compile, channels_last, graph
    assert (t.cfg.amp, t.cfg.compile, t.cfg.channels_last, t.cfg.cuda_graph) == ("bf16", "default", True, True)
    fast = losses(t, 6)
    # d_loss, g_loss, D(real), D(fake) agree within bf16's precision; r_t, the mean sign of
    # D(real), moves in steps of 1/batch when a logit near 0 changes sign, so it is compared
    # where it is exact: each path's r_t is a whole number of those steps in [-1, 1].
    torch.testing.assert_close(fast[:, :4], ref[:, :4], rtol=0.05, atol=0.05)
    b = t.cfg.batch_size
    for rt in (fast[:, 4], ref[:, 4]):
        assert torch.equal(rt * b, (rt * b).round()) and rt.abs().max() <= 1


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
        for k, v in getattr(a, net).items():
            assert torch.equal(v, getattr(b, net)[k]), (net, k)
    for opt in ("g_opt", "d_opt"):  # Adam's moments and step counts
        for i, state in getattr(a, opt)["state"].items():
            for k, v in state.items():
                assert torch.equal(v, getattr(b, opt)["state"][i][k]), (opt, i, k)
    straight = (tmp_path / "logs" / "straight" / "metrics.csv").read_text().splitlines()
    resumed = (tmp_path / "logs" / "resumed" / "metrics.csv").read_text().splitlines()
    cols = lambda rows: [r.split(",")[:1] + r.split(",")[4:] for r in rows]  # all but timings
    assert cols(straight) == cols(resumed)


def test_a_resumed_graphed_run_trains_with_its_new_learning_rates_and_betas(tmp_path):
    # Adam's lr and betas are Python numbers that a captured graph keeps: a resumed run's new
    # ones count only because its graph is captured after the checkpoint is loaded. The
    # graphed steps equal the eager ones with the new settings and part from the old ones.
    import shutil
    import main
    common = [*SMALL, *out_dirs(tmp_path), *PLAIN, "--attn_impl", "dense", "--span", "2", "--sample_step", "100",
              "--model_save_step", "4"]
    main.main([*common, "--version", "base", "--total_step", "4"])
    new = ["--g_lr", "3e-4", "--d_lr", "1e-4", "--beta1", "0.5", "--beta2", "0.99"]
    runs = {}
    for name, flags in (("eager_new", [*new, "--cuda_graph", "false"]), ("graph_new", [*new, "--cuda_graph", "true"]),
                        ("graph_old", ["--cuda_graph", "true"])):
        for root in ("models", "logs"):
            shutil.copytree(tmp_path / root / "base", tmp_path / root / name)
        cfg = configure([*common, "--version", name, "--total_step", "20", "--resume", *flags])
        configure_backends(cfg)
        t = Trainer(cfg)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
        lr, betas = (3e-4, 1e-4), (0.5, 0.99)
        if name != "graph_old":
            assert [g["lr"] for opt in (t.g_opt, t.d_opt) for g in opt.param_groups] == list(lr)
            assert all(g["betas"] == betas for opt in (t.g_opt, t.d_opt) for g in opt.param_groups)
        runs[name] = losses(t, 10)
    torch.testing.assert_close(runs["graph_new"], runs["eager_new"], rtol=1e-5, atol=1e-6)
    assert (runs["graph_new"][4:] - runs["graph_old"][4:]).abs().max() > 1e-3  # the replays used the new ones


def test_graph_captures_beside_loader_workers_and_their_pin_memory_thread(tmp_path, image_folder):
    # --cache false: batches come from spawned DataLoader workers through a pin-memory thread
    # that runs while the step is captured (a global-mode capture fails on its CUDA calls).
    t = make_trainer(tmp_path, "--dataset", "folder", "--image_path", str(image_folder), "--cache", "false",
                     "--num_workers", "2", "--compile", "none", "--batch_size", "4")
    assert t.cfg.cuda_graph
    stream = make_batches(build_dataset(t.cfg), t.cfg, 0, t.device)
    assert stream.loader.multiprocessing_context.get_start_method() == "spawn" and stream.loader.timeout > 0
    batches = iter(stream)
    out = [t.train_step(batches).clone() for _ in range(8)]  # 3 eager, the capture, 4 replays
    assert t.gan.step_fn.graph is not None
    assert any("pin_memory" in th.name for th in threading.enumerate())
    assert torch.isfinite(torch.stack(out)).all()


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
