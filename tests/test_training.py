import io
import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from marketplace_classifier.serving.settings import CARD_FILE, REFERENCE_FILE, ModelSettings
from marketplace_classifier.training.data import CleanData
from marketplace_classifier.training.evaluate import evaluate
from marketplace_classifier.training.export import export
from marketplace_classifier.training.tasks import frozen_task
from marketplace_classifier.training.train import (
    TrainConfig,
    build_model,
    load_checkpoint,
    seed_everything,
    train,
)


def test_training_lowers_the_loss_and_keeps_the_best_checkpoint(trained):
    for kind in ("image", "text"):
        checkpoint = torch.load(trained["paths"][kind], weights_only=False)
        history = checkpoint["history"]
        assert history[-1]["train_loss"] < history[0]["train_loss"]
        accuracies = [row["val_accuracy"] for row in history]
        assert checkpoint["best_epoch"] == accuracies.index(max(accuracies)) + 1
        assert checkpoint["best_val_accuracy"] == max(accuracies)
    assert (trained["work"] / "runs" / "image").exists()


def test_checkpoints_reload_strictly_and_reproduce(trained):
    model, checkpoint = load_checkpoint(trained["paths"]["image"])
    again, _ = load_checkpoint(trained["paths"]["image"])
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.inference_mode():
        assert torch.equal(model(images), again(images))
    assert len(checkpoint["index_to_name"]) == 13


def test_training_is_deterministic_for_a_seed(trained, tmp_path):
    config = replace(trained["configs"]["image"], checkpoint_dir=str(tmp_path / "a"),
                     runs_dir=str(tmp_path / "runs"), epochs=2)
    first = torch.load(train(config), weights_only=False)["history"]
    second = torch.load(train(replace(config, checkpoint_dir=str(tmp_path / "b"))),
                        weights_only=False)["history"]
    assert without_time(first) == without_time(second)


def test_feature_cache_is_reused_and_invalidated(trained, tmp_path, monkeypatch):
    from marketplace_classifier.training import tasks

    calls, stage_calls = [], []
    original = tasks.compute_features_from_stage_inputs
    monkeypatch.setattr(tasks, "compute_features_from_stage_inputs",
                        lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs))
    original_stage = tasks.compute_stage_inputs
    monkeypatch.setattr(tasks, "compute_stage_inputs",
                        lambda *args, **kwargs: stage_calls.append(1) or original_stage(*args, **kwargs))
    config = trained["configs"]["image"]
    data = CleanData.load(trained["data_dir"])
    model = build_model(config, 13)
    settings = replace(config, feature_batch_size=64)
    device = torch.device("cpu")
    first = frozen_task(model, settings, data, device, tmp_path)
    frozen_task(model, settings, data, device, tmp_path)
    assert len(calls) == 1  # second time from the cache
    frozen_task(model, replace(settings, image_size=48), data, device, tmp_path)
    assert len(calls) == 2  # preprocessing changed
    photo = data.image_path(data.images["id"][0])
    original_bytes = photo.read_bytes()
    photo.write_bytes(original_bytes)  # cleaned again: new modification time, same bytes
    frozen_task(model, settings, data, device, tmp_path)
    assert len(calls) == 2  # the cache follows the contents
    from PIL import Image, ImageOps

    ImageOps.mirror(Image.open(io.BytesIO(original_bytes))).save(photo, "JPEG")
    second = frozen_task(model, settings, data, device, tmp_path)
    photo.write_bytes(original_bytes)
    assert len(calls) == 3  # a photo changed
    assert not torch.equal(first.tensors["features"], second.tensors["features"])
    with torch.no_grad():  # e.g. a fine-tuned branch under a combined model: same names, new weights
        model.backbone.network._conv_head.weight.mul_(1.5)
    third = frozen_task(model, settings, data, device, tmp_path)
    assert len(calls) == 4 and not torch.equal(first.tensors["features"], third.tensors["features"])
    # the head of the backbone is in its last stage: the photos were not decoded again for it
    assert len(stage_calls) == 3


def test_text_model_mixes_its_lexical_branch_with_a_weight_chosen_on_validation(trained):
    checkpoint = torch.load(trained["paths"]["text"], weights_only=False)
    mix = checkpoint["mix"]
    assert set(mix["val_accuracy_by_weight"]) == {step / 20 for step in range(21)}
    assert mix["val_accuracy"] == max(mix["val_accuracy_by_weight"].values())
    assert mix["val_accuracy"] == mix["val_accuracy_by_weight"][mix["lexical_weight"]]
    weights = checkpoint["state_dict"]["mix"]
    assert torch.allclose(weights, torch.tensor([1 - mix["lexical_weight"], mix["lexical_weight"]]))
    lexical = checkpoint["state_dict"]["lexical.bag.weight"]
    assert lexical.abs().sum() > 0  # the lexical branch learned
    idf = checkpoint["state_dict"]["lexical.idf"]
    assert idf.min() >= 1 and idf.max() > idf.min()  # fitted on the training split
    combined = torch.load(trained["paths"]["combined"], weights_only=False)
    assert "mix" in combined and torch.equal(  # carried into the combined model, not retrained
        combined["state_dict"]["text_model.lexical.bag.weight"], lexical)


@pytest.mark.parametrize(("model", "buffer", "grid"), [
    ("combined", "levels_mix", {0.0, 0.25, 0.5, 0.75, 1.0}),  # the text model's levels head
    ("combined", "levels_branch_mix", {step / 10 for step in range(11)}),  # the lexical branch's levels
    ("text", "levels_branch_mix", {step / 10 for step in range(11)}),
])
def test_the_paths_weights_are_chosen_on_validation_and_kept(trained, model, buffer, grid):
    checkpoint = torch.load(trained["paths"][model], weights_only=False)
    chosen = checkpoint[buffer]
    assert set(chosen["val_full_path_accuracy_by_weight"]) == grid
    by_weight, weight = chosen["val_full_path_accuracy_by_weight"], chosen["weight"]
    assert chosen["val_full_path_accuracy"] == max(by_weight.values()) == by_weight[weight]
    assert weight == min(w for w, score in by_weight.items() if score == chosen["val_full_path_accuracy"])
    assert torch.allclose(checkpoint["state_dict"][buffer], torch.tensor([1 - weight, weight]))


def test_checkpoints_from_before_the_paths_weights_load_strictly_as_they_answered(trained, tmp_path):
    checkpoint = torch.load(trained["paths"]["combined"], weights_only=False)
    # saved before the mixes existed: levels from the fusion alone, the lexical levels at the roots' weight
    for name in ("levels_mix", "levels_branch_mix", "text_model.levels_branch_mix"):
        del checkpoint["state_dict"][name]
    torch.save(checkpoint, tmp_path / "before.pt")
    older, _ = load_checkpoint(tmp_path / "before.pt")
    assert older.levels_mix.tolist() == [1.0, 0.0]
    assert torch.equal(older.levels_branch_mix, checkpoint["state_dict"]["mix"])
    assert torch.equal(older.text_model.levels_branch_mix, checkpoint["state_dict"]["text_model.mix"])
    text = torch.load(trained["paths"]["text"], weights_only=False)  # from before the lexical levels
    for name in ("lexical_levels_buckets", "lexical_levels_rank"):
        del text["config"][name]
    for name in ("lexical.levels_table", "lexical.levels_bias", "levels_branch_mix"):
        del text["state_dict"][name]
    torch.save(text, tmp_path / "text_before.pt")
    assert load_checkpoint(tmp_path / "text_before.pt")[0].lexical.levels_table is None
    del checkpoint["state_dict"]["fusion.bias"]  # anything else missing is still refused
    torch.save(checkpoint, tmp_path / "broken.pt")
    with pytest.raises(RuntimeError, match="fusion.bias"):
        load_checkpoint(tmp_path / "broken.pt")


def test_evaluation_writes_its_reports(trained, tmp_path):
    metrics = evaluate(trained["paths"]["combined"], trained["data_dir"], tmp_path)
    saved = json.loads((tmp_path / "combined" / "metrics.json").read_text())
    assert saved["accuracy"] == metrics["accuracy"] and 0 <= saved["accuracy"] <= 1
    assert set(saved["per_class"]) == set(CleanData.load(trained["data_dir"]).index_to_name.values())
    assert sum(map(sum, saved["confusion_matrix"])) == saved["samples"] > 0
    assert saved["path"]["levels_mix"]["weight"] in (0.0, 0.25, 0.5, 0.75, 1.0)  # what val chose
    assert saved["path"]["levels_branch_mix"]["weighs"] == "lexical levels"
    calibration = saved["calibration"]  # temperature from validation, error measured on test
    assert calibration["temperature"] > 0 and 0 <= calibration["ece_after"] <= 1
    for name in ("confusion_matrix.png", "curves.png", "reliability.png"):
        assert (tmp_path / "combined" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| combined |" in (tmp_path / "summary.md").read_text()
    listing = saved["listing"]  # photos of a listing averaged
    assert listing["samples"] == CleanData.load(trained["data_dir"]).samples("combined", "test")[
        "product_id"].nunique()
    low, high = listing["accuracy_95ci"]
    assert low <= listing["accuracy"] <= high and saved["accuracy_95ci"][0] <= saved["accuracy"]
    for pair in listing["most_confused"]:
        assert pair["true"] != pair["predicted"] and pair["count"] >= 1 and pair["example"]
    branches = saved["branches"]  # the ablation inside the model: each branch alone and the mix
    assert len(branches) == 3 and all(0 <= value <= 1 for value in branches.values())
    assert [v for k, v in branches.items() if k.startswith("mixed")] == [listing["accuracy"]]
    assert "lexical branch alone" in (tmp_path / "summary.md").read_text()
    within = saved["path"]["within_root"]  # second-level mistakes under the right root
    assert within["listings"] <= saved["path"]["levels"]["2"]["listings"]
    for pair in within["most_confused"]:
        assert pair["truth"] != pair["answer"] and pair["count"] >= 1


def test_export_matches_the_eager_model_and_loads_in_a_fresh_process(trained, tmp_path, capsys):
    for kind in ("image", "text", "combined"):  # the ONNX runtimes: tests/test_runtimes.py
        result = export(trained["paths"][kind], trained["data_dir"], tmp_path, runtime="torchscript")
        progress = [line for line in capsys.readouterr().err.splitlines() if line.startswith("export ")]
        assert progress[0] == f"export {kind} [1/4] loading the checkpoint and data; calibrating on " \
            "validation"
        assert progress[-2].startswith(f"export {kind} [4/4] writing preprocessing.json")
        assert progress[-1].startswith(f"export {kind}: done in ")
        folder = tmp_path / kind
        assert result["max_abs_diff"] <= 1e-4
        settings = ModelSettings.load(folder)
        assert settings.model == kind and settings.num_classes == 13
        assert json.loads((folder / "index_to_name.json").read_text())["12"] == "Video Games & Consoles"
        if kind != "image":
            assert settings.text.max_length == 32
            assert (folder / settings.text.tokenizer / "tokenizer.json").exists()
        if kind != "text":
            assert settings.image.size == 64
        card = json.loads((folder / CARD_FILE).read_text())  # per-level figures beside the root's
        assert set(card["test"]["path"]["levels"]) == {"1", "2", "3"}
        assert card["test"]["path"]["levels"]["1"]["listings"] == card["test"]["listings"]
        depths = json.loads((folder / REFERENCE_FILE).read_text())["confident_depth"]
        assert len(depths["shares"]) == 4 and abs(sum(depths["shares"]) - 1) < 1e-4
    scripted = torch.jit.load(str(tmp_path / "text" / "model.pt"), map_location="cpu")
    eager, _ = load_checkpoint(trained["paths"]["text"])
    from marketplace_classifier.serving.processing import model_inputs
    from marketplace_classifier.training.text_encoder import load_tokenizer

    tokenizer = load_tokenizer("minilm")
    text_settings = ModelSettings.load(tmp_path / "text").text
    assert text_settings.lexical.buckets == trained["configs"]["text"].lexical_buckets
    for texts in (["kettle"], ["a much longer description of a mountain bike with gears", "tv"]):
        inputs = model_inputs("text", None, texts, tokenizer, text_settings)
        assert len(inputs) == 4  # token ids, mask, lexical term ids, counts
        with torch.inference_mode():
            assert (scripted(*inputs) - eager(*inputs)).abs().max() <= 1e-4


def test_cli_reports_a_missing_checkpoint_in_one_line(tmp_path, clean_sample):
    result = subprocess.run(
        [sys.executable, "-m", "marketplace_classifier.training",
         "train", "--model", "combined", "--data-dir",
         str(clean_sample[0]), "--checkpoint-dir", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"error: checkpoint {tmp_path}/image/best.pt not found: train that model first"]


def test_train_config_defaults_are_frozen_encoders():
    assert TrainConfig().frozen and not TrainConfig(finetune="last").frozen


def test_finetuning_the_last_stage_trains_only_it(trained, tmp_path):
    config = replace(trained["configs"]["image"], checkpoint_dir=str(tmp_path), epochs=1,
                     finetune="last", image_size=32, cache_dir=None)
    seed_everything(config.seed)
    fresh = build_model(config, 13)  # what train() starts from with the same seed
    tuned, checkpoint = load_checkpoint(train(config))
    assert checkpoint["config"]["finetune"] == "last"
    network, start = tuned.backbone.network, fresh.backbone.network
    assert torch.equal(network._conv_stem.weight, start._conv_stem.weight)
    assert torch.equal(network._blocks[0]._depthwise_conv.weight, start._blocks[0]._depthwise_conv.weight)
    assert not torch.equal(network._blocks[-1]._project_conv.weight, start._blocks[-1]._project_conv.weight)
    assert not torch.equal(tuned.head[-1].weight, fresh.head[-1].weight)
    # batch-norm statistics stay as pretrained by default, and follow the data with --bn-stats update
    assert torch.equal(network._blocks[-1]._bn2.running_mean, start._blocks[-1]._bn2.running_mean)
    updated, _ = load_checkpoint(train(replace(config, bn_stats="update",
                                               checkpoint_dir=str(tmp_path / "update"))))
    assert not torch.equal(updated.backbone.network._blocks[-1]._bn2.running_mean,
                           start._blocks[-1]._bn2.running_mean)
    with pytest.raises(ValueError, match="--bn-stats 'sometimes'"):
        train(replace(config, bn_stats="sometimes", checkpoint_dir=str(tmp_path / "bad")))


def test_backbones_split_at_the_last_stage_without_changing_their_answer():
    from marketplace_classifier.training.backbones import build_backbone

    torch.manual_seed(0)
    images = torch.randn(2, 3, 64, 64)
    for name in ("efficientnet_lite0", "resnet50"):
        backbone = build_backbone(name, "none").eval()
        with torch.inference_mode():
            below = backbone.below_last_stage(images)
            assert torch.equal(backbone.from_last_stage(below), backbone(images))
        trainable = {id(p) for p in backbone.last_stage().parameters()}
        with torch.enable_grad():
            backbone.from_last_stage(below.clone()).sum().backward()
        with_gradient = {id(p) for p in backbone.parameters() if p.grad is not None}
        assert with_gradient and with_gradient <= trainable  # the cached part is all below the cut


def test_photo_views_are_the_photo_its_mirror_and_repeatable_crops():
    from marketplace_classifier.training.features import photo_view

    photo = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    assert torch.equal(photo_view(photo, 0, torch.Generator()), photo)
    assert torch.equal(photo_view(photo, 1, torch.Generator()), photo.flip(-1))
    crops = [photo_view(photo, 2, torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(*crops) and crops[0].shape == photo.shape and crops[0].dtype == torch.uint8
    assert not torch.equal(crops[0], photo_view(photo, 2, torch.Generator().manual_seed(8)))


def views_computed(monkeypatch) -> list[int]:
    """The views whose last-stage inputs are computed (not read from the cache), in order."""
    from marketplace_classifier.training import tasks

    computed = []
    original = tasks.compute_stage_inputs
    monkeypatch.setattr(tasks, "compute_stage_inputs",
                        lambda *args, **kwargs: computed.append(kwargs.get("view", 0))
                        or original(*args, **kwargs))
    return computed


def test_last_stage_finetuning_trains_on_cached_activations(trained, tmp_path, monkeypatch):
    from marketplace_classifier.training.features import load_model_image, photo_view
    from marketplace_classifier.training.tasks import make_task

    computed = views_computed(monkeypatch)
    config = replace(trained["configs"]["image"], checkpoint_dir=str(tmp_path / "a"), epochs=2,
                     finetune="last", cached_views=3, cache_dir=str(tmp_path / "cache"))
    first = torch.load(train(config), weights_only=False)
    assert sorted(computed) == [0, 1, 2]  # every photo plain, training photos in two more views
    second = torch.load(train(replace(config, checkpoint_dir=str(tmp_path / "b"))), weights_only=False)
    assert sorted(computed) == [0, 1, 2]  # the second run reads them from the cache
    assert without_time(first["history"]) == without_time(second["history"])  # the same views for the seed

    model, _ = load_checkpoint(tmp_path / "a" / "image" / "best.pt")
    data = CleanData.load(trained["data_dir"])
    task = make_task(model, config, data, torch.device("cpu"))
    assert sorted(computed) == [0, 1, 2]  # the tuned model's lower stages are unchanged: cache hit
    train_photos = data.samples("image", "train")
    photo = load_model_image(data.image_path(train_photos["id"].iloc[0]), config.image_size)
    with torch.inference_mode():
        mirrored = model.backbone.below_last_stage((photo_view(photo, 1, None)[None].float()
                                                    - model.mean) / model.std)
        assert torch.allclose(task.train_views[0][0].float(), mirrored[0], atol=1e-2, rtol=1e-2)
        val = data.samples("image", "val")
        photos = torch.stack([load_model_image(data.image_path(i), config.image_size) for i in val["id"]])
        cached = torch.cat([task.logits(batch.inputs) for batch in task.batches("val", 16)])
        whole = model(photos)  # what export traces and the server runs
    assert torch.allclose(cached, whole, atol=1e-2)  # the cache holds float16
    assert torch.equal(cached.argmax(1), whole.argmax(1))
    with pytest.raises(ValueError, match="cached-views 0"):
        make_task(model, replace(config, cached_views=0), data, torch.device("cpu"))


def test_frozen_features_are_the_last_stage_over_its_cached_inputs(trained, tmp_path, monkeypatch):
    from marketplace_classifier.training.features import load_model_image
    from marketplace_classifier.training.tasks import make_task

    computed = views_computed(monkeypatch)
    config = replace(trained["configs"]["image"], cache_dir=str(tmp_path / "cache"))
    data = CleanData.load(trained["data_dir"])
    model = build_model(config, 13)
    frozen = make_task(model, config, data, torch.device("cpu"))
    assert computed == [0]
    samples = data.samples("image")
    photos = torch.stack([load_model_image(data.image_path(i), config.image_size) for i in samples["id"][:8]])
    with torch.inference_mode():
        whole = model.features(photos)  # the full network in float32, as exported
    assert torch.allclose(frozen.tensors["features"][:8], whole, atol=2e-2, rtol=2e-2)
    make_task(model, replace(config, finetune="last", cached_views=2), data, torch.device("cpu"))
    assert computed == [0, 1]  # fine-tuning the last stage reuses the plain photos' activations


def test_int8_text_encoder_variant_stays_close(trained, tmp_path):
    from marketplace_classifier.serving.processing import model_inputs
    from marketplace_classifier.training.text_encoder import load_tokenizer

    result = export(trained["paths"]["text"], trained["data_dir"], tmp_path, int8=True)
    assert result["max_abs_diff"] <= 1e-4  # the TorchScript equals the quantised eager model
    assert abs(result["int8_test_accuracy"] - result["fp32_test_accuracy"]) <= 0.15
    settings = ModelSettings.load(tmp_path / "text_int8")
    assert settings.int8_text_encoder is True
    quantised = torch.jit.load(str(tmp_path / "text_int8" / "model.pt"), map_location="cpu")
    eager, _ = load_checkpoint(trained["paths"]["text"])
    texts = list(CleanData.load(trained["data_dir"]).samples("text", "test")["text"][:24])
    inputs = model_inputs("text", None, texts, load_tokenizer("minilm"), settings.text)
    with torch.inference_mode():
        roots = settings.num_classes  # the levels' logits follow the roots'
        plain = torch.softmax(eager(*inputs)[:, :roots], 1)
        small = torch.softmax(quantised(*inputs)[:, :roots], 1)
    assert (plain - small).abs().mean() < 0.05
    assert (plain.argmax(1) == small.argmax(1)).float().mean() >= 0.75


def test_interrupted_training_leaves_whole_checkpoints_and_resumes_exactly(trained, tmp_path):
    import signal
    import time

    config = replace(trained["configs"]["image"], checkpoint_dir=str(tmp_path / "interrupted"),
                     runs_dir=str(tmp_path / "runs"), batch_size=4, epochs=100_000, patience=0)
    last = tmp_path / "interrupted" / "image" / "last.pt"
    command = [sys.executable, "-m", "marketplace_classifier.training", "train", "--model", "image",
               "--data-dir", config.data_dir, "--image-backbone", "efficientnet_lite0",
               "--image-weights", "none", "--image-size", "64", "--epochs", "100000",
               "--batch-size", "4", "--lr", str(config.lr), "--seed", str(config.seed),
               "--min-listings", str(config.min_listings), "--checkpoint-dir", config.checkpoint_dir,
               "--runs-dir", config.runs_dir, "--cache-dir", config.cache_dir]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if last.exists() and torch.load(last, weights_only=False)["progress"]["epoch"] >= 2:
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    assert "rerun with --resume" in stderr.strip().splitlines()[-1]
    completed = torch.load(last, weights_only=False)["progress"]["epoch"]
    load_checkpoint(tmp_path / "interrupted" / "image" / "best.pt")  # whole and loadable
    load_checkpoint(last)

    total = completed + 2
    resumed = train(replace(config, epochs=total, resume=True))
    straight = train(replace(config, epochs=total, checkpoint_dir=str(tmp_path / "straight")))
    resumed_history = torch.load(resumed, weights_only=False)["history"]
    assert [row["epoch"] for row in resumed_history] == list(range(1, total + 1))
    assert without_time(resumed_history) == without_time(torch.load(straight, weights_only=False)["history"])


def test_fine_tuning_starts_from_a_trained_run_and_combined_takes_branches_from_anywhere(trained,
                                                                                        tmp_path):
    frozen, _ = load_checkpoint(trained["paths"]["image"])
    config = replace(trained["configs"]["image"], checkpoint_dir=str(tmp_path / "tuned"), epochs=1,
                     finetune="last", cache_dir=None, lr=0.0, init_from=str(trained["paths"]["image"]))
    tuned, _ = load_checkpoint(train(config))
    assert torch.equal(tuned.head[-1].weight, frozen.head[-1].weight)  # lr 0: still the frozen run's
    with pytest.raises(ValueError, match="holds a text model"):
        train(replace(config, init_from=str(trained["paths"]["text"])))
    combined = replace(trained["configs"]["combined"], checkpoint_dir=str(tmp_path / "elsewhere"),
                       epochs=1, image_checkpoint=str(tmp_path / "tuned" / "image" / "best.pt"),
                       text_checkpoint=str(trained["paths"]["text"]))
    _, checkpoint = load_checkpoint(train(combined))
    assert checkpoint["config"]["branches"]["image"]["finetune"] == "last"


def test_evaluation_and_export_load_checkpoints_without_the_training_loop():
    probe = ("import sys, marketplace_classifier.training.evaluate, marketplace_classifier.training.export; "
             "print(sorted(m for m in sys.modules\n"
             "             if 'tensorboard' in m or m == 'marketplace_classifier.training.train'))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_temperature_scaling_lowers_the_validation_calibration_error(trained):
    from marketplace_classifier.training.calibration import (
        expected_calibration_error,
        split_logits,
        validation_answers,
    )

    model, checkpoint = load_checkpoint(trained["paths"]["text"])
    config = replace(trained["configs"]["text"], data_dir=str(trained["data_dir"]))
    data = CleanData.load(trained["data_dir"])
    temperature = validation_answers(model, config, data, 0.95)["temperature"]
    logits, labels = split_logits(model, config, data, "val")
    before = expected_calibration_error(torch.softmax(logits, 1).numpy(), labels.numpy())
    after = expected_calibration_error(torch.softmax(logits / temperature, 1).numpy(), labels.numpy())
    assert temperature != 1.0 and after < before
    nearby = (temperature * 0.8, temperature, temperature * 1.25)
    nll = [torch.nn.functional.cross_entropy(logits / t, labels).item() for t in nearby]
    assert nll[1] <= min(nll[0], nll[2])  # the fitted temperature is the best of its neighbours


def test_review_threshold_reaches_its_target_on_the_data_it_was_chosen_on(trained):
    import numpy as np

    from marketplace_classifier.serving.processing import listing_probabilities
    from marketplace_classifier.training.calibration import (
        coverage_at,
        listing_logits,
        review_threshold,
        validation_answers,
    )

    rng = np.random.default_rng(0)
    confidence = rng.uniform(0.2, 1.0, 500)
    correct = rng.uniform(0, 1, 500) < confidence  # surer answers are right more often
    for target in (0.8, 0.9, 0.95):
        threshold = review_threshold(confidence, correct, target)
        reached = coverage_at(confidence, correct, threshold)
        assert reached["precision"] >= target and 0 < reached["coverage"] < 1
        lower = confidence[confidence < threshold].max()  # filing more listings misses the target
        assert coverage_at(confidence, correct, lower)["precision"] < target
    assert review_threshold(confidence, np.zeros(500, bool), 0.5) is None
    model, _ = load_checkpoint(trained["paths"]["combined"])
    config = replace(trained["configs"]["combined"], data_dir=str(trained["data_dir"]))
    data = CleanData.load(trained["data_dir"])
    pooled, labels = listing_logits(model, config, data, "val")
    probabilities, labels = listing_probabilities(pooled, 1.0).numpy(), labels.numpy()
    assert len(labels) == data.samples("combined", "val")["product_id"].nunique()
    threshold = review_threshold(probabilities.max(1), probabilities.argmax(1) == labels, 0.9)
    if threshold is not None:
        assert coverage_at(probabilities.max(1), probabilities.argmax(1) == labels,
                           threshold)["precision"] >= 0.9
    answers = validation_answers(model, config, data, 0.9)  # as export chooses it, with its T
    calibrated = listing_probabilities(pooled, answers["temperature"]).numpy()
    if answers["review_threshold"] is not None:
        assert coverage_at(calibrated.max(1), calibrated.argmax(1) == labels,
                           answers["review_threshold"])["precision"] >= 0.9


def test_learning_rates_warm_up_decay_and_differ_by_part(trained):
    from marketplace_classifier.training.train import lr_schedule, parameter_groups

    config = replace(trained["configs"]["text"], finetune_encoder=True, lr=1e-3, backbone_lr=1e-5,
                     warmup_epochs=1, decay="cosine", epochs=3)
    model, _ = load_checkpoint(trained["paths"]["text"])
    groups = parameter_groups(model, config)
    encoder = {id(p) for p in model.encoder.parameters()}
    by_lr = {group.get("lr", config.lr): group for group in groups}
    assert {id(p) for p in by_lr[1e-5]["params"]} == encoder
    assert not encoder & {id(p) for p in by_lr[1e-3]["params"]}
    optimizer = torch.optim.AdamW(groups, lr=config.lr)
    schedule = lr_schedule(optimizer, config, steps_per_epoch=4)
    rates = []
    for _ in range(12):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates[0] == pytest.approx(1e-3 / 4) and rates[3] == pytest.approx(1e-3)  # warmup
    assert all(a > b for a, b in zip(rates[4:], rates[5:], strict=False))  # cosine decay
    assert rates[-1] < 0.05 * 1e-3
    with pytest.raises(ValueError, match="--decay"):
        lr_schedule(optimizer, replace(config, decay="linear"), 4)


def test_the_ece_of_a_calibrated_model_tells_noise_from_miscalibration():
    import numpy as np

    from marketplace_classifier.training.calibration import (
        ece_of_a_calibrated_model,
        expected_calibration_error,
    )

    rng = np.random.default_rng(1)
    logits = rng.normal(size=(750, 13)) * 3
    probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    cumulative = probabilities.cumsum(1)
    calibrated_labels = (cumulative < rng.random((750, 1))).sum(1).clip(max=12)  # drawn from them
    floor = ece_of_a_calibrated_model(probabilities)
    assert 0 < floor["mean"] < floor["p95"] < 0.1
    assert floor == ece_of_a_calibrated_model(probabilities)  # repeatable
    # answers that are right as often as they say stay within the noise of 750 listings ...
    assert expected_calibration_error(probabilities, calibrated_labels) <= floor["p95"]
    # ... an overconfident model (the same labels, sharper answers) does not
    sharp = np.exp(logits * 3) / np.exp(logits * 3).sum(1, keepdims=True)
    assert expected_calibration_error(sharp, calibrated_labels) > ece_of_a_calibrated_model(sharp)["p95"]
    # more listings, less noise
    assert ece_of_a_calibrated_model(np.tile(probabilities, (8, 1)))["mean"] < floor["mean"]


def test_complementarity_counts_what_the_photo_adds_to_the_text(tmp_path):
    from marketplace_classifier.training.evaluate import complementarity

    answers = {"image": {"a": True, "b": True, "c": False, "d": False},
               "text": {"a": True, "b": False, "c": False, "d": True, "e": False},
               "combined": {"a": True, "b": True, "c": False, "d": True}}
    assert complementarity(tmp_path) == ""
    for model, right in answers.items():
        (tmp_path / model).mkdir()
        (tmp_path / model / "metrics.json").write_text(json.dumps({"listing": {"right": right}}))
    line = complementarity(tmp_path)  # "e" has no photo: not counted
    assert "Of the 4 test listings with photos, the text model gets 2 wrong" in line
    assert "the image model gets 1 of those right" in line
    assert "right on 0.750 of them" in line and "(the combined model: 0.750)" in line


def test_cross_fitting_answers_each_training_listing_from_a_copy_that_did_not_train_on_it(
        trained, monkeypatch):
    import numpy as np

    from marketplace_classifier.training import cross_fit

    data = CleanData.load(trained["data_dir"])
    trained_on = []
    original = cross_fit.train_on_positions

    def recording(task, config, positions, epochs, seed):
        trained_on.append(set(positions))
        original(task, config, positions, epochs, seed)

    monkeypatch.setattr(cross_fit, "train_on_positions", recording)
    for kind in ("text", "image"):
        trained_on.clear()
        result = cross_fit.out_of_fold(trained["paths"][kind], data, 3, trained["configs"][kind].cache_dir)
        samples = data.samples(kind, "train")
        fold = result["fold"]
        assert {len(set(fold[samples["product_id"] == p])) for p in samples["product_id"]} == {1}
        assert [positions == set(np.flatnonzero(fold != k)) for k, positions in enumerate(trained_on)] \
            == [True] * 3  # each copy trained on the other folds only
        for answers in result["train"]:  # every training sample answered, as log-probabilities
            assert answers.shape[0] == len(samples)
            assert torch.allclose(answers.exp().sum(1), torch.ones(len(samples)), atol=1e-4)
        assert len(result["val"]) == len(result["train"]) == (2 if kind == "text" else 1)


def test_cross_fit_command_reports_what_fusion_gains_on_validation(trained, tmp_path):
    out = tmp_path / "cross_fit.json"
    command = [sys.executable, "-m", "marketplace_classifier.training", "cross-fit",
               "--data-dir", str(trained["data_dir"]),
               "--checkpoint-dir", str(trained["work"] / "checkpoints")]
    done = subprocess.run([*command, "--folds", "2", "--cache-dir", trained["configs"]["text"].cache_dir,
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    data = CleanData.load(trained["data_dir"])
    with_photos = data.samples("image", "val")["product_id"].nunique()
    assert result["listings"]["val"] == with_photos and result["folds"] == 2
    figures = [*result["text_model"].values(), *result["image_model"].values(),
               result["late_fusion"]["val"], *result["stacker"]["val_by_l2"].values()]
    assert all(0.0 <= value <= 1.0 for value in figures)
    refused = subprocess.run([*command, "--folds", "1"], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--folds 1" in refused.stderr


def test_the_stacker_learns_which_branch_to_trust():
    from marketplace_classifier.training.cross_fit import fit_stacker

    torch.manual_seed(0)
    labels = torch.randint(0, 3, (300,))
    right = torch.nn.functional.one_hot(labels, 3).float() * 4 - 2  # a branch that is always right
    noise = torch.randn(300, 3)  # and one that guesses
    layer = fit_stacker(torch.cat([noise, right], 1), labels, 1e-3, 3)
    with torch.no_grad():
        assert layer(torch.cat([noise, right], 1)).argmax(1).eq(labels).all()
        assert layer.weight[:, 3:].abs().sum() > layer.weight[:, :3].abs().sum()


def without_time(history: list[dict]) -> list[dict]:
    """A training history without each epoch's wall time (the one thing a rerun may change)."""
    return [{key: value for key, value in row.items() if key != "seconds"} for row in history]
