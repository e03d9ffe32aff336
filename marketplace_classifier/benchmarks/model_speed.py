"""In-process items/s of exported models at batch 4 on one thread (what one serving worker gets).

Usage: python -m marketplace_classifier.benchmarks.model_speed artifacts/image artifacts/real/image ...
[--seconds 8]
       [--listing-photos 1 3 6] [--runtime torchscript onnxruntime openvino]
The inputs are prepared beforehand (decoding and tokenizing are not timed); `make bench` measures
the served figures. A combined model exported with `listings` is also measured per listing of
--listing-photos photos: its text once per listing against forward's text once per photo.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import torch
from PIL import Image

from marketplace_classifier.serving.exported import ExportedModel
from marketplace_classifier.serving.layout import ExportLayout
from marketplace_classifier.serving.processing import model_image_from_bytes
from marketplace_classifier.serving.settings import RUNTIMES

TEXT = "Sony PS4 Pro 1TB with two controllers and five games, boxed, collection only. " * 3
BATCH = 4


def sample_photo(size: int) -> torch.Tensor:
    photo = io.BytesIO()
    Image.new("RGB", (1000, 750), (120, 40, 200)).save(photo, "JPEG")
    return model_image_from_bytes(photo.getvalue(), size)


def calls_per_second(method, inputs: tuple, seconds: float) -> float:
    with torch.inference_mode():
        for _ in range(3):
            method(*inputs)
        calls, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            method(*inputs)
            calls += 1
    return calls / (time.perf_counter() - started)


def items_per_second(folder: Path, seconds: float, runtime: str | None = None) -> float:
    exported = ExportedModel.load(folder, runtime=runtime, threads=1)
    images = [sample_photo(exported.settings.image.size)] * BATCH if exported.kind.uses_image else None
    inputs = exported.inputs(images, [TEXT] * BATCH if exported.kind.uses_text else None)
    return calls_per_second(exported.model, inputs, seconds) * BATCH


def listings_per_second(folder: Path, photos: int, seconds: float, runtime: str | None = None
                        ) -> dict[str, float]:
    """Listings of `photos` photos per second, BATCH listings a call: forward (the text beside
    every photo) against listings (each listing's text once)."""
    exported = ExportedModel.load(folder, runtime=runtime, threads=1)
    images = [sample_photo(exported.settings.image.size)] * (BATCH * photos)
    per_photo = exported.inputs(images, [TEXT] * (BATCH * photos))
    once = exported.inputs(images, [TEXT] * BATCH)
    listing_of_photo = torch.arange(BATCH).repeat_interleave(photos)
    return {"text_per_photo": calls_per_second(exported.model, per_photo, seconds) * BATCH,
            "text_per_listing": calls_per_second(exported.model.listings,
                                                 (once[0], listing_of_photo, *once[1:]), seconds) * BATCH}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path, help="artifacts/<model> folders")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--listing-photos", type=int, nargs="*", default=[1, 3, 6])
    parser.add_argument("--runtime", nargs="+", choices=RUNTIMES, default=[None],
                        help="runtimes to measure (default: the one each folder's preprocessing.json names)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for folder in args.folders:
        if not ExportLayout(folder).model.exists():
            parser.error(f"{folder} has no model.pt: export the model first")
        for runtime in args.runtime:
            name = {"folder": str(folder), "runtime": runtime or ExportedModel.load(folder).runtime}
            rate = items_per_second(folder, args.seconds, runtime)
            print(json.dumps(name | {"items_per_second": round(rate, 1)}))
            if ExportedModel.load(folder).kind.text_once_per_listing:
                for photos in args.listing_photos:
                    rates = listings_per_second(folder, photos, args.seconds, runtime)
                    print(json.dumps(name | {"photos_per_listing": photos}
                                     | {key: round(rate, 2) for key, rate in rates.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
