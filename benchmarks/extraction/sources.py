"""Query sources of the simulated attackers, and the tool lists of tool-calling clients.

Every source returns at most ``count`` query texts in a fixed order for a given seed:

- ``wiki``: sentences of general English from a text file, one sentence a line.
- ``banking77``: the Banking77 training queries, a neighbouring domain (bank support).
- ``templated``: in-domain queries from a few fixed frames whose slots are filled with
  content words of the CLINC150 training queries, as a scripted attacker would write them.

``domain_tools`` turns the CLINC150 intents into OpenAI tools, one per intent and one list per
CLINC150 domain (15 tools, within the gateway's default ``max_tools`` of 16).
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

from edge_runtime.data import Example, load_split

SOURCES = ("wiki", "banking77", "templated")

# Frames of requests to an assistant. Each "{}" is a slot for one content word.
TEMPLATES = (
    "can you {} my {}",
    "how do i {} the {}",
    "what is my {} {}",
    "i need to {} my {} today",
    "please {} the {} for me",
    "tell me the {} of my {}",
    "is there a {} for {}",
    "how much {} is on my {}",
    "set a {} for my {}",
    "why is my {} {}",
    "where can i {} a {}",
    "what {} should i {} for {}",
)

# Words that carry no topic, left out of the slot vocabulary.
STOP_WORDS = frozenset(
    "a an the i me my you your is are was be to of in on for and or with what how why where "
    "when can do does did it this that there please tell need want would could should will "
    "have has at from by about if so not".split()
)
_WORD = re.compile(r"[a-z]+")


def load_wiki(path: Path, count: int, seed: int) -> list[str]:
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    sentences = [line for line in lines if len(line.split()) >= 3]
    random.Random(seed).shuffle(sentences)
    return sentences[:count]


def load_banking77(folder: Path, count: int, seed: int) -> list[str]:
    texts = [example.text for example in load_split(folder, "train")]
    random.Random(seed).shuffle(texts)
    return texts[:count]


def slot_vocabulary(train: list[Example], min_count: int = 3) -> list[str]:
    """Return the content words seen at least ``min_count`` times in ``train``, sorted."""
    counts = Counter(
        word for example in train for word in _WORD.findall(example.text.lower())
        if word not in STOP_WORDS and len(word) > 2
    )
    return sorted(word for word, seen in counts.items() if seen >= min_count)


def make_templated(train: list[Example], count: int, seed: int) -> list[str]:
    """Fill the templates with random slot words until ``count`` distinct queries exist."""
    vocabulary = slot_vocabulary(train)
    rng = random.Random(seed)
    queries: dict[str, None] = {}
    attempts = 0
    while len(queries) < count and attempts < 20 * count:
        attempts += 1
        template = rng.choice(TEMPLATES)
        words = [rng.choice(vocabulary) for _ in range(template.count("{}"))]
        queries[template.format(*words)] = None
    return list(queries)


def load_source(name: str, count: int, seed: int, data_root: Path,
                clinc_train: list[Example]) -> list[str]:
    """Return ``count`` queries of source ``name`` (fewer when the source has fewer)."""
    if name == "wiki":
        return load_wiki(data_root / "wiki_sentences" / "all_wiki_sents.txt", count, seed)
    if name == "banking77":
        return load_banking77(data_root / "banking77", count, seed)
    if name == "templated":
        return make_templated(clinc_train, count, seed)
    raise ValueError(f"unknown query source {name!r}; expected one of {', '.join(SOURCES)}")


def intent_tool(label: str) -> dict:
    """Return an OpenAI tool named after a CLINC150 intent, without parameters."""
    words = label.replace("_", " ")
    return {"type": "function", "function": {
        "name": label,
        "description": f"Handle {words} requests",
        "parameters": {"type": "object", "properties": {}},
    }}


def domain_tools(clinc_folder: Path) -> dict[str, list[dict]]:
    """Return the intent tools of each CLINC150 domain, from ``domains.json``."""
    domains = json.loads((clinc_folder / "domains.json").read_text(encoding="utf-8"))
    return {domain: [intent_tool(label) for label in labels]
            for domain, labels in domains.items()}
