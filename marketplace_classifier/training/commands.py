"""Model commands of the CLI: train, evaluate, export."""

from __future__ import annotations

import argparse
import json
import signal
from dataclasses import fields
from pathlib import Path

from marketplace_classifier.serving.model_kinds import MODEL_KINDS
from marketplace_classifier.serving.settings import RUNTIMES
from marketplace_classifier.training.config import SECTIONS, TrainConfig, train_options


def _train(args: argparse.Namespace) -> None:
    from marketplace_classifier.training.distributed import is_main_process
    from marketplace_classifier.training.train import train

    names = {field.name for field in fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in vars(args).items() if k in names and v is not None})
    previous = signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM stops like Ctrl-C
    try:
        best_path = train(config)
        if is_main_process():
            print(f"best checkpoint: {best_path}")
    except KeyboardInterrupt as error:
        last = Path(config.checkpoint_dir) / config.model / "last.pt"
        raise Interrupted(f"interrupted; the last complete epoch is in {last}: rerun with --resume") \
            from error
    finally:
        signal.signal(signal.SIGTERM, previous)


class Interrupted(Exception):
    """Training stopped by Ctrl-C or SIGTERM; checkpoints are whole."""


def _fraction(value: str) -> float:
    number = float(value)
    if not 0 < number <= 1:
        raise argparse.ArgumentTypeError(f"{value} is not in (0, 1]")
    return number


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _evaluate(args: argparse.Namespace) -> None:
    from marketplace_classifier.training.evaluate import evaluate, write_summary

    for model in args.model:
        metrics = evaluate(Path(args.checkpoint_dir) / model / "best.pt", args.data_dir,
                           args.reports_dir, args.split, args.device, args.target_precision)
        print(f"{model}: accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f} "
              f"on {metrics['samples']} {args.split} {metrics['unit']}s")
    print(write_summary(Path(args.reports_dir)))


def _export(args: argparse.Namespace) -> None:
    from marketplace_classifier.training.export import export

    for model in args.model:
        result = export(Path(args.checkpoint_dir) / model / "best.pt", args.data_dir, args.artifacts_dir,
                        int8=args.int8, target_precision=args.target_precision, runtime=args.runtime)
        print(json.dumps(result))


def _cross_fit(args: argparse.Namespace) -> None:
    from marketplace_classifier.training.cross_fit import cross_fit

    folder = Path(args.checkpoint_dir)
    result = cross_fit(args.data_dir, args.text_checkpoint or folder / "text" / "best.pt",
                       args.image_checkpoint or folder / "image" / "best.pt", args.folds, args.cache_dir,
                       args.out)
    print(json.dumps(result, indent=2))


def add_commands(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser("train", help="train the image, text or combined model")
    train.add_argument("--model", choices=MODEL_KINDS, required=True)
    train.add_argument("--data-dir", required=True, help="cleaned and split folder")
    train.add_argument("--finetune-encoder", action="store_true", help="train the text encoder too")
    train.add_argument("--resume", action="store_true",
                       help="continue after the last complete epoch (checkpoints/<model>/last.pt)")
    defaults = TrainConfig()
    groups = {name: train.add_argument_group(f"{name} options", text) for name, text in SECTIONS.items()}
    for name, (section, text) in train_options().items():
        default = getattr(defaults, name)
        kind = type(default) if default is not None else str
        # SUPPRESS: an option not given is left out (the config's default applies) and the
        # help shows the config's default, not argparse's
        groups[section].add_argument("--" + name.replace("_", "-"), type=kind, default=argparse.SUPPRESS,
                                     help=f"{text} (default: {default})")
    train.set_defaults(run=_train)

    for name, run, text in (("evaluate", _evaluate, "test-split reports under reports/<model>/"),
                            ("export", _export, "TorchScript and handler files under artifacts/<model>/")):
        command = commands.add_parser(name, help=text)
        command.add_argument("--model", nargs="+", choices=MODEL_KINDS, default=list(MODEL_KINDS),
                             help="the models to take, each from <checkpoint-dir>/<model>/best.pt")
        command.add_argument("--data-dir", required=True, help="cleaned and split folder")
        command.add_argument("--checkpoint-dir", default="checkpoints", help="where train saved the models")
        command.add_argument("--target-precision", type=_fraction, default=0.95,
                             help="precision of the listings filed without review, for which the "
                                  "review threshold is chosen on validation")
        if name == "evaluate":
            command.add_argument("--reports-dir", default="reports", help="where the reports go")
            command.add_argument("--split", choices=("train", "val", "test"), default="test",
                                 help="the split to report on (choices are made on val)")
            command.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
        else:
            command.add_argument("--artifacts-dir", default="artifacts",
                                 help="where each model's exported folder goes")
            command.add_argument("--int8", action="store_true",
                                 help="also quantise the text encoder to int8 (into <model>_int8/; "
                                      "reports the test accuracy before and after)")
            command.add_argument("--runtime", choices=("fastest", *RUNTIMES), default="fastest",
                                 help="what preprocessing.json names for serving: the fastest measured "
                                      "here (ONNX Runtime and OpenVINO checked against the model; int8 "
                                      "or bfloat16 when validation accuracy drops 0.5 points or less; one "
                                      "that lost any is chosen only when 1.25x faster than the best that "
                                      "lost none), or one of them; torchscript writes no onnx/")
        command.set_defaults(run=run)

    cross = commands.add_parser("cross-fit", help="out-of-fold answers of the text and frozen image "
                                "models on train, and what fusing them gains on validation")
    cross.add_argument("--data-dir", required=True, help="cleaned and split folder")
    cross.add_argument("--checkpoint-dir", default="checkpoints")
    cross.add_argument("--text-checkpoint", help="default: <checkpoint-dir>/text/best.pt")
    cross.add_argument("--image-checkpoint",
                       help="a frozen-backbone run (default: <checkpoint-dir>/image/best.pt)")
    cross.add_argument("--folds", type=int, default=5)
    cross.add_argument("--cache-dir", default="cache/features", help="where frozen features are cached")
    cross.add_argument("--out", type=Path, help="also write the figures to this JSON file")
    cross.set_defaults(run=_cross_fit)
