"""Word-level variants of the training queries, for distillation.

The student learns the teacher's soft targets on these variants (the KL term only, like the
transfer sentences), so it matches the teacher near each training query and not only on it.
Whether this helps a given student is measured, not assumed: the third round of the student
sweep in docs/benchmarks.md gives the CLINC150 figures.

Each variant deletes each word with probability ``edit_rate``, or else replaces it by a random
word of the training vocabulary with the same probability. With probability ``span_rate`` it
then keeps only a random run of consecutive words. A variant equal to its query, to another
variant, to a training query or to a held-out (validation or test) query is dropped, so no
held-out text reaches training.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

from export.dataset import normalize_text

EDIT_RATE = 0.15
SPAN_RATE = 0.25
# A span keeps at least this many words (or the whole query if it is shorter).
MIN_SPAN_WORDS = 2


def perturb(words: list[str], vocabulary: list[str], rng: random.Random,
            edit_rate: float = EDIT_RATE, span_rate: float = SPAN_RATE) -> list[str]:
    """Return one perturbed copy of ``words``; ``words`` itself is left unchanged."""
    changed = []
    for word in words:
        draw = rng.random()
        if draw < edit_rate:
            continue  # deleted
        if draw < 2 * edit_rate:
            changed.append(rng.choice(vocabulary))
        else:
            changed.append(word)
    if len(changed) > MIN_SPAN_WORDS and rng.random() < span_rate:
        length = rng.randint(MIN_SPAN_WORDS, len(changed) - 1)
        start = rng.randint(0, len(changed) - length)
        changed = changed[start:start + length]
    return changed


def augment_texts(texts: list[str], copies: int, seed: int,
                  held_out: Iterable[str] = ()) -> list[str]:
    """Return up to ``copies`` distinct variants of each text, in order of ``texts``.

    Fewer come back for a text whose variants repeat (a one-word query has few). The same
    ``seed`` gives the same list.
    """
    if copies <= 0:
        return []
    rng = random.Random(seed)
    vocabulary = sorted({word for text in texts for word in text.split()})
    if not vocabulary:
        return []
    seen = {normalize_text(text) for text in texts}
    seen.update(normalize_text(text) for text in held_out)
    variants = []
    for text in texts:
        words = text.split()
        made_for_text = 0
        # Three tries per copy, because short queries often give back a seen text.
        for _ in range(3 * copies):
            if made_for_text == copies:
                break
            variant = " ".join(perturb(words, vocabulary, rng))
            key = normalize_text(variant)
            if variant and key not in seen:
                seen.add(key)
                variants.append(variant)
                made_for_text += 1
    return variants
