"""The compare report as one HTML page: the statistics table as compare prints it, the FID
and attention-distance plots, and the runs' sample grids and attention pictures side by
side (a row per group, a column per seed). One file, every image inside it as a data: URI,
so it can be mailed or moved alone; plain HTML and CSS, no script, nothing fetched. The
statistics come from compare.py, the plots from plots.py: this module only lays them out."""
import base64
import html
import re
from pathlib import Path

from files import atomic_open

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# the files Trainer.write_samples writes at every --sample_step, in <sample_path>/<version>
# and <attn_path>/<version>
SAMPLE_GRID = {False: re.compile(r"(\d+)_fake\.png"), True: re.compile(r"(\d+)_fake_ema\.png")}
ATTENTION_PICTURE = re.compile(r"(\d+)_attn\.png")
ALERT_ROWS = ("failed", "stopped early")  # compare's rows that count what went wrong: red unless 0

CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; margin-bottom: .2em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
.meta, .notes, .cap { color: #555; } .notes { font-size: .9em; max-width: 62em; }
table { border-collapse: collapse; } th, td { border: 1px solid #ccc; padding: 3px 8px; vertical-align: top; }
thead th { background: #f2f2f2; }
.stats td { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; }
.stats tbody th { text-align: right; font-weight: normal; color: #444; white-space: nowrap; }
.bad { color: #b00020; font-weight: 600; }
figure { margin: 0; } .plots { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }
.plots img { max-width: 100%; }
.grid td { text-align: center; } .grid tbody th { text-align: left; max-width: 14em; }
.grid img.sample { width: 170px; } .grid img.attention { width: 340px; }
.cap { font-size: .8em; } .other { background: #fff6e0; }
.none { color: #777; font-style: italic; min-width: 8em; } .none b { font-size: 1.3em; }
.zoom input { display: none; } .zoom img { cursor: zoom-in; display: block; margin: auto; }
.zoom input:checked + img { position: fixed; inset: 0; margin: auto; width: auto; height: auto;
  max-width: 96vw; max-height: 96vh; z-index: 9; cursor: zoom-out; background: #fff;
  box-shadow: 0 0 0 100vmax rgba(0, 0, 0, .75); }
"""


def e(text) -> str:
    """Text made safe for HTML, in elements and in quoted attributes alike."""
    return html.escape(str(text), quote=True)


def data_uri(path):
    """A PNG file as a data: URI; None if it cannot be read or is no PNG (a broken picture
    is shown as a "none" cell, never as a broken image)."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii") if data.startswith(PNG_MAGIC) else None


def zoomable(uri, alt, cls, title="") -> str:
    """An image that opens at full size over the page when clicked, and closes when clicked
    again: a hidden checkbox and CSS, so the picture is in the file once and needs no
    script (Chromium-based browsers refuse to open a data: URI as a page of its own, so a link
    to one would not)."""
    return (f'<label class="zoom" title="{e(title)}"><input type="checkbox">'
            f'<img class="{cls}" src="{uri}" alt="{e(alt)}"></label>')


# ---------------------------------------------------------------------------- a run's pictures
def start_folder(run):
    """The folder a run was started in, when its config.json names a relative --log_path:
    the run's log folder is <start>/<log_path>/<version>. None where that cannot be told."""
    log_path = run.config.get("log_path")
    if not isinstance(log_path, str) or Path(log_path).is_absolute():
        return None
    folder = Path(run.folder).resolve().parent
    for part in reversed(Path(log_path).parts):
        if part == ".." or folder.name != part:
            return None
        folder = folder.parent
    return folder


def output_folder(run, key):
    """The folder a run wrote its `key` output to (config.json's `key`, e.g. sample_path,
    then its version); a relative one is looked up from where the run started, then from
    here. None if the run names none or it is not there."""
    root, version = run.config.get(key), run.config.get("version")
    if not isinstance(root, str) or not isinstance(version, str):
        return None
    found = [Path(root) / version] if Path(root).is_absolute() else \
        [start / root / version for start in (start_folder(run), Path.cwd()) if start is not None]
    return next((f for f in found if f.is_dir()), None)


def pictures(folder, pattern) -> dict:
    """{step: path} of the files in `folder` whose names match `pattern` (step first); none
    from a folder that cannot be listed (its cells say so, the page is still written)."""
    try:
        names = list(folder.iterdir()) if folder is not None else []
    except OSError:
        return {}
    found = {}
    for p in names:
        m = pattern.fullmatch(p.name)
        if m:
            found[int(m.group(1))] = p
    return found


def page_step(found) -> int | None:
    """The step the pictures are shown at: the newest step at which every finished run
    wrote one (so a run that failed early does not hold the page back; it shows its newest
    before that step). Without finished runs, every run with pictures decides; with no step
    in common, the newest step of any. None if no run wrote a picture."""
    having = [(run, set(steps)) for run, steps in found if steps]
    decide = [s for run, s in having if run.outcome.kind == "finished"] or [s for _, s in having]
    if not decide:
        return None
    common = set.intersection(*decide)
    return max(common) if common else max(set.union(*decide))


def _columns(groups) -> list:
    """One column per seed (numbers in order), then runs without a seed, by name."""
    runs = [r for g in groups for r in g.runs]
    seeds = sorted({r.seed for r in runs if isinstance(r.seed, int)})
    names = [f"seed{s}" for s in seeds] + list(dict.fromkeys(r.name for r in runs if not isinstance(r.seed, int)))
    heads = [f"seed {s}" for s in seeds] + names[len(seeds):]
    return list(zip(names, heads))


# ---------------------------------------------------------------------------- the page
def _stats_table(table) -> str:
    (corner, labels), body = table[0], table[1:]
    out = ['<table class="stats" id="stats"><thead><tr>', f"<th>{e(corner)}</th>"]
    out += [f"<th>{e(label)}</th>" for label in labels]
    out.append("</tr></thead><tbody>")
    for name, cells in body:
        alert = name in ALERT_ROWS
        out.append(f"<tr><th>{e(name)}</th>" + "".join(
            f'<td{" class=bad" if alert and cell != "0" else ""}>{e(cell)}</td>' for cell in cells) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _notes(lines) -> str:
    """compare's explanation lines as paragraphs (an indented line continues the one above)."""
    paragraphs = []
    for line in lines:
        if line.startswith("  ") and paragraphs:
            paragraphs[-1] += " " + line.strip()
        else:
            paragraphs.append(line)
    return "".join(f'<p class="notes">{e(p)}</p>' for p in paragraphs)


def _ending(run) -> str:
    o = run.outcome
    return "" if o.kind in ("finished", "unknown") else f"{o.what} @{o.step}"


def _grid(groups, found, step, cls, what) -> str:
    """A table of one kind of picture: a row per group, a column per seed; a run without
    such a picture at or before `step` gets a "none" cell saying so."""
    columns = _columns(groups)
    out = [f'<table class="grid" id="{cls}-grid"><thead><tr><th>group</th>']
    out += [f"<th>{e(head)}</th>" for _, head in columns]
    out.append("</tr></thead><tbody>")
    for g in groups:
        out.append(f"<tr><th>{e(g.label)}</th>")
        by_name = {r.name: r for r in g.runs}
        for name, _ in columns:
            run = by_name.get(name)
            if run is None:
                out.append('<td class="absent">&ndash;</td>')
                continue
            steps = found[id(run)]
            shown = max((s for s in steps if step is not None and s <= step), default=None)
            uri = data_uri(steps[shown]) if shown is not None else None
            ending = _ending(run)
            if uri is None:
                why = "unreadable or not a PNG" if shown is not None else \
                    f"no {what} at or before step {step}" if steps else f"the run wrote no {what}"
                out.append(f'<td class="none"><b>none</b><br>{e(why)}'
                           + (f'<br><span class="bad">{e(ending)}</span>' if ending else "") + "</td>")
                continue
            caption = f"step {shown}" + ("" if shown == step else f" (newest before {step})")
            out.append(f'<td{" class=other" if shown != step else ""}>'
                       + zoomable(uri, f"{what}, {g.label}, {run.name}, step {shown}", cls, str(steps[shown]))
                       + f'<div class="cap">{e(caption)} &middot; {e(Path(run.folder).name)}</div>'
                       + (f'<div class="cap bad">{e(ending)}</div>' if ending else "") + "</td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def page(groups, table, notes, fid_png, attention_png=None, column="fid") -> str:
    """The page's HTML: `table` and `notes` are compare's report (compare.report_table),
    `fid_png` and `attention_png` its plots as PNG files (attention_png None: no run logged
    attention distances)."""
    ema = column.endswith("_ema")  # fid_ema, recall_ema, ...: the EMA generator's pictures
    runs = [r for g in groups for r in g.runs]
    samples = {id(r): pictures(output_folder(r, "sample_path"), SAMPLE_GRID[ema]) for r in runs}
    attention = {id(r): pictures(output_folder(r, "attn_path"), ATTENTION_PICTURE) for r in runs}
    step = page_step([(r, {*samples[id(r)], *attention[id(r)]}) for r in runs])
    plots = []
    for title, png, none in ((f"{column} over steps (band: ±1 std over seeds)", fid_png, "no values"),
                             ("attention distance", attention_png, "no run logged attention distances")):
        uri = data_uri(png) if png is not None else None
        plots.append(f'<figure><figcaption>{e(title)}</figcaption>'
                     + (zoomable(uri, title, "plot") if uri else f'<div class="none"><b>none</b>: {e(none)}</div>')
                     + "</figure>")
    at = "" if step is None else f" at step {step}"
    parts = [
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e('compare: ' + ', '.join(g.label for g in groups))}</title><style>{CSS}</style></head><body>",
        "<h1>Compare report</h1>",
        f'<p class="meta">{len(runs)} runs in {len(groups)} groups; {e(column)}'
        f'{" (the EMA generators)" if ema else ""}. Click a picture to see it full size.</p>',
        "<details><summary>run folders</summary><ul>"
        + "".join(f"<li>{e(r.folder)}</li>" for r in runs) + "</ul></details>",
        "<h2>Statistics</h2>", _stats_table(table), _notes(notes),
        '<h2>Plots</h2><div class="plots">', *plots, "</div>",
        f"<h2>Sample grids{e(at)}</h2>",
        _grid(groups, samples, step, "sample", "EMA sample grid" if ema else "sample grid"),
        f"<h2>Attention pictures{e(at)}</h2>",
        _grid(groups, attention, step, "attention", "attention picture"),
        "</body></html>\n"]
    return "\n".join(parts)


def write_page(path, groups, table, notes, fid_png, attention_png=None, column="fid"):
    """Write the page to `path` through a temp file (an earlier page stays whole if this
    write fails)."""
    text = page(groups, table, notes, fid_png, attention_png, column)
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)
