"""The compare report's HTML page: where it finds a run's pictures, which step it shows,
"none" cells, escaping, and the page itself loaded in a real headless browser (chromium):
its rendered table, images and zoom, and the screenshot kept in docs/report.png."""
import base64
import csv
import html
import io
import json
import os
import re
import shutil
import statistics
import subprocess
from html.parser import HTMLParser
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import fid
from conftest import REPO, one_line, run_main
from report_html import data_uri, output_folder, page_step
from test_compare import make_run

SCREENSHOT = REPO / "docs" / "report.png"


def picture(path, size, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)


def emoji_grid(path, start):
    """A 4×4 grid of bundled emoji at 32 px on a black frame, as a sample grid looks."""
    with np.load(REPO / "data" / "emoji64.npz") as z:
        imgs = z["images"][start:start + 16]
    grid = np.zeros((4 * 34 + 2, 4 * 34 + 2, 3), np.uint8)
    for i, im in enumerate(imgs):
        small = np.asarray(Image.fromarray(im).resize((32, 32), Image.BILINEAR))
        grid[2 + 34 * (i // 4):34 * (i // 4 + 1), 2 + 34 * (i % 4):34 * (i % 4 + 1)] = small
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)


def attention_picture(path, span):
    """A real attention picture (plots.save_attention_picture) of an untrained tiny G."""
    import torch

    from plots import save_attention_picture
    from sagan_models import build_generator, forward_capturing_attention_inputs
    torch.manual_seed(span)
    G = build_generator(SimpleNamespace(imsize=32, z_dim=32, g_conv_dim=16, g_span=span, mask_mode="pre",
                                        attn_impl="dense", fully_masked="mean", original_attention=False)).eval()
    with torch.no_grad():
        images, inputs = forward_capturing_attention_inputs(G, torch.randn(1, 32))
        u8 = ((images[0] + 1) * 127.5).clamp(0, 255).to(torch.uint8)
        save_attention_picture(G, u8, inputs, path, span)


# (name, span, seed, {step: fid}, status, steps with pictures, attention pictures?)
SWEEP = [("sw_span0_seed0", 0, 0, {10: 60, 20: 45}, None, (10, 20), True),
         ("sw_span0_seed1", 0, 1, {10: 61, 20: 46}, None, (10, 20), True),
         ("sw_span3_seed0", 3, 0, {10: 55, 20: 40}, None, (10, 20), True),
         ("sw_span3_seed1", 3, 1, {10: 57}, {"status": "diverged", "step": 15}, (10,), True),
         ("sw_span3_seed2", 3, 2, None, {"status": "failed", "step": 3}, (), True),
         ("sw_spannone_seed0", "none", 0, {10: 70, 20: 50}, None, (10, 20), False),  # no attention layers
         ("sw_spannone_seed1", "none", 1, {10: 72, 20: 53}, None, (10, 20), False)]


def tiny_sweep(project, real_pictures=False):
    """A sweep's folders as training leaves them, started in `project` with the default
    relative paths (./logs, ./samples, ./attn): config.json, fid.csv, attention.csv,
    status.json, sample grids and attention pictures. Returns the run folders."""
    folders = []
    attention = {span: project / f"attn_span{span}.png" for span in (0, 3)}
    for span, path in attention.items():
        attention_picture(path, span) if real_pictures else picture(path, (60, 150), span)
    for k, (name, span, seed, fids, status, steps, attn) in enumerate(SWEEP):
        d = make_run(project / "logs", name, fids, status, seed=seed, g_span=span, d_span=span, total_step=20)
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(log_path="./logs", sample_path="./samples", attn_path="./attn", ema_decay=0.999)  # _fake_ema grids
        (d / "config.json").write_text(json.dumps(cfg))
        if attn and fids:
            with open(d / "attention.csv", "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["step", "network", "layer", "map", "distance", "uniform"])
                for step in steps:  # the layers of a 32² run; distances made up, rising with the span
                    for net, layer, size in (("G", "attn8", 8), ("G", "attn16", 16), ("D", "attn16", 16),
                                             ("D", "attn8", 8)):
                        uniform = size / 3 + span / 4
                        w.writerow([step, net, layer, f"{size}x{size}", uniform * (0.8 + step / 100 + seed / 20),
                                    uniform])
        for step in steps:
            if real_pictures:
                emoji_grid(project / "samples" / name / f"{step}_fake.png", 16 * k + step)
            else:
                picture(project / "samples" / name / f"{step}_fake.png", (30, 30), k)
            picture(project / "samples" / name / f"{step}_fake_ema.png", (20, 20), k)
            if attn:
                (project / "attn" / name).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(attention[span], project / "attn" / name / f"{step}_attn.png")
        folders.append(d)
    return folders


# ---------------------------------------------------------------------------- without a browser
class Page(HTMLParser):
    """The page's start tags and text, as a browser's parser reads them."""

    def __init__(self, text):
        super().__init__()
        self.tags, self.text = [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def test_every_text_in_the_page_is_escaped(tmp_path):
    hostile = '<img src=x onerror="alert(1)"> & <b>'
    d = make_run(tmp_path, "r", {10: 5.0}, seed=0)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "version": hostile}))
    r = run_main(["compare", d, "--out", tmp_path / "p.png", "--html", tmp_path / "r.html"], entry=fid.main)
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "r.html").read_text(encoding="utf-8")
    p = Page(text)
    assert [a["src"][:22] for t, a in p.tags if t == "img"] == ["data:image/png;base64,"]  # the FID plot only
    assert not any("onerror" in a for _, a in p.tags)
    assert f"{hostile} (span 0)" in "".join(p.text)  # the group's label, shown as text


def test_pictures_are_found_from_where_the_run_started_and_shown_at_the_newest_common_step(tmp_path):
    project = tmp_path / "project"
    runs = tiny_sweep(project)
    here = tmp_path / "elsewhere"  # compare runs from another folder: ./samples is not found from here
    here.mkdir()
    os.chdir(here)
    run = SimpleNamespace(config=json.loads((runs[0] / "config.json").read_text()), folder=runs[0])
    assert output_folder(run, "sample_path") == project / "samples" / "sw_span0_seed0"
    run.config["attn_path"] = str(project / "attn")  # absolute: as given
    assert output_folder(run, "attn_path") == project / "attn" / "sw_span0_seed0"
    run.config["log_path"] = "./other_logs"  # the log folder does not end in it: not known where it started
    assert output_folder(run, "sample_path") is None
    (here / "samples" / "sw_span0_seed0").mkdir(parents=True)  # then ./samples from here
    assert output_folder(run, "sample_path") == here / "samples" / "sw_span0_seed0"
    # the step: the newest that every finished run has, however early a failed run stopped
    ran = lambda kind: SimpleNamespace(outcome=SimpleNamespace(kind=kind))
    assert page_step([(ran("finished"), {10, 20, 30}), (ran("finished"), {10, 20}), (ran("diverged"), {10})]) == 20
    assert page_step([(ran("diverged"), {10, 20}), (ran("stopped early"), {10})]) == 10  # none finished
    assert page_step([(ran("finished"), {10}), (ran("finished"), {20})]) == 20  # nothing in common: the newest
    assert page_step([(ran("finished"), set())]) is None
    # a file that is no PNG becomes a "none" cell, not a broken image
    (tmp_path / "x.png").write_bytes(b"not a png")
    assert data_uri(tmp_path / "x.png") is None and data_uri(tmp_path / "missing.png") is None
    assert data_uri(runs[0].parent.parent / "attn_span0.png").startswith("data:image/png;base64,iVBOR")


def test_ema_shows_the_ema_sample_grids(tmp_path):
    runs = tiny_sweep(tmp_path / "project")[:2]
    r = run_main(["compare", *runs, "--ema", "--out", tmp_path / "p.png", "--html", tmp_path / "e.html"],
                 entry=fid.main)
    assert r.returncode == 0 and f"report page: {tmp_path / 'e.html'}" in r.stdout, r.stderr
    sizes = [Image.open(io.BytesIO(base64.b64decode(a["src"].split(",", 1)[1]))).size
             for t, a in Page((tmp_path / "e.html").read_text()).tags if t == "img" and a.get("class") == "sample"]
    assert sizes == [(20, 20), (20, 20)]  # the _fake_ema grids, not the 30×30 _fake ones


def test_html_output_that_is_a_folder_is_one_line_and_nothing_is_written(tmp_path):
    runs = tiny_sweep(tmp_path / "project")[:2]
    r = run_main(["compare", *runs, "--out", tmp_path / "p.png", "--html", tmp_path], entry=fid.main)
    assert f"--html {tmp_path} is a folder; give a file name" in one_line(r) and r.stdout == ""
    assert not (tmp_path / "p.png").exists()


# ---------------------------------------------------------------------------- in a browser
PROBE = """<script>
addEventListener('load', () => {
  const img = document.images, rect = e => e.getBoundingClientRect();
  const out = {
    tables: Object.fromEntries([...document.querySelectorAll('table')].map(t => [t.id,
      [...t.rows].map(r => [...r.cells].map(c => ({text: c.innerText.trim(), cls: c.className,
                                                   imgs: c.querySelectorAll('img').length})))])),
    images: [...img].map(i => ({ok: i.complete && i.naturalWidth > 0, w: i.naturalWidth, shown: rect(i).width,
                                data: i.src.startsWith('data:image/png;base64,'), cls: i.className})),
    height: document.documentElement.scrollHeight};
  const first = document.querySelector('#sample-grid img');
  first.closest('label').click();  // opens it over the page at full size
  out.zoom = {shown: rect(first).width, natural: first.naturalWidth, position: getComputedStyle(first).position};
  first.closest('label').click();
  out.unzoomed = rect(first).width;
  const pre = document.createElement('pre');
  pre.id = 'probe';
  pre.textContent = JSON.stringify(out);
  document.body.append(pre);
});
</script>"""


def chromium():
    """The browser to load pages in: $CHROMIUM, or chromium / chrome on the PATH. CI installs
    it (.ci/run); elsewhere its absence is a failure that names the fix, not a skip."""
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome", "chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    pytest.fail("no chromium to load the page in: install it (Debian/Ubuntu: apt-get install chromium), set "
                "CHROMIUM=/path/to/chrome, or leave this test out with -m 'not browser'", pytrace=False)


def headless(page, tmp_path, *flags):
    r = subprocess.run([chromium(), "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run",
                        "--hide-scrollbars", f"--user-data-dir={tmp_path / 'chromium-profile'}", *flags,
                        page.as_uri()], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def report_rows(stdout, n):
    """The first n lines of compare's printed report, each split into its columns."""
    return [re.split(r"\s{2,}", line.strip()) for line in stdout.splitlines()[:n]]


@pytest.mark.slow
@pytest.mark.browser
def test_the_page_in_chromium_shows_the_report_every_picture_and_the_failures(tmp_path):
    runs = tiny_sweep(tmp_path / "project", real_pictures=True)
    page = tmp_path / "report.html"
    r = run_main(["compare", *runs, "--out", tmp_path / "cmp.png", "--html", page], entry=fid.main)
    assert r.returncode == 0, r.stderr
    text = page.read_text(encoding="utf-8")
    # self-contained: no script, nothing fetched from anywhere; every image is inside the file
    assert "<script" not in text and re.findall(r'(?:src|href)="(?!data:image/png;base64,)', text) == []
    probed = tmp_path / "probed.html"
    probed.write_text(text.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    dom = headless(probed, tmp_path, "--dump-dom")
    got = json.loads(html.unescape(re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S).group(1)))
    # the statistics table is compare's printed report, row by row and cell by cell
    stats = [[c["text"] for c in row] for row in got["tables"]["stats"]]
    assert stats == report_rows(r.stdout, len(stats))
    assert r.stdout.splitlines()[len(stats)].startswith("per step:")  # and nothing of it is left out
    labels = ["span 0", "span 3", "span none"]
    assert stats[0] == ["step", *labels] and [row[0] for row in stats[1:3]] == ["10", "20"]
    for row, step in zip(stats[1:3], (10, 20)):  # mean ± std over the runs that reached the step, worked here
        for label, cell in zip(labels, row[1:]):
            runs_of = [fids for _, span, _, fids, *_ in SWEEP if f"span {span}" == label]
            vals = [fids[step] for fids in runs_of if fids and step in fids]
            assert cell == (f"{vals[0]:.2f} (n = 1: no interval)" if len(vals) == 1 else
                            f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f} ({len(vals)}/{len(runs_of)})")
    failed = next(row for row in got["tables"]["stats"] if row[0]["text"] == "failed")
    assert [c["text"] for c in failed[1:]] == ["0", "2: seed1 diverged @15, seed2 failed @3", "0"]
    assert [c["cls"] for c in failed[1:]] == ["", "bad", ""]
    # the pictures: a row per group, a column per seed; "none" where a run wrote no such picture, "-" no run
    kind = lambda c: "img" if c["imgs"] == 1 else {"none": "none", "absent": "-"}.get(c["cls"], c["cls"])
    expected = {"sample": [["img", "img", "-"], ["img", "img", "none"], ["img", "img", "-"]],
                "attention": [["img", "img", "-"], ["img", "img", "none"], ["none", "none", "-"]]}
    for grid, cells in expected.items():
        rows = got["tables"][f"{grid}-grid"]
        assert [c["text"] for c in rows[0]] == ["group", "seed 0", "seed 1", "seed 2"]
        assert [row[0]["text"] for row in rows[1:]] == labels
        assert [[kind(c) for c in row[1:]] for row in rows[1:]] == cells
        assert all(c["text"].startswith("none") for row in rows[1:] for c in row[1:] if kind(c) == "none")
        diverged = rows[2][2]["text"]  # span 3, seed 1: its newest picture before the page's step, and why it ended
        assert "step 10 (newest before 20)" in diverged and "diverged @15" in diverged
        assert "the run wrote no" in rows[2][3]["text"] and "failed @3" in rows[2][3]["text"]
    assert "the run wrote no attention picture" in got["tables"]["attention-grid"][3][1]["text"]
    # every image loaded (none broken), each a PNG inside the page: 2 plots + 6 sample grids + 4 attention pictures
    assert [i["cls"] for i in got["images"]] == ["plot"] * 2 + ["sample"] * 6 + ["attention"] * 4
    assert all(i["ok"] and i["data"] for i in got["images"]), got["images"]
    # a click opens a picture at its full size over the page; another closes it
    assert got["zoom"] == {"shown": 138, "natural": 138, "position": "fixed"} and got["unzoomed"] == 170
    # the screenshot of the page as it is (no probe), the whole page tall
    shot = tmp_path / "report.png"
    headless(page, tmp_path, f"--screenshot={shot}", f"--window-size=1200,{min(got['height'], 4000)}")
    im = Image.open(shot).convert("RGB")
    assert im.size == (1200, min(got["height"], 4000)) and np.asarray(im).std() > 20  # not a blank page
    small = im.quantize(colors=128)  # the README's copy: a palette PNG, a fraction of the size
    small.save(tmp_path / "small.png", optimize=True)
    assert (tmp_path / "small.png").stat().st_size < 300_000
    if os.environ.get("UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(tmp_path / "small.png", SCREENSHOT)
