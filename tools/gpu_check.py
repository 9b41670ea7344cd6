"""The Python steps of tools/gpu_check.sh (issue 25), each a sub-command:

    python tools/gpu_check.py weights OUT (--from FP16_FILE | --random)   FID weights for the runs
    python tools/gpu_check.py data FOLDER N      emoji64.npz, N of its images as PNGs, the first N as small.npz
    python tools/gpu_check.py same A.pt B.pt     are two checkpoints equal, bit for bit? (exit 1 if not)
    python tools/gpu_check.py summary WORK       the summary of a finished check, from its work folder
"""
import argparse
import csv
import json
import math
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_weights(out, source=None):
    """FID-Inception weights in float32: the real ones from their fp16 copy, or random ones in
    the real layout (the dry run: FID values then mean nothing, the code paths are the same)."""
    import torch
    import inception
    if source is None:
        sd = inception.FIDInception().state_dict()
    else:
        sd = {k: v.float() if v.is_floating_point() else v for k, v in torch.load(source).items()}
    torch.save(sd, out)


def make_data(folder, n):
    """emoji64.npz copied into `folder` (a --cache file then lands there, not in the repo), its
    first n images as PNG files under folder/imgs (a --dataset folder: the loader-worker path),
    the first 16 as folder/small.npz (a small FID reference for the dry run)."""
    import numpy as np
    from PIL import Image
    folder = Path(folder)
    (folder / "imgs").mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "data" / "emoji64.npz", folder / "emoji64.npz")
    with np.load(REPO / "data" / "emoji64.npz") as z:
        images = z["images"][:n]
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / "imgs" / f"{i:05d}.png")
    np.savez(folder / "small.npz", images=images[:16])


def differences(a, b, where=""):
    """[(where, what)] for every tensor, number or key in which two nested checkpoint values
    differ; [] when they are equal bit for bit (NaN equals NaN at the same place)."""
    import torch
    if torch.is_tensor(a) or torch.is_tensor(b):
        if not (torch.is_tensor(a) and torch.is_tensor(b)) or a.shape != b.shape or a.dtype != b.dtype:
            return [(where, "type, shape or dtype")]
        if torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
                                 and torch.equal(a.nan_to_num(0), b.nan_to_num(0))):
            return []
        diff = (a.double() - b.double()).abs().max().item() if a.is_floating_point() else "integers"
        return [(where, f"max |a-b| {diff}")]
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [(where, f"keys {sorted(set(a) ^ set(b), key=str)}")]
        return [d for k in a for d in differences(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [(where, "length")]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    return [] if a == b or (a != a and b != b) else [(where, f"{a!r} != {b!r}")]


# what a resumed run may record differently from an uninterrupted one: its own names, paths and timings
NOT_COMPARED = {"config", "elapsed", "interval"}


def same_checkpoints(a, b) -> list:
    """The differences of two checkpoints in everything training computes: weights, EMA,
    Adam states, RNG states, step, fixed z (not the config, the wall time or the partial
    log interval, which name the run and time it)."""
    import checkpoint
    ca, cb = (vars(checkpoint.load(p)) for p in (a, b))
    return differences({k: v for k, v in ca.items() if k not in NOT_COMPARED},
                       {k: v for k, v in cb.items() if k not in NOT_COMPARED})


# ---------------------------------------------------------------------------- summary
def _table(header, rows):
    cells = [[str(c) for c in r] for r in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells[1:]])


def _last_line(path, pattern=""):
    try:
        lines = [l for l in Path(path).read_text(errors="replace").splitlines() if pattern in l and l.strip()]
    except OSError:
        return "(no log)"
    return lines[-1].strip()[:160] if lines else "(nothing)"


def phase_rows(work):
    rows = []
    for line in (work / "status.tsv").read_text().splitlines() if (work / "status.tsv").exists() else []:
        name, rc, seconds, limit, note = (line.split("\t") + [""] * 5)[:5]
        result = "ok" if rc == "0" else f"TIMEOUT ({limit} s)" if rc in ("124", "137") else f"FAILED (exit {rc})"
        rows.append([name, result, f"{float(seconds):.0f}", note])
    return rows


def bench_rows(path):
    data = json.loads(path.read_text())
    rows = [[r["span"], r["path"], f"{r['it_per_s']:.1f}", f"{r['images_per_s']:.0f}",
             f"{r['gpu_busy_ms_per_step']:.2f}" if "gpu_busy_ms_per_step" in r else "-",
             f"{r['gpu_events_per_step']:.0f}" if "gpu_events_per_step" in r else "-",
             f"{r.get('warmup_seconds', math.nan):.1f}", r.get("error", "")[:60]] for r in data["training"]]
    fid = [[name, f"{r['feature_images_per_s']:.0f}", f"{r['fid_seconds']:.2f}", f"{r['fid']:.4f}",
            f"{r['fid_rel_diff_vs_fp32']:.1e}"] for name, r in (data["fid"] or {"precisions": {}})["precisions"].items()]
    return data, rows, fid


def precision_rows(path):
    """Per span: bf16 against fp32 at the last step both logged for every seed: means, their
    difference, Welch's t-test from the group statistics of `fid.py compare --csv`."""
    from scipy import stats
    groups = {}
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            amp = "bf16" if "amp=bf16" in r["group"] else "fp32" if "amp=none" in r["group"] else r["group"]
            groups.setdefault((r["g_span"], amp), {})[int(r["step"])] = r
    rows = []
    for span in sorted({s for s, _ in groups}, key=str):
        a, b = groups.get((span, "bf16"), {}), groups.get((span, "fp32"), {})
        full = lambda g: [s for s, r in g.items() if int(r["n"]) == max(int(x["n"]) for x in g.values())]
        common = sorted(set(full(a)) & set(full(b))) if a and b else []
        if not common:
            rows.append([span, "-", "-", "-", "-", "-", "no common step"])
            continue
        s = common[-1]
        x, y = a[s], b[s]
        num = lambda r, k: float(r[k]) if r[k] != "" else math.nan
        p = stats.ttest_ind_from_stats(num(x, "mean"), num(x, "std"), int(x["n"]), num(y, "mean"), num(y, "std"),
                                       int(y["n"]), equal_var=False).pvalue if int(x["n"]) > 1 < int(y["n"]) else math.nan
        cell = lambda r: f"{num(r, 'mean'):.1f} ± {num(r, 'std'):.1f} ({r['n']})"
        rows.append([span, s, cell(x), cell(y), f"{num(x, 'mean') - num(y, 'mean'):+.1f}", f"{p:.3g}", ""])
    return rows


def summary(work) -> str:
    work = Path(work)
    out = [f"# gpu_check summary ({(work / 'mode.txt').read_text().strip() if (work / 'mode.txt').exists() else ''})",
           "", (work / "env.txt").read_text().strip() if (work / "env.txt").exists() else "", "",
           _table(["phase", "result", "s", "note"], phase_rows(work))]
    if (work / "lane.log").exists():
        out += ["", "lane: " + _last_line(work / "lane.log", " in ")]
        failed = [l.strip() for l in (work / "lane.log").read_text(errors="replace").splitlines()
                  if l.startswith("FAILED") or l.startswith("ERROR")]
        out += [f"  {l[:200]}" for l in failed[:30]]
    for mode in ("graph", "plain"):
        if (work / f"resume_{mode}.log").exists():
            out.append(f"resume ({mode}): " + _last_line(work / f"resume_{mode}.log", "resume check:"))
    for name in ("cache", "workers_emoji", "workers_folder"):
        if (work / f"{name}.log").exists():
            out.append(f"{name}: " + _last_line(work / f"{name}.log"))
    if (work / "bench.json").exists():
        try:
            data, rows, fid = bench_rows(work / "bench.json")
            out += ["", f"bench: {data['env']['device']} · torch {data['env']['torch']} · {data['env']['command']}",
                    _table(["span", "path", "it/s", "img/s", "GPU ms/step", "kernels/step", "warm-up s", "error"], rows)]
            if data["fid"]:
                out += ["", f"bench: FID of {data['fid']['fid_samples']} samples ({data['fid']['weights']}):",
                        _table(["precision", "Inception img/s", "one FID, s", "FID", "vs fp32"], fid)]
        except (KeyError, ValueError) as e:
            out.append(f"bench.json unreadable: {e!r}")
    elif (work / "bench.log").exists():  # cut short: the rows it printed as it went
        out += ["", "bench (no bench.json; the rows it printed):"]
        out += [l for l in (work / "bench.log").read_text(errors="replace").splitlines() if l.startswith("span ")]
    if (work / "fid_time.txt").exists():
        out += ["", (work / "fid_time.txt").read_text().strip()]
    if (work / "precision.csv").exists():
        out += ["", "precision: bf16 against fp32 (--amp none, TF32) at the last step every seed logged; "
                    "p: Welch's t-test over seeds",
                _table(["span", "step", "FID bf16", "FID fp32", "bf16 - fp32", "p", "note"],
                       precision_rows(work / "precision.csv"))]
        if (work / "precision.txt").exists():
            out += ["", (work / "precision.txt").read_text().strip()]
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(prog="tools/gpu_check.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("weights")
    w.add_argument("out")
    src = w.add_mutually_exclusive_group(required=True)
    src.add_argument("--from", dest="source")
    src.add_argument("--random", action="store_true")
    d = sub.add_parser("data")
    d.add_argument("folder")
    d.add_argument("n", type=int)
    s = sub.add_parser("same")
    s.add_argument("a")
    s.add_argument("b")
    m = sub.add_parser("summary")
    m.add_argument("work")
    args = p.parse_args(argv)
    if args.cmd == "weights":
        make_weights(args.out, args.source)
    elif args.cmd == "data":
        make_data(args.folder, args.n)
    elif args.cmd == "same":
        diffs = same_checkpoints(args.a, args.b)
        for where, what in diffs[:40]:
            print(f"  differs: {where}: {what}")
        print(f"resume check: {'EXACT' if not diffs else f'{len(diffs)} DIFFERENCES'} ({args.a} vs {args.b})")
        return 1 if diffs else 0
    else:
        print(summary(args.work))
    return 0


if __name__ == "__main__":
    sys.exit(main())
