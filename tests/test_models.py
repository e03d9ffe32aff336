import pytest
import torch
import torchvision

from marketplace_classifier.serving.model_kinds import COMBINED, IMAGE, TEXT, model_kind
from marketplace_classifier.serving.processing import model_inputs, tokenize
from marketplace_classifier.serving.settings import LexicalSettings, TextSettings
from marketplace_classifier.training.backbones import WeightsError, build_backbone
from marketplace_classifier.training.models import (
    CombinedClassifier,
    ImageClassifier,
    TextClassifier,
    TextCNNHead,
)
from marketplace_classifier.training.text_encoder import load_encoder


@pytest.fixture(scope="module")
def minilm():
    return load_encoder("minilm")


@pytest.mark.parametrize("backbone", ["resnet50", "efficientnet_lite0"])
def test_image_model_shapes(backbone):
    model = ImageClassifier(build_backbone(backbone, "none"), 13).eval()
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    assert model(images).shape == (2, 13)
    assert model.features(images).shape == (2, model.feature_dim)


def test_text_and_combined_shapes(minilm):
    encoder, tokenizer = minilm
    text = TextClassifier(encoder, 13).eval()
    ids, mask = tokenize(tokenizer, ["oak dining table", "ps5 console with two pads and fifa"], 16)
    assert text(ids, mask).shape == (2, 13)
    image = ImageClassifier(build_backbone("efficientnet_lite0", "none"), 13).eval()
    combined = CombinedClassifier(image, text, 13).eval()
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    assert combined(images, ids, mask).shape == (2, 13)


def test_fusion_starts_as_the_sum_of_both_heads(minilm):
    encoder, tokenizer = minilm
    image = ImageClassifier(build_backbone("efficientnet_lite0", "none"), 13).eval()
    text = TextClassifier(encoder, 13).eval()
    combined = CombinedClassifier(image, text, 13).eval()
    combined.init_fusion_from_heads()
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    ids, mask = tokenize(tokenizer, ["a kettle", "a sofa that seats three", "bike"], 16)
    with torch.inference_mode():
        expected = image(images) + text(ids, mask)
        assert torch.allclose(combined(images, ids, mask), expected, atol=1e-5)


def test_text_head_ignores_how_far_a_batch_was_padded():
    torch.manual_seed(0)
    head = TextCNNHead(8, 13).eval()
    for length in (1, 2, 5, 7):
        hidden = torch.randn(1, length, 8)
        padded = torch.cat([hidden, torch.randn(1, 11, 8)], dim=1)  # garbage in padded slots
        mask = torch.zeros(1, length + 11, dtype=torch.long)
        mask[:, :length] = 1
        alone = head(hidden, torch.ones(1, length, dtype=torch.long))
        assert torch.allclose(alone, head(padded, mask), atol=1e-6)


def test_weights_from_a_file_load_strictly(tmp_path):
    reference = torchvision.models.resnet50(weights=None)  # what users save: the full network
    state = {name: torch.randn_like(value) if value.is_floating_point() else value
             for name, value in reference.state_dict().items()}
    torch.save(state, tmp_path / "resnet.pt")
    loaded = build_backbone("resnet50", str(tmp_path / "resnet.pt")).network
    assert torch.equal(loaded.conv1.weight, state["conv1.weight"])

    del state["layer4.2.bn3.running_var"]
    torch.save(state, tmp_path / "incomplete.pt")
    with pytest.raises(WeightsError, match="missing 1 keys"):
        build_backbone("resnet50", str(tmp_path / "incomplete.pt"))
    with pytest.raises(WeightsError, match="does not exist"):
        build_backbone("resnet50", str(tmp_path / "absent.pt"))


def test_imagenet_resnet_weights_come_from_the_torch_cache(tmp_path, monkeypatch):
    from marketplace_classifier.training import backbones

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    def no_download(*args, **kwargs):
        raise OSError("offline")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    with pytest.raises(WeightsError, match="could not be downloaded"):
        build_backbone("resnet50", "imagenet")
    cached = backbones.resnet50_weights_file()
    assert str(cached).startswith(str(tmp_path))
    cached.parent.mkdir(parents=True)
    state = torchvision.models.resnet50(weights=None).state_dict()
    state["conv1.weight"] = torch.full_like(state["conv1.weight"], 0.5)
    torch.save(state, cached)
    loaded = build_backbone("resnet50", "imagenet")  # the cached file, no download
    assert torch.equal(loaded.network.conv1.weight, state["conv1.weight"])


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_shipped_efficientnet_weights_load_strictly(name):
    from marketplace_classifier.training.backbones import _efficientnet_lite_imagenet_state
    from marketplace_classifier.training.efficientnet_lite import VARIANTS, EfficientNetLite

    backbone = build_backbone(name, "imagenet")  # strict: every key of the package's file
    assert backbone.network._conv_stem.weight.abs().sum() > 0
    network = EfficientNetLite(VARIANTS[name][0]).eval()
    network.load_state_dict(_efficientnet_lite_imagenet_state(name), strict=True)
    with torch.inference_mode():  # the ImageNet head still works: a plausible distribution
        probabilities = torch.softmax(network(torch.zeros(1, 3, 64, 64)), 1)
    assert probabilities.shape == (1, 1000) and probabilities.max() < 0.99


def test_lexical_branch_ignores_padding_and_weighs_rare_terms_more():
    from marketplace_classifier.serving.processing import lexical_batch, lexical_ids
    from marketplace_classifier.serving.settings import LexicalSettings
    from marketplace_classifier.training.models import LexicalClassifier

    torch.manual_seed(0)
    lexical = LexicalClassifier(1024, 13)
    torch.nn.init.normal_(lexical.bag.weight)
    settings = LexicalSettings(buckets=1024, max_chars=5_000)
    texts = ["ps4 pro with two pads", "ikea kallax shelf unit, white"]
    lexical.fit_idf([lexical_ids(text, settings)[0] for text in texts + ["ps4 games"]])
    ids, counts = lexical_batch(texts, settings)
    alone = lexical(*lexical_batch(texts[:1], settings))
    assert torch.allclose(lexical(ids, counts)[:1], alone, atol=1e-6)  # padded in a longer batch
    shared, own = lexical_ids("ps4", settings)[0][0], lexical_ids("kallax", settings)[0][0]
    assert lexical.idf[own] > lexical.idf[shared]
    # its gather-and-sum (which ONNX exporters take) is the bag's weighted sum it replaced
    present = (ids > 0).to(counts.dtype)
    weights = (1 + torch.log(counts.clamp(min=1))) * lexical.idf[ids] * present
    weights = weights / weights.norm(dim=1, keepdim=True).clamp(min=1e-6)
    with torch.no_grad():
        lexical.bag.weight[0] = 5.0  # the padding row never counts, whatever it holds
        bag = lexical.bag(ids, per_sample_weights=weights) + lexical.bias
        assert torch.allclose(lexical(ids, counts), bag, atol=1e-5)


def two_listings(tokenizer, photos: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, ...]:
    """Model inputs of two short listings (with `photos`, the combined model's), 512 lexical buckets."""
    return model_inputs("text" if photos is None else "combined", photos, ["oak table", "xbox one s"],
                        tokenizer, TextSettings(16, LexicalSettings(buckets=512, max_chars=100)))


def test_text_model_answers_a_mix_of_its_branches(minilm):
    encoder, tokenizer = minilm
    text = TextClassifier(encoder, 13, lexical_buckets=512).eval()
    torch.nn.init.normal_(text.lexical.bag.weight)
    text.mix.copy_(torch.tensor([0.3, 0.7]))
    inputs = two_listings(tokenizer)
    with torch.inference_mode():
        encoder_logits, lexical_logits = text.branches(*inputs)
        expected = 0.3 * torch.log_softmax(encoder_logits, 1) + 0.7 * torch.log_softmax(lexical_logits, 1)
        assert torch.allclose(text(*inputs), expected, atol=1e-6)


def test_a_lexical_branch_with_levels_mixes_them_by_their_own_weights_and_traces(minilm):
    """With lexical_levels_rank, the lexical branch answers the levels too (a narrow bag and a
    linear layer); the model's levels are then the branches' log-probabilities weighted by
    `levels_branch_mix`, its roots by `mix`, and the traced model gives the same."""
    encoder, tokenizer = minilm
    torch.manual_seed(0)
    text = TextClassifier(encoder, 13, lexical_buckets=512, levels=7, lexical_levels_rank=4).eval()
    torch.nn.init.normal_(text.lexical.bag.weight)
    text.mix.copy_(torch.tensor([0.3, 0.7]))
    text.levels_branch_mix.copy_(torch.tensor([0.8, 0.2]))
    inputs = two_listings(tokenizer)
    with torch.inference_mode():
        encoder_logits, lexical_logits = text.branches(*inputs)
        assert encoder_logits.shape == lexical_logits.shape == (2, 13 + 7)
        expected = torch.cat([first * torch.log_softmax(part_e, 1) + second * torch.log_softmax(part_l, 1)
                              for part_e, part_l, first, second in (
                                  (encoder_logits[:, :13], lexical_logits[:, :13], 0.3, 0.7),
                                  (encoder_logits[:, 13:], lexical_logits[:, 13:], 0.8, 0.2))], 1)
        assert torch.allclose(text(*inputs), expected, atol=1e-6)
        traced = torch.jit.trace(text, tuple(inputs), check_trace=False)
        assert torch.allclose(traced(*inputs), expected, atol=1e-5)
    table = TextClassifier(encoder, 13, lexical_buckets=512, levels=7, lexical_levels_buckets=64).eval()
    assert tuple(table.lexical.levels_table.shape) == (64, 7)  # a full table of fewer buckets
    torch.nn.init.normal_(table.lexical.levels_table)
    with torch.inference_mode():
        lexical_logits = table.branches(*inputs)[1]
        term_ids, counts = inputs[2:]  # each term weighs in the bucket it folds into
        weights = (1 + torch.log(counts.clamp(min=1))) * table.lexical.idf[term_ids] * (term_ids > 0)
        weights = weights / weights.norm(dim=1, keepdim=True)
        expected = (table.lexical.levels_table[term_ids % 64] * weights.unsqueeze(2)).sum(1)
        assert torch.allclose(lexical_logits[:, 13:], expected, atol=1e-5)
        traced = torch.jit.trace(table, tuple(inputs), check_trace=False)
        assert torch.allclose(traced(*inputs), table(*inputs), atol=1e-5)
    roots_only = TextClassifier(encoder, 13, lexical_buckets=512, levels=7).eval()
    assert not hasattr(roots_only, "levels_branch_mix")  # nothing to weigh
    with torch.inference_mode():
        assert roots_only.branches(*inputs)[1].shape == (2, 13)  # the first branch's levels pass through
        assert roots_only(*inputs).shape == (2, 20)


def test_the_combined_models_levels_mix_the_fusions_and_the_text_heads_and_trace(minilm):
    """levels_mix [1, 0] answers the fusion's levels alone (as before the mix existed); another
    weight mixes in the text model's own levels head on the same text features."""
    encoder, tokenizer = minilm
    torch.manual_seed(0)
    text = TextClassifier(encoder, 13, lexical_buckets=512, levels=7)
    image = ImageClassifier(build_backbone("efficientnet_lite0", "none"), 13, levels=7)
    model = CombinedClassifier(image, text, 13, levels=7).eval()
    photos = [torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8) for _ in range(2)]
    inputs = two_listings(tokenizer, photos)
    with torch.inference_mode():
        hidden = text.hidden_states(*inputs[1:3])
        features = (image.features(inputs[0]), text.head.pooled(hidden, inputs[2]))
        fusion = model.levels_fusion(torch.cat(features, 1))
        own = text.head.levels(features[1])
        assert model.levels_mix.tolist() == [1.0, 0.0]
        assert torch.allclose(model(*inputs)[:, 13:], torch.log_softmax(fusion, 1), atol=1e-5)
        model.levels_mix.copy_(torch.tensor([0.25, 0.75]))
        expected = 0.25 * torch.log_softmax(fusion, 1) + 0.75 * torch.log_softmax(own, 1)
        assert torch.allclose(model(*inputs)[:, 13:], expected, atol=1e-5)
        traced = torch.jit.trace(model, tuple(inputs), check_trace=False)
        assert torch.allclose(traced(*inputs)[:, 13:], expected, atol=1e-5)


def test_each_model_kind_says_how_its_model_is_built_called_and_trained(minilm):
    """ModelKind: the parts it needs, the inputs its model takes (model_inputs builds exactly
    those), the method frozen training calls, and its TorchScript's extra methods."""
    encoder, tokenizer = minilm
    image = ImageClassifier(build_backbone("efficientnet_lite0", "none"), 13).eval()
    text = TextClassifier(encoder, 13, lexical_buckets=64).eval()
    models = {IMAGE: image, TEXT: text, COMBINED: CombinedClassifier(image, text, 13).eval()}
    photos = [torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)] * 2
    settings = TextSettings(16, LexicalSettings(64, 1000, 0))
    for kind, model in models.items():
        assert model_kind(kind.name) is kind
        assert model_kind(f"{kind.name}_int8" if kind.uses_text else kind) is kind
        inputs = model_inputs(kind, photos, ["a kettle", "oak table"], tokenizer, settings)
        assert len(inputs) == len(kind.script_inputs(lexical=True))
        with torch.inference_mode():
            assert model(*inputs).shape == (2, 13)
        assert callable(getattr(model, kind.frozen_entry))
        assert all(callable(getattr(model, method)) for method in kind.extra_methods)
        assert (kind.image_part(model) is image) == kind.uses_image
        assert (kind.text_part(model) is text) == kind.uses_text
    with torch.inference_mode():  # frozen training's entry answers one logits tensor per branch
        assert len(image.feature_branches(image.features(torch.stack(photos)))) == 1
    for name in ("image_int8", "video", "Text"):
        with pytest.raises(ValueError, match="unknown model"):
            model_kind(name)


def test_combined_listings_run_each_text_once_with_forwards_answers(minilm):
    encoder, tokenizer = minilm
    image = ImageClassifier(build_backbone("efficientnet_lite0", "none"), 13).eval()
    combined = CombinedClassifier(image, TextClassifier(encoder, 13, lexical_buckets=64), 13).eval()
    settings = TextSettings(16, LexicalSettings(64, 1000, 0))
    photos = torch.randint(0, 256, (5, 3, 64, 64), dtype=torch.uint8)
    listing_of_photo = torch.tensor([0, 0, 0, 1, 1])
    texts = ["oak dining table with six chairs", "ps5"]
    once = model_inputs(TEXT, None, texts, tokenizer, settings)
    per_photo = model_inputs(TEXT, None, [texts[i] for i in listing_of_photo], tokenizer, settings)
    with torch.inference_mode():
        expected = combined(photos, *per_photo)
        assert torch.allclose(combined.listings(photos, listing_of_photo, *once), expected, atol=1e-5)
