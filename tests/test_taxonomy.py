"""The category tree: learned from training paths with rare categories folded into their parents,
decoded into paths that are always paths of the tree, and stopped where it is not confident."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from marketplace_classifier.serving.taxonomy import STOP, Level, Taxonomy, split_path

ROOTS = ("A", "B", "C")
PATHS = (["A / a1 / x"] * 6 + ["A / a1 / y"] * 5 + ["A / a1"] * 5 + ["A / a1 / rare"] * 2
         + ["A / a2"] * 7 + ["A / a3"] * 2 + ["B / b1 / z / deeper"] * 8 + ["C"] * 3)


def tree() -> Taxonomy:
    return Taxonomy.learn(PATHS, ROOTS, max_depth=3, min_listings=5)


def test_the_tree_is_learned_cut_at_its_depth_with_rare_categories_folded_into_their_parents():
    taxonomy = tree()
    assert taxonomy.terminals == (("A", "a1"), ("A", "a1", "x"), ("A", "a1", "y"), ("A", "a2"),
                                  ("B", "b1", "z"))
    assert taxonomy.fold("A / a1 / rare") == ("A", "a1")  # 2 listings < 5: its parent
    assert taxonomy.fold("A / a3") == ("A",)  # a rare second level folds into its root
    assert taxonomy.fold("B / b1 / z / deeper") == ("B", "b1", "z")  # cut at three levels
    assert taxonomy.fold("A / never / seen") == ("A",) and taxonomy.fold("Z / q") == ()
    assert taxonomy.terminal_index("A / a1 / rare") == taxonomy.terminals.index(("A", "a1"))
    assert taxonomy.terminal_index("C") == -1 and taxonomy.terminal_index("A / a3") == -1
    assert taxonomy.choices(("A", "a1")) == [("A", "a1", "x"), ("A", "a1", "y"), STOP]
    assert taxonomy.choices(("B", "b1")) == [("B", "b1", "z")]  # never ended there in training
    assert taxonomy.choices(("C",)) == [] and taxonomy.depth == 3


def one_hot(taxonomy: Taxonomy, path: str) -> torch.Tensor:
    log_probabilities = torch.full((len(taxonomy.terminals),), -30.0)
    log_probabilities[taxonomy.terminals.index(split_path(path))] = 0.0
    return log_probabilities


def test_a_folded_rare_category_is_answered_as_its_parent():
    taxonomy = tree()
    roots = torch.tensor([[0.9, 0.05, 0.05]])
    # the levels head puts everything on the terminal the rare category was folded into
    (path,) = taxonomy.decode(roots, one_hot(taxonomy, "A / a1")[None])
    assert [level.name for level in path] == ["A", "a1"]
    assert path[1].probability == pytest.approx(0.9, abs=1e-6)


def test_the_root_comes_from_the_root_head_and_the_levels_stay_below_it():
    taxonomy = tree()
    # the levels head prefers B's category; the root head says A: the answer stays under A
    levels = torch.log_softmax(torch.tensor([0.0, 0.0, 0.0, 2.0, 9.0]), 0)
    (path,) = taxonomy.decode(torch.tensor([[0.6, 0.3, 0.1]]), levels[None])
    assert [level.name for level in path] == ["A", "a2"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-20, 20), min_size=5, max_size=5), st.lists(st.floats(0.01, 1), min_size=3,
       max_size=3), st.lists(st.floats(0.2, 5), min_size=2, max_size=2))
def test_every_decoded_answer_is_a_tree_path_whose_probability_never_grows(levels, roots, temperatures):
    taxonomy = Taxonomy(tree().roots, tree().terminals, temperatures=tuple(temperatures))
    root_probabilities = torch.tensor([roots]) / sum(roots)
    (path,) = taxonomy.decode(root_probabilities, torch.log_softmax(torch.tensor(levels), 0)[None])
    names = tuple(level.name for level in path)
    assert names[0] in ROOTS and len(names) <= taxonomy.max_depth
    for depth in range(2, len(names) + 1):
        assert names[:depth] in taxonomy.children(names[:depth - 1])
    # it ends at a terminal, or at a root without categories below it
    assert taxonomy.is_terminal(names) or (len(names) == 1 and not taxonomy.children(names))
    assert all(a.probability >= b.probability - 1e-9 for a, b in zip(path, path[1:], strict=False))


def test_confident_depth_stops_at_the_first_level_below_its_threshold():
    taxonomy = Taxonomy(tree().roots, tree().terminals, thresholds=(0.6, 0.5))
    path = [Level("A", 0.9), Level("a1", 0.7), Level("x", 0.4)]
    assert taxonomy.confident_depth(path, 0.8) == 2
    assert taxonomy.confident_depth(path, 0.95) == 0  # not even the root: needs review
    assert Taxonomy(tree().roots, tree().terminals, thresholds=(None, 0.1)).confident_depth(path, 0.5) == 1


def test_a_path_is_filed_to_its_end_only_when_its_last_level_reaches_its_end_threshold():
    """The end threshold judges where the answer stops: it applies to the path's last level, and
    a path that goes on below a level is not held to that level's end threshold."""
    path = [Level("A", 0.9), Level("a1", 0.7), Level("x", 0.5)]
    ends_at_a1 = path[:2]
    taxonomy = Taxonomy(tree().roots, tree().terminals, thresholds=(0.6, 0.4), end_thresholds=(0.8, 0.45))
    assert taxonomy.confident_depth(path, 0.8) == 3  # a1 goes on: 0.7 < 0.8 does not stop it
    assert taxonomy.confident_depth(ends_at_a1, 0.8) == 1  # it stops at a1: 0.7 < 0.8
    stricter = Taxonomy(tree().roots, tree().terminals, thresholds=(0.6, 0.4), end_thresholds=(0.6, 0.55))
    assert stricter.confident_depth(path, 0.8) == 2 and stricter.confident_depth(ends_at_a1, 0.8) == 2
    never = Taxonomy(tree().roots, tree().terminals, thresholds=(0.6, 0.4), end_thresholds=(None, 0.0))
    assert never.confident_depth(ends_at_a1, 0.8) == 1 and never.confident_depth(path, 0.8) == 3
    assert never.confident_depth(path[:1], 0.8) == 1  # a path that ends at its root: the root's threshold


def test_end_thresholds_file_whole_paths_at_the_target_precision():
    """Per-level thresholds hold each level's precision down to it; where an answer stops can
    still be wrong. The end thresholds chosen on a split hold the precision of the paths filed to
    their end on it, which the per-level thresholds alone did not."""
    from marketplace_classifier.training.levels import SplitPaths, choose_end_thresholds, levels_figures

    generator = torch.Generator().manual_seed(0)
    taxonomy = Taxonomy(tree().roots, tree().terminals, thresholds=(0.0, 0.0))
    levels = torch.log_softmax(3 * torch.randn(600, len(taxonomy.terminals), generator=generator), 1)
    roots = torch.tensor([[0.98, 0.01, 0.01]]).repeat(600, 1)
    answers = taxonomy.decode(roots, levels)
    draws = torch.rand(600, generator=generator).tolist()
    # an answer is right about as often as its probability says, and a wrong one that stops at a1
    # went one level too shallow
    truths = [tuple(a.name for a in answer) if draw < answer[-1].probability
              else ("A", "a1", "x") if len(answer) == 2 and answer[1].name == "a1" else ("A", "a2")
              for answer, draw in zip(answers, draws, strict=True)]
    paths = SplitPaths(truths, roots, levels)
    before = levels_figures(taxonomy, paths, 0.5)["full_path"]
    assert before["filed_to_end_precision"] < 0.9
    ends = choose_end_thresholds(taxonomy, paths, 0.9)
    assert len(ends) == 2 and all(threshold is not None for threshold in ends)
    after = levels_figures(Taxonomy(taxonomy.roots, taxonomy.terminals, thresholds=(0.0, 0.0),
                                    end_thresholds=ends), paths, 0.5)["full_path"]
    assert after["filed_to_end_precision"] >= 0.9 and 0 < after["filed_to_end"] < before["filed_to_end"]


def test_the_tree_round_trips_through_preprocessing_json_and_an_old_export_answers_its_roots():
    taxonomy = Taxonomy(tree().roots, tree().terminals, temperatures=(1.2, 0.8), thresholds=(0.7, None),
                        end_thresholds=(0.9, None))
    saved = json.loads(json.dumps(taxonomy.to_json()))
    assert saved["rule"]["min_listings"] == 5 and "fewer training listings" in saved["rule"]["folding"]
    assert Taxonomy.from_json(ROOTS, saved) == taxonomy
    old = Taxonomy.from_json(ROOTS, None)
    (path,) = old.decode(torch.tensor([[0.2, 0.7, 0.1]]), None)
    assert [level.name for level in path] == ["B"] and old.confident_depth(path, 0.5) == 1


def test_a_truth_the_tree_never_saw_is_judged_not_crashed_on():
    from marketplace_classifier.training.levels import SplitPaths, levels_figures

    taxonomy = Taxonomy(tree().roots, tree().terminals, thresholds=(0.0, 0.0))
    levels = torch.stack([one_hot(taxonomy, "A / a1 / x"), one_hot(taxonomy, "A / a2")])
    paths = SplitPaths([("A", "a1", "x"), ("A", "unseen", "leaf")], torch.tensor([[0.9, 0.05, 0.05]] * 2),
                       levels)
    figures = levels_figures(taxonomy, paths, root_threshold=0.5)
    assert figures["levels"]["1"]["accuracy"] == 1.0 and figures["levels"]["2"]["accuracy"] == 0.5
    assert figures["full_path"]["accuracy"] == 0.5 and figures["listings"] == 2


def test_the_sample_data_has_a_three_level_tree_with_paths_that_stop_at_two_and_a_long_tail(tmp_path):
    import collections

    import pandas as pd

    from marketplace_classifier.training.sample import SampleConfig, generate

    generate(tmp_path / "raw", SampleConfig(products=600, seed=3))
    paths = pd.read_csv(tmp_path / "raw" / "Products.csv", lineterminator="\n")["category"].map(split_path)
    depths = collections.Counter(paths.map(len))
    assert set(depths) == {2, 3} and depths[2] > 0.2 * len(paths) and depths[3] > 0.3 * len(paths)
    leaves = collections.Counter(path for path in paths if len(path) == 3)
    assert max(leaves.values()) >= 3 * min(leaves.values())  # common leaves and rare ones
    assert len({path[:2] for path in paths}) == 39
