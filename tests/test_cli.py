from vlmsae.cli import main


def test_zoo_prints_layers_and_recorded_summary(capsys):
    main(["zoo", "--families", "vit-gpt2", "llava", "--n-layers", "2"])
    out = capsys.readouterr().out
    assert "llava: LlavaForConditionalGeneration, 2 decoder layers at model.model.language_model.layers" in out
    assert "image tokens in the decoder stream: no (cross-attention)" in out
    assert "blocks.1.hook_resid_post  shape (2, 25, 64)" in out
    assert "recorded 2 families" in out


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
    import vlmsae

    data = image_folder(tmp_path / "images")
    args = ["train", "--model", "zoo:llava", "--data", str(data), "--layer", "1", "2", "--out", str(tmp_path / "out"),
            "--batch-size", "64", "--buffer-size", "512", "--k", "8", "--checkpoint-every", "8"]
    main(args + ["--steps", "24"])
    assert "wrote" in capsys.readouterr().out
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
