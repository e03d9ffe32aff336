import json

import pytest

from marketplace_classifier.serving.settings import (
    PAD_COLOUR,
    ImageSettings,
    LexicalSettings,
    ModelSettings,
    SettingsError,
    TextSettings,
)

COMBINED = ModelSettings("combined", 13, ImageSettings(224, (0.5,) * 3, (0.5,) * 3),
                         TextSettings(128, LexicalSettings(4096, 5000)), temperature=1.7)


def test_settings_round_trip_through_preprocessing_json(tmp_path):
    path = COMBINED.save(tmp_path)
    assert path.name == "preprocessing.json"
    assert ModelSettings.load(tmp_path) == COMBINED
    written = json.loads(path.read_text())
    assert written["inputs"] == ["images", "input_ids", "attention_mask", "lexical_ids", "lexical_counts"]
    assert written["image"]["pad_colour"] == list(PAD_COLOUR)


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d | {"colour_space": "BGR"}, "unknown setting colour_space"),
    (lambda d: d | {"image": d["image"] | {"crop": 0.875}}, "unknown setting image.crop"),
    (lambda d: d | {"text": d["text"] | {"lexical": {"buckets": 8}}}, "max_chars"),
    (lambda d: {k: v for k, v in d.items() if k != "num_classes"}, "num_classes"),
    (lambda d: d | {"text": None}, "a combined model needs text settings"),
    (lambda d: d | {"model": "audio"}, "unknown model 'audio'"),
    (lambda d: d | {"temperature": 0}, "temperature must be positive"),
    (lambda d: d | {"image": d["image"] | {"pad_colour": [255, 255, 255]}}, "this code pads with"),
])
def test_a_file_this_code_cannot_serve_is_refused_naming_the_setting(tmp_path, change, message):
    (tmp_path / "preprocessing.json").write_text(json.dumps(change(COMBINED.to_json())))
    with pytest.raises(SettingsError, match=message) as error:
        ModelSettings.load(tmp_path)
    assert "preprocessing.json" in str(error.value)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(SettingsError, match="preprocessing.json"):
        ModelSettings.load(tmp_path)


def test_files_written_by_earlier_exports_still_load(tmp_path):
    earlier = COMBINED.to_json()
    del earlier["notes"]
    earlier["image"] |= {"resize": "fit longer side, pad to centred square", "dtype": "uint8",
                         "layout": "[B,3,H,W] RGB", "normalisation": "inside the model"}
    earlier["text"] |= {"padding": "longest in batch", "fields": ["product_name", "product_description"],
                        "joiner": " ", "strip_boilerplate": True}
    (tmp_path / "preprocessing.json").write_text(json.dumps(earlier))
    assert ModelSettings.load(tmp_path) == COMBINED


def test_a_failed_write_leaves_the_old_file_and_no_partial_one(tmp_path):
    from marketplace_classifier.serving.files import atomic_write

    target = atomic_write(tmp_path / "a" / "settings.json", lambda temporary: temporary.write_text("old"))

    def half_then_crash(temporary):
        temporary.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, half_then_crash)
    assert target.read_text() == "old" and [p.name for p in target.parent.iterdir()] == ["settings.json"]
