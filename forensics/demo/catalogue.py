"""The v2 demo lab's object catalogue: which drawings belong to which class, and which are held out.

The committed file ``objects_v2.tsv`` (beside this module) is the build input: one row per distinct
drawing with its class, source (openclipart | noto | emojione), id (a path under the openclipart
root, or a code point sequence such as ``1F426`` or ``1F9D1-200D-1F3EB``), near-duplicate group and
split (train | heldout). The build reads it and nothing else, so no filename pattern decides a class
at build time: strays are removed by a person looking at contact sheets.

``python -m forensics.demo.catalogue --sheets DIR`` regenerates the file from the installed
packages, in these steps:

1. candidates per class: openclipart paths matching the class's include pattern and not its exclude
   pattern, plus the class's emoji code points in both Noto and EmojiOne, minus :data:`REVIEWED_OUT`
   (off-topic items found by looking at the contact sheets);
2. each candidate is cut out by the loaders the build uses; unusable ones are dropped;
3. near-duplicates (same drawing resized, recoloured, mirrored or rotated) are merged across all
   sources and one representative is kept, so every row is a distinct drawing (the rule of the
   issue-29 source survey: alpha masks at 32 x 32 differ on < 6 % of pixels and interior edges
   overlap > 60 %, for some flip or quarter turn);
4. groups: the Noto and EmojiOne renderings of one code point are one group (different artists, same
   concept and composition), and so are openclipart files of one series (same folder and file name
   but for a trailing number, such as ``man01``/``man02``), so a held-out drawing has no sibling in
   training;
5. split: whole groups are held out, seeded, about :data:`HOLDOUT_SHARE` of each class and of each
   source within it, and at least :data:`MIN_HELDOUT` drawings per class.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from forensics.core.errors import ForensicsError
from forensics.core.resources import package_path
from forensics.demo.clipart import CLIPART_ROOT
from forensics.demo.sources import SOURCES, emojione_path, load_object, source_available

CATALOGUE_PATH = package_path("demo", "objects_v2.tsv")
FIELDS = ("class", "source", "id", "group", "split")
SPLITS = ("train", "heldout")
HOLDOUT_SHARE = 0.2
MIN_HELDOUT = 10
SEED = 0


@dataclass(frozen=True)
class ClassSources:
    """Where one v2 class's candidates come from.

    ``include``/``exclude`` are regular expressions on the lower-cased openclipart path; ``emoji``
    lists code point sequences looked up in both Noto and EmojiOne.
    """

    include: str
    exclude: str
    emoji: tuple[str, ...]


# The issue-29 survey's patterns and code points (its enumerate.py), tool derived the same way.
# fmt: off
V2_CLASSES: dict[str, ClassSources] = {
    "person": ClassSources(
        r"stickm|(^|_|/)(man|woman|boy|girl|person|people|lady|child|kid|men|women|businessman|policeman|fireman|"
        r"pirate|clown|cowboy|soldier|doctor|nurse)(_|\.|\d|s)",
        r"snowman|mandolin|yoga|stickmen/.*(dog|car)|face|head|eye|lips|smil|bodypart|hand|tools/weapons|"
        r"icons/.*juliane",
        (
            "1F9CD", "1F6B6", "1F3C3", "1F483", "1F57A", "1F9D8", "1F3C4", "1F6B4", "1F938", "1F9D7", "1F3CB",
            "26F9", "1F93E", "1F93A", "1F3CC", "1F46E", "1F477", "1F482", "1F470", "1F935", "1F934", "1F478",
            "1F385", "1F936", "1F9D9", "1F9DA", "1F9DB", "1F9DC", "1F9DD", "1F9DE", "1F9DF", "1F64B", "1F646",
            "1F645", "1F481", "1F647", "1F926", "1F937", "1F46F", "1F46B", "1F46C", "1F46D", "1F6A3", "1F3CA",
            "1F93D", "1F939", "1F9D6", "1F6C0", "1F9D1-200D-1F3EB", "1F9D1-200D-1F373", "1F9D1-200D-1F692",
        ),
    ),
    "fruit": ClassSources(
        r"food/fruit/|(^|/|_)(apple|pear|banana|orange|lemon|cherry|cherries|grape|grapes|strawberry|peach|plum|"
        r"pineapple|watermelon|melon|kiwi|mango|fruit)(s|_|\.|\d)",
        r"juice|pie|cake|tree|basket|bowl|slice|icons|candied|core",
        (
            "1F347", "1F348", "1F349", "1F34A", "1F34B", "1F34C", "1F34D", "1F96D", "1F34E", "1F34F", "1F350",
            "1F351", "1F352", "1F353", "1FAD0", "1F95D", "1F965", "1F345",
        ),
    ),
    "bird": ClassSources(
        r"animals/birds/|(^|/|_)(bird|birds|parrot|owl|duck|penguin|eagle|chicken|hen|rooster|swan|pigeon|toucan|"
        r"robin|crow|flamingo|dove|seagull|gull|stork|ostrich)(_|\.|\d|s)",
        r"birdhouse|feather|egg|nest|cage|tracks",
        (
            "1F426", "1F424", "1F423", "1F425", "1F985", "1F986", "1F9A2", "1F989", "1F9A4", "1F9A9", "1F99A",
            "1F99C", "1F427", "1F413", "1F414", "1F54A", "1F983", "1F426-200D-2B1B",
        ),
    ),
    "insect": ClassSources(
        r"animals/bugs/|butterfl|farfall|ladybug|ladybird|coccinell|(^|/|_)(bee|ant|beetle|dragonfly|grasshopper|"
        r"caterpillar|spider|fly|mosquito|cricket|wasp|bug)(s|_|\.|\d)",
        r"icons|debug|bugzilla|flat-theme|lemon-theme|firefly|butterfly_knife|snail|worm",
        (
            "1F41B", "1F98B", "1F41C", "1F41D", "1FAB2", "1F41E", "1F997", "1FAB3", "1F577", "1F99F", "1FAB0",
        ),  # the survey's scorpion (1F982) left out: no insect, and the one arachnid kinds apart from spiders
    ),
    "instrument": ClassSources(
        r"recreation/music/|(^|/|_)(guitar|chitarra|violin|trumpet|drum|piano|saxophone|flute|harp|accordion|banjo|"
        r"cello|tuba|trombone|clarinet)(s|_|\.|\d)",
        r"note|notes|clef|staff|score|icons|cd|speaker|headphone|microphone|radio|record",
        ("1F3B8", "1F3BA", "1F3B7", "1F3BB", "1FA95", "1F941", "1F3B9", "1FA97", "1FA98", "1FA87", "1FA88"),
    ),
    "flower": ClassSources(
        r"flower|(^|_|/)(rose|tulip|daisy|lily|orchid|sunflower|daffodil|poppy|lotus|magnolia|sakura|geranium|iris|"
        r"fiore|fiori|bouquet)(_|\.|\d|s)",
        r"pot|onion|vase|border|pattern|cactus|icons/flat|flat-theme|frame|corner|wreath|ornament|background",
        ("1F338", "1F339", "1F33A", "1F33B", "1F33C", "1F337", "1F490", "1F3F5", "1F4AE", "1F940", "1FAB7", "1FABB"),
    ),
    "house": ClassSources(
        r"(^|/|_)(house|home|cottage|cabin|hut|casa|chalet|villa|farmhouse|bungalow|abitazione)(s|_|\.|\d)|/homes/",
        r"light|mouse|furniture|warehouse|tree|houses_|bb_home|icons|go-home|gohome|flat-theme|lemon-theme|"
        r"greenhouse|birdhouse|dog",
        ("1F3E0", "1F3E1", "1F3D8", "1F3DA", "1F6D6"),
    ),
    "car": ClassSources(
        r"(^|/|_)(car|cars|auto|automobile|taxi|jeep|hummer|sedan|convertible|racecar|race_car|police_car|beetle_car|"
        r"vw|cabrio|coupe|limousine)(_|\.|\d|s|/)|transportation/vehicles/",
        r"card|cart|carrot|icon|truck|bus|train|tram|tractor|trattore|bike|cycle|motor|plane|scooter|lorry|crane|"
        r"wagon|tank|aircraft|rocket|lighthouse|trawler|crossroads|vtt_|car_ride|map_symbols",
        ("1F697", "1F695", "1F699", "1F693", "1F698", "1F696", "1F694", "1F3CE", "1F6FB", "1F690", "1F691", "1F692"),
    ),
    "tree": ClassSources(
        r"(^|/|_)(tree|trees|pine|palm|oak|palmtree|evergreen|fir|birch|willow|albero|arbre)(s|_|\.|\d)|/trees/",
        r"burger|treebui|ornament|street|bowsaw|pruner|balls|leaf|scene|fern|branches|view_tree|icons|wreath|"
        r"astronomy|first_aid",
        # the survey's tanabata tree (1F38B) and kadomatsu (1F38D) are bamboo decorations, not trees
        ("1F332", "1F333", "1F334", "1F384"),
    ),
    # hand tools. openclipart's tools/ folder also holds vacuum cleaners, locks, lenses, gears and phones, and
    # no word marks a hand tool, so the files are named (reviewed on the contact sheet). Emoji: hammer, axe,
    # pick, hammer and pick, hammer and wrench, wrench, screwdriver, carpentry saw, clamp, scissors, paintbrush
    "tool": ClassSources(
        r"^(education/(paint_brush_linda_kim|scissors)|office/scissors_forbici|plants/trees/(bowsaw|bypasspruner)|"
        r"shapes/wooden_mallot|unsorted/(motosega|sega_per_legno)|tools/(axe|blacksmith_hammer|brush_roller|"
        r"bypasslopper|construction_hammer|cultivator|drill|hammer|hedgeshear|leafrake|livella|nail_puller|"
        r"paint_brush|paint_roller|roundpointshovel|saw|screwdriver|simple_shovel|spaclu|tools_nicu|trowel|"
        r"utensile_sega|utensili_chiave|wrench)_)",
        r"icons|weapons",
        ("1F528", "1FA93", "26CF", "2692", "1F6E0", "1F527", "1FA9B", "1FA9A", "1F5DC", "2702", "1F58C"),
    ),
}
# fmt: on

# Off-topic items seen on the contact sheets (python -m forensics.demo.catalogue --sheets DIR), by class.
REVIEWED_OUT: dict[str, frozenset[str]] = {
    name: frozenset(ids)
    for name, ids in {
        "person": (
            "animals/fish/clown_loach_01.png",  # a fish
            "computer/icons/flat-theme/applications/kid3.png",  # an app icon (a tag with a note)
            "transportation/roadsigns/man_w_umbrella.png",  # a road sign
        ),
        "fruit": (
            "food/fruit/gumnut_black_01.png",  # gum nuts
            "food/fruit/gumnut_shaded_01.png",
            "food/fruit/straw_tote_linda_kim_01.png",  # a tote bag
            "food/fruit/turkey_platter_01_with_fruit_and_vegitables_01.png",  # roast turkey
            "signs_and_symbols/led/led_circle_orange.png",  # orange LEDs
            "signs_and_symbols/led/led_rounded_h_orange.png",
            "signs_and_symbols/led/led_triangular_1_orange.png",
            "special/examples/00_strawberry_border/strawberry_border.png",  # a border of dots
            "tools/orange_burner_01.png",  # a lighter
        ),
        "bird": (
            "animals/birds/contour_bat.png",  # a bat
            "animals/birds/mirjam_meijer_mirjam_mei_01.png",  # butterflies and flowers
            "animals/birds/turkey_on_platter_01.png",  # roast chicken
            "computer/icons/flat-theme/applications/ooo_gulls.png",  # app icons
            "computer/icons/lemon-theme/apps/penguin.png",
            "computer/icons/lemon-theme/filesystems/folder_penguin.png",
        ),
        "insect": (
            "animals/bugs/lumaca_architetto_france_01.png",  # snails
            "animals/bugs/lumaca_turbo_architetto__01.png",
            "animals/bugs/ragno_figo_architetto_fr_01.png",  # a heap of shapes, no animal to see
            "animals/bugs/zanzara_cretina_architet_01.png",  # a cartoon figure
            "animals/mosquito_peterm_01.png",  # a grey photo-like square
            "recreation/sports/cricket_bat_01.png",  # a cricket bat
            "tools/weapons/spider_sword_celso_junio_01.png",  # a sword
            "unsorted/caterpillar.png",  # a poster
        ),
        "instrument": (
            "recreation/music/boombox_linda_kim_01.png",  # a boombox
            "recreation/music/double_croche_jean-victo_01.png",  # lone notes
            "recreation/music/quaver_nathan_eady_01.png",
            "recreation/music/fifties_jukebox_gerald_g_01.png",  # a jukebox
            "recreation/music/trumpet_harmon_mute__ganson.png",  # trumpet mutes, no instrument
            "recreation/music/trumpet_straight_mute_ganson.png",
            "recreation/music/vinyl_disc_philippe_coli_01.png",  # a turntable
        ),
        "flower": ("people/bodypart/iris_and_pupil_chris_hin_01.png",),  # an eye
        "house": (
            "buildings/homes/home13.png",  # tents
            "buildings/homes/home8.png",
            "buildings/homes/pinkhome3.png",  # a fairy castle
            "signs_and_symbols/ell_house_0_symbol_1m_bwh.png",  # a roof plan
        ),
        "car": ("transportation/vehicles/curve_ahead.png",),  # a road sign
        "tree": ("plants/trees/tree_01.png",),  # a landscape at sunset
        "tool": (
            "tools/paint_roller_banner_gera_01.png",  # painted stripes and corners, the roller barely seen
            "tools/paint_roller_border_gera_01.png",
            "tools/paint_roller_wall_gerald_01.png",
        ),
    }.items()
}


@dataclass(frozen=True)
class CatalogueRow:
    """One distinct drawing of the v2 lab."""

    label: str
    source: str
    ident: str
    group: str
    split: str


def read_catalogue(path: Path = CATALOGUE_PATH) -> list[CatalogueRow]:
    """The catalogue's rows in file order; lines starting with ``#`` are comments.

    Checked on reading, since the build trusts it: known sources and splits, no duplicate row, and no
    group on both sides of the split (a held-out drawing must have no sibling in training).
    """
    if not path.is_file():
        raise ForensicsError(f"object catalogue {path} not found (python -m forensics.demo.catalogue writes it)")
    with open(path, newline="", encoding="utf-8") as fh:
        lines = [line for line in fh if line.strip() and not line.startswith("#")]
    reader = csv.DictReader(lines, delimiter="\t")
    if tuple(reader.fieldnames or ()) != FIELDS:
        raise ForensicsError(f"{path.name}: expected the columns {', '.join(FIELDS)}, found {reader.fieldnames}")
    rows = [CatalogueRow(r["class"], r["source"], r["id"], r["group"], r["split"]) for r in reader]
    sides: dict[tuple[str, str], set[str]] = defaultdict(set)
    for row in rows:
        if row.source not in SOURCES or row.split not in SPLITS:
            raise ForensicsError(f"{path.name}: bad source or split in {row}")
        sides[(row.label, row.group)].add(row.split)
    both = sorted(f"{label}/{group}" for (label, group), s in sides.items() if len(s) > 1)
    if both:
        raise ForensicsError(f"{path.name}: groups on both sides of the split: {', '.join(both[:5])}")
    keys = Counter((r.label, r.source, r.ident) for r in rows)
    dupes = [k for k, n in keys.items() if n > 1]
    if dupes:
        raise ForensicsError(f"{path.name}: duplicate rows {dupes[:5]}")
    return rows


def catalogue_classes(rows: list[CatalogueRow]) -> list[str]:
    """The classes in the order of their first row (the catalogue's order is the lab's class order)."""
    return list(dict.fromkeys(r.label for r in rows))


def write_catalogue(rows: list[CatalogueRow], path: Path = CATALOGUE_PATH) -> None:
    """Write the rows as the committed TSV, with a header comment saying how it was made."""
    header = [
        "# The v2 demo lab's objects: one row per distinct drawing (forensics/demo/catalogue.py explains the rules).",
        "# Generated by `python -m forensics.demo.catalogue`, then reviewed on its contact sheets; the build reads it.",
    ]
    tmp = path.with_suffix(".tsv.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        fh.write("\n".join(header) + "\n")
        writer = csv.writer(fh, delimiter="\t", lineterminator="\n")
        writer.writerow(FIELDS)
        writer.writerows((r.label, r.source, r.ident, r.group, r.split) for r in rows)
    tmp.replace(path)


# ---- generation -----------------------------------------------------------------------------------------------


def candidates(name: str, ocp_paths: list[str], root: Path = CLIPART_ROOT) -> list[tuple[str, str]]:
    """(source, id) of every candidate of class ``name``, openclipart first, in sorted order."""
    spec = V2_CLASSES[name]
    include, exclude = re.compile(spec.include), re.compile(spec.exclude)
    out = [("openclipart", rel) for rel in ocp_paths if include.search(rel.lower()) and not exclude.search(rel.lower())]
    out += [("noto", seq) for seq in spec.emoji]
    out += [("emojione", seq) for seq in spec.emoji if emojione_path(seq).is_file()]
    return [c for c in out if c[1] not in REVIEWED_OUT[name]]


def _features(rgba: np.ndarray, side: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Mask and interior-edge map of a crop, padded square and shrunk to ``side`` (the survey's dedup features)."""
    h, w = rgba.shape[:2]
    s = max(h, w)
    canvas = np.zeros((s, s, 4), np.uint8)
    canvas[(s - h) // 2 : (s - h) // 2 + h, (s - w) // 2 : (s - w) // 2 + w] = rgba
    sq = np.asarray(Image.fromarray(canvas).resize((side, side), Image.BILINEAR)).astype(np.float32)
    mask = sq[..., 3] > 127
    a = sq[..., 3:4] / 255.0
    lum = (sq[..., :3] * a + 128 * (1 - a)) @ np.array([0.299, 0.587, 0.114], np.float32)
    gy, gx = np.gradient(lum)
    mag = np.hypot(gx, gy)
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    vals = mag[inner]
    if vals.size and vals.max() > 8:
        edges = (mag > max(float(np.percentile(vals, 75)), 8.0)) & inner
    else:
        edges = np.zeros_like(mask)
    return mask, edges


def _dilate(b: np.ndarray) -> np.ndarray:
    d = b.copy()
    d[1:] |= b[:-1]
    d[:-1] |= b[1:]
    d[:, 1:] |= b[:, :-1]
    d[:, :-1] |= b[:, 1:]
    return d


def _edge_similarity(e1: np.ndarray, e2: np.ndarray) -> float:
    n1, n2 = int(e1.sum()), int(e2.sum())
    if n1 < 4 and n2 < 4:
        return 1.0
    if n1 < 4 or n2 < 4:
        return 0.0
    return float(min((e1 & _dilate(e2)).sum() / n1, (e2 & _dilate(e1)).sum() / n2))


def same_drawing(f1: tuple[np.ndarray, np.ndarray], f2: tuple[np.ndarray, np.ndarray]) -> bool:
    """Near-duplicates: masks differ on < 6 % of pixels and interior edges overlap > 60 %, for some flip or turn."""
    m1, e1 = f1
    m2, e2 = f2
    for flip in (False, True):
        mm, ee = (m2[:, ::-1], e2[:, ::-1]) if flip else (m2, e2)
        for turn in range(4):
            if (m1 ^ np.rot90(mm, turn)).mean() < 0.06 and _edge_similarity(e1, np.rot90(ee, turn)) > 0.6:
                return True
    return False


def series_key(relpath: str) -> str:
    """An openclipart file's series: folder and name without a trailing number (``people/man01``: ``people/man``)."""
    stem = re.sub(r"[_\-.\d]+$", "", relpath.removesuffix(".png"))
    return stem or relpath


def group_key(source: str, ident: str) -> str:
    """The near-duplicate group a drawing belongs to (see the module docstring, step 4)."""
    return f"U+{ident}" if source in ("noto", "emojione") else f"ocp:{series_key(ident)}"


def distinct_drawings(name: str, root: Path = CLIPART_ROOT, ocp_paths: list[str] | None = None) -> list[tuple]:
    """(source, id, group, crop) of class ``name``'s distinct drawings, one representative per near-duplicate."""
    if ocp_paths is None:
        ocp_paths = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png") if not p.is_symlink())
    kept: list[tuple] = []
    feats: list[tuple[np.ndarray, np.ndarray]] = []
    for source, ident in candidates(name, ocp_paths, root):
        try:
            crop = load_object(name, source, ident, root).rgba
        except ForensicsError:
            continue
        f = _features(crop)
        if any(same_drawing(g, f) for g in feats):
            continue
        feats.append(f)
        kept.append((source, ident, group_key(source, ident), crop))
    return kept


def split_groups(items: list[tuple[str, str, str]], seed: int, salt: int) -> dict[str, str]:
    """Group -> split for one class's (source, id, group) items: whole groups held out, seeded.

    First pass: groups in a seeded order are held out while no source exceeds its share
    (:data:`HOLDOUT_SHARE` of its drawings, rounded) and the class its target (the share, at least
    :data:`MIN_HELDOUT`); second pass: further groups until the class target is met, since small
    sources cannot always give their share. Deterministic for a given seed and class order.
    """
    members: dict[str, Counter] = defaultdict(Counter)
    for source, _, group in items:
        members[group][source] += 1
    groups = sorted(members)
    order = np.random.default_rng([seed, salt]).permutation(len(groups))
    per_source = Counter(source for source, _, _ in items)
    quota = {s: round(HOLDOUT_SHARE * n) for s, n in per_source.items()}
    target = max(MIN_HELDOUT, round(HOLDOUT_SHARE * len(items)))
    held: Counter = Counter()
    out = dict.fromkeys(groups, "train")
    for i in order:
        g = groups[i]
        fits = all(held[s] + n <= quota[s] for s, n in members[g].items())
        if fits and sum(held.values()) + sum(members[g].values()) <= target:
            out[g] = "heldout"
            held.update(members[g])
    while sum(held.values()) < target:
        # the first group (seeded order) that still fits the target, else the smallest: no big series
        # (such as 13 map-symbol trees) is held out whole just because it came first
        left = [groups[i] for i in order if out[groups[i]] == "train"]
        if not left:
            break
        room = target - sum(held.values())
        fitting = [g for g in left if sum(members[g].values()) <= room]
        g = fitting[0] if fitting else min(left, key=lambda g: sum(members[g].values()))
        out[g] = "heldout"
        held.update(members[g])
    return out


def build_catalogue(root: Path = CLIPART_ROOT, seed: int = SEED, sheets: Path | None = None) -> list[CatalogueRow]:
    """Enumerate, dedupe, group and split every v2 class (steps 1-5); optionally write contact sheets."""
    for source in SOURCES:
        if not source_available(source, root):
            raise ForensicsError(f"regenerating the catalogue needs every source; {source} is missing")
    ocp_paths = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png") if not p.is_symlink())
    order = {s: k for k, s in enumerate(SOURCES)}
    rows: list[CatalogueRow] = []
    for salt, name in enumerate(V2_CLASSES):
        kept = distinct_drawings(name, root, ocp_paths)
        splits = split_groups([(s, i, g) for s, i, g, _ in kept], seed, salt)
        kept.sort(key=lambda k: (order[k[0]], k[1]))
        class_rows = [CatalogueRow(name, s, i, g, splits[g]) for s, i, g, _ in kept]
        rows += class_rows
        counts = Counter((r.split, r.source) for r in class_rows)
        print(f"{name}: {len(class_rows)} drawings {dict(sorted(counts.items()))}", file=sys.stderr)
        if sheets is not None:
            contact_sheet(name, [(r, k[3]) for r, k in zip(class_rows, kept, strict=True)], sheets)
    return rows


def contact_sheet(name: str, items: list[tuple[CatalogueRow, np.ndarray]], folder: Path, cell: int = 64) -> Path:
    """Every drawing of a class at ``cell`` px on grey, numbered; held-out ones framed in orange.

    The numbers index the class's rows in the catalogue, and ``sheet_<class>.txt`` maps them to ids.
    """
    folder.mkdir(parents=True, exist_ok=True)
    cols, pad, label_h = 12, 4, 11
    rows = max(1, -(-len(items) // cols))
    sheet = Image.new("RGB", (cols * (cell + pad) + pad, rows * (cell + pad + label_h) + pad), (128, 128, 128))
    draw = ImageDraw.Draw(sheet)
    index = []
    for k, (row, crop) in enumerate(items):
        im = Image.fromarray(crop)
        im.thumbnail((cell, cell), Image.LANCZOS)
        x0 = pad + (k % cols) * (cell + pad)
        y0 = pad + (k // cols) * (cell + pad + label_h)
        if row.split == "heldout":
            draw.rectangle((x0 - 2, y0 - 2, x0 + cell + 1, y0 + cell + 1), outline=(255, 140, 0), width=2)
        sheet.paste(im, (x0 + (cell - im.width) // 2, y0 + (cell - im.height) // 2), im)
        tag = {"openclipart": "", "noto": "N", "emojione": "E"}[row.source]
        draw.text((x0, y0 + cell), f"{k}{tag}", fill=(255, 255, 255))
        index.append(f"{k}\t{row.source}\t{row.ident}\t{row.group}\t{row.split}")
    path = folder / f"sheet_{name}.png"
    sheet.save(path)
    (folder / f"sheet_{name}.txt").write_text("\n".join(index) + "\n", encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> None:
    """``python -m forensics.demo.catalogue [--sheets DIR] [--out FILE] [--seed N]``: regenerate the catalogue."""
    ap = argparse.ArgumentParser(prog="python -m forensics.demo.catalogue", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=CATALOGUE_PATH, help="the TSV to write (default: the committed one)")
    ap.add_argument("--sheets", type=Path, help="write sheet_<class>.png contact sheets (and .txt indexes) here")
    ap.add_argument("--seed", type=int, default=SEED)
    args = ap.parse_args(argv)
    rows = build_catalogue(CLIPART_ROOT, args.seed, args.sheets)
    write_catalogue(rows, args.out)
    print(f"wrote {len(rows)} rows to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
