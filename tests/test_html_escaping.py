"""Strings that reach an HTML page (latent labels, tokens, captions, settings) are text there: none of them
can add an element, end a <script> block or comment out the rest of the page (issue 11, item 5).

Each page is built twice, once with hostile strings and once with plain ones of the same shape; parsed,
both must have the same elements, the hostile strings must come back verbatim as text or JSON, and no
<script> block may hold what a browser's tokenizer reads as its end or as an escape into a comment."""

import json
from dataclasses import asdict
from html.parser import HTMLParser

import pandas as pd
import pytest
import torch

import vlmsae
from vlmsae.analysis import latent_table, scan
from vlmsae.dashboard import write_dashboard
from vlmsae.testbed.demo import DemoConfig, _write_report
from vlmsae.zoo import tiny_inputs, tiny_model

HOSTILE = ["</script><script>window.__pwned=1</script>", "<!--<script>", "\"'&<>", "__DATA__ <b>bold</b>"]
PLAIN = ["plain label one", "plain label two", "plain label three", "plain label four"]
LAYER = 1


class Page(HTMLParser):
    """The start tags, the raw text of each <script> and <style>, and the decoded text outside them."""

    def __init__(self, page: str):
        super().__init__(convert_charrefs=True)
        self.tags, self.scripts, self.text, self._in = [], [], [], None
        self.feed(page)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag in ("script", "style"):
            self._in = tag
            if tag == "script":
                self.scripts.append((dict(attrs), []))

    def handle_endtag(self, tag):
        if tag == self._in:
            self._in = None

    def handle_data(self, data):
        if self._in == "script":
            self.scripts[-1][1].append(data)
        elif self._in is None:
            self.text.append(data)

    def script(self, i) -> str:
        return "".join(self.scripts[i][1])


def check_scripts(page: Page) -> None:
    """No <script> holds `</script`, `<script` or `<!--`: in a browser each can end the block early or make
    it swallow what follows (the script data escaped states of the HTML tokenizer)."""
    for i in range(len(page.scripts)):
        body = page.script(i).lower()
        for bad in ("</script", "<script", "<!--"):
            assert bad not in body, f"script {i} holds {bad!r}: {body[max(0, body.find(bad) - 80):][:200]!r}"


class Tokens:
    """A tokenizer whose tokens are the given strings."""

    def __init__(self, words):
        self.words = words

    def convert_ids_to_tokens(self, ids):
        if isinstance(ids, int):
            return self.words[ids % len(self.words)]
        return [self.words[i % len(self.words)] for i in ids]


@pytest.fixture(scope="module")
def scanned():
    torch.manual_seed(0)
    model = tiny_model("llava", n_layers=2)
    data = [tiny_inputs(model, 4, seed=s) for s in range(2)]
    sae = vlmsae.SAE(d_in=64, d_sae=64, k=8).eval()
    found = scan(model, LAYER, sae, data, n_examples=3, latents=range(8))
    images = torch.cat([(b["pixel_values"] + 1) / 2 for b in data])
    return found, images


def dashboard(found, images, words, path):
    table = latent_table(found, tokenizer=Tokens(words))
    table["top_tokens"] = [words[i % len(words)] for i in range(len(table))]
    table["concept"] = [words[(i + 1) % len(words)] for i in range(len(table))]
    write_dashboard(path, found, images, table=table, tokenizer=Tokens(words), title="".join(words))
    return path.read_text()


def test_dashboard_shows_hostile_labels_as_text(scanned, tmp_path):
    found, images = scanned
    hostile = Page(dashboard(found, images, HOSTILE, tmp_path / "hostile.html"))
    plain = Page(dashboard(found, images, PLAIN, tmp_path / "plain.html"))
    assert hostile.tags == plain.tags  # no element added, none swallowed
    check_scripts(hostile)
    # the title is text, in the <title> and the header (and "__DATA__" in it is no placeholder)
    assert "".join(hostile.text).count("".join(HOSTILE)) == 2
    # the labels and tokens reach the page's script verbatim, as JSON strings (it shows them with textContent)
    [data] = [i for i, (attrs, _) in enumerate(hostile.scripts) if attrs.get("id") == "data"]
    shown = json.loads(hostile.script(data))["latents"]
    assert {f["top_tokens"] for f in shown} == set(HOSTILE)
    assert {f["stats"]["concept"] for f in shown} == set(HOSTILE)
    tokens = {t for f in shown for x in f["examples"] for t in x["tokens"] if t is not None}
    assert tokens and tokens <= set(HOSTILE)


def report(words, path):
    summary = {"model": words[0], "d_sae": 256, "k": 8, "steps": 10, "seconds": 1.0}
    table = pd.DataFrame({"fvu": [0.1], "l0": [8.0], words[1]: [0.5]}, index=pd.Index([1], name="layer"))
    history = [{"layer": 1, "sae": 0, "step": s, "fvu": 1 / s, "dead_fraction": 0.0} for s in (1, 2)]
    index = pd.MultiIndex.from_tuples([("color", w) for w in words], names=["concept", "value"])
    concepts = {1: pd.DataFrame({"latent": range(len(words)), "auroc": 0.9}, index=index)}
    steering = {1: pd.DataFrame({"success": 0.5}, index=pd.Index(words, name="value"))}
    example = {"layer": 1, "value": words[1], "before": words[2], "after": words[0] + words[3]}
    cfg = DemoConfig(out=words[3])
    _write_report(path, summary, table, history, concepts, steering, example, cfg)
    return path.read_text(), cfg


def test_report_shows_hostile_captions_and_settings_as_text(tmp_path):
    page, cfg = report(HOSTILE, tmp_path / "hostile.html")
    hostile = Page(page)
    plain = Page(report(PLAIN, tmp_path / "plain.html")[0])
    assert hostile.tags == plain.tags
    check_scripts(hostile)
    text = "".join(hostile.text)
    for shown in (f"steering toward {HOSTILE[1]} (layer 1)", f"before: {HOSTILE[2]}",
                  f"after: {HOSTILE[0] + HOSTILE[3]}", str(asdict(cfg)), HOSTILE[0]):
        assert shown in text, shown
