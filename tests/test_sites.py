"""TransformerLens hook names are accepted wherever vlmsae takes a layer and a site (issue 12, item 6), by string
parsing alone: the same calls with ``"blocks.L.hook_resid_post"`` and with ``(L, "resid_post")`` give bit-equal results.
The names themselves are checked against a real TransformerBridge in tests/test_integrations.py."""

import re
import warnings

import pytest
import torch

import vlmsae
from vlmsae.errors import HookNameWarning, LayerIndexError, SiteError
from vlmsae.hooks import check_sites
from vlmsae.sites import parse_site
from vlmsae.zoo import tiny_inputs, tiny_model


@pytest.mark.parametrize("args, expected", [
    ((3,), (3, "resid_post")),
    ((3, "resid_pre"), (3, "resid_pre")),
    ((3, "hook_resid_pre"), (3, "resid_pre")),
    ((3, "hook_in"), (3, "resid_pre")),
    ((3, "hook_out"), (3, "resid_post")),
    (("blocks.3.hook_resid_post",), (3, "resid_post")),
    (("blocks.12.hook_resid_pre",), (12, "resid_pre")),
    (("blocks.3.hook_in",), (3, "resid_pre")),
    (("blocks.3.hook_out",), (3, "resid_post")),
    (("blocks.3.hook_resid_pre", "resid_pre"), (3, "resid_pre")),
    (("blocks.3.hook_resid_pre", "hook_in"), (3, "resid_pre")),
    (("layers.3",), ("layers.3", "resid_post")),  # not a hook name: left for check_sites to reject
])
def test_parse_site(args, expected):
    assert parse_site(*args) == expected


@pytest.mark.parametrize("args, says", [
    (("blocks.3.hook_resid_mid",), "blocks.3.hook_resid_pre or blocks.3.hook_resid_post"),
    (("blocks.3.attn.hook_z",), "'attn.hook_z'"),
    (("blocks.3.hook_resid_post", "hook_in"), "site='resid_pre' was passed too"),
])
def test_parse_site_refuses_what_vlmsae_does_not_hook(args, says):
    with pytest.raises(SiteError, match=re.escape(says)):
        parse_site(*args)


@pytest.fixture(scope="module")
def llava():
    model = tiny_model("llava")
    return model, tiny_inputs(model, 2, padding="left")


def test_check_sites_names_the_pair_a_hook_name_stands_for(llava):
    """Where a call does not parse names (train, harvest), the error says which (layer, site) to pass."""
    info = vlmsae.layers(llava[0])
    with pytest.raises(LayerIndexError, match=r"pass layer=2, site='resid_pre'"):
        check_sites(info, [("blocks.2.hook_in", "resid_post")])
    with pytest.raises(SiteError, match=r"TransformerLens's name of 'resid_post'"):
        check_sites(info, [(2, "hook_resid_post")])


def test_record_attach_splice_steer_take_hook_names(llava):
    model, inputs = llava
    sae = vlmsae.SAE(d_in=vlmsae.layers(model).d_model, d_sae=128, k=8)
    v = torch.randn(sae.cfg.d_in, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        clean = model(**inputs).logits
        with vlmsae.record(model, ["blocks.1.hook_resid_pre", "blocks.2.hook_in"]) as named, \
                vlmsae.record(model, [1, 2], site="resid_pre") as plain:
            model(**inputs)
        assert named.site == "resid_pre" and named.layers == [1, 2]
        for layer in (1, 2):
            assert torch.equal(named[layer], plain[layer])
        results = {}
        for key, site in (("blocks.2.hook_resid_post", "resid_post"), (2, "resid_post"), (2, "hook_out")):
            with vlmsae.splice(model, key, sae, site=site):
                spliced = model(**inputs).logits
            with vlmsae.steer(model, key, v, site=site):
                steered = model(**inputs).logits
            with vlmsae.attach(model, {"blocks.2.hook_out" if key == 2 else key: lambda r, f: r + v}):
                attached = model(**inputs).logits
            results[key, site] = (spliced, steered, attached)
    reference = results[2, "resid_post"]
    assert all((logits - clean).abs().max() > 1e-3 for logits in reference)
    for key, got in results.items():
        for a, b in zip(got, reference):
            assert torch.equal(a, b), key


def test_record_refuses_two_sites_in_one_block(llava):
    with pytest.raises(SiteError, match="record one site per record"):
        with vlmsae.record(llava[0], ["blocks.1.hook_resid_pre", "blocks.2.hook_resid_post"]):
            pass


def test_hook_name_metadata_in_either_spelling_matches_its_site(llava):
    model, inputs = llava
    sae = vlmsae.SAE(d_in=vlmsae.layers(model).d_model, d_sae=128, k=8)
    for name in ("blocks.2.hook_out", "blocks.2.hook_resid_post"):
        sae.metadata["hook_name"] = name
        with warnings.catch_warnings():
            warnings.simplefilter("error", HookNameWarning)
            with vlmsae.splice(model, "blocks.2.hook_resid_post", sae):
                pass
    with pytest.warns(HookNameWarning, match="blocks.2.hook_out"):
        sae.metadata["hook_name"] = "blocks.2.hook_out"
        with vlmsae.splice(model, 1, sae):
            pass
