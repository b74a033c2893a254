"""batchup 0.2.3's samplers (drop-in), driven by the same plans the server runs.

Passed as ``sampler=`` to a source, a sampler is sent to the server as a description
(kind, repeats, indices/weights arrays) and run there; its own iterator methods run the
identical plan in process, for scripts that call them directly.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from batchup_protocol.plan import SequencePlan, WeightedPlan, check_repeats

__all__ = [
    "AbstractSampler",
    "StandardSampler",
    "SubsetSampler",
    "WeightedSampler",
    "WeightedSubsetSampler",
    "num_batches",
]


def num_batches(n: int, batch_size: int) -> int:
    """Number of mini-batches of ``batch_size`` needed for ``n`` samples (last one short)."""
    b = n // batch_size
    if n % batch_size > 0:
        b += 1
    return b


def _drain(plan: SequencePlan | WeightedPlan) -> Iterator[np.ndarray[Any, Any]]:
    while True:
        batch = plan.next()
        if batch is None:
            return
        yield batch


class AbstractSampler:
    """Base class: generates mini-batches of indices."""

    def num_indices_generated(self) -> Any:
        raise NotImplementedError

    def map_indices(self, indices: Any) -> Any:
        return indices

    def in_order_indices_batch_iterator(self, batch_size: int) -> Iterator[Any]:
        raise NotImplementedError(f"Abstract for type {type(self)}")

    def shuffled_indices_batch_iterator(self, batch_size: int, shuffle_rng: Any) -> Iterator[Any]:
        raise NotImplementedError(f"Abstract for type {type(self)}")


class StandardSampler(AbstractSampler):
    """Every sample of ``range(length)``, ``repeats`` times (-1: forever)."""

    def __init__(self, length: int, repeats: int = 1):
        check_repeats(repeats)
        self.length = length
        self.repeats = repeats

    def num_indices_generated(self) -> Any:
        return np.inf if self.repeats == -1 else self.length * self.repeats

    def in_order_indices_batch_iterator(self, batch_size: int) -> Iterator[Any]:
        yield from _drain(SequencePlan(self.length, batch_size, self.repeats))

    def shuffled_indices_batch_iterator(self, batch_size: int, shuffle_rng: Any) -> Iterator[Any]:
        yield from _drain(SequencePlan(self.length, batch_size, self.repeats, rng=shuffle_rng))


class SubsetSampler(AbstractSampler):
    """The samples named by ``indices``, ``repeats`` times (-1: forever)."""

    def __init__(self, indices: Any, repeats: int = 1):
        check_repeats(repeats)
        self.indices = indices
        self.length = len(self.indices)
        self.repeats = repeats

    def num_indices_generated(self) -> Any:
        return np.inf if self.repeats == -1 else self.length * self.repeats

    def map_indices(self, indices: Any) -> Any:
        return self.indices[indices]

    def in_order_indices_batch_iterator(self, batch_size: int) -> Iterator[Any]:
        yield from _drain(SequencePlan(0, batch_size, self.repeats, self.indices))

    def shuffled_indices_batch_iterator(self, batch_size: int, shuffle_rng: Any) -> Iterator[Any]:
        yield from _drain(SequencePlan(0, batch_size, self.repeats, self.indices, shuffle_rng))


class WeightedSampler(AbstractSampler):
    """Samples drawn with replacement with probability proportional to ``weights``."""

    def __init__(self, weights: np.ndarray[Any, Any]):
        weights = weights.astype(float)
        weight_sum = weights.sum()
        if weight_sum == 0.0:
            raise ValueError("weights should not sum to 0")
        self.weights = weights / weight_sum
        self.length = len(self.weights)

    def num_indices_generated(self) -> Any:
        return np.inf

    def in_order_indices_batch_iterator(self, batch_size: int) -> Iterator[Any]:
        raise NotImplementedError("In-order sampling not supported by WeightedSampler")

    def shuffled_indices_batch_iterator(self, batch_size: int, shuffle_rng: Any) -> Iterator[Any]:
        yield from _drain(WeightedPlan(self.weights, batch_size, shuffle_rng))

    @staticmethod
    def class_balancing_sample_weights(y: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        """Per-sample weights ``1 / (count(class) * n_classes_present)``."""
        h = np.bincount(y)
        with np.errstate(divide="ignore"):
            cls_weight = 1.0 / (h.astype(float) * len(np.nonzero(h)[0]))
        cls_weight[~np.isfinite(cls_weight)] = 0.0
        return cls_weight[y]  # type: ignore[no-any-return]

    @staticmethod
    def class_balancing_sampler(y: np.ndarray[Any, Any]) -> WeightedSampler:
        return WeightedSampler(WeightedSampler.class_balancing_sample_weights(y))


class WeightedSubsetSampler(AbstractSampler):
    """Samples of ``indices`` drawn with replacement, weighted by ``sub_weights``."""

    def __init__(self, sub_weights: np.ndarray[Any, Any], indices: np.ndarray[Any, Any]):
        if len(sub_weights) != len(indices):
            raise ValueError(
                f"sub_weights and indices should have the same length; {len(sub_weights)} != {len(indices)}"
            )
        sub_weights_sum = sub_weights.sum()
        if sub_weights_sum == 0.0:
            raise ValueError("sub_weights should not sum to 0")
        self.sub_weights = sub_weights / sub_weights_sum
        self.indices = indices
        self.length = len(self.indices)

    def num_indices_generated(self) -> Any:
        return np.inf

    def map_indices(self, indices: Any) -> Any:
        return self.indices[indices]

    def in_order_indices_batch_iterator(self, batch_size: int) -> Iterator[Any]:
        raise NotImplementedError("In-order sampling not supported by WeightedSubsetSampler")

    def shuffled_indices_batch_iterator(self, batch_size: int, shuffle_rng: Any) -> Iterator[Any]:
        plan = WeightedPlan(self.sub_weights, batch_size, shuffle_rng, self.indices, "WeightedSubsetSampler")
        yield from _drain(plan)

    @staticmethod
    def class_balancing_sampler(
        y: np.ndarray[Any, Any], indices: np.ndarray[Any, Any]
    ) -> WeightedSubsetSampler:
        weights = WeightedSampler.class_balancing_sample_weights(y[indices])
        return WeightedSubsetSampler(weights, indices=indices)
