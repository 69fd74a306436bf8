"""Benchmark prompts: the seed's "Write a 1000-word story about a <animal>." or lines of a file.

Every request of a run gets a prompt no earlier request had (within a round *and* across warm-ups
and repeats), so a prefix cache cannot turn a later round into a cache hit that the first round
paid for. Prompts are drawn in a fixed order, so two servers in an A/B see the same sequence.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

ANIMALS = [
    "orange tabby cat", "arctic fox", "honeybee", "barn owl", "giant panda", "octopus", "red kangaroo",
    "emperor penguin", "axolotl", "peregrine falcon", "komodo dragon", "snow leopard", "bottlenose dolphin",
    "monarch butterfly", "harpy eagle", "platypus", "ape", "bobcat", "crocodile", "elephant", "gorilla", "hawk",
    "iguana", "jackal", "koala", "leopard", "marmot", "narwhal", "ocelot", "panther", "quokka", "raccoon",
    "sea otter", "tapir", "wombat", "yak", "zebra", "armadillo", "beaver", "chameleon", "dingo", "echidna",
    "flamingo", "gecko", "hedgehog", "ibis", "jaguar", "kingfisher", "lemur", "meerkat", "newt", "orca",
    "pangolin", "quail", "reindeer", "salamander", "toucan", "vulture", "walrus", "wolverine", "badger",
    "capybara", "dormouse", "ermine", "ferret", "gazelle", "hyena", "impala", "kiwi", "lynx", "mongoose",
    "nightingale", "okapi", "pelican", "puffin", "rhinoceros", "seahorse", "tortoise", "weasel", "bison",
]
# Past len(ANIMALS) requests, prompts continue as "<adjective> <animal>": 80 * 17 unique prompts.
ADJECTIVES = ["brave", "sleepy", "curious", "tiny", "ancient", "lonely", "clever", "clumsy", "gentle", "grumpy",
              "cheerful", "shy", "restless", "wise", "young", "stubborn"]

SHORT_TEMPLATE = "Name one fact about the {}."  # ttft: a prompt of ~10 tokens


def animal(i: int) -> str:
    """The i-th unique subject: the plain animals first, then adjective + animal."""
    if i < 0:
        raise ValueError(f"prompt index {i} is negative")
    k, j = divmod(i, len(ANIMALS))
    if k > len(ADJECTIVES):
        raise ValueError(f"prompt index {i}: only {len(ANIMALS) * (len(ADJECTIVES) + 1)} unique animal prompts")
    return ANIMALS[j] if k == 0 else f"{ADJECTIVES[k - 1]} {ANIMALS[j]}"


def story_prompt(i: int) -> str:
    subject = animal(i)
    article = "an" if subject[0] in "aeiou" else "a"
    return f"Write a 1000-word story about {article} {subject}."


def read_prompt_file(path: str | Path) -> list[str]:
    """One prompt per line, or JSONL objects with a "prompt" field; blank lines are skipped."""
    prompts = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e})") from e
            if not isinstance(obj.get("prompt"), str):
                raise ValueError(f"{path}:{n}: a JSON line needs a string field \"prompt\"")
            prompts.append(obj["prompt"])
        else:
            prompts.append(line)
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


class PromptSource:
    """Hands out prompts in a fixed order; ``take(n)`` never repeats one while any are left."""

    def __init__(self, spec: str = "animals", template: str | None = None):
        self.spec = spec
        self.template = template
        self.file_prompts = None if spec == "animals" else read_prompt_file(spec)
        self.next = 0
        self.warned = False

    def prompt(self, i: int) -> str:
        if self.file_prompts is None:
            return self.template.format(animal(i)) if self.template else story_prompt(i)
        if i >= len(self.file_prompts) and not self.warned:
            # Repeating a prompt is allowed (the user chose the file) but must not go unnoticed.
            logger.warning("%s has %d prompts; reusing them from request %d on (a prefix cache may hit)",
                           self.spec, len(self.file_prompts), i)
            self.warned = True
        return self.file_prompts[i % len(self.file_prompts)]

    def take(self, n: int) -> list[str]:
        out = [self.prompt(self.next + k) for k in range(n)]
        self.next += n
        return out

    def reset(self) -> None:
        """Start the sequence over (each A/B trial replays the same prompts on a fresh server)."""
        self.next = 0
