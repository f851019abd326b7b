"""The feature dashboard: a self-contained file that a real headless browser opens offline and renders."""

import base64
import html
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image

import vlmsae
from vlmsae import Kind
from vlmsae.analysis import latent_table, scan
from vlmsae.dashboard import write_dashboard
from vlmsae.trainer import SAETrainer
from vlmsae.zoo import tiny_inputs, tiny_model

LAYER = 1
CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
needs_browser = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH: install it with "
                                   "`apt-get install -y chromium` (Debian) to run the browser checks")


def tiny_llava_scan():
    """A TopK SAE trained briefly on a tiny LLaVA's layer 1 and a scan of every second latent over its data:
    (model, data, scan, images in [0, 1]). The dashboard and export tests read it."""
    torch.manual_seed(0)
    model = tiny_model("llava", n_layers=2)
    data = [tiny_inputs(model, 4, seed=s) for s in range(3)]
    acts = []
    for batch in data:
        with vlmsae.record(model, [LAYER], stop=True) as rec:
            model(**batch)
        acts.append(rec[LAYER][rec.kinds(LAYER) != Kind.PAD])
    acts = torch.cat(acts)
    sae = vlmsae.SAE(d_in=64, d_sae=64, k=4)
    trainer = SAETrainer(sae)
    for _ in range(20):
        trainer.step(acts[torch.randperm(len(acts))[:64]])
    sae.eval()
    found = scan(model, LAYER, sae, data, n_examples=5, latents=list(range(0, 64, 2)))
    return model, data, found, torch.cat([(b["pixel_values"] + 1) / 2 for b in data])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    _, _, found, images = tiny_llava_scan()
    features = list(range(0, 64, 2))  # the dashboard shows the scanned subset
    table = latent_table(found)
    path = write_dashboard(tmp_path_factory.mktemp("dash") / "features.html", found, images, table=table,
                           title="tiny llava <L1>")
    return path, found, table, features


def browse(path: Path, fragment: str, tmp_path: Path, *options: str) -> tuple[str, str]:
    """Open ``path#fragment`` in headless chromium with no network; return the rendered DOM and the browser log.
    ``options``: more chromium switches, e.g. ``--window-size=W,H`` or ``--screenshot=FILE`` (then the DOM is not
    dumped)."""
    profile = tmp_path / f"profile-{abs(hash((fragment, options)))}"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
           f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000",
           *options, *(() if any(o.startswith("--screenshot") for o in options) else ("--dump-dom",)),
           f"{path.resolve().as_uri()}#{fragment}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout, done.stderr


LAYOUT_PROBE = """<script>addEventListener("load", () => {
  const root = document.documentElement;
  const images = [...document.images].map(im => {
    const box = im.getBoundingClientRect();
    return [box.left, box.top, box.width, box.height, im.complete && im.naturalWidth > 0];
  });
  document.body.setAttribute("data-probe", JSON.stringify({scroll: root.scrollWidth, client: root.clientWidth, images}));
});</script>"""


def screenshot(path: Path, tmp_path: Path, width: int = 1280) -> tuple[dict, Image.Image, list[Image.Image]]:
    """What a reader of ``path`` sees in a ``width`` px window (device scale 1): (layout, screenshot, images).

    layout: the page's ``scroll`` and ``client`` widths in px (scroll > client: a horizontal scroll bar) and, per
    <img> in document order, [left, top, width, height, decoded]; the screenshot covers the page down to its last
    image; images: the page's data-URI PNGs in document order, decoded (what each <img> should show)."""
    page = path.read_text()
    probed = tmp_path / f"probe-{path.name}"  # the same page and a script that writes its layout into the DOM
    probed.write_text(page.replace("</body>", LAYOUT_PROBE + "</body>"))
    size = [f"--window-size={width},1000", "--hide-scrollbars", "--force-device-scale-factor=1"]
    dom, _ = browse(probed, "", tmp_path, *size)
    layout = json.loads(html.unescape(re.search(r'data-probe="([^"]*)"', dom).group(1)))
    height = int(max([1000] + [top + h for _, top, _, h, _ in layout["images"]])) + 8
    png = tmp_path / f"shot-{path.stem}.png"
    browse(path, "", tmp_path, f"--window-size={width},{height}", *size[1:], f"--screenshot={png}")
    images = [Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")
              for data in re.findall(r"<img src=['\"]data:image/png;base64,([^'\"]+)['\"]", page)]
    return layout, Image.open(png).convert("RGB"), images


def test_file_is_self_contained(built):
    path, *_ = built
    page = path.read_text()
    assert not re.search(r"<script[^>]+src=|<link[^>]+href=\"?http|url\(http", page), "the page fetches something"
    assert "plotly" in page.lower() and len(page) > 1_000_000  # plotly.js inline
    assert "data:image/png;base64," in page
    assert "tiny llava &lt;L1&gt;" in page  # the title is escaped
    assert [p.name for p in path.parent.iterdir()] == ["features.html"]  # the temporary file was renamed away


@needs_browser
def test_browser_renders_the_features_and_images(built, tmp_path):
    path, found, table, features = built
    dom, log = browse(path, "", tmp_path)
    consoles = [line for line in log.splitlines() if ":CONSOLE" in line]
    assert not consoles, consoles
    assert 'data-ready="1"' in dom
    assert re.search(r'<pre id="errors"></pre>', dom)
    assert len(re.findall(r'<li class="latent', dom)) == len(features)
    assert f"{len(features)} of {len(features)} latents" in dom
    # the first feature is shown: one image per example where it fired, each with a 4x4 patch heatmap
    first = features[0]
    fired = int((found.top.values[0] > 0).sum())
    assert f"Latent {first}" in dom
    assert len(re.findall(r'<img src="data:image/png;base64,', dom)) == fired
    assert len(re.findall(r'class="cell"', dom)) == 16 * fired
    assert len(re.findall(r'class="plotly-graph-div', dom)) == 2  # the summary figures drew


@needs_browser
def test_fragment_selects_and_filters(built, tmp_path):
    path, found, table, features = built
    live = [f for f in features if not table.at[f, "dead"]]
    target = live[-1]
    dom, log = browse(path, f"f={target}", tmp_path)
    assert f"Latent {target}" in dom and not [line for line in log.splitlines() if ":CONSOLE" in line]
    dom, _ = browse(path, f"q={target}", tmp_path)
    shown = re.findall(r'<li class="latent[^"]*" data-id="(\d+)"', dom)
    assert str(target) in shown and 0 < len(shown) < len(features)


HOSTILE = ("</script><script>window.__pwned=1</script>", "<!--<script>", "\"'&<>")
PROBE = "<script>document.body.dataset.pwned = typeof window.__pwned;</script>"


@needs_browser
def test_browser_renders_hostile_labels_as_text(built, tmp_path):
    """Labels and a title that look like markup neither blank the page nor run: the page renders them as text."""
    path, found, table, features = built
    table = table.copy()
    table["top_tokens"] = [HOSTILE[i % len(HOSTILE)] for i in range(len(table))]
    table["concept"] = [HOSTILE[(i + 1) % len(HOSTILE)] for i in range(len(table))]
    images = torch.rand(12, 3, 32, 32)  # the scan's 3 batches of 4 examples; which pixels does not matter here
    labels = {f: f"label {f} {HOSTILE[i % len(HOSTILE)]}" for i, f in enumerate(features)}
    hostile = write_dashboard(tmp_path / "hostile.html", found, images, table=table, title="".join(HOSTILE),
                              labels=labels)
    page = hostile.read_text().rstrip()
    assert page.endswith("</body></html>")
    # a probe after the page's own script: it runs only if the page was not swallowed, and reports the injection
    hostile.write_text(page.removesuffix("</body></html>") + PROBE + "</body></html>")
    dom, log = browse(hostile, "", tmp_path)
    assert not [line for line in log.splitlines() if ":CONSOLE" in line]
    assert 'data-ready="1"' in dom and 'data-pwned="undefined"' in dom
    assert re.search(r'<pre id="errors"></pre>', dom)
    assert len(re.findall(r'<li class="latent', dom)) == len(features)
    for label in HOSTILE + ("".join(HOSTILE),):
        assert html.escape(label, quote=False) in dom, label
    # each latent's label in its list entry, and the first latent's in the header too
    for f in features:
        assert html.escape(labels[f], quote=False) in dom, f
    assert f"<h2>Latent {features[0]}: {html.escape(labels[features[0]], quote=False)}" in dom
