"""The shipped testbed models: they load offline, see, and answer fresh Shapes samples (never the training ones)."""

import pytest
import torch

import vlmsae
from vlmsae.testbed import models, shapes

GOAL = 0.98
N_FRESH = 300  # fresh samples per measurement; seeds from models.EVAL_SEED up, which training never draws


@pytest.fixture(scope="module")
def captioner():
    return models.load_captioner()


@pytest.fixture(scope="module")
def qa():
    return models.load_qa()


def test_captioner_loads_offline(captioner):
    model, tok = captioner
    assert isinstance(model, models.VisionEncoderDecoderModel)
    info = vlmsae.layers(model)
    assert info.family == "vit-gpt2" and info.n_layers == model.config.decoder.n_layer
    assert tok.pad_token_id == shapes.PAD and len(tok) == model.config.decoder.vocab_size


def test_qa_loads_offline(qa):
    model, tok = qa
    info = vlmsae.layers(model)
    assert info.family == "llava" and model.config.image_seq_length == shapes.N_PATCHES
    assert model.config.image_token_index == shapes.IMAGE


def test_captioner_accuracy_on_fresh_samples(captioner):
    torch.set_num_threads(2)
    result = models.evaluate_captioner(*captioner, n=N_FRESH, seed=models.EVAL_SEED + 777)
    print(f"\ncaptioner exact match on {N_FRESH} fresh samples:", {k: round(v, 4) for k, v in result.items()})
    assert result["exact_match"] >= GOAL, result


def test_qa_accuracy_on_fresh_samples(qa):
    torch.set_num_threads(2)
    result = models.evaluate_qa(*qa, n=N_FRESH, seed=models.EVAL_SEED + 777)
    print(f"\nLLaVA QA exact match on {N_FRESH} fresh samples per question:",
          {k: round(v, 4) for k, v in result.items()})
    assert result["exact_match"] >= GOAL, result
    assert min(v for k, v in result.items() if k != "exact_match") >= 0.95, result


@torch.no_grad()
def test_concept_sites_are_where_the_captioner_predicts_the_word(captioner):
    """Teacher-forced, the logits at ``site.predict`` pick the concept word (what steering and AUROC rely on)."""
    model, tok = captioner
    samples = shapes.make_samples(32, seed=models.EVAL_SEED + 999)
    inputs = shapes.captioner_inputs(samples, tok)
    labels = inputs.pop("labels")
    pred = model(**inputs).logits.argmax(-1)
    hits = [pred[i, site.predict].item() == tok.convert_tokens_to_ids(site.value)
            for i, s in enumerate(samples) for site in shapes.concept_sites(s)]
    assert sum(hits) / len(hits) >= GOAL
    # position t is labelled with the word it predicts: the caption, then <eos>; padding is not labelled
    for i, sample in enumerate(samples):
        words = tok.convert_tokens_to_ids(sample.caption.split())
        assert tok.unk_token_id not in words
        pad = [-100] * (labels.shape[1] - len(words) - 1)
        assert labels[i].tolist() == words + [tok.eos_token_id] + pad
        assert inputs["decoder_input_ids"][i, :len(words) + 1].tolist() == [tok.bos_token_id] + words
        for site in shapes.concept_sites(sample):
            assert labels[i, site.predict] == tok.convert_tokens_to_ids(site.value)


@pytest.mark.parametrize("question", list(shapes.QUESTIONS))
def test_qa_labels_are_exactly_the_answer_and_eos(qa, question):
    """The QA model learns the answer and nothing else: every other position is -100 (the model shifts them)."""
    _, tok = qa
    samples = shapes.make_samples(16, seed=models.EVAL_SEED + 999)
    inputs = shapes.qa_inputs(samples, tok, question)
    prompt = 1 + shapes.N_PATCHES + len(shapes.QUESTIONS[question].replace("?", " ?").split())
    for i, sample in enumerate(samples):
        answer = tok.convert_tokens_to_ids(sample.answer(question).split())
        assert tok.unk_token_id not in answer
        after = [-100] * (inputs["labels"].shape[1] - prompt - len(answer) - 1)
        assert inputs["labels"][i].tolist() == [-100] * prompt + answer + [tok.eos_token_id] + after
        assert inputs["input_ids"][i, prompt:prompt + len(answer)].tolist() == answer


def test_training_is_deterministic(tmp_path):
    cfg = models.TestbedModelConfig(steps=3, warmup=1, batch=4, d_model=32, n_layers=1, vision_layers=1, threads=1)
    a, _ = models.train_captioner(tmp_path / "a", cfg)
    b, _ = models.train_captioner(None, cfg)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    c, _ = models.train_qa(None, cfg)
    d, _ = models.train_qa(None, cfg)
    assert all(torch.equal(x, y) for x, y in zip(c.state_dict().values(), d.state_dict().values()))
    loaded, tok = models.load_captioner(tmp_path / "a")
    assert torch.equal(loaded.state_dict()["decoder.lm_head.weight"], a.state_dict()["decoder.lm_head.weight"])
