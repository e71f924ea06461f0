"""The two demo prompts: a secret word hidden in a haystack, and a codename in a structured log."""

from __future__ import annotations

import random

from pydantic import BaseModel, Field

FILLER_WORDS = ("apple", "river", "stone", "cloud", "maple", "tiger", "ocean", "piano", "candle", "forest",
                "silver", "garden", "window", "rocket", "meadow", "violin", "harbor", "lantern")
SECRET_WORDS = ("pumpkin", "walrus", "saffron", "glacier", "mosaic", "thunder", "origami", "cactus")
HAYSTACK_LINES = 40
AGENTS = (("James", "Falcon"), ("Sarah", "Whisper"), ("Mike", "Hammer"), ("Omega", "Phantom"),
          ("Linda", "Spark"), ("Robert", "Echo"))


class Demo(BaseModel):
    """One demo: the user message, the prompt word whose attention is marked, the expected answer."""

    name: str
    title: str
    prompt: str = Field(description="The user message.")
    target: str = Field(description="Prompt word the answer must come from; its tokens are marked ◀.")
    expected: str = Field(description="What a correct answer contains.")


def needle(seed: int = 0) -> Demo:
    """``key-N: word`` lines with ``The secret word is X.`` at a random depth, then the question."""
    rng = random.Random(seed)
    secret = rng.choice(SECRET_WORDS)
    lines = [f"key-{i}: {rng.choice(FILLER_WORDS)}" for i in range(HAYSTACK_LINES)]
    depth = rng.randrange(HAYSTACK_LINES + 1)
    lines.insert(depth, f"The secret word is {secret}.")
    prompt = "\n".join(lines) + "\n\nWhat is the secret word?"
    return Demo(name="needle", title=f"Needle in a haystack (secret at line {depth + 1} of {HAYSTACK_LINES + 1})",
                prompt=prompt, target=secret, expected=secret)


def codename() -> Demo:
    """A security log of agents and their codenames, and a request for one agent's codename.

    The entries are sentences: SmolLM2-135M cannot look a value up from ``key: value``
    pairs, but retrieves from statements (right here for agent Sarah; it misses some others).
    """
    entries = "".join(f"[Entry {i:02d}] The codename of agent {agent} is {code}.\n"
                      for i, (agent, code) in enumerate(AGENTS, start=1))
    prompt = f"Security log:\n{entries}\nWhat is the codename of agent Sarah?"
    return Demo(name="codename", title="Codename retrieval (agent Sarah, entry 02 of 06)",
                prompt=prompt, target="Whisper", expected="Whisper")


DEMO_NAMES = ("needle", "codename")


def build(name: str, seed: int = 0) -> Demo:
    """The demo called ``name`` (one of ``DEMO_NAMES``); ``seed`` places the needle."""
    if name == "needle":
        return needle(seed)
    if name == "codename":
        return codename()
    raise ValueError(f"unknown demo {name!r}; choose one of {', '.join(DEMO_NAMES)}")
