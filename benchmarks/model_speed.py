"""In-process items/s of exported models at batch 4 on one thread (what one serving worker gets).

Usage: python -m benchmarks.model_speed artifacts/image artifacts/real/image ... [--seconds 8]
The inputs are prepared beforehand (decoding and tokenizing are not timed); `make bench` measures
the served figures.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import torch
from PIL import Image

from serving.exported import ExportedModel
from serving.processing import model_image_from_bytes

TEXT = "Sony PS4 Pro 1TB with two controllers and five games, boxed, collection only. " * 3
BATCH = 4


def items_per_second(folder: Path, seconds: float) -> float:
    exported = ExportedModel.load(folder)
    model, settings = exported.model, exported.settings
    images = None
    if exported.kind.uses_image:
        photo = io.BytesIO()
        Image.new("RGB", (1000, 750), (120, 40, 200)).save(photo, "JPEG")
        images = [model_image_from_bytes(photo.getvalue(), settings.image.size)] * BATCH
    inputs = exported.inputs(images, [TEXT] * BATCH if exported.kind.uses_text else None)
    with torch.inference_mode():
        for _ in range(3):
            model(*inputs)
        calls, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            model(*inputs)
            calls += 1
    return calls * BATCH / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="artifacts/<model> folders")
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for folder in args.folders:
        if not (folder / "model.pt").exists():
            parser.error(f"{folder} has no model.pt: export the model first")
        rate = items_per_second(folder, args.seconds)
        print(json.dumps({"folder": str(folder), "items_per_second": round(rate, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
