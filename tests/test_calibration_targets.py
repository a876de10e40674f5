"""export.calibrate.choose_threshold with a disagreement budget over all queries
(``over="all"``), which the retraining loop's threshold sweep compares with the build's target
over local answers."""

from __future__ import annotations

import numpy as np
import pytest

from edge_runtime.errors import ConfigError
from export.calibrate import choose_threshold

# Ten queries, most confident first. The student disagrees with the teacher on the 3rd and 7th.
CONFIDENCE = np.array([0.99, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3])
AGREES = np.array([True, True, False, True, True, True, False, True, True, True])


@pytest.mark.parametrize(
    ("budget", "expected"),
    [
        (0.0, 0.95),  # no disagreement allowed: stop before the 3rd query
        (0.1, 0.7),  # one disagreement in ten queries: stop before the 7th
        (0.2, 0.3),  # two disagreements: every query is local
    ],
)
def test_budget_over_all_queries(budget: float, expected: float):
    assert choose_threshold(CONFIDENCE, AGREES, budget, over="all") == expected


def test_same_target_both_bases():
    # At 0.7 the local set contains 1 disagreement in 6 answers: 16.7% of the local answers but
    # 10% of all ten queries. So a 0.1 target stops earlier over local answers.
    assert choose_threshold(CONFIDENCE, AGREES, 0.1) == 0.95
    assert choose_threshold(CONFIDENCE, AGREES, 0.1, over="all") == 0.7


def test_budget_none_met_turns_local_off():
    agrees = np.array([False, True, True])

    assert choose_threshold(np.array([0.9, 0.8, 0.7]), agrees, 0.2, over="all") == 1.0


def test_local_is_default():
    for target in (0.05, 0.15, 0.25, 0.35):
        assert choose_threshold(CONFIDENCE, AGREES, target) == choose_threshold(
            CONFIDENCE, AGREES, target, over="local"
        )


def test_unknown_base_rejected():
    with pytest.raises(ConfigError, match="'overall'"):
        choose_threshold(CONFIDENCE, AGREES, 0.1, over="overall")
