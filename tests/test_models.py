import pytest
import torch
import torchvision

from handlers.processing import tokenize
from training.backbones import WeightsError, build_backbone
from training.models import CombinedClassifier, ImageClassifier, TextClassifier, TextCNNHead
from training.text_encoder import load_encoder


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
    from training import backbones

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


def test_shipped_efficientnet_weights_load():
    backbone = build_backbone("efficientnet_lite0", "imagenet")
    assert backbone.network._conv_stem.weight.abs().sum() > 0
