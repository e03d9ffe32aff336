"""Bulk scoring on Ray Data, for catalogues that outgrow one machine: the input's rows (paths,
not photos) become a dataset, `map_batches` runs the serving core in a pool of actors (one model
each, the exported folder's chosen runtime), and the driver appends each answered batch to the
same journal as the other two ways, so a stopped run resumes the same way. Runs in the second
engine's environment (.venv-engine), where Ray is installed; the photos' paths must be readable
on every node (a shared folder), as must the exported model folder."""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from marketplace_classifier.ops import serve
from marketplace_classifier.ops.bulk import InProcessScorer, append_and_count, exported_folder, score_rows
from marketplace_classifier.ops.bulk_io import (
    BulkError,
    InputRow,
    Journal,
    check_output,
    finish,
    journal_for,
    read_rows,
)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
ACTORS_START_SECONDS = 600  # how long the pool may take to start and load the model in every actor


class RayScorer:
    """One actor of the pool: the model loaded once, each batch of rows scored by the core."""

    def __init__(self, model_dir: str, model: str, threads: int):
        import ray

        self.scorer, self.model = InProcessScorer(Path(model_dir), threads), model
        self.place = f"node {ray.get_runtime_context().get_node_id()[:12]}"

    def __call__(self, batch: dict) -> dict:
        rows = [InputRow(**json.loads(text)) for text in batch["row"]]
        records = score_rows([row_with_paths(row) for row in rows], self.scorer, self.model)
        return {
            "record": [json.dumps(record, ensure_ascii=False) for record in records],
            "node": [self.place] * len(records),
        }


def row_with_paths(row: InputRow) -> InputRow:
    return InputRow(**(asdict(row) | {"photos": tuple(Path(photo) for photo in row.photos)}))


def row_json(row: InputRow) -> str:
    return json.dumps(asdict(row) | {"photos": [str(photo) for photo in row.photos]})


def run_on_ray(args: argparse.Namespace) -> dict:
    """Score args.input on the Ray cluster at args.ray ('auto': the running one, 'local': start
    one in this process) with args.actors actors; the counts, and which actors scored what."""
    try:
        import ray
    except ImportError as error:
        raise BulkError(
            "Ray is not installed here: run with .venv-engine/bin/python (make engine-venv)"
        ) from error
    model_dir = exported_folder((Path(args.artifacts_dir) / args.model).resolve())
    check_output(args.out)
    journal = Journal(journal_for(args.out))
    done = journal.open()
    rows = [row for row in itertools.islice(read_rows(args.input), args.limit) if row.row not in done]
    counts = {
        "listings": len(rows) + len(done),
        "resumed_from": len(done),
        "answered": 0,
        "errors": 0,
        "placement": {},
    }
    # workers import the project from its folder, on every node
    runtime_env = {"env_vars": {"PYTHONPATH": str(PROJECT_ROOT), "OMP_NUM_THREADS": str(args.threads or 1)}}
    local = {"include_dashboard": False} if args.ray == "local" else {}  # only for a cluster it starts
    ray.init(
        address=None if args.ray == "local" else args.ray,
        runtime_env=runtime_env,
        log_to_driver=False,
        **local,
    )
    try:
        if rows:
            # every actor up (its model loaded) before the first block is handed out, and a block
            # per batch: otherwise the first actor ready takes every block of a small catalogue
            ray.data.DataContext.get_current().wait_for_min_actors_s = ACTORS_START_SECONDS
            blocks = max(args.actors, math.ceil(len(rows) / args.batch_size))
            dataset = ray.data.from_items([{"row": row_json(row)} for row in rows],
                                          override_num_blocks=blocks)
            answered = dataset.map_batches(
                RayScorer,
                batch_size=args.batch_size,
                concurrency=args.actors,
                num_cpus=1,
                scheduling_strategy="SPREAD",
                fn_constructor_args=(str(model_dir), args.model, args.threads or 1),
            )
            with tqdm(
                total=counts["listings"],
                initial=len(done),
                unit="listing",
                disable=None,
                desc=f"scoring with {args.model} on Ray",
            ) as bar:
                for batch in answered.iter_batches(batch_size=args.batch_size, batch_format="numpy"):
                    records = [json.loads(text) for text in batch["record"]]
                    append_and_count(journal, counts, records)
                    for node in batch["node"]:
                        counts["placement"][str(node)] = counts["placement"].get(str(node), 0) + 1
                    bar.update(len(records))
    finally:
        ray.shutdown()
    finish(args.out, journal)
    return counts


@contextlib.contextmanager
def local_cluster(nodes: int = 2, cpus_per_node: int = 1) -> Iterator[str]:
    """A Ray cluster of `nodes` nodes on this machine (`ray start --head`, then `ray start
    --address` for each other node), from the second engine's environment; yields its address.
    Only its own processes are stopped at the end: `ray stop` would stop every Ray process of
    this user, the second engine's included."""
    ray = str(serve.ENGINE_PYTHON.with_name("ray"))
    port, temp = serve.free_port(), Path(tempfile.mkdtemp(prefix="rb", dir="/tmp"))  # short: socket paths
    env = os.environ | {"PYTHONPATH": str(PROJECT_ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    common = [
        "--node-ip-address",
        "127.0.0.1",
        "--num-cpus",
        str(cpus_per_node),
        "--temp-dir",
        str(temp),
        "--disable-usage-stats",
    ]
    address = f"127.0.0.1:{port}"
    try:
        subprocess.run(
            [ray, "start", "--head", "--port", str(port), "--include-dashboard", "false", *common],
            check=True,
            env=env,
            capture_output=True,
            timeout=300,
        )
        for _ in range(nodes - 1):
            subprocess.run(
                [ray, "start", "--address", address, *common],
                check=True,
                env=env,
                capture_output=True,
                timeout=300,
            )
        yield address
    finally:
        stop_cluster(port, temp)


def stop_cluster(port: int, temp: Path) -> None:
    import psutil

    marks = (str(temp), f"127.0.0.1:{port}", f"port={port}")
    mine = [
        process
        for process in psutil.process_iter(["cmdline"])
        if any(mark in " ".join(process.info["cmdline"] or ()) for mark in marks)
    ]
    for process in mine:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(mine, timeout=30)
    shutil.rmtree(temp, ignore_errors=True)


def score_on_cluster(
    source: Path,
    out: Path,
    model: str,
    artifacts: Path,
    address: str,
    actors: int = 2,
    batch_size: int = 16,
    timeout: float = 3600,
) -> tuple[subprocess.CompletedProcess, dict]:
    """`score --ray ADDRESS` run from the second engine's environment, one torch thread an actor:
    the finished process, and how many listings each node's actors scored."""
    command = [
        str(serve.ENGINE_PYTHON),
        "-m",
        "marketplace_classifier.ops.score",
        "--input",
        str(source),
        "--out",
        str(out),
        "--model",
        model,
        "--artifacts-dir",
        str(artifacts),
        "--ray",
        address,
        "--actors",
        str(actors),
        "--batch-size",
        str(batch_size),
        "--threads",
        "1",
    ]
    run = subprocess.run(
        command,
        cwd=PROJECT_ROOT,
        env=os.environ | {"PYTHONPATH": str(PROJECT_ROOT)},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    marker = "placement: "
    placement = json.loads(run.stderr.split(marker, 1)[1].splitlines()[0]) if marker in run.stderr else {}
    return run, placement
