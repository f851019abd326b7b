from vlmsae.cli import main


def test_zoo_prints_layers_and_recorded_summary(capsys):
    main(["zoo", "--families", "vit-gpt2", "llava", "--n-layers", "2"])
    out = capsys.readouterr().out
    assert "llava: LlavaForConditionalGeneration, 2 decoder layers at model.model.language_model.layers" in out
    assert "image tokens in the decoder stream: no (cross-attention)" in out
    assert "blocks.1.hook_resid_post  shape (2, 25, 64)" in out
    assert "recorded 2 families" in out


def test_zoo_lists_every_site_of_a_dual_encoder_with_the_shapes_the_model_itself_gives(capsys):
    """CLIP has no decoder: `vlmsae zoo` shows its towers' and embeddings' hook names, with the shapes of the
    model's own outputs (hidden states of the towers' last layers, the pooled embeddings)."""
    import torch

    from vlmsae import zoo

    main(["zoo", "--families", "clip", "--n-layers", "3"])
    out = capsys.readouterr().out
    clip = zoo.tiny_model("clip", n_layers=3)
    with torch.no_grad():
        ref = clip(**zoo.tiny_inputs(clip, batch=2, padding="left"), output_hidden_states=True)
    n, t = len(ref.vision_model_output.hidden_states) - 1, len(ref.text_model_output.hidden_states) - 1
    assert "clip: CLIPModel, a dual encoder: no decoder" in out
    assert f"vision.blocks.{n - 1}.hook_resid_post  shape {tuple(ref.vision_model_output.hidden_states[n].shape)}  " \
           f"({n} layers)" in out
    assert f"text.blocks.{t - 1}.hook_resid_pre  shape {tuple(ref.text_model_output.hidden_states[t - 1].shape)}  " \
           f"({t} layers)" in out
    assert f"hook_image_embeds  shape {tuple(ref.image_embeds.shape)}" in out
    assert f"hook_text_embeds  shape {tuple(ref.text_embeds.shape)}" in out
    assert "recorded 1 families: clip" in out


def test_help_names_each_command_and_the_train_options_defaults(capsys):
    """`vlmsae --help` gives each command's first paragraph, and `vlmsae train --help` every option's default, as
    plain text (no reST quotes)."""
    import pytest

    for argv in (["--help"], ["train", "--help"]):
        with pytest.raises(SystemExit) as done:
            main(argv)
        assert done.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "``" not in out
    assert "explain Label SAE latents: an explainer VLM answers questions about each latent's top and non-firing " \
           "images; each label is then scored by detection on held-out images." in out
    for default in ("SAE training steps (default 1000)", "(default 65536)", "TopK's k (default 32)",
                    "expansion x d_model (default 8)", "2e-4 / sqrt(d_sae / 2**14)", "(default cpu)", "(default 0)"):
        assert default in out, default


def image_folder(path, n=12):
    import json

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    path.mkdir()
    with open(path / "captions.jsonl", "w") as f:
        for i in range(n):
            Image.fromarray((rng.random((40, 40, 3)) * 255).astype(np.uint8)).save(path / f"{i}.png")
            words = rng.choice(["a", "red", "blue", "circle", "square", "left", "right"], 5)
            f.write(json.dumps({"image": f"{i}.png", "text": " ".join(words)}) + "\n")
    return path


def test_train_command_writes_saes_and_resumes(tmp_path, capsys):
    import pytest

    import vlmsae

    data = image_folder(tmp_path / "images")
    args = ["train", "--model", "zoo:llava", "--data", str(data), "--layer", "1", "2", "--out", str(tmp_path / "out"),
            "--batch-size", "64", "--buffer-size", "512", "--k", "8", "--checkpoint-every", "8", "--quota", "balanced"]
    main(args + ["--steps", "24"])
    out = capsys.readouterr().out
    assert "wrote" in out and "layer 1: image 50%, text 50%" in out
    assert "the buffers' first fill read the data 5 times over" in out  # 12 images for 512 balanced rows
    with pytest.raises(vlmsae.SAEFileError, match=r"out holds the SAE folders L1, L2: pass one of them"):
        vlmsae.SAE.load(tmp_path / "out")  # the run's folder, not an SAE's
    sae = vlmsae.SAE.load(tmp_path / "out" / "L2")
    assert sae.cfg.k == 8 and sae.metadata["hook_name"] == "blocks.2.hook_resid_post"
    main(args + ["--steps", "32", "--resume"])  # continue the same run to 32 steps
    assert (tmp_path / "out" / "checkpoints" / "step-32").is_dir()


def test_folder_source_and_clear_errors(tmp_path, capsys):
    import pytest

    import vlmsae
    from vlmsae.data import ImageTextFolder
    from vlmsae.zoo import processor, tiny_model

    data = image_folder(tmp_path / "images", n=5)
    model = tiny_model("qwen2-vl", n_layers=2)
    source = ImageTextFolder(data, processor(model), batch_size=2)
    batches = list(source)
    assert len(source) == 3 and [b["input_ids"].shape[0] for b in batches] == [2, 2, 1]
    model(**batches[0])  # valid inputs
    with pytest.raises(vlmsae.ConfigError, match="holds none of"):
        ImageTextFolder(tmp_path, processor(model))
    with pytest.raises(SystemExit):
        main(["train", "--model", str(tmp_path / "missing"), "--data", str(data), "--layer", "1", "--out", "x"])
    assert "cannot load" in capsys.readouterr().err


def test_demo_on_your_own_captioner_folder_and_images(tmp_path, capsys, monkeypatch):
    """``vlmsae demo --model DIR --images FOLDER``: a ViT-GPT2 folder as a user has it (weights, tokenizer and an
    image processor, no joint processor) runs the pipeline; a hub id offline gives an error with the fix."""
    import json
    import shutil

    import pytest
    from transformers import ViTImageProcessor

    import vlmsae
    from vlmsae.testbed import models

    model_dir = tmp_path / "captioner"
    shutil.copytree(models.CAPTIONER_DIR, model_dir)
    ViTImageProcessor(size={"height": 48, "width": 48}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(
        model_dir)
    images = image_folder(tmp_path / "images")
    out = tmp_path / "demo"
    main(["demo", "--model", str(model_dir), "--images", str(images), "--out", str(out), "--quick",
          "--steps", "30", "--layers", "1"])
    assert "wrote" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["layers"]) == ["1"] and summary["layers"]["1"]["l0"] > 0
    assert vlmsae.SAE.load(out / "sae" / "L1").metadata["hook_name"] == "blocks.1.hook_resid_post"
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network here: skip the retries
    with pytest.raises(SystemExit):
        main(["demo", "--model", "nlpconnect/vit-gpt2-image-captioning", "--images", str(images), "--out",
              str(tmp_path / "hub")])
    err = capsys.readouterr().err
    assert "nlpconnect/vit-gpt2-image-captioning" in err and "--local-dir" in err
    assert not (tmp_path / "hub").exists()


def test_evaluate_and_dashboard_commands(tmp_path, capsys):
    """``vlmsae evaluate`` and ``vlmsae dashboard`` on an SAE folder over a folder of images: the layer comes from
    the SAE's hook_name; a bad argument or an SAE that does not fit the model exits with the reason and writes
    nothing."""
    import json

    import pytest
    import torch

    import vlmsae

    data = image_folder(tmp_path / "images", n=6)
    torch.manual_seed(0)
    sae = vlmsae.SAE(d_in=64, d_sae=128, k=8, metadata={"hook_name": "blocks.1.hook_resid_post"})
    sae.save(tmp_path / "sae")
    common = ["--model", "zoo:llava", "--sae", str(tmp_path / "sae"), "--data", str(data), "--data-batch", "3"]
    main(["evaluate", *common, "--out", str(tmp_path / "table.json")])
    printed = capsys.readouterr().out
    table = json.loads((tmp_path / "table.json").read_text())
    assert sorted(table) == ["all", "image", "text"] and "loss_recovered" in printed
    assert table["all"]["loss_tokens"] > 0 and 0 < table["all"]["l0"] <= 8
    main(["dashboard", *common, "--batches", "1", "--out", str(tmp_path / "page.html"), "--latents", "0", "1", "2"])
    page = (tmp_path / "page.html").read_text()
    assert "wrote" in capsys.readouterr().out and page.count("data:image/png;base64") >= 1
    wrong = vlmsae.SAE(d_in=32, d_sae=64, k=4)
    wrong.save(tmp_path / "wrong")
    for argv, reason in ((["evaluate", *common, "--out", str(tmp_path / "t.csv")], "must end in .json"),
                         (["dashboard", *common, "--out", str(tmp_path / "p.png")], "must end in .html"),
                         (["evaluate", *common, "--batches", "0"], "--batches 0 must be at least 1"),
                         (["evaluate", *common[:2], "--sae", str(tmp_path / "wrong"), *common[4:], "--layer", "1",
                           "--out", str(tmp_path / "w.json")], "d_in=32"),
                         (["evaluate", *common[:2], "--sae", str(tmp_path / "wrong"), *common[4:]], "pass --layer")):
        with pytest.raises(SystemExit):
            main(argv)
        assert reason in capsys.readouterr().err, argv
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "page.html", "sae", "table.json", "wrong"]



def llava_folder(path):
    """A LLaVA folder as a user has one: weights, config and processor. Its vision tower is narrower than its
    decoder (32 vs 64), and its chat template wraps every prompt in ``<turn>``, a token the tokenizer marks special
    but the config does not name. Returns the folder and the id of ``<turn>``."""
    from tokenizers import AddedToken
    from transformers import CLIPImageProcessorPil, LlavaForConditionalGeneration, LlavaProcessor

    from vlmsae import zoo

    config = zoo.tiny_config("llava", n_layers=2)
    config.vision_config.hidden_size, config.vision_config.intermediate_size = 32, 64
    model = LlavaForConditionalGeneration(config)
    tok = zoo.tokenizer(model)
    tok.add_tokens([AddedToken("<turn>", special=True)])
    model.resize_token_embeddings(len(tok))
    template = ("{% for m in messages %}<turn> {{ m['role'] }} {% for c in m['content'] %}{% if c['type'] == 'image' %}"
                "<image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}"
                "{% if add_generation_prompt %}<turn> assistant {% endif %}")
    vision = config.vision_config
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": vision.image_size}, crop_size=vision.image_size),
        tokenizer=tok, chat_template=template, patch_size=vision.patch_size, num_additional_image_tokens=1,
        vision_feature_select_strategy=config.vision_feature_select_strategy)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path, tok.convert_tokens_to_ids("<turn>")


def test_train_command_at_a_vision_site_and_bad_sites(tmp_path, capsys):
    """``--layer`` takes hook names of any site, or indices at ``--site``; the SAE is as wide as that site (32 here,
    the decoder 64), its metadata names it; several sites, or a site the model lacks, exit with the error before
    anything is written."""
    import pytest

    import vlmsae

    folder, _ = llava_folder(tmp_path / "model")
    data = image_folder(tmp_path / "images", n=6)
    common = ["train", "--model", str(folder), "--data", str(data), "--steps", "4", "--batch-size", "32",
              "--buffer-size", "128", "--k", "4", "--expansion", "2"]
    main(common + ["--layer", "vision.blocks.1.hook_resid_post", "--out", str(tmp_path / "a")])
    main(common + ["--layer", "0", "--site", "vision.resid_post", "--out", str(tmp_path / "b")])
    for path, name in (("a/L1", "vision.blocks.1.hook_resid_post"), ("b/L0", "vision.blocks.0.hook_resid_post")):
        sae = vlmsae.SAE.load(tmp_path / path)
        assert sae.metadata["hook_name"] == name and sae.W_enc.shape == (32, 64)
    capsys.readouterr()
    for bad, message in ((["--layer", "blocks.1.hook_resid_post", "vision.blocks.1.hook_resid_post"], "several sites"),
                         (["--layer", "blocks.1.hook_resid_mid"], "hook_resid_mid"),
                         (["--layer", "1", "--site", "resid_mid"], "resid_mid")):
        with pytest.raises(SystemExit):
            main(common + bad + ["--out", str(tmp_path / "bad")])
        assert message in capsys.readouterr().err
        assert not (tmp_path / "bad").exists()


def test_train_command_reads_special_tokens_from_the_models_processor(tmp_path, monkeypatch):
    """The run is told to keep the chat template's ``<turn>`` out of the buffers (which then keep it out:
    tests/test_special_tokens.py), though only the folder's tokenizer names it."""
    import vlmsae
    import vlmsae.cli

    folder, turn = llava_folder(tmp_path / "model")
    assert turn not in vlmsae.special_token_ids(vlmsae.load_model(folder))
    seen = {}
    real_train = vlmsae.cli.train

    def spy(model, layer, data, saes, *, cfg, **kwargs):
        seen["special_ids"] = cfg.special_ids
        seen["turns"] = sum(int((batch["input_ids"] == turn).sum()) for batch in data)
        return real_train(model, layer, data, saes, cfg=cfg, **kwargs)

    monkeypatch.setattr(vlmsae.cli, "train", spy)
    main(["train", "--model", str(folder), "--data", str(image_folder(tmp_path / "images", n=4)), "--layer", "1",
          "--out", str(tmp_path / "out"), "--steps", "2", "--batch-size", "16", "--buffer-size", "64", "--k", "4"])
    assert turn in seen["special_ids"] and seen["turns"] == 4 * 2  # two <turn> in each prompt


def test_explain_command_labels_latents_with_an_explainer_vlm(tmp_path, capsys):
    """``vlmsae explain`` with a VLM folder as explainer: its answers (through the folder's chat template) become
    the labels; every latent gets a label or None, its transcript holds the folder's prompts, a detection score;
    a bad argument exits with the reason and writes nothing."""
    import json

    import pytest
    import torch

    import vlmsae

    data = image_folder(tmp_path / "images", n=12)
    folder, _ = llava_folder(tmp_path / "explainer")
    torch.manual_seed(0)
    sae = vlmsae.SAE(d_in=64, d_sae=32, k=8, metadata={"hook_name": "blocks.1.hook_resid_post"})
    sae.save(tmp_path / "sae")
    common = ["--model", "zoo:llava", "--sae", str(tmp_path / "sae"), "--data", str(data), "--data-batch", "4"]
    out = tmp_path / "labels.json"
    main(["explain", *common, "--latents", "0", "1", "--explainer", str(folder), "--out", str(out),
          "--n-top", "3", "--n-negative", "3", "--n-score", "2"])
    assert "wrote" in capsys.readouterr().out
    rows = json.loads(out.read_text())
    explainer = vlmsae.VLMExplainer(vlmsae.load_model(str(folder)))
    assert [r["latent"] for r in rows] == [0, 1]
    for r in rows:
        assert r["transcript"] and all(t["prompt"] == explainer.prompt(t["question"], t["context"])
                                       for t in r["transcript"])
        assert any(t["context"] and "[[" in t["prompt"] for t in r["transcript"])  # the peak's text is asked
        assert all(t["answer"] == explainer.ask([vlmsae.plots.to_rgb(_image(data, t["example"]))], t["question"],
                                                [t["context"]])[0] for t in r["transcript"][:2])
        assert r["label"] is None or r["label"].split(": ")[0] in explainer.questions
    image = vlmsae.plots.to_rgb(_image(data, 0))
    boxes = explainer.locate([image, image], "red square")  # score_boxes asks this; a tiny random model answers
    assert len(boxes) == 2 and all(isinstance(b, str) for b in boxes)
    for argv, reason in ((["--out", str(tmp_path / "l.csv"), "--explainer", str(folder)], "must end in .json"),
                         (["--out", str(tmp_path / "l.json"), "--explainer", str(tmp_path / "none")], "none")):
        with pytest.raises(SystemExit):
            main(["explain", *common, "--latents", "0", *argv])
        assert reason in capsys.readouterr().err
    assert not (tmp_path / "l.json").exists()


def _image(folder, example):
    from PIL import Image

    return Image.open(folder / f"{example}.png").convert("RGB")
