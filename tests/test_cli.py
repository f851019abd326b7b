from vlmsae.cli import main


def test_demo_prints_layers_and_recorded_summary(capsys):
    main(["demo", "--families", "vit-gpt2", "llava", "--n-layers", "2"])
    out = capsys.readouterr().out
    assert "llava: LlavaForConditionalGeneration, 2 decoder layers at model.model.language_model.layers" in out
    assert "image tokens in the decoder stream: no (cross-attention)" in out
    assert "blocks.1.hook_resid_post  shape (2, 25, 64)" in out
    assert "recorded 2 families" in out
