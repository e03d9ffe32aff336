"""Training: a plain loop over epochs, TensorBoard logs, the best validation checkpoint kept."""

from __future__ import annotations

import math
import random
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from marketplace_classifier.serving.model_kinds import TEXT
from marketplace_classifier.training.calibration import split_outputs
from marketplace_classifier.training.checkpoints import (
    atomic_save,
    build_model,
    checkpoint_taxonomy,
    choose_device,
    config_from,
    current_state,
    load_checkpoint,
    save_checkpoint,
)
from marketplace_classifier.training.config import TrainConfig
from marketplace_classifier.training.data import CleanData
from marketplace_classifier.training.distributed import (
    ALONE,
    Cluster,
    eval_order,
    join,
    leave,
    per_process_batch,
    train_order,
    wrap,
)
from marketplace_classifier.training.levels import (
    PATH_WEIGHTS,
    PathWeight,
    full_path_accuracy,
    split_paths,
    with_temperatures,
)
from marketplace_classifier.training.models import CombinedClassifier, levels_logits, root_logits
from marketplace_classifier.training.tasks import make_task, taxonomy_of, text_settings

CPU = torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


IMAGE_BRANCH_SETTINGS = ("image_backbone", "image_weights", "image_size", "levels", "min_listings")
TEXT_BRANCH_SETTINGS = ("text_encoder", "max_length", "lexical_buckets", "lexical_max_chars",
                        "lexical_head_words")


def _combined_branches(config: TrainConfig) -> tuple[nn.Module, TrainConfig]:
    """Combined model initialised from the trained image and text checkpoints, and the
    configuration with the branches' own settings (what preprocessing must match)."""
    folder = Path(config.checkpoint_dir)
    image, image_checkpoint = load_checkpoint(config.image_checkpoint or folder / "image" / "best.pt")
    text, text_checkpoint = load_checkpoint(config.text_checkpoint or folder / "text" / "best.pt")
    branches = {"image": image_checkpoint["config"], "text": text_checkpoint["config"]}
    if checkpoint_taxonomy(image_checkpoint) != checkpoint_taxonomy(text_checkpoint):
        raise ValueError("the image and text checkpoints answer different category trees (--levels, "
                         "--min-listings or their data differ): train both on the same settings")
    config = replace(config, branches=branches,
                     **{name: branches["image"][name] for name in IMAGE_BRANCH_SETTINGS},
                     **{name: branches["text"].get(name, 0) for name in TEXT_BRANCH_SETTINGS})
    model = CombinedClassifier(image, text, len(image_checkpoint["index_to_name"]),
                               levels=len(checkpoint_taxonomy(image_checkpoint).terminals))
    model.init_fusion_from_heads()
    return model, config


# ---------------------------------------------------------------- the loop
def _single_models(model: nn.Module, config: TrainConfig) -> tuple[nn.Module | None, nn.Module | None]:
    """The image and the text model inside `model` (itself, a combined model's branch, or None)."""
    return config.kind.image_part(model), config.kind.text_part(model)


def set_trainable(model: nn.Module, config: TrainConfig) -> list[nn.Parameter]:
    """Freeze what the training mode keeps fixed; return what the optimiser updates."""
    image, text = _single_models(model, config)
    if image is not None:
        image.backbone.requires_grad_(config.finetune == "all")
        if config.finetune == "last":
            image.backbone.last_stage().requires_grad_(True)
    if text is not None:
        text.encoder.requires_grad_(config.finetune_encoder)
    if config.kind.fuses:  # the single models' output layers are not on its path
        image.head.requires_grad_(False)
        text.head.classifier.requires_grad_(False)
        for levels in (image.levels_head, text.head.levels):
            if levels is not None:
                levels.requires_grad_(False)
        if text.lexical is not None:  # trained with the text model; mixed in, not retrained
            text.lexical.requires_grad_(False)
    return [parameter for parameter in model.parameters() if parameter.requires_grad]


def parameter_groups(model: nn.Module, config: TrainConfig) -> list[dict]:
    """What the optimiser updates: pretrained backbone and encoder at --backbone-lr, the lexical
    branch at --lexical-lr without weight decay, the rest (new layers) at --lr."""
    trainable = set_trainable(model, config)
    image, text = _single_models(model, config)
    pretrained = [part for part in (getattr(image, "backbone", None), getattr(text, "encoder", None))
                  if part is not None]
    lexical = getattr(text, "lexical", None)
    pretrained_ids = {id(p) for part in pretrained for p in part.parameters()}
    lexical_ids = {id(p) for p in lexical.parameters()} if lexical is not None else set()
    new_layers = [p for p in trainable if id(p) not in pretrained_ids and id(p) not in lexical_ids]
    groups = [{"params": new_layers},
              {"params": [p for p in trainable if id(p) in pretrained_ids], "lr": config.backbone_lr},
              {"params": [p for p in trainable if id(p) in lexical_ids], "lr": config.lexical_lr,
               "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def lr_schedule(optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int
                ) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step factor on every group's learning rate: linear warmup, then constant or cosine."""
    warmup = round(config.warmup_epochs * steps_per_epoch)
    total = max(config.epochs * steps_per_epoch, warmup + 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if config.decay == "none":
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, total - warmup) / (total - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _train_mode(model: nn.Module, config: TrainConfig) -> None:
    """Dropout on; batch-norm statistics stay as pretrained in frozen parts, and in trained
    parts too unless --bn-stats update (a few thousand photos shift them away from what the
    trained head expects faster than the head can follow)."""
    model.train()
    for module in model.modules():
        frozen = not any(parameter.requires_grad for parameter in module.parameters())
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and (frozen or config.bn_stats == "frozen"):
            module.eval()


def branch_loss(logits: torch.Tensor, batch, num_classes: int) -> torch.Tensor:
    """Cross-entropy of the root head, plus the levels head's where the branch has one and the
    batch has samples below their roots (serving/taxonomy.py)."""
    loss = nn.functional.cross_entropy(root_logits(logits, num_classes), batch.labels)
    if logits.shape[1] > num_classes and batch.levels is not None and bool((batch.levels >= 0).any()):
        loss = loss + nn.functional.cross_entropy(levels_logits(logits, num_classes), batch.levels,
                                                  ignore_index=-1)
    return loss


def run_epoch(task, split: str, batch_size: int, order: list[int] | None = None, forward=None,
              optimizer=None, device: torch.device = CPU, cluster: Cluster = ALONE,
              scheduler=None, grad_clip: float = 0.0) -> tuple[float, float]:
    """Mean loss and accuracy over one split, summed over all processes; updates the model
    through `forward` (the DDP-wrapped network when distributed) when given an optimiser."""
    forward = forward or task.network
    totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, seen
    with torch.set_grad_enabled(optimizer is not None):
        for batch in task.batches(split, batch_size, order, train=optimizer is not None):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                branches = forward(*batch.inputs)
            # every branch learns from its own loss; the answer mixes them (weights chosen on val)
            loss = sum(branch_loss(logits.float(), batch, task.model.num_classes) for logits in branches)
            logits = root_logits(task.model.combine(branches), task.model.num_classes)
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if grad_clip > 0:
                    nn.utils.clip_grad_norm_(task.model.parameters(), grad_clip)
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
            count = len(batch.labels)
            totals += torch.tensor([loss.item() * count,
                                    (logits.argmax(1) == batch.labels).sum().item(), count])
    loss_sum, correct, seen = cluster.sum(totals, device).tolist()
    return loss_sum / max(seen, 1), correct / max(seen, 1)


def train(config: TrainConfig) -> Path:
    """Train one model, alone or as one of torchrun's processes; return its best checkpoint."""
    seed_everything(config.seed)
    cluster, device = join(choose_device(config.device))
    try:
        per_process_batch(config.batch_size, cluster)
        data = CleanData.load(Path(config.data_dir), config.reviewed_dir)
        if data.reviewed:
            tqdm.write(f"reviewed listings from {config.reviewed_dir}: {data.reviewed}")
        with cluster.main_first():  # rank 0 fills the feature cache, the others read it
            if config.kind.fuses:
                model, config = _combined_branches(config)
            else:
                taxonomy = taxonomy_of(config, data)
                levels = len(taxonomy.terminals) if taxonomy else 0
                model = build_model(config, data.num_classes, levels=levels)
            fit_lexical_idf(model, config, data.samples(TEXT, "train")["text"])
            if config.init_from:
                start_from(model, Path(config.init_from), config)
            model.to(device)
            task = make_task(model, config, data, device)
        for split in ("train", "val"):
            if task.size(split) == 0:
                raise ValueError(f"the {split} split has no {config.model} samples")
        optimizer = torch.optim.AdamW(parameter_groups(model, config), lr=config.lr,
                                      weight_decay=config.weight_decay)
        shard = math.ceil(task.size("train") / cluster.world_size)
        scheduler = lr_schedule(optimizer, config,
                                math.ceil(shard / per_process_batch(config.batch_size, cluster)))
        best_path = _fit(model, task, optimizer, scheduler, config, data, device, cluster)
        if cluster.is_main and has_lexical(model):
            choose_mix(best_path, task, config)
        if cluster.is_main:
            choose_path_weights(best_path, task, config, data)
        cluster.barrier()  # nobody returns while rank 0 is still writing checkpoints
        return best_path
    finally:
        leave(cluster)


def _fit(model, task, optimizer, scheduler, config: TrainConfig, data: CleanData, device,
         cluster: Cluster) -> Path:
    folder = Path(config.checkpoint_dir) / config.model
    best_path, last_path = folder / "best.pt", folder / "last.pt"
    writer = SummaryWriter(str(Path(config.runs_dir) / config.model)) if cluster.is_main else None
    forward = wrap(task.network, cluster, device, sync_buffers=not config.frozen)
    progress = {"history": [], "best_accuracy": -1.0, "best_epoch": 0, "epoch": 0}
    if config.resume:
        progress = _restore(last_path, model, optimizer, scheduler)
        _say(cluster, f"resuming {config.model} after epoch {progress['epoch']}")
    history = progress["history"]
    epochs = tqdm(range(progress["epoch"] + 1, config.epochs + 1), desc=f"training {config.model}",
                  unit="epoch", disable=None if cluster.is_main else True)
    for epoch in epochs:
        if config.patience and epoch - 1 - progress["best_epoch"] >= config.patience:
            break  # a resumed run that had already stopped early
        started = time.perf_counter()
        row, shards = _one_epoch(model, task, forward, (optimizer, scheduler), config, device,
                                 cluster, epoch)
        history.append(row | {"seconds": round(time.perf_counter() - started, 1)})
        row = history[-1]
        progress["epoch"] = epoch
        if row["val_accuracy"] > progress["best_accuracy"]:
            progress.update(best_accuracy=row["val_accuracy"], best_epoch=epoch)
        if cluster.is_main:
            _record_epoch(writer, model, (optimizer, scheduler), config, data, row, progress, shards, cluster,
                          best_path if progress["best_epoch"] == epoch else None, last_path)
        if config.patience and epoch - progress["best_epoch"] >= config.patience:
            _say(cluster, f"early stop: no better validation accuracy for {config.patience} epochs")
            break
    if cluster.is_main:
        writer.close()
        _store_full_history(best_path, history)
    return best_path


def train_on_positions(task, config: TrainConfig, positions: list[int], epochs: int, seed: int) -> None:
    """Train `task.model` on these positions of the training split for a fixed number of epochs,
    in one process, without validation or checkpoints (cross-fitting)."""
    model = task.model
    optimizer = torch.optim.AdamW(parameter_groups(model, config), lr=config.lr,
                                  weight_decay=config.weight_decay)
    scheduler = lr_schedule(optimizer, config, math.ceil(len(positions) / config.batch_size))
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        _train_mode(model, config)
        order = [positions[i] for i in torch.randperm(len(positions), generator=generator).tolist()]
        run_epoch(task, "train", config.batch_size, order, optimizer=optimizer, scheduler=scheduler,
                  grad_clip=config.grad_clip)
    model.eval()


def start_from(model: nn.Module, path: Path, config: TrainConfig) -> None:
    """Load another run's weights strictly (same architecture), e.g. fine-tuning from the
    frozen run's trained head instead of a random one."""
    if not path.exists():
        raise FileNotFoundError(f"--init-from: checkpoint {path} not found")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if checkpoint["config"]["model"] != config.model:
        raise ValueError(f"--init-from: {path} holds a {checkpoint['config']['model']} model, "
                         f"not {config.model}")
    try:
        model.load_state_dict(current_state(model, checkpoint["state_dict"]), strict=True)
    except RuntimeError as error:
        raise ValueError(f"--init-from: {path} does not fit this model ({str(error).splitlines()[0]})"
                         ) from error


def has_lexical(model: nn.Module) -> bool:
    text = getattr(model, "text_model", model)
    return getattr(text, "lexical", None) is not None


def fit_lexical_idf(model: nn.Module, config: TrainConfig, texts) -> None:
    """The lexical branch's idf, from the texts it trains on (the training split's products)."""
    if config.kind is not TEXT or model.lexical is None:  # a fused model reuses its text model's
        return
    from marketplace_classifier.serving.processing import lexical_ids

    lexical = text_settings(config).lexical
    model.lexical.fit_idf([lexical_ids(text, lexical)[0] for text in texts])


MIX_GRID = [step / 20 for step in range(21)]


def reload_best(best_path: Path, model: nn.Module) -> dict:
    """The best checkpoint, its weights loaded into `model` (in eval mode) for a choice on val."""
    checkpoint = torch.load(best_path, map_location="cpu", weights_only=False)
    model.load_state_dict(current_state(model, checkpoint["state_dict"]), strict=True)
    model.eval()
    return checkpoint


def keep_choices(best_path: Path, checkpoint: dict, model: nn.Module) -> None:
    """The best checkpoint saved again with `model`'s buffers as chosen."""
    checkpoint["state_dict"] = model.state_dict()
    atomic_save(checkpoint, best_path)


@torch.no_grad()
def choose_mix(best_path: Path, task, config: TrainConfig) -> float:
    """Weight of the lexical branch against the other, chosen on the validation split and
    stored in the best checkpoint."""
    checkpoint = reload_best(best_path, task.model)
    branches, labels = split_outputs(task, "val", config.batch_size)
    first, second = (torch.log_softmax(logits, 1) for logits in branches)
    scores = [((1 - w) * first + w * second).argmax(1).eq(labels).float().mean().item() for w in MIX_GRID]
    best = MIX_GRID[max(range(len(MIX_GRID)), key=lambda i: (scores[i], -abs(MIX_GRID[i] - 0.5)))]
    task.model.mix.copy_(torch.tensor([1 - best, best]))
    checkpoint["mix"] = {"lexical_weight": best, "val_accuracy": max(scores),
                         "val_accuracy_by_weight": dict(zip(MIX_GRID, scores, strict=True))}
    keep_choices(best_path, checkpoint, task.model)
    tqdm.write(f"{config.model}: lexical weight {best:.2f} (val accuracy {max(scores):.3f}; "
               f"without it {scores[0]:.3f}, lexical alone {scores[-1]:.3f})")
    return best


def choose_path_weights(best_path: Path, task, config: TrainConfig, data: CleanData) -> None:
    """Each of the model's path weights in turn (PATH_WEIGHTS), the others as chosen before it,
    kept in the best checkpoint under their buffers' names."""
    weights = [weight for weight in PATH_WEIGHTS if hasattr(task.model, weight.buffer)]
    if not weights:
        return
    checkpoint = reload_best(best_path, task.model)
    for weight in weights:
        checkpoint[weight.buffer] = choose_path_weight(task, config, data, weight)
    keep_choices(best_path, checkpoint, task.model)


@torch.no_grad()
def choose_path_weight(task, config: TrainConfig, data: CleanData, weight: PathWeight) -> dict:
    """Set the weight whose full path is most often right on the validation listings (per level
    temperatures fitted for each weight, as export fits them; the review thresholds do not change
    which path is answered) and return the choice with its scores."""
    buffer = getattr(task.model, weight.buffer)
    taxonomy = taxonomy_of(config, data)
    scores = []
    for candidate in weight.grid:
        buffer.copy_(torch.tensor([1 - candidate, candidate]))
        paths = split_paths(task.model, config, data, taxonomy, "val", task, 1.0)
        scores.append(full_path_accuracy(with_temperatures(taxonomy, paths), paths))
    best = weight.grid[scores.index(max(scores))]
    buffer.copy_(torch.tensor([1 - best, best]))
    tqdm.write(f"{config.model}: {weight.weighs} weight {best:.2f} (val full path {max(scores):.3f}; "
               f"at {weight.grid[0]:.2f} {scores[0]:.3f})")
    return {"weight": best, "weighs": weight.weighs, "val_full_path_accuracy": max(scores),
            "val_full_path_accuracy_by_weight": dict(zip(weight.grid, scores, strict=True))}


def _one_epoch(model, task, forward, stepping: tuple, config: TrainConfig, device, cluster: Cluster,
               epoch: int) -> tuple[dict, list[dict]]:
    """One pass over this process's shard of train, then validation over all processes;
    `stepping` is the optimiser and its learning-rate schedule."""
    optimizer, scheduler = stepping
    _train_mode(model, config)
    order = train_order(task.size("train"), config.seed, epoch, cluster)
    batch_size = per_process_batch(config.batch_size, cluster)
    train_loss, train_accuracy = run_epoch(task, "train", batch_size, order, forward, optimizer,
                                           device, cluster, scheduler, config.grad_clip)
    model.eval()
    val_loss, val_accuracy = run_epoch(task, "val", batch_size, eval_order(task.size("val"), cluster),
                                       device=device, cluster=cluster)
    shards = cluster.gather({"rank": cluster.rank, "train_positions": order})
    _say(cluster, f"{config.model} epoch {epoch}: train loss {train_loss:.4f} acc {train_accuracy:.3f}"
                  f" | val loss {val_loss:.4f} acc {val_accuracy:.3f}")
    return {"epoch": epoch, "train_loss": train_loss, "train_accuracy": train_accuracy,
            "val_loss": val_loss, "val_accuracy": val_accuracy}, shards


def _record_epoch(writer, model, stepping: tuple, config: TrainConfig, data: CleanData, row: dict,
                  progress: dict, shards: list[dict], cluster: Cluster, best_path: Path | None,
                  last_path: Path) -> None:
    """Rank 0 only: TensorBoard scalars, the best checkpoint when it improved, and last.pt."""
    optimizer, scheduler = stepping
    for name, value in row.items():
        if name != "epoch":
            writer.add_scalar(name.replace("_", "/", 1), value, row["epoch"])
    processes = {"world_size": cluster.world_size, "backend": cluster.backend,
                 "batch_size_per_process": per_process_batch(config.batch_size, cluster),
                 "last_epoch_shards": shards}
    taxonomy = taxonomy_of(config, data)
    taxonomy = taxonomy.to_json() if taxonomy else None
    if best_path is not None:
        save_checkpoint(best_path, model, config, history=progress["history"],
                        best_epoch=row["epoch"], best_val_accuracy=row["val_accuracy"],
                        index_to_name=data.index_to_name, processes=processes, taxonomy=taxonomy)
    writer.add_scalar("lr/head", optimizer.param_groups[0]["lr"], row["epoch"])
    save_checkpoint(last_path, model, config, optimizer=optimizer.state_dict(),
                    scheduler=scheduler.state_dict(),
                    torch_rng=torch.get_rng_state(), progress=progress,
                    index_to_name=data.index_to_name, processes=processes, taxonomy=taxonomy)


def _say(cluster: Cluster, line: str) -> None:
    if cluster.is_main:
        tqdm.write(line)


def _restore(last_path: Path, model, optimizer, scheduler) -> dict:
    """Model, optimiser, schedule and random state after the last complete epoch."""
    if not last_path.exists():
        raise FileNotFoundError(f"--resume: {last_path} not found (no epoch of this run completed)")
    state = torch.load(last_path, map_location="cpu", weights_only=False)
    model.load_state_dict(current_state(model, state["state_dict"]), strict=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return state["progress"]


def _store_full_history(path: Path, history: list[dict]) -> None:
    """The best checkpoint keeps the curves of the whole run, for the report."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    checkpoint["history"] = history
    atomic_save(checkpoint, path)


__all__ = ["TrainConfig", "build_model", "choose_device", "config_from", "load_checkpoint", "train"]
