"""The fast paths compute what the reference paths compute (issue 5, CPU parts)."""
import json

import pytest
import torch

from conftest import TINY, out_dirs, run_cli
from batches import make_batches
from data_loader import build_dataset
from run import configure
from sagan_models import Self_Attn
from trainer import Trainer


@pytest.mark.parametrize("mode", ["pre", "post"])
def test_fused_attention_matches_dense_in_values_and_gradients(mode):
    for span in range(5):
        for hw in [(4, 4), (8, 8), (6, 10)]:
            torch.manual_seed(span)
            layer = Self_Attn(32, span=span, mask_mode=mode)
            torch.nn.init.constant_(layer.gamma, 0.8)
            x = torch.randn(3, 32, *hw)
            upstream = torch.randn(3, 32, *hw)
            results = []
            for fused in (False, True):
                layer.fused = fused
                layer.zero_grad()
                xi = x.clone().requires_grad_(True)
                out = layer(xi)
                (out * upstream).sum().backward()
                results.append((out.detach(), xi.grad, [p.grad.clone() for p in layer.parameters()]))
            (o0, gx0, gp0), (o1, gx1, gp1) = results
            torch.testing.assert_close(o1, o0, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(gx1, gx0, atol=1e-5, rtol=1e-5)
            for a, b in zip(gp1, gp0):
                torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


def _first_steps(tmp_path, image_folder, flags, n=2):
    cfg = configure([*TINY, *out_dirs(tmp_path), "--dataset", "folder", "--image_path", str(image_folder),
                          "--span", "2", "--version", "v" + str(abs(hash(tuple(flags)))), *flags])
    t = Trainer(cfg)
    batches = iter(make_batches(build_dataset(cfg), cfg, 0, t.device))
    return torch.stack([t.train_step(batches) for _ in range(n)])


REFERENCE = ["--attn_impl", "dense", "--amp", "none", "--compile", "none"]


@pytest.mark.slow
def test_every_cpu_speed_option_gives_the_reference_losses(tmp_path, image_folder):
    ref = _first_steps(tmp_path, image_folder, REFERENCE)
    fast = _first_steps(tmp_path, image_folder, ["--attn_impl", "fused", "--channels_last", "--cache",
                                                 "--compile", "default"])
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)
    # bfloat16 autocast: same losses to bf16 precision
    bf16 = _first_steps(tmp_path, image_folder, ["--attn_impl", "fused", "--amp", "bf16", "--cache"])
    torch.testing.assert_close(bf16, ref, rtol=0.05, atol=0.02)


@pytest.mark.slow
def test_cpu_benchmark_runs_and_writes_its_table(tmp_path):
    out = tmp_path / "bench.json"
    r = run_cli(["--device", "cpu", "--steps", "2", "--warmup", "1", "--fid_samples", "2", "--fid_batch_size", "2",
                 "--out", out], cwd=tmp_path, script="bench.py")
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert {(row["path"], row["span"]) for row in data["training"]} == {
        ("reference", 0), ("fast", 0), ("reference", 3), ("fast", 3)}
    assert all(row["it_per_s"] > 0 and "error" not in row for row in data["training"])
    assert set(data["fid"]["precisions"]) == {"fp32", "tf32"} and data["env"]["torch"] == torch.__version__
    for row in data["fid"]["precisions"].values():
        assert row["fid_seconds"] > 0 and abs(row["fid"] - row["fid_cpu"]) <= 1e-9 * max(1.0, abs(row["fid"]))
    assert "× ref" in r.stdout


def test_speed_flags_resolve_to_the_plain_path_on_cpu():
    cfg = configure(["--device", "cpu"])
    assert (cfg.amp, cfg.compile, cfg.channels_last, cfg.cache, cfg.cuda_graph) == ("none", "none", False, False, False)
    cfg = configure(["--device", "cpu", "--amp", "bf16", "--channels_last", "--cache", "true"])
    assert (cfg.amp, cfg.channels_last, cfg.cache) == ("bf16", True, True)


@pytest.mark.parametrize("args, message", [
    (["--device", "cpu", "--cuda_graph"], "--cuda_graph needs a CUDA device"),
    (["--device", "cpu", "--compile", "default", "--adv_loss", "wgan-gp"], "no double backward"),
    # modes --help does not offer (the step is already one CUDA graph) are refused like any bad choice
    (["--device", "cpu", "--compile", "reduce-overhead"], "invalid choice: 'reduce-overhead'"),
    (["--device", "cpu", "--compile", "max-autotune"], "invalid choice: 'max-autotune'"),
    (["--device", "cpu", "--channels_last", "maybe"], "expected true or false"),
])
def test_speed_flag_combinations_that_cannot_run_are_refused_in_one_line(capsys, args, message):
    import main
    with pytest.raises(SystemExit) as e:
        main.main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
