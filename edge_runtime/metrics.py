"""Accuracy figures shared by the build report and ``edge-runtime eval``."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edge_runtime.data import OOS_LABEL


def accuracy_figures(predicted: Sequence[str], expected: Sequence[str],
                     oos_label: str = OOS_LABEL) -> dict[str, float | None]:
    """Overall accuracy, accuracy on in-scope queries, and recall of the out-of-scope label
    (None when the split has no out-of-scope queries)."""
    if len(predicted) != len(expected):
        raise ValueError(f"{len(predicted)} predictions for {len(expected)} expected labels")
    predicted_array = np.asarray(predicted, dtype=object)
    expected_array = np.asarray(expected, dtype=object)
    correct = predicted_array == expected_array
    out_of_scope = expected_array == oos_label
    in_scope = ~out_of_scope
    return {
        "accuracy": float(correct.mean()) if len(correct) else None,
        "in_scope_accuracy": float(correct[in_scope].mean()) if in_scope.any() else None,
        "oos_recall": float(correct[out_of_scope].mean()) if out_of_scope.any() else None,
    }


def percentile_ms(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile of a list of milliseconds, or None for an empty list."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else None
