"""The category tree a model answers in: its roots (the label decoder's classes), the deeper
categories it learned, and how an answer is decoded into a path.

A listing's category is a path (`Home & Garden / Garden & Patio / Sheds`). Training learns the
tree from the training split's paths: each path is cut at `max_depth` levels, and a category
with fewer than `min_listings` training listings folds into its parent (its listings are filed
under the parent), so every class has enough examples. Roots never fold. The model answers the
root with its root head, as before, and the deeper levels with one more head over the
*terminals*: every folded path of two levels or more (a path may end at level 2 while its
siblings go on).

Decoding walks the tree: the root with the highest probability, then among that root's
children the one with the most probability mass (the sum over the terminals below it), then,
below that, its children or stopping where it is (when it is a terminal itself), and so on. The
answer is therefore always a path of the tree. Each level's conditional choice has its own
temperature, fitted on validation listings; a level's probability is the product of the
choices down to it, so it never grows with depth. `confident_depth` is the deepest level whose
probability reaches that level's review threshold (chosen on validation for a target precision),
every level above it reaching its own. A path's last level must also reach its *end* threshold:
an answer that stops at a level is right only when the listing's path stops there too, so the
answers filed to their end meet the precision target for the whole path, not only down to it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

SEPARATOR = " / "
DEFAULT_MAX_DEPTH = 3
DEFAULT_MIN_LISTINGS = 5
STOP = -1  # a choice at some level: the path ends at its parent


def split_path(path: str) -> tuple[str, ...]:
    """`A / B / C` -> ("A", "B", "C"), each part stripped; empty parts dropped."""
    return tuple(part.strip() for part in str(path).split(SEPARATOR.strip()) if part.strip())


def join_path(parts: Sequence[str]) -> str:
    return SEPARATOR.join(parts)


@dataclass(frozen=True)
class Level:
    """One level of a decoded answer."""

    name: str  # the category's own name at this level
    probability: float  # of the path down to here

    def to_json(self) -> dict:
        return {"name": self.name, "probability": self.probability}


@dataclass(frozen=True)
class Taxonomy:
    """Roots (index order of the root head) and terminals (index order of the levels head)."""

    roots: tuple[str, ...]
    terminals: tuple[tuple[str, ...], ...] = ()
    max_depth: int = DEFAULT_MAX_DEPTH
    min_listings: int = DEFAULT_MIN_LISTINGS
    temperatures: tuple[float, ...] = ()  # levels 2, 3, ...: the levels head's, per level
    thresholds: tuple[float | None, ...] = ()  # levels 2, 3, ...: the review threshold per level
    end_thresholds: tuple[float | None, ...] = ()  # levels 2, 3, ...: for a path that ends there
    _children: dict = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.max_depth < 1 or self.min_listings < 1:
            raise ValueError("max_depth and min_listings must be at least 1")
        for terminal in self.terminals:
            if not 2 <= len(terminal) <= self.max_depth or terminal[0] not in self.roots:
                raise ValueError(f"terminal {join_path(terminal)!r} is not below a root within "
                                 f"{self.max_depth} levels")
        object.__setattr__(self, "_children", self._index_children())

    # ------------------------------------------------------------ learning the tree
    @classmethod
    def learn(cls, paths: Iterable[str], roots: Sequence[str], max_depth: int = DEFAULT_MAX_DEPTH,
              min_listings: int = DEFAULT_MIN_LISTINGS) -> Taxonomy:
        """The tree of the training listings' `paths`: cut at `max_depth`, rare categories folded
        into their parents."""
        cut = [split_path(path)[:max_depth] for path in paths]
        counts = Counter(prefix for parts in cut for depth in range(2, len(parts) + 1)
                         for prefix in [parts[:depth]])
        kept = {_fold(parts, counts, min_listings) for parts in cut if parts and parts[0] in roots}
        terminals = tuple(sorted(parts for parts in kept if len(parts) >= 2))
        return cls(tuple(roots), terminals, max_depth, min_listings)

    def fold(self, path: str | Sequence[str]) -> tuple[str, ...]:
        """A path as this tree files it: cut at max_depth, then its deepest prefix the tree
        knows (a path the tree never saw ends at its deepest known ancestor; an unknown root is
        the empty path)."""
        parts = tuple(split_path(path) if isinstance(path, str) else path)[:self.max_depth]
        if not parts or parts[0] not in self.roots:
            return ()
        depth = 1
        while depth < len(parts) and parts[:depth + 1] in self._children["nodes"]:
            depth += 1
        return parts[:depth]

    def terminal_index(self, path: str | Sequence[str]) -> int:
        """The levels head's class of a path (folded), or STOP when it ends at its root."""
        return self._children["terminal"].get(self.fold(path), STOP)

    # ------------------------------------------------------------ the tree's shape
    def _index_children(self) -> dict:
        nodes: set[tuple[str, ...]] = set()
        below: dict[tuple[str, ...], list[int]] = {}  # a node -> the terminals at or below it
        for index, terminal in enumerate(self.terminals):
            for depth in range(2, len(terminal) + 1):
                nodes.add(terminal[:depth])
                below.setdefault(terminal[:depth], []).append(index)
        children: dict[tuple[str, ...], list[tuple[str, ...]]] = {}
        for node in sorted(nodes):
            children.setdefault(node[:-1], []).append(node)
        return {"nodes": nodes, "below": below, "children": children,
                "terminal": {terminal: index for index, terminal in enumerate(self.terminals)}}

    def children(self, node: tuple[str, ...]) -> list[tuple[str, ...]]:
        return self._children["children"].get(tuple(node), [])

    def is_terminal(self, node: tuple[str, ...]) -> bool:
        return tuple(node) in self._children["terminal"]

    def terminals_below(self, node: tuple[str, ...]) -> list[int]:
        return self._children["below"].get(tuple(node), [])

    @property
    def depth(self) -> int:
        """The deepest level of the tree."""
        return max((len(terminal) for terminal in self.terminals), default=1)

    def choices(self, parent: tuple[str, ...]) -> list[tuple[str, ...] | int]:
        """What can follow `parent`: its children, and STOP when the path may end there (a
        terminal of two levels or more that has children)."""
        options: list = list(self.children(parent))
        if options and len(parent) >= 2 and self.is_terminal(parent):
            options.append(STOP)
        return options

    def choice_masses(self, parent: tuple[str, ...], probabilities: torch.Tensor
                      ) -> tuple[list, torch.Tensor]:
        """The choices after `parent` and their share of the probability mass below it, from one
        listing's levels-head `probabilities` [K]."""
        options = self.choices(parent)
        masses = torch.stack([probabilities[self._children["terminal"][parent]] if option == STOP
                              else probabilities[self.terminals_below(option)].sum() for option in options])
        return options, masses / masses.sum().clamp(min=1e-12)

    # ------------------------------------------------------------ decoding
    def decode(self, root_probabilities: torch.Tensor, levels_log_probabilities: torch.Tensor | None
               ) -> list[list[Level]]:
        """Paths for a batch: `root_probabilities` [N, roots] (calibrated), and the levels head's
        pooled log-probabilities [N, terminals] (None: roots only)."""
        paths = []
        for row, root_row in enumerate(root_probabilities):
            root = int(root_row.argmax())
            path = [Level(self.roots[root], float(root_row[root]))]
            if levels_log_probabilities is not None and self.terminals:
                path += self._descend((self.roots[root],), path[0].probability, levels_log_probabilities[row])
            paths.append(path)
        return paths

    def _descend(self, node: tuple[str, ...], probability: float, log_probabilities: torch.Tensor
                 ) -> list[Level]:
        levels = []
        while len(node) < self.max_depth:
            options = self.choices(node)
            if not options:
                break
            options, shares = self.choice_masses(node, self.level_probabilities(log_probabilities,
                                                                                len(node) + 1))
            best = int(shares.argmax())
            if options[best] == STOP:
                break
            node, probability = options[best], probability * float(shares[best])
            levels.append(Level(node[-1], probability))
        return levels

    def level_probabilities(self, log_probabilities: torch.Tensor, level: int) -> torch.Tensor:
        """The levels head's pooled log-probabilities as probabilities, at `level`'s temperature."""
        index = level - 2
        temperature = self.temperatures[index] if index < len(self.temperatures) else 1.0
        return torch.softmax(log_probabilities.float() / temperature, dim=-1)

    def confident_depth(self, path: Sequence[Level], root_threshold: float | None) -> int:
        """How many levels of `path`, from the root, reach their review thresholds (0: not even
        the root; a level without a threshold never does). The path's last level below the root
        must reach its end threshold as well, when the export has one."""
        thresholds = (root_threshold, *self.thresholds)
        depth = 0
        for level, threshold in zip(path, thresholds, strict=False):
            if threshold is None or level.probability < threshold:
                break
            if depth + 1 == len(path) and not self.reaches_end(depth + 1, level.probability):
                break
            depth += 1
        return depth

    def reaches_end(self, level: int, probability: float) -> bool:
        """Whether a path that ends at `level` (2, 3, ...) is confident that it ends there (always,
        for the root or an export without end thresholds)."""
        index = level - 2
        if index < 0 or index >= len(self.end_thresholds):
            return True
        threshold = self.end_thresholds[index]
        return threshold is not None and probability >= threshold

    # ------------------------------------------------------------ preprocessing.json
    def to_json(self) -> dict:
        return {"rule": {"max_depth": self.max_depth, "min_listings": self.min_listings,
                         "folding": "a category with fewer training listings than min_listings is filed "
                                    "under its parent; paths are cut at max_depth levels"},
                "terminals": [join_path(terminal) for terminal in self.terminals],
                "temperatures": list(self.temperatures), "thresholds": list(self.thresholds),
                "end_thresholds": list(self.end_thresholds)}

    @classmethod
    def from_json(cls, roots: Sequence[str], saved: dict | None) -> Taxonomy:
        """The taxonomy of an export; one without (a root-only model) answers one-level paths."""
        if not saved:
            return cls(tuple(roots), max_depth=1)
        rule = saved.get("rule", {})
        return cls(tuple(roots), tuple(split_path(path) for path in saved.get("terminals", [])),
                   int(rule.get("max_depth", DEFAULT_MAX_DEPTH)),
                   int(rule.get("min_listings", DEFAULT_MIN_LISTINGS)),
                   tuple(float(t) for t in saved.get("temperatures", [])),
                   tuple(None if t is None else float(t) for t in saved.get("thresholds", [])),
                   tuple(None if t is None else float(t) for t in saved.get("end_thresholds", [])))


def _fold(parts: tuple[str, ...], counts: Counter, min_listings: int) -> tuple[str, ...]:
    depth = 1
    while depth < len(parts) and counts[parts[:depth + 1]] >= min_listings:
        depth += 1
    return parts[:depth]
