"""Generate the TorchServe gRPC client stubs from the .proto files inside the installed
torchserve package (its frontend jar). Nothing generated is committed.

Usage: marketplace-classifier grpc-stubs [--out DIR]   (default: this interpreter's site-packages)
"""

from __future__ import annotations

import argparse
import sysconfig
import tempfile
import zipfile
from pathlib import Path

PROTOS = ("inference.proto", "management.proto")


def frontend_jar() -> Path:
    import ts

    return Path(ts.__file__).parent / "frontend" / "model-server.jar"


def google_protos_root() -> Path:
    """Where google/rpc/status.proto lives (googleapis-common-protos)."""
    import google.rpc

    return Path(next(iter(google.rpc.__path__))).parents[1]


def generate(out: Path) -> list[Path]:
    from grpc_tools import protoc

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder, zipfile.ZipFile(frontend_jar()) as jar:
        for name in PROTOS:
            (Path(folder) / name).write_bytes(jar.read(f"proto/{name}"))
        include = Path(protoc.__file__).parent / "_proto"
        arguments = ["protoc", f"-I{folder}", f"-I{google_protos_root()}", f"-I{include}",
                     f"--python_out={out}", f"--grpc_python_out={out}",
                     *(str(Path(folder) / name) for name in PROTOS)]
        if protoc.main(arguments) != 0:
            raise RuntimeError(f"protoc failed on {PROTOS} from {frontend_jar()}")
    return sorted(out.glob("*_pb2*.py"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(sysconfig.get_paths()["purelib"]))
    for path in generate(parser.parse_args(argv).out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
