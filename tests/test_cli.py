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
