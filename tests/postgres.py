"""A real PostgreSQL for the tests: Debian's server binaries, a throwaway cluster on a free
loopback port, run as the `postgres` user when the tests run as root (PostgreSQL refuses root)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from marketplace_classifier.ops import serve

BINARIES = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)


def postgres_binaries() -> Path | None:
    return next((folder for folder in BINARIES if (folder / "initdb").exists()), None)


def as_owner(command: list[str], owner: str | None) -> list[str]:
    return ["runuser", "-u", owner, "--", *command] if owner else command


@contextlib.contextmanager
def running_postgres() -> Iterator[str]:
    """A started PostgreSQL with an empty database; yields its URL. Stopped and removed after."""
    binaries = postgres_binaries()
    if binaries is None:
        raise RuntimeError("PostgreSQL is not installed (Debian's postgresql package)")
    owner = "postgres" if os.geteuid() == 0 else None
    folder = Path(tempfile.mkdtemp(prefix="pg"))
    data, port = folder / "data", serve.free_port()
    if owner:
        shutil.chown(folder, owner)
    run = dict(check=True, capture_output=True, text=True, timeout=120)
    subprocess.run(as_owner([str(binaries / "initdb"), "-D", str(data), "-A", "trust", "-U", "review",
                             "--no-sync", "-E", "UTF8"], owner), **run)
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run(as_owner([str(binaries / "pg_ctl"), "-D", str(data), "-o", options, "-w", "-l",
                             str(folder / "log"), "start"], owner), **run)
    try:
        create = [str(binaries / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "review", "review"]
        subprocess.run(as_owner(create, owner), **run)
        yield f"postgresql://review@127.0.0.1:{port}/review"
    finally:
        subprocess.run(as_owner([str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                                owner), capture_output=True, timeout=120)
        shutil.rmtree(folder, ignore_errors=True)
