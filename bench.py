"""Training and FID speed, measured side by side with the package's plain reference path.

    python bench.py                      # GPU: batch 64, 64², spans 0 and 3, fast vs reference
    python bench.py --device cpu         # a tiny version that runs in seconds (CI)
    python bench.py --fast_flags="--amp none" --spans 3    # the fast path with a part switched off

"fast" is the training loop with no speed flags, i.e. main.py's defaults (on CUDA: bf16
autocast, fused attention, channels_last, torch.compile, --cache data on the GPU, the whole
step as one CUDA graph); "reference" is the same loop with every speed part switched off:
fp32 (PyTorch's default precision), eager, dense materialised attention, images decoded
from JPEG per step by DataLoader workers. Both run the Trainer's own train_step on a
synthetic CelebA-like folder of 178×218 JPEGs, steady state after warm-up, data loading
included. --profile adds, per path, the GPU kernels per step and their summed time
(torch.profiler). Prints a table and writes it as JSON with the GPU name, torch version
and flags.
"""
import argparse
import dataclasses
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.profiler import ProfilerActivity, profile

from batches import make_batches
from choices import FID_SAMPLES, PRECISIONS, span_list, span_text
from data_loader import build_dataset
from device import configure_backends, pick_device, set_tf32
from features import Resolved, batches_from_array, extract_features, generated_features, load_images
from files import atomic_open, check_output_file
from inception import FIDInception, load_inception, resolve_weights
from metrics import METRICS, feature_stats
from parameter import parse_flags, resolve_device_defaults
from run import configure
from sampling import fixed_latents, whole_batches
from trainer import Trainer
from utils import REPO, OneLineParser, UserError, int_at_least, write_failed


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


def time_training(argv, steps, warmup, device, reference=False, profile=0):
    cfg = configure(argv)
    configure_backends(cfg)
    if reference:  # PyTorch's defaults: no TF32 matmuls (cuDNN convs may use TF32), no autotuning
        set_tf32(False, True)
        torch.backends.cudnn.benchmark = False
    t = Trainer(cfg)
    batches = iter(make_batches(build_dataset(cfg), cfg, 0, t.device))
    t0 = time.perf_counter()
    for _ in range(warmup):
        t.train_step(batches)
    sync(t.device)
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    acc = torch.zeros(5, device=t.device)
    for _ in range(steps):
        acc += t.train_step(batches)
    losses = (acc / steps).tolist()  # one sync, as the trainer does per log interval
    sync(t.device)
    dt = time.perf_counter() - t0
    out = {"it_per_s": steps / dt, "images_per_s": steps * cfg.batch_size * cfg.d_iters / dt,
           "seconds": dt, "steps": steps, "warmup_seconds": warm_s,
           "losses": dict(zip(["d_loss", "g_loss", "d_real", "d_fake", "rt"], losses)),
           "config": {k: getattr(cfg, k) for k in ("amp", "compile", "channels_last", "cache", "cuda_graph",
                                                   "attn_impl")}}
    if profile and device.type == "cuda":
        out.update(profile_steps(t, batches, profile))
    return out


def profile_steps(t, batches, steps):
    """GPU kernels (and copies) per step and their summed device time, from torch.profiler."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            t.train_step(batches)
        sync(t.device)
    gpu = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy_us = sum(e.device_time for e in gpu)
    return {"profile_steps": steps, "gpu_events_per_step": len(gpu) / steps, "gpu_busy_ms_per_step": busy_us / steps / 1e3}


def fid_distance(generated, ref, device):
    """(FID, seconds) of the training monitor's distance on `device`, as its first of a run: the
    square-root factors of both sides computed within, on copies of the sides, so that a call on
    the same device (a CPU bench) does not reuse what an earlier call kept in their caches."""
    generated, ref = (dataclasses.replace(side, cache={}) for side in (generated, ref))
    device = torch.device(device)
    sync(device)
    t0 = time.perf_counter()
    value, = METRICS["fid"].compute(generated, ref, device, {})
    sync(device)
    return value, time.perf_counter() - t0


def time_fid(args, device, trainer_argv):
    """For each FID precision: Inception feature throughput, and one FID of --fid_samples
    generated images through the Trainer's FID path, in phases (generation + features,
    statistics, Fréchet distance on the CPU and on the device). The reference side is the
    bundled emoji's statistics, computed beforehand with the same network."""
    weights = resolve_weights(args.fid_weights, download=False, quiet=True)
    cfg = configure(trainer_argv)
    t = Trainer(cfg)
    real = load_images(REPO / "data" / "emoji64.npz")
    if device.type == "cpu":
        real = real[:4 * args.fid_samples]  # Inception is slow on a CPU; this is a smoke test there
    rows = {}
    for precision in PRECISIONS:
        if weights:
            model = load_inception(weights, device=device, precision=precision)
        else:  # speed only (noted in the output)
            model = FIDInception(precision=precision).to(device).eval().requires_grad_(False)
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
        ref_pool3, _ = extract_features(model, batches_from_array(real, args.fid_batch_size), device,
                                            progress=False)
        ref = Resolved("reference", *feature_stats(ref_pool3), ref_pool3)
        sync(device)
        t0 = time.perf_counter()
        z = fixed_latents(0, "fid", whole_batches(args.fid_samples, cfg.batch_size), cfg.z_dim)
        pool3, _ = generated_features(t.G, model, z, args.fid_batch_size, t.device, bn_mode="batch",
                                          progress=False, gen_batch=cfg.batch_size, n=args.fid_samples)
        t1 = time.perf_counter()
        generated = Resolved("generated", *feature_stats(pool3), pool3)
        t2 = time.perf_counter()
        (value_cpu, cpu_s), (value, device_s) = (fid_distance(generated, ref, d) for d in ("cpu", device))
        rows[precision] = {"feature_images_per_s": feat_ips, "generate_and_features_s": t1 - t0,
                           "stats_s": t2 - t1, "distance_cpu_s": cpu_s, "distance_device_s": device_s,
                           "fid_seconds": (t2 - t0) + device_s, "fid": value, "fid_cpu": value_cpu}
    for r in rows.values():
        r["fid_rel_diff_vs_fp32"] = abs(r["fid"] - rows["fp32"]["fid"]) / max(rows["fp32"]["fid"], 1e-12)
    return {"precisions": rows, "fid_samples": args.fid_samples, "fid_batch_size": args.fid_batch_size,
            "weights": str(weights) if weights else "random (speed only)",
            "reference": f"{len(real)} bundled emoji", "generator": "untrained (step 0)"}


def main(argv=None):
    """The command line: a user mistake (e.g. --device cuda without a GPU) is one line, exit 2."""
    try:
        run(argv)
    except UserError as e:
        print(f"bench.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("bench.py: interrupted", file=sys.stderr)
        return 130


def run(argv=None):
    p = OneLineParser(prog="bench.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--spans", default=[0, 3], type=span_list,
                   help="comma-separated spans to time, as main.py's --span takes them (none: no attention layers)")
    p.add_argument("--steps", type=int_at_least(1), default=None, help="timed steps (default: 300 GPU, 5 CPU)")
    p.add_argument("--warmup", type=int_at_least(0), default=None, help="untimed steps first (default: 30 GPU, 2 CPU)")
    p.add_argument("--batch_size", type=int_at_least(1), default=None, help="default: 64 GPU, 8 CPU")
    p.add_argument("--imsize", type=int, default=None, help="default: 64 GPU, 32 CPU")
    p.add_argument("--conv_dim", type=int_at_least(1), default=None, help="G and D width (default: 64 GPU, 16 CPU)")
    p.add_argument("--n_images", type=int_at_least(1), default=None, help="synthetic JPEGs (default: 4096 GPU, 64 CPU)")
    p.add_argument("--num_workers", type=int_at_least(0), default=2, help="reference path's decoding workers")
    p.add_argument("--fast_flags", default="", help="extra main.py flags for the fast path, e.g. '--amp none' "
                                                    "(default: none, i.e. main.py's own defaults)")
    p.add_argument("--profile", type=int_at_least(0), default=0, help="profile this many steps per path (GPU)")
    p.add_argument("--skip_reference", action="store_true", help="time the fast path only")
    p.add_argument("--fid_samples", type=int_at_least(2), default=None, help=f"default: {FID_SAMPLES} GPU, 16 CPU")
    p.add_argument("--fid_batch_size", type=int_at_least(1), default=None, help="default: 500 GPU, 16 CPU")
    p.add_argument("--fid_weights", default=None)
    p.add_argument("--out", default="bench_results/bench.json")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    gpu = device.type == "cuda"
    pick = lambda v, g, c: v if v is not None else (g if gpu else c)
    args.steps, args.warmup = pick(args.steps, 300, 5), pick(args.warmup, 30, 2)
    args.batch_size, args.imsize = pick(args.batch_size, 64, 8), pick(args.imsize, 64, 32)
    args.conv_dim, args.n_images = pick(args.conv_dim, 64, 16), pick(args.n_images, 4096, 64)
    args.fid_samples, args.fid_batch_size = pick(args.fid_samples, FID_SAMPLES, 16), pick(args.fid_batch_size, 500, 16)
    if args.n_images < args.batch_size:  # every path would fail on it, after the JPEGs were made
        raise UserError(f"--n_images {args.n_images} is fewer than --batch_size {args.batch_size}; raise --n_images")
    common = common_flags(args, device, Path())  # the folders do not matter to the checks
    own = {w for w in common if w.startswith("--")} | {"--span", "--version"}
    clash = [w.split("=")[0] for w in args.fast_flags.split() if w.split("=")[0] in own]
    if clash:  # the table's header would name the benchmark's value, not the one timed
        raise UserError(f"--fast_flags: {', '.join(clash)} is bench.py's own; give bench.py's flag instead "
                        f"(--batch_size, --imsize, --conv_dim, --spans, --device), or none for its data and folders")
    for name, flags in path_flags(args).items():  # as main.py checks them: now, not after a path was timed
        try:
            resolve_device_defaults(parse_flags(common + flags), device.type)
        except UserError as e:
            raise UserError(f"the {name} path{' (--fast_flags)' if name == 'fast' else ''}: {e}") from None
    if args.profile and not gpu:
        raise UserError("--profile counts GPU kernels: it needs a CUDA device; drop it")
    if args.fid_weights is not None:  # now, not after the training paths were timed
        resolve_weights(args.fid_weights, download=False, quiet=True)
    out = check_output_file(args.out, "--out")  # now, not after minutes of timing
    tmp = Path(tempfile.mkdtemp(prefix="sagan_bench_"))
    try:
        measure(args, device, tmp, out, argv)
    finally:  # its thousands of JPEGs and run folders are the benchmark's own
        shutil.rmtree(tmp, ignore_errors=True)


def common_flags(args, device, tmp):
    """The main.py flags bench.py sets for every path: its sizes and device, its data and run
    folders under `tmp` (removed afterwards), no FID during the timed steps."""
    return ["--dataset", "folder", "--image_path", str(tmp / "data"), "--imsize", str(args.imsize),
            "--batch_size", str(args.batch_size), "--g_conv_dim", str(args.conv_dim),
            "--d_conv_dim", str(args.conv_dim), "--device", device.type, "--seed", "0", "--fid_step", "0",
            "--log_path", str(tmp / "logs"), "--model_save_path", str(tmp / "models"),
            "--sample_path", str(tmp / "samples"), "--attn_path", str(tmp / "attn")]


def path_flags(args) -> dict:
    """{path: its main.py flags}: "reference" every speed part off, "fast" main.py's defaults
    with --fast_flags; the reference left out with --skip_reference."""
    paths = {
        "reference": ["--amp", "none", "--compile", "none", "--attn_impl", "dense", "--channels_last", "false",
                      "--cache", "false", "--cuda_graph", "false", "--num_workers", str(args.num_workers)],
        "fast": ["--num_workers", str(args.num_workers), *args.fast_flags.split()],
    }
    if args.skip_reference:
        del paths["reference"]
    return paths


def measure(args, device, tmp, out, argv):
    """Time every path and FID with the data and run folders under `tmp`; print the table
    and write it to `out`."""
    gpu = device.type == "cuda"
    make_jpegs(tmp / "data", args.n_images)
    common, paths = common_flags(args, device, tmp), path_flags(args)
    rows = []
    for span in args.spans:
        text = span_text(span)  # as main.py's --span takes it, and as the table shows it
        for name, flags in paths.items():
            try:
                r = time_training(common + flags + ["--span", text, "--version", f"{name}{text}"],
                                  args.steps, args.warmup, device, reference=name == "reference", profile=args.profile)
            except UserError:  # a user mistake (e.g. --imsize 48) fails every path alike: one line, now
                raise
            except Exception as e:  # a benchmark reports a failing path and goes on with the others
                print(f"span {text}  {name:9s}  FAILED: {type(e).__name__}: {str(e)[:2000]}", flush=True)
                rows.append({"path": name, "span": span, "flags": " ".join(flags), "error": repr(e)[:2000],
                             "it_per_s": float("nan"), "images_per_s": float("nan")})
                continue
            rows.append({"path": name, "span": span, "flags": " ".join(flags), **r})
            prof = f"  {r['gpu_busy_ms_per_step']:.2f} ms GPU/step, {r['gpu_events_per_step']:.0f} kernels/step" \
                if "gpu_busy_ms_per_step" in r else ""
            print(f"span {text}  {name:9s}  {r['it_per_s']:8.1f} it/s  {r['images_per_s']:9.0f} img/s  "
                  f"(warm-up {r['warmup_seconds']:.1f} s){prof}", flush=True)
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
        print(f"{span_text(r['span']):>4} | {r['path']:9} | {r['it_per_s']:8.1f} | {r['images_per_s']:9.0f} | {ratio:>6}")
    for name, r in fid_row["precisions"].items():
        print(f"FID {name}: features {r['feature_images_per_s']:.0f} img/s; one FID of {args.fid_samples} samples "
              f"{r['fid_seconds']:.2f} s (generate+features {r['generate_and_features_s']:.2f}, stats "
              f"{r['stats_s']:.2f}, distance {r['distance_device_s']:.2f} on {device.type} / "
              f"{r['distance_cpu_s']:.2f} on cpu); FID {r['fid']:.4f}, {r['fid_rel_diff_vs_fp32']:.2e} from fp32 "
              f"(weights: {fid_row['weights']})")
    try:  # through a temp file: a full disk never costs the table an earlier run wrote there
        with atomic_open(out, "w") as f:
            f.write(json.dumps({"env": env, "args": vars(args), "training": rows, "fid": fid_row}, indent=2))
    except OSError as e:
        raise write_failed("--out", out, e) from None
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
