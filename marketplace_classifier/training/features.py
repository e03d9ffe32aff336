"""Frozen-encoder features, computed once and cached on disk under a key of everything
they depend on (data, encoder and its weights, preprocessing), so a change invalidates them."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from marketplace_classifier.serving.files import atomic_write
from marketplace_classifier.serving.processing import model_image, tokenize


def cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def file_stamps(paths: Sequence[Path]) -> list:
    """Name and content digest of each file: the cache follows what the files hold, so cleaning
    again into the same folder (new modification times, same bytes) keeps the features."""
    return [[Path(path).name, hashlib.blake2b(Path(path).read_bytes(), digest_size=16).hexdigest()]
            for path in paths]


def cached(cache_dir: Path | None, kind: str, parts: dict, compute) -> dict[str, torch.Tensor]:
    """Load `kind` features for `parts` from the cache, or compute and store them atomically."""
    if cache_dir is None:
        tqdm.write(f"computing {kind} features (no cache)")
        return compute()
    path = Path(cache_dir) / f"{kind}-{cache_key(parts)}.pt"
    if path.exists():
        return torch.load(path, map_location="cpu", weights_only=True)
    tqdm.write(f"computing {kind} features into {path}")
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda temporary: torch.save(result, temporary))
    return result


@torch.inference_mode()
def compute_features_from_stage_inputs(model, activations: torch.Tensor, device: torch.device,
                                       batch_size: int = 32) -> dict[str, torch.Tensor]:
    """Backbone features [N, F] from the activations entering the last stage [N, C, h, w]
    (compute_stage_inputs of the plain photos): the frozen features of the same photos."""
    model.eval().to(device)
    chunks = [model.backbone.from_last_stage(activations[start:start + batch_size].to(device).float())
              .float().cpu()
              for start in tqdm(range(0, len(activations), batch_size), desc="image features",
                                unit="batch", disable=None)]
    return {"features": torch.cat(chunks) if chunks else torch.empty(0, model.feature_dim)}


@torch.inference_mode()
def compute_stage_inputs(model, paths: Sequence[Path], image_size: int, device: torch.device,
                         batch_size: int = 32, view: int = 0, seed: int = 0) -> dict[str, torch.Tensor]:
    """Activations entering the image model's last stage [N, C, h, w] (float16), of each photo
    as it is (view 0), mirrored (view 1) or randomly cropped and flipped (view 2 and up, the
    crops drawn from `seed` and `view`, so a rerun caches the same views)."""
    model.eval().to(device)
    generator = torch.Generator().manual_seed(seed * 1000 + view)
    chunks = []
    for start in tqdm(range(0, len(paths), batch_size), desc=f"last-stage inputs, view {view}",
                      unit="batch", disable=None):
        batch = torch.stack([photo_view(load_model_image(path, image_size), view, generator)
                             for path in paths[start:start + batch_size]])
        normalised = (batch.to(device).float() - model.mean) / model.std
        chunks.append(model.backbone.below_last_stage(normalised).half().cpu())
    return {"activations": torch.cat(chunks)}


def photo_view(image: torch.Tensor, view: int, generator: torch.Generator) -> torch.Tensor:
    """View `view` of a uint8 [3,S,S] photo: 0 itself, 1 mirrored, 2+ a random crop of 60-100%
    of its area resized back to S, mirrored half of the time."""
    if view == 0:
        return image
    if view == 1:
        return image.flip(-1)
    size = image.shape[-1]
    area = float(torch.empty(1).uniform_(0.6, 1.0, generator=generator))
    side = max(1, round(size * area ** 0.5))
    top, left = (int(torch.randint(0, size - side + 1, (1,), generator=generator)) for _ in range(2))
    crop = image[:, top:top + side, left:left + side].unsqueeze(0).float()
    crop = torch.nn.functional.interpolate(crop, size=(size, size), mode="bilinear", antialias=True,
                                           align_corners=False)
    crop = crop.round().clamp(0, 255).to(torch.uint8)[0]
    return crop.flip(-1) if bool(torch.rand(1, generator=generator) < 0.5) else crop


def load_model_image(path: Path, image_size: int) -> torch.Tensor:
    with Image.open(path) as picture:
        return model_image(picture, image_size)


@torch.inference_mode()
def compute_hidden_states(text_model, tokenizer, texts: Sequence[str], max_length: int,
                          device: torch.device, batch_size: int = 32) -> dict[str, torch.Tensor]:
    """Encoder hidden states [N, max_length, H] (float16 to halve the cache) and masks [N, max_length]."""
    text_model.eval().to(device)
    hidden_chunks, mask_chunks = [], []
    for start in tqdm(range(0, len(texts), batch_size), desc="text features", unit="batch",
                      disable=None):
        ids, mask = tokenize(tokenizer, texts[start:start + batch_size], max_length)
        hidden = text_model.hidden_states(ids.to(device), mask.to(device)).float().cpu()
        pad = max_length - hidden.shape[1]
        hidden_chunks.append(torch.nn.functional.pad(hidden, (0, 0, 0, pad)).half())
        mask_chunks.append(torch.nn.functional.pad(mask, (0, pad)))
    return {"hidden": torch.cat(hidden_chunks), "mask": torch.cat(mask_chunks)}
