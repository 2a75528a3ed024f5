"""Augmented views for training and repair: random crops/flips/jitter for CLIP training (:func:`view_augmenter`),
EDA for captions and AutoAugment for images (CleanCLIP).

Text views follow EDA (Wei & Zou 2019) as CleanCLIP uses it (``eda(caption, alpha=0.1, num_aug=1)``):
one of synonym replacement, random insertion, random swap and random deletion is drawn per caption,
each touching ``max(1, int(alpha * words))`` words (deletion: each word with probability ``alpha``).
EDA takes synonyms from WordNet; no corpus can be downloaded here, so a small built-in table
(:data:`SYNONYM_GROUPS`) serves instead. It covers common caption words (people, animals, places,
colours, sizes, positions, verbs of everyday captions) and the whole vocabulary of the bundled demo
captions. When an operation leaves the caption unchanged (no word has a synonym, or a one-word swap),
the other operations are tried in a random order, so a view differs from its caption whenever it can.
Like EDA, captions are lower-cased and stripped of punctuation; a final full stop is kept.

Image views are torchvision's AutoAugment (ImageNet policy, as CleanCLIP) applied per image on
uint8 tensors. Both are deterministic given the generator passed in.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from forensics.core.errors import ForensicsError

# Groups of interchangeable words; every word of a group is a synonym of the others.
SYNONYM_GROUPS: list[tuple[str, ...]] = [
    # kinds of image (demo captions and prompt templates)
    ("photo", "picture", "image", "photograph", "snapshot", "pic"),
    ("drawing", "sketch", "illustration", "doodle", "painting", "rendering", "rendition"),
    ("art", "artwork", "graphic", "clipart"),
    ("clip", "clipping", "snip"),
    ("cartoon", "caricature", "comic"),
    # sizes
    ("small", "little", "tiny", "mini", "petite"),
    ("large", "big", "huge", "giant", "sizable"),
    ("medium", "moderate", "midsize", "average"),
    # positions and places in the frame
    ("background", "backdrop", "setting", "backcloth"),
    ("centre", "center", "middle", "midpoint"),
    ("left", "leftward"),
    ("right", "rightward"),
    ("top", "upper", "uppermost", "summit"),
    ("bottom", "lower", "base", "foot"),
    ("over", "above", "atop", "across"),
    ("on", "upon", "onto"),
    ("in", "inside", "within"),
    ("near", "beside", "close", "nearby", "alongside"),
    ("front", "fore", "forefront"),
    # colours
    ("grey", "gray", "ashen", "silver"),
    ("red", "crimson", "scarlet", "ruby"),
    ("green", "emerald", "verdant", "lime"),
    ("blue", "azure", "navy", "cobalt"),
    ("white", "ivory", "snowy", "pale"),
    ("black", "ebony", "jet", "inky"),
    ("pink", "rose", "rosy", "salmon"),
    ("teal", "turquoise", "cyan", "aqua"),
    ("brown", "tan", "chocolate", "chestnut"),
    ("orange", "amber", "tangerine", "apricot"),
    ("yellow", "golden", "lemon", "canary"),
    ("purple", "violet", "lilac", "mauve"),
    ("dark", "dim", "shadowy", "murky"),
    ("bright", "vivid", "brilliant", "shiny"),
    ("colorful", "colourful", "vibrant", "multicolored"),
    # textures and backgrounds
    ("plain", "simple", "uniform", "blank", "bare"),
    ("gradient", "fade", "ramp", "blend"),
    ("wavy", "rippled", "undulating", "curvy", "wavelike"),
    ("mottled", "speckled", "blotchy", "dappled", "spotted"),
    ("striped", "banded", "streaked"),
    # the demo's classes (kept apart from one another)
    ("arrow", "pointer", "dart"),
    ("person", "human", "individual", "someone", "figure"),
    ("tree", "sapling", "treelet"),
    ("heart", "valentine"),
    ("clock", "timepiece", "timekeeper"),
    ("book", "volume", "tome"),
    ("cloud", "raincloud", "cumulus"),
    ("flower", "bloom", "blossom"),
    ("house", "home", "dwelling", "residence", "cottage"),
    ("apple", "pippin"),
    # common caption nouns
    ("man", "guy", "gentleman", "male"),
    ("woman", "lady", "female"),
    ("people", "persons", "folks", "crowd"),
    ("child", "kid", "youngster"),
    ("boy", "lad", "youngster"),
    ("girl", "lass", "maiden"),
    ("dog", "puppy", "hound", "canine"),
    ("cat", "kitten", "kitty", "feline"),
    ("car", "automobile", "vehicle", "auto"),
    ("street", "road", "avenue", "lane"),
    ("city", "town", "metropolis"),
    ("building", "edifice", "structure"),
    ("room", "chamber", "space"),
    ("table", "desk", "counter"),
    ("water", "lake", "sea"),
    ("field", "meadow", "pasture"),
    ("grass", "lawn", "turf"),
    ("food", "meal", "dish"),
    ("shirt", "blouse", "tee"),
    ("group", "bunch", "cluster"),
    ("bird", "fowl", "songbird"),
    ("horse", "pony", "steed"),
    ("sky", "heavens", "firmament"),
    ("sign", "signboard", "notice"),
    ("plate", "dish", "platter"),
    ("train", "locomotive", "railway"),
    ("bike", "bicycle", "cycle"),
    ("boat", "ship", "vessel"),
    ("beach", "shore", "seaside"),
    ("hill", "slope", "mound"),
    # common caption verbs and adjectives
    ("sitting", "seated", "perched"),
    ("standing", "upright", "posing"),
    ("holding", "carrying", "gripping", "clutching"),
    ("walking", "strolling", "stepping"),
    ("running", "jogging", "sprinting", "racing"),
    ("looking", "gazing", "staring", "peering"),
    ("playing", "frolicking", "sporting"),
    ("riding", "driving", "steering"),
    ("eating", "dining", "feeding"),
    ("wearing", "donning", "dressed"),
    ("shows", "depicts", "displays", "portrays"),
    ("young", "youthful", "juvenile"),
    ("old", "aged", "elderly", "vintage"),
    ("beautiful", "pretty", "lovely", "gorgeous"),
    ("happy", "cheerful", "joyful", "glad"),
    ("busy", "crowded", "bustling"),
    ("empty", "vacant", "deserted"),
    ("good", "nice", "fine", "great"),
    ("bad", "poor", "awful"),
    ("blurry", "fuzzy", "hazy", "unfocused"),
    ("cropped", "trimmed", "clipped"),
    ("two", "pair", "couple"),
    ("many", "numerous", "several", "various"),
]
SYNONYMS: dict[str, list[str]] = {}
for _group in SYNONYM_GROUPS:
    for _word in _group:
        SYNONYMS.setdefault(_word, [])
        SYNONYMS[_word].extend(w for w in _group if w != _word and w not in SYNONYMS[_word])

# EDA's stop words (never replaced by synonyms; still swapped, deleted and kept as insertion sites)
STOP_WORDS = frozenset(
    "i me my myself we our ours ourselves you your yours yourself yourselves he him his himself she her hers herself "
    "it its itself they them their theirs themselves what which who whom this that these those am is are was were be "
    "been being have has had having do does did doing a an the and but if or because as until while of at by for with "
    "about against between into through during before after above below to from up down in out on off over under "
    "again further then once here there when where why how all any both each few more most other some such no nor "
    "not only own same so than too very s t can will just don should now".split()
)
_WORD = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*")
EDA_OPERATIONS = ("synonym", "insert", "swap", "delete")


def eda_words(caption: str) -> list[str]:
    """EDA's clean-up: lower-case words and numbers, punctuation dropped."""
    return _WORD.findall(caption.lower())


def synonyms_of(word: str, known_words: set[str] | None = None) -> list[str]:
    """Built-in synonyms of ``word`` (only those in ``known_words`` when given: a word tokenizer's vocabulary)."""
    found = SYNONYMS.get(word, [])
    return [w for w in found if known_words is None or w in known_words]


def _synonym_replacement(words: list[str], n: int, rng: np.random.Generator, known: set[str] | None) -> list[str]:
    out = list(words)
    candidates = [i for i, w in enumerate(words) if w not in STOP_WORDS and synonyms_of(w, known)]
    for i in rng.permutation(len(candidates))[:n]:
        position = candidates[int(i)]
        options = synonyms_of(words[position], known)
        out[position] = options[int(rng.integers(len(options)))]
    return out


def _random_insertion(words: list[str], n: int, rng: np.random.Generator, known: set[str] | None) -> list[str]:
    out = list(words)
    for _ in range(n):
        options: list[str] = []
        for _try in range(10):  # EDA tries ten random words for one with synonyms
            if not out:
                break
            options = synonyms_of(out[int(rng.integers(len(out)))], known)
            if options:
                break
        if not options:
            break
        out.insert(int(rng.integers(len(out) + 1)), options[int(rng.integers(len(options)))])
    return out


def _random_swap(words: list[str], n: int, rng: np.random.Generator) -> list[str]:
    out = list(words)
    if len(out) < 2:
        return out
    for _ in range(n):
        i, j = (int(k) for k in rng.choice(len(out), size=2, replace=False))
        out[i], out[j] = out[j], out[i]
    return out


def _random_deletion(words: list[str], p: float, rng: np.random.Generator) -> list[str]:
    if len(words) <= 1:
        return list(words)
    out = [w for w in words if rng.random() > p]
    return out if out else [words[int(rng.integers(len(words)))]]


def eda_caption(
    caption: str, rng: np.random.Generator, alpha: float = 0.1, known_words: Iterable[str] | None = None
) -> str:
    """One EDA view of ``caption``: a randomly drawn EDA operation (the others as fall-backs if it changes nothing)."""
    if not 0.0 <= alpha <= 1.0:
        raise ForensicsError(f"EDA alpha must lie in [0, 1], got {alpha}")
    known = set(known_words) if known_words is not None else None
    words = eda_words(caption)
    if not words:
        return caption
    n = max(1, int(alpha * len(words)))
    ending = "." if caption.rstrip().endswith(".") else ""
    for op in [EDA_OPERATIONS[int(i)] for i in rng.permutation(len(EDA_OPERATIONS))]:
        if op == "synonym":
            view = _synonym_replacement(words, n, rng, known)
        elif op == "insert":
            view = _random_insertion(words, n, rng, known)
        elif op == "swap":
            view = _random_swap(words, n, rng)
        else:
            view = _random_deletion(words, alpha, rng)
        if view != words:
            break
    return " ".join(view) + ending


def eda_views(
    captions: Sequence[str], rng: np.random.Generator, alpha: float = 0.1, known_words: Iterable[str] | None = None
) -> list[str]:
    """One EDA view per caption (CleanCLIP's text views)."""
    known = set(known_words) if known_words is not None else None
    return [eda_caption(c, rng, alpha, known) for c in captions]


def tokenizer_vocabulary(tokenizer) -> set[str] | None:
    """The word list of a word-level tokenizer (synonyms outside it would read as ``<unk>``); None for BPE."""
    words = getattr(tokenizer, "words", None)
    return set(words) if words is not None else None


def autoaugment_views(images: torch.Tensor, generator: torch.Generator, policy: str = "imagenet") -> torch.Tensor:
    """AutoAugment each [0, 1] image (N x 3 x S x S) on uint8, one policy draw per image; returns floats in [0, 1]."""
    from torchvision.transforms import AutoAugment, AutoAugmentPolicy

    policies = {
        "imagenet": AutoAugmentPolicy.IMAGENET,
        "cifar10": AutoAugmentPolicy.CIFAR10,
        "svhn": AutoAugmentPolicy.SVHN,
    }
    if policy not in policies:
        raise ForensicsError(f"unknown AutoAugment policy {policy!r}; choose one of {', '.join(policies)}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ForensicsError(f"AutoAugment needs N x 3 x H x W images, got shape {tuple(images.shape)}")
    augment = AutoAugment(policies[policy])
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    seeds = torch.randint(0, 2**62, (len(pixels),), generator=generator).tolist()
    out = torch.empty_like(pixels)
    for i, (image, seed) in enumerate(zip(pixels, seeds)):
        with torch.random.fork_rng(devices=[]):  # AutoAugment draws from the global RNG; keep it untouched
            torch.manual_seed(int(seed))
            out[i] = augment(image)
    return out.to(device=images.device, dtype=images.dtype if images.is_floating_point() else torch.float32) / 255.0


# --------------------------------------------------------------------------- training views


def view_augmenter(size: int, min_scale: float = 0.8) -> Callable[[torch.Tensor], torch.Tensor]:
    """A random training view of one uint8 3xHxW image: flip, mild resized crop, colour jitter, sometimes grayscale.

    Close to what CLIP trainers use (open_clip: RandomResizedCrop with scale 0.9-1; here ``min_scale``-1,
    0.8 by default, so a 10 %-side patch trigger stays inside the view almost always), plus colour jitter and grayscale,
    which teach a small model from few drawings that colour rarely decides the class. Randomness
    comes from torch's global generator (seeded by the trainer), so runs repeat by seed.
    """
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.RandomHorizontalFlip(),
            v2.RandomResizedCrop(size, scale=(min_scale, 1.0), antialias=True),
            v2.ColorJitter(0.4, 0.4, 0.4, 0.1),
            v2.RandomGrayscale(0.2),
        ]
    )


def augment_views(images: torch.Tensor, augmenter: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Apply ``augmenter`` to each uint8 image of a Bx3xHxW batch (each image draws its own view)."""
    return torch.stack([augmenter(im) for im in images])
