"""Training and FID speed, measured side by side with the package's plain reference path.

    python bench.py                      # GPU: batch 64, 64², spans 0 and 3, fast vs reference
    python bench.py --device cpu         # a tiny version that runs in seconds (CI)
    python bench.py --amp none --compile none --spans 3    # any config by flags

"fast" is the training loop with the speed flags given here (default on GPU: bf16 autocast,
fused attention, channels_last, torch.compile, --cache data on the GPU); "reference" is the
same loop in fp32, eager, dense materialised attention, images decoded from JPEG per step
by DataLoader workers. Both run the Trainer's own train_step on a synthetic CelebA-like
folder of 178×218 JPEGs, steady state after warm-up, data loading included.
Prints a table and writes it as JSON with the GPU name, torch version and flags.
"""
import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data_loader import build_dataset, make_batches
from parameter import get_parameters
from trainer import Trainer
from utils import set_tf32


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_jpegs(folder: Path, n: int, seed=0):
    """n CelebA-shaped (178×218) JPEGs: smooth random colour fields, so JPEG decoding costs
    what it costs on photos of that size."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        small = rng.integers(0, 256, (14, 12, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((178, 218), Image.BICUBIC)
        img.save(folder / f"{i:06d}.jpg", quality=90)


def time_training(argv, steps, warmup, device):
    cfg = get_parameters(argv)
    t = Trainer(cfg)
    if cfg.attn_impl == "dense":  # the reference path: PyTorch's default precision, no TF32 matmuls
        set_tf32(False, True)
    t._wrap_models()
    batches = iter(make_batches(build_dataset(cfg), cfg, 0, t.device))
    for _ in range(warmup):
        t.train_step(batches)
    sync(t.device)
    t0 = time.perf_counter()
    acc = torch.zeros(4, device=t.device)
    for _ in range(steps):
        acc += t.train_step(batches)
    losses = (acc / steps).tolist()  # one sync, as the trainer does per log interval
    sync(t.device)
    dt = time.perf_counter() - t0
    return {"it_per_s": steps / dt, "images_per_s": steps * cfg.batch_size * cfg.d_iters / dt,
            "seconds": dt, "steps": steps, "losses": dict(zip(["d_loss", "g_loss", "d_real", "d_fake"], losses))}


def time_fid(args, device, trainer_argv):
    """Inception feature throughput and one FID of --fid_samples generated images against
    precomputed reference statistics, through the Trainer's FID path."""
    import fid
    weights = fid.resolve_weights(args.fid_weights, download=False, quiet=True)
    model = fid.load_inception(weights, device=device) if weights else \
        fid.FIDInception().to(device).eval().requires_grad_(False)  # speed only; noted in the output
    if device.type == "cuda" and not weights:
        model = model.to(memory_format=torch.channels_last)
    batch = torch.randint(0, 256, (args.fid_batch_size, 3, args.imsize, args.imsize), dtype=torch.uint8,
                          device=device)
    with torch.inference_mode():
        model(batch)
        sync(device)
        t0 = time.perf_counter()
        reps = max(1, 2048 // args.fid_batch_size) if device.type == "cuda" else 1
        for _ in range(reps):
            model(batch)
        sync(device)
    feat_ips = reps * args.fid_batch_size / (time.perf_counter() - t0)

    cfg = get_parameters(trainer_argv)
    t = Trainer(cfg)
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((4096, 2048)) * 0.1
    mu, sigma = fid.feature_stats(ref)
    sync(device)
    t0 = time.perf_counter()
    pool3, _ = fid.generated_features(t.G, model, args.fid_samples, cfg.z_dim, args.fid_batch_size, t.device,
                                      bn_mode="batch", seed=0, progress=False)
    value = fid.frechet_distance(*fid.feature_stats(pool3), mu, sigma)
    fid_seconds = time.perf_counter() - t0
    return {"feature_images_per_s": feat_ips, "fid_seconds": fid_seconds, "fid_samples": args.fid_samples,
            "fid_batch_size": args.fid_batch_size, "weights": str(weights) if weights else "random (speed only)",
            "fid_value_vs_random_stats": value}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--spans", default="0,3", help="comma-separated spans to time")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: 300 GPU, 5 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 30 GPU, 2 CPU)")
    p.add_argument("--batch_size", type=int, default=None, help="default: 64 GPU, 8 CPU")
    p.add_argument("--imsize", type=int, default=None, help="default: 64 GPU, 32 CPU")
    p.add_argument("--conv_dim", type=int, default=None, help="G and D width (default: 64 GPU, 16 CPU)")
    p.add_argument("--n_images", type=int, default=None, help="synthetic JPEGs (default: 4096 GPU, 64 CPU)")
    p.add_argument("--num_workers", type=int, default=2, help="reference path's decoding workers")
    p.add_argument("--amp", default=None, choices=["none", "bf16"], help="fast path (default: bf16 GPU, none CPU)")
    p.add_argument("--compile", default=None, help="fast path torch.compile mode (default: default GPU, none CPU)")
    p.add_argument("--channels_last", default=None, choices=["true", "false"])
    p.add_argument("--skip_reference", action="store_true", help="time the fast path only")
    p.add_argument("--fid_samples", type=int, default=None, help="default: 10000 GPU, 16 CPU")
    p.add_argument("--fid_batch_size", type=int, default=None, help="default: 500 GPU, 16 CPU")
    p.add_argument("--fid_weights", default=None)
    p.add_argument("--out", default="bench_results/bench.json")
    args = p.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    gpu = device.type == "cuda"
    pick = lambda v, g, c: v if v is not None else (g if gpu else c)
    args.steps, args.warmup = pick(args.steps, 300, 5), pick(args.warmup, 30, 2)
    args.batch_size, args.imsize = pick(args.batch_size, 64, 8), pick(args.imsize, 64, 32)
    args.conv_dim, args.n_images = pick(args.conv_dim, 64, 16), pick(args.n_images, 4096, 64)
    args.amp, args.compile = pick(args.amp, "bf16", "none"), pick(args.compile, "default", "none")
    args.channels_last = pick(args.channels_last, "true", "false")
    args.fid_samples, args.fid_batch_size = pick(args.fid_samples, 10000, 16), pick(args.fid_batch_size, 500, 16)

    tmp = Path(tempfile.mkdtemp(prefix="sagan_bench_"))
    make_jpegs(tmp / "data", args.n_images)
    common = ["--dataset", "folder", "--image_path", str(tmp / "data"), "--imsize", str(args.imsize),
              "--batch_size", str(args.batch_size), "--g_conv_dim", str(args.conv_dim),
              "--d_conv_dim", str(args.conv_dim), "--device", device.type, "--seed", "0", "--fid_step", "0",
              "--log_path", str(tmp / "logs"), "--model_save_path", str(tmp / "models"),
              "--sample_path", str(tmp / "samples"), "--attn_path", str(tmp / "attn")]
    paths = {
        "reference": ["--amp", "none", "--compile", "none", "--attn_impl", "dense", "--channels_last", "false",
                      "--num_workers", str(args.num_workers)],
        "fast": ["--amp", args.amp, "--compile", args.compile, "--attn_impl", "fused", "--channels_last",
                 args.channels_last, "--cache", "--num_workers", str(args.num_workers)],
    }
    if args.skip_reference:
        del paths["reference"]
    rows = []
    for span in [int(s) for s in args.spans.split(",")]:
        for name, flags in paths.items():
            r = time_training(common + flags + ["--span", str(span), "--version", f"{name}{span}"],
                              args.steps, args.warmup, device)
            rows.append({"path": name, "span": span, "flags": " ".join(flags), **r})
            print(f"span {span}  {name:9s}  {r['it_per_s']:8.1f} it/s  {r['images_per_s']:9.0f} img/s", flush=True)
    fid_row = time_fid(args, device, common + paths["fast"] + ["--version", "fid"])

    env = {"device": torch.cuda.get_device_name(device) if gpu else platform.processor() or "cpu",
           "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "command": " ".join(["python", "bench.py", *(sys.argv[1:] if argv is None else argv)])}
    print(f"\n{env['device']} · torch {env['torch']} · {env['command']}")
    print(f"batch {args.batch_size}, {args.imsize}², {args.steps} timed steps after {args.warmup} warm-up")
    print(f"{'span':>4} | {'path':9} | {'it/s':>8} | {'img/s':>9} | {'× ref':>6}")
    for r in rows:
        ref = next((x for x in rows if x["path"] == "reference" and x["span"] == r["span"]), None)
        ratio = f"{r['it_per_s'] / ref['it_per_s']:.1f}" if ref else "-"
        print(f"{r['span']:>4} | {r['path']:9} | {r['it_per_s']:8.1f} | {r['images_per_s']:9.0f} | {ratio:>6}")
    print(f"FID features: {fid_row['feature_images_per_s']:.0f} img/s; one FID of {args.fid_samples} samples: "
          f"{fid_row['fid_seconds']:.2f} s (weights: {fid_row['weights']})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"env": env, "args": vars(args), "training": rows, "fid": fid_row}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
