"""Every picture made with matplotlib: FID curves, the compare report's plots, the attention
picture. The backend is chosen here, once: files only, never a window."""
import io
from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from matplotlib.backend_bases import FigureCanvasBase  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from files import atomic_open  # noqa: E402
from sagan_models import attention_layers  # noqa: E402
from utils import UserError  # noqa: E402

def plot_fid(runs: dict, path, column="fid", higher=False):
    """A fid.csv column (FID, or the first metric of a run without FID) against step, a line
    per run; its EMA generator dashed in the same colour."""
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for label, rows in runs.items():
        color = None
        for key, style in ((column, "-o"), (column + "_ema", "--s")):
            pts = [(int(r["step"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
            if pts:
                line, = ax.plot(*zip(*pts), style, ms=3, color=color,
                                label=label + (" (EMA)" if key.endswith("_ema") else ""))
                color = line.get_color()
    ax.set_xlabel("generator step")
    ax.set_ylabel(f"{'FID' if column == 'fid' else column} ({'higher' if higher else 'lower'} is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_attention_picture(G, image_u8, attn_inputs, path, span, queries=((0.25, 0.25), (0.25, 0.75),
                                                                         (0.5, 0.5), (0.75, 0.4))):
    """For a few query pixels of one generated image, each G attention layer's weights as
    a heat map over the image, with the query marked and its masked square outlined.
    Returns the picture as written, uint8 (H, W, 3)."""

    layers = dict(attention_layers(G))
    img = image_u8.permute(1, 2, 0).cpu().numpy()
    S = img.shape[0]
    fig, axes = plt.subplots(len(attn_inputs), 1 + len(queries), figsize=(2.2 * (1 + len(queries)),
                                                                          2.3 * len(attn_inputs)), squeeze=False)
    for row, (name, x) in enumerate(attn_inputs.items()):
        _, w = layers[name](x, return_attention=True)  # (1, N, N) for this one image
        H, W = x.shape[2:]
        cell = S / H
        axes[row, 0].imshow(img)
        axes[row, 0].set_title(f"{name} ({H}×{W})", fontsize=9)
        for k, (fy, fx) in enumerate(queries):
            i, j = int(fy * H), int(fx * W)
            heat = w[0, i * W + j].float().view(H, W).cpu().numpy()
            ax = axes[row, k + 1]
            ax.imshow(img.mean(axis=2), cmap="gray", vmin=0, vmax=255)
            ax.imshow(np.kron(heat, np.ones((int(cell), int(cell)))), cmap="inferno", alpha=0.65)
            ax.plot((j + 0.5) * cell - 0.5, (i + 0.5) * cell - 0.5, "c+", ms=9, mew=2)
            axes[row, 0].plot((j + 0.5) * cell - 0.5, (i + 0.5) * cell - 0.5, "c+", ms=7, mew=1.5)
            if layers[name].masked:  # span 0 of --original_attention masks the query itself
                r0, r1, c0, c1 = max(i - span, 0), min(i + span, H - 1), max(j - span, 0), min(j + span, W - 1)
                ax.add_patch(Rectangle((c0 * cell - 0.5, r0 * cell - 0.5), (c1 - c0 + 1) * cell,
                                       (r1 - r0 + 1) * cell, fill=False, ec="cyan", lw=1.2, ls="--"))
            ax.set_title(f"query ({i},{j})  max {heat.max():.2f}", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"generator attention, span {span} (dashed: masked square)", fontsize=10)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=80)
    plt.close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png.getvalue())
    with Image.open(png) as im:  # the file's own pixels, for whoever shows it elsewhere (TensorBoard)
        return np.asarray(im.convert("RGB"))


def plot_groups(groups, path, column="fid", higher=False):
    """Each group's mean of `column` over the runs that reached a step, with a ±std band where
    there are several; an × at the last value of every run that failed (NaN/inf, a crash).
    higher: larger values are the better ones (recall, ...)."""
    fig, ax = plt.subplots(figsize=(6.4, 4))
    marked = False  # the legend explains the × once
    for g in groups:
        t = g.table()
        steps = list(t)
        mean = np.array([t[s].mean for s in steps])
        failed = g.failed()
        label = f"{g.label} (n={len(g.runs)}" + (f", {len(failed)} failed)" if failed else ")")
        line, = ax.plot(steps, mean, "-o", ms=3, label=label)
        std = np.array([t[s].std for s in steps])
        if np.isfinite(std).any():
            ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2, lw=0)
        ends = [(max(r.fid), r.fid[max(r.fid)]) for r in failed if r.fid]  # one that failed before any FID has none
        if ends:
            ax.plot(*zip(*ends), "x", ms=9, mew=2, color=line.get_color())
            marked = True
    if marked:
        ax.plot([], [], "kx", ms=9, mew=2, label="a failed run's last value")
    ax.set_xlabel("generator step")
    ax.set_ylabel(f"{column} ({'higher' if higher else 'lower'} is better; band: ±1 std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save_figure(fig, path, dpi=100)


def plot_attention(groups, path):
    """Mean attention distance against step, a panel per attention layer, a line per group;
    dotted: what uniform weights over the keys the span leaves would give."""
    layers = sorted({(r["network"], r["layer"]) for g in groups for run in g.runs for r in run.attention})
    if not layers:
        return False
    fig, axes = plt.subplots(1, len(layers), figsize=(3.6 * len(layers), 3.4), squeeze=False)
    for ax, (net, layer) in zip(axes[0], layers):
        size = ""
        for g in groups:
            by_step, uniform, fixed = {}, None, False
            for run in g.runs:
                for r in run.attention:
                    if (r["network"], r["layer"]) == (net, layer):
                        by_step.setdefault(int(r["step"]), []).append(float(r["distance"]))
                        uniform, size = float(r["uniform"]), r["map"]
                        fixed = r.get("fixed") not in (None, "") and float(r["fixed"]) == 1
            if not by_step:
                continue
            steps = sorted(by_step)
            # a layer whose mask fixes every weight learns nothing about where to look
            label = g.label + (" (uniform by construction)" if fixed else "")
            line, = ax.plot(steps, [np.mean(by_step[s]) for s in steps], "-o", ms=3, label=label)
            ax.axhline(uniform, color=line.get_color(), ls=":", lw=1)
        ax.set_title(f"{net} {layer} ({size})", fontsize=9)
        ax.set_xlabel("generator step")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("mean attention distance (pixels of the map)")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("where attention looks (dotted: uniform over the keys left by the span)", fontsize=10)
    fig.tight_layout()
    _save_figure(fig, path, dpi=90)
    return True


def _save_figure(fig, path, dpi):
    """Write through a temp file renamed over `path` (a full disk never costs the earlier
    picture), in the format its suffix names (see figure_path)."""
    try:
        with atomic_open(path) as f:
            fig.savefig(f, dpi=dpi, format=Path(path).suffix[1:].lower())
    finally:
        plt.close(fig)


def figure_path(out, flag) -> Path:
    """The picture file `out` names: a suffix matplotlib writes (none: .png is added, as
    matplotlib does); UserError for a folder or an unknown suffix, before any work."""
    out = Path(out)
    if out.is_dir():
        raise UserError(f"{flag} {out} is a folder; give a file name, e.g. {out / 'fid_compare.png'}")
    if not out.suffix:
        return out.with_name(out.name + ".png")
    kinds = FigureCanvasBase.get_supported_filetypes()
    if out.suffix[1:].lower() not in kinds:
        raise UserError(f"{flag} {out}: cannot draw a {out.suffix} file; end the name in one of "
                        f"{', '.join('.' + k for k in sorted(kinds))}")
    return out
