"""The work a request may cost, checked before the work is done.

Byte and pixel caps alone admit requests that cost minutes: a 3 KB request of fifty 50-megapixel
WebPs, a 300 KB progressive JPEG that repeats one scan thousands of times, or 320 ordinary photos.
So each request, and each batch a worker runs, has a budget of photos (model rows) and of
decoded pixels, and each JPEG a cap on its scans; all are read from the photos' headers before
any photo is decoded. The defaults keep the largest admitted batch well inside the 60 s response
timeout on one core (`python -m marketplace_classifier.benchmarks.budget_bench`; docs/benchmark.md).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from marketplace_classifier.serving.processing import BatchBudgetSpent, OverBudget


@dataclass(frozen=True)
class WorkBudget:
    photos_per_request: int = 32
    pixels_per_request: int = 100_000_000
    photos_per_batch: int = 64
    pixels_per_batch: int = 200_000_000
    scans_per_photo: int = 32

    def __post_init__(self) -> None:
        for option in fields(self):
            if not isinstance(getattr(self, option.name), int) or getattr(self, option.name) < 1:
                raise ValueError(f"work budget {option.name} must be a positive integer")
        if self.photos_per_batch < self.photos_per_request or self.pixels_per_batch < self.pixels_per_request:
            raise ValueError("a batch's work budget must admit at least one request's")

    @classmethod
    def from_options(cls, options: dict) -> WorkBudget:
        """The handler options of an archive's model-config.yaml (`handler:`), e.g.
        `photos_per_request: 16`; missing ones keep their defaults."""
        return cls(**{option.name: int(options[option.name]) for option in fields(cls)
                      if option.name in options})


@dataclass(frozen=True)
class Cost:
    """The work one request asks for: photos through the model and pixels decoded."""

    photos: int = 0
    pixels: int = 0

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.photos + other.photos, self.pixels + other.pixels)


def check_request(cost: Cost, budget: WorkBudget) -> None:
    """Refuse (413) a request that asks for more than one request may."""
    if cost.photos > budget.photos_per_request:
        raise OverBudget(f"{cost.photos} photos in one request; the work budget is "
                         f"{budget.photos_per_request} photos per request (split it)")
    if cost.pixels > budget.pixels_per_request:
        raise OverBudget(f"{cost.pixels / 1e6:.1f} million pixels to decode in one request; the work "
                         f"budget is {budget.pixels_per_request / 1e6:.0f} million per request "
                         "(send smaller photos, or fewer in one request)")


def admit(costs: list[Cost], budget: WorkBudget) -> list[bool]:
    """Which requests of a batch run: the cheapest first, while the batch stays within its
    budget, so that ordinary requests are never held back by a heavy batch-mate."""
    admitted, total = [False] * len(costs), Cost()
    for index in sorted(range(len(costs)), key=lambda i: (costs[i].photos, costs[i].pixels)):
        after = total + costs[index]
        if after.photos <= budget.photos_per_batch and after.pixels <= budget.pixels_per_batch:
            admitted[index], total = True, after
    return admitted


def batch_full(cost: Cost, budget: WorkBudget) -> BatchBudgetSpent:
    return BatchBudgetSpent(f"this request ({cost.photos} photos, {cost.pixels / 1e6:.1f} million pixels) "
                            f"did not fit beside the rest of its batch (budget {budget.photos_per_batch} "
                            f"photos, {budget.pixels_per_batch / 1e6:.0f} million pixels); retry it")
