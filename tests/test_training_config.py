"""The training configuration: frozen, validated when built, and the one source of the `train`
command's options and help."""

from __future__ import annotations

import dataclasses

import pytest

from marketplace_classifier.training.cli import build_parser
from marketplace_classifier.training.config import TrainConfig, train_options


def test_the_configuration_is_frozen_and_changed_only_by_replace():
    config = TrainConfig(model="text")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.epochs = 3
    assert dataclasses.replace(config, epochs=3).epochs == 3 and config.epochs == 15


@pytest.mark.parametrize(("changes", "message"), [
    ({"model": "audio"}, "--model 'audio': choose image, text, combined"),
    ({"finetune": "half"}, "--finetune 'half': choose none or last or all"),
    ({"bn_stats": "sometimes"}, "--bn-stats 'sometimes': choose frozen or update"),
    ({"decay": "linear"}, "--decay 'linear': choose none or cosine"),
    ({"epochs": 0}, "--epochs 0: must be at least 1"),
    ({"cached_views": 0}, "--cached-views 0: must be at least 1"),
    ({"lr": -0.001}, "--lr -0.001: must be at least 0"),  # 0 keeps the weights (a check in tests)
    ({"grad_clip": -1.0}, "--grad-clip -1.0: must be at least 0"),
    ({"lexical_levels_rank": 32, "lexical_levels_buckets": 32768},
     "--lexical-levels-rank and --lexical-levels-buckets: choose one way for the lexical branch's levels "
     "(a rank needs --lexical-levels-buckets 0)"),
])
def test_a_bad_setting_is_refused_when_built_naming_its_option(changes, message):
    with pytest.raises(ValueError, match=f"^{message}$".replace("(", r"\(").replace(")", r"\)")):
        TrainConfig(**changes)


def test_the_train_commands_options_and_help_come_from_the_fields():
    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]  # argparse keeps its subcommands here
    helps = {action.dest: action.help for action in train._actions}
    options = train_options()
    assert {"epochs", "lr", "decay", "cached_views", "image_checkpoint"} <= set(options)
    assert not {"model", "data_dir", "branches", "resume"} & set(options)  # set by the code or own flags
    for name, (_, text) in options.items():
        default = getattr(TrainConfig(), name)
        assert helps[name] == f"{text} (default: {default})"
    # each option is listed under its section's heading
    groups = {group.title: {action.dest for action in group._group_actions} for group in train._action_groups}
    for name, (section, _) in options.items():
        assert name in groups[f"{section} options"]
    args = parser.parse_args(["train", "--model", "text", "--data-dir", "d", "--decay", "cosine",
                              "--warmup-epochs", "0.5"])
    assert (args.decay, args.warmup_epochs) == ("cosine", 0.5)


def test_every_field_belongs_to_one_section_and_the_sections_hold_them_all():
    from dataclasses import fields

    from marketplace_classifier.training.config import SECTIONS, sectioned

    grouped = sectioned(TrainConfig(epochs=3))
    assert list(grouped) == list(SECTIONS)
    listed = sorted(name for values in grouped.values() for name in values)
    assert listed == sorted(item.name for item in fields(TrainConfig))
    assert grouped["optimisation"]["epochs"] == 3 and grouped["image"]["image_size"] == 224
