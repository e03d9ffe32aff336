"""Classify a few held-out (test split) listings with the running server, over REST and gRPC,
each with all its photos (one answer per listing), and print each answer's category path beside the
true one, how deep it is confident, and whether it would be filed automatically."""

from __future__ import annotations

import argparse
from pathlib import Path

from marketplace_classifier.ops.predict import grpc_predict, rest_predict
from marketplace_classifier.ops.serve import ROOT, read_key, read_properties
from marketplace_classifier.serving.model_kinds import COMBINED, KINDS, TEXT
from marketplace_classifier.training.data import CleanData


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    photos_of = data.samples(COMBINED, "test").groupby("product_id", sort=False)["id"].apply(list)
    held_out = data.samples(TEXT, "test").set_index("id").loc[list(photos_of.index[:args.count])]
    print(f"{'protocol':8} {'model':9} {'photos':>6} {'answer (confident part in [ ])':64} {'p':>5} "
          f"{'filed':5}  true category path")
    for product_id, row in held_out.iterrows():
        photos = [data.image_path(image_id).read_bytes() for image_id in photos_of[product_id]]
        truth = str(row["category"])
        for kind in KINDS.values():
            model = kind.name
            listing_photos = photos if kind.uses_image else None
            fields = {"text": row["text"]} if kind.uses_text else {}
            for protocol, call, target in (("rest", rest_predict, rest), ("grpc", grpc_predict, grpc_target)):
                answer = call(target, model, listing_photos, fields, 3, token)
                path = [level["name"] for level in answer.get("path", [{"name": answer["category"]}])]
                mark = "ok" if [part.strip() for part in truth.split("/")][:len(path)] == path else "--"
                filed = "no" if answer["needs_review"] else "yes"
                print(f"{protocol:8} {model:9} {answer.get('photos', '-'):>6} "
                      f"{shown_path(path, answer.get('confident_depth', 1))[:64]:64} "
                      f"{answer['probability']:5.2f} {filed:5}  {truth} {mark}")
    return 0


def shown_path(path: list[str], confident_depth: int) -> str:
    """`[Home & Garden / Garden] / Sheds`: the levels the answer is confident of in brackets."""
    confident, rest = " / ".join(path[:confident_depth]), " / ".join(path[confident_depth:])
    if not confident:
        return rest
    return f"[{confident}]" + (f" / {rest}" if rest else "")


if __name__ == "__main__":
    raise SystemExit(main())
