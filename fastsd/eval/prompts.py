"""The DreamBooth paper's evaluation prompts (Ruiz et al. 2023, dataset/prompts_and_classes.txt).

25 prompts for objects and 25 for live subjects (the dataset's dogs and cats), written with the
instance token and the class word: ``a sks dog in the jungle``. CLIP-T scores each image against
its prompt without the token (``a dog in the jungle``): the token means nothing to CLIP, so only
the prompt's content is measured, as in the paper's evaluation code.
"""

from __future__ import annotations

_SHARED_HEAD = (
    "a {} in the jungle",
    "a {} in the snow",
    "a {} on the beach",
    "a {} on a cobblestone street",
    "a {} on top of pink fabric",
    "a {} on top of a wooden floor",
    "a {} with a city in the background",
    "a {} with a mountain in the background",
    "a {} with a blue house in the background",
    "a {} on top of a purple rug in a forest",
)
_SHARED_TAIL = ("a red {}", "a purple {}", "a shiny {}", "a wet {}", "a cube shaped {}")

OBJECT_PROMPTS: tuple[str, ...] = (
    *_SHARED_HEAD,
    "a {} with a wheat field in the background",
    "a {} with a tree and autumn leaves in the background",
    "a {} with the Eiffel Tower in the background",
    "a {} floating on top of water",
    "a {} floating in an ocean of milk",
    "a {} on top of green grass with sunflowers around it",
    "a {} on top of a mirror",
    "a {} on top of the sidewalk in a crowded street",
    "a {} on top of a dirt road",
    "a {} on top of a white rug",
    *_SHARED_TAIL,
)

LIVE_PROMPTS: tuple[str, ...] = (
    *_SHARED_HEAD,
    "a {} wearing a red hat",
    "a {} wearing a santa hat",
    "a {} wearing a rainbow scarf",
    "a {} wearing a black top hat and a monocle",
    "a {} in a chef outfit",
    "a {} in a firefighter outfit",
    "a {} in a police outfit",
    "a {} wearing pink glasses",
    "a {} wearing a yellow shirt",
    "a {} in a purple wizard outfit",
    *_SHARED_TAIL,
)

#: Class words that get the live-subject prompts (outfits and hats instead of floating and mirrors).
LIVE_CLASSES = frozenset(
    [
        "dog",
        "puppy",
        "cat",
        "kitten",
        "person",
        "man",
        "woman",
        "boy",
        "girl",
        "child",
        "baby",
        "kid",
        "face",
        "people",
        "human",
        "bird",
        "parrot",
        "horse",
        "rabbit",
        "bunny",
        "hamster",
        "animal",
        "pet",
        "teddy",
        "monkey",
        "fox",
        "bear",
        "lion",
        "tiger",
    ]
)


def is_live(class_word: str) -> bool:
    """True for classes the paper treats as live subjects."""
    return any(w in LIVE_CLASSES for w in class_word.lower().split())


def eval_prompts(token: str, class_word: str, limit: int | None = None) -> list[tuple[str, str]]:
    """``(generation prompt, CLIP-T prompt)`` pairs for the subject: with the token, and without it."""
    templates = LIVE_PROMPTS if is_live(class_word) else OBJECT_PROMPTS
    pairs = [(t.format(f"{token} {class_word}".strip()), t.format(class_word)) for t in templates]
    return pairs[:limit] if limit else pairs


def class_prompt(class_word: str) -> str:
    """The prompt PRES and DIV generate with: the class alone, as prior preservation trains it."""
    return f"a {class_word}"
