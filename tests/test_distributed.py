"""Training under torchrun: shards, reduced validation, one writer, same result as one process."""

import os
import subprocess
import sys

import pytest
import torch

from marketplace_classifier.training.distributed import Cluster, eval_order, per_process_batch, train_order


def test_process_shards_are_disjoint_and_form_the_single_process_batches():
    alone = train_order(11, seed=5, epoch=2, cluster=Cluster())
    ranks = [train_order(11, seed=5, epoch=2, cluster=Cluster(rank, 2)) for rank in (0, 1)]
    assert sorted(alone) == list(range(11))
    assert not set(ranks[0]) & set(ranks[1]) and len(ranks[0]) == len(ranks[1]) == 5
    global_batch, local_batch = 4, per_process_batch(4, Cluster(0, 2))
    for step in range(2):
        together = ranks[0][step * local_batch:(step + 1) * local_batch] + \
            ranks[1][step * local_batch:(step + 1) * local_batch]
        assert sorted(together) == sorted(alone[step * global_batch:(step + 1) * global_batch])
    assert train_order(11, 5, 3, Cluster()) != alone  # reshuffled every epoch
    shards = [eval_order(7, Cluster(rank, 3)) for rank in range(3)]
    assert sorted(sum(shards, [])) == list(range(7))  # validation counts every sample once


def test_global_batch_must_split_over_the_processes():
    with pytest.raises(ValueError, match="--batch-size 30 does not split evenly over 4"):
        per_process_batch(30, Cluster(0, 4))


def test_two_gloo_processes_train_like_one(trained, tmp_path):
    config = trained["configs"]["image"]  # the single-process run to compare with
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "marketplace_classifier.training",
               "train", "--model", "image", "--data-dir", config.data_dir,
               "--image-backbone", config.image_backbone, "--image-weights", config.image_weights,
               "--image-size", str(config.image_size), "--epochs", str(config.epochs),
               "--batch-size", str(config.batch_size), "--lr", str(config.lr),
               "--seed", str(config.seed), "--min-listings", str(config.min_listings), "--device", "cpu",
               "--checkpoint-dir", str(tmp_path / "checkpoints"), "--runs-dir", str(tmp_path / "runs"),
               "--cache-dir", str(tmp_path / "cache")]
    environment = os.environ | {"OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("computing image features") == 1  # rank 0 only; rank 1 read the cache
    assert result.stdout.count("best checkpoint:") == 1

    folder = tmp_path / "checkpoints" / "image"
    assert sorted(path.name for path in (tmp_path / "checkpoints").rglob("*") if path.is_file()) \
        == ["best.pt", "last.pt"]
    assert [path.name for path in (tmp_path / "runs").iterdir()] == ["image"]
    distributed = torch.load(folder / "best.pt", weights_only=False)
    processes = distributed["processes"]
    assert processes["world_size"] == 2 and processes["backend"] == "gloo"
    assert processes["batch_size_per_process"] == config.batch_size // 2
    shards = [set(shard["train_positions"]) for shard in processes["last_epoch_shards"]]
    train_size = _train_images(config)
    assert shards[0] and shards[1] and not shards[0] & shards[1]
    assert len(shards[0] | shards[1]) >= train_size - 1  # at most the odd one out is dropped

    single = torch.load(trained["paths"]["image"], weights_only=False)
    for together, alone in zip(distributed["history"], single["history"], strict=True):
        assert together["val_accuracy"] == pytest.approx(alone["val_accuracy"], abs=0.03)
        assert together["val_loss"] == pytest.approx(alone["val_loss"], rel=0.02)


def _train_images(config) -> int:
    from marketplace_classifier.training.data import CleanData

    return len(CleanData.load(config.data_dir).samples("image", "train"))
