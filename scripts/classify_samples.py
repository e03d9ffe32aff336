"""Classify a few held-out (test split) listings with the running server, over REST and gRPC,
and print each answer beside the true category."""

from __future__ import annotations

import argparse
from pathlib import Path

from handlers.model_kinds import MODEL_KINDS
from scripts.predict import grpc_predict, rest_predict
from scripts.serve import ROOT, read_key, read_properties
from training.data import CleanData


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True, help="cleaned and split folder")
    parser.add_argument("--count", type=int, default=4)
    parser.add_argument("--config", type=Path, default=ROOT / "config.properties")
    parser.add_argument("--key-file", type=Path, default=ROOT / ".serve" / "key_file.json")
    args = parser.parse_args(argv)
    properties = read_properties(args.config)
    token = read_key(args.key_file)
    rest = properties["inference_address"]
    grpc_target = f"127.0.0.1:{properties.get('grpc_inference_port', '7070')}"
    data = CleanData.load(args.data_dir)
    held_out = data.samples("combined", "test").drop_duplicates("product_id").head(args.count)
    print(f"{'protocol':8} {'model':9} {'answer':34} {'p':>5}  true category")
    for _, row in held_out.iterrows():
        image = data.image_path(row["id"]).read_bytes()
        for model in MODEL_KINDS:
            photo = image if model != "text" else None
            fields = {"text": row["text"]} if model != "image" else {}
            for protocol, call, target in (("rest", rest_predict, rest), ("grpc", grpc_predict, grpc_target)):
                answer = call(target, model, photo, fields, 3, token)
                mark = "ok" if answer["category"] == data.index_to_name[str(row["label"])] else "--"
                print(f"{protocol:8} {model:9} {answer['category'][:34]:34} {answer['probability']:5.2f}"
                      f"  {data.index_to_name[str(row['label'])]} {mark}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
