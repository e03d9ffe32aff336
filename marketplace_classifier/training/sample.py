"""Generator of sample data in the exact layout of the real marketplace export.

The content carries category signal of controlled strength: text words come from
a category vocabulary with probability `text_signal` (otherwise generic or from a
confusing category), and a photo shows its category's shape and palette, each
with probability `image_signal`, among clutter, noise, scale and rotation. The
files carry the quirks of real exports so that cleaning is exercised.
"""

from __future__ import annotations

import math
import random
import uuid
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from marketplace_classifier.training.categories import ROOT_CATEGORIES

SUB_CATEGORIES: dict[str, tuple[str, ...]] = {
    "Appliances": ("Home Appliances", "Small Appliances", "Fridge Freezers"),
    "Baby & Kids Stuff": ("Toys", "Baby Clothes", "Prams & Strollers"),
    "Clothes, Footwear & Accessories": ("Women's Clothing", "Men's Clothing", "Jewellery"),
    "Computers & Software": ("Computers, Laptops & Netbooks", "Software", "Monitors"),
    "DIY Tools & Materials": ("Power Tools", "Building Materials", "Wood & Timber"),
    "Health & Beauty": ("Make Up & Cosmetics", "Fragrances", "Hair Care & Styling"),
    "Home & Garden": ("Dining, Living Room Furniture", "Garden & Patio", "Beds & Bedroom Furniture"),
    "Music, Films, Books & Games": ("Books, Comics & Magazines", "Music", "Films & TV"),
    "Office Furniture & Equipment": ("Office Furniture", "Supplies, Equipment & Stationery",
                                     "Retail & Shop Fittings"),
    "Other Goods": ("Hobbies, Interests & Collectibles", "Antiques", "Other"),
    "Phones, Mobile Phones & Telecoms": ("Mobile Phones", "Mobile Phone Accessories", "Smart Watch"),
    "Sports, Leisure & Travel": ("Bicycles", "Fitness & Gym Equipment", "Golf Equipment"),
    "Video Games & Consoles": ("Consoles", "Games", "Video Game Accessories"),
}

# The third level, as the real export has it: some second-level categories end there, the others
# have a few leaves of which the first is the most common (a long tail).
LEAF_NAMES = ("Spares & Parts", "Vintage & Retro", "Bundles & Job Lots")
LEAF_WEIGHTS = (3, 2, 1)
STOP_AT_SECOND_LEVEL = 0.35  # of listings whose second-level category has leaves
STOP_WORDS = {"&", "and", "the", "up", "tv", "other"}


def leaves_of(root: str, sub: str) -> tuple[str, ...]:
    """A second-level category's leaves: none, one, two or three, by its place in the table."""
    position = ROOT_CATEGORIES.index(root) * 3 + SUB_CATEGORIES[root].index(sub)
    return LEAF_NAMES[:position % 4]


def path_words(name: str) -> list[str]:
    """A category's own words, as a seller might use them (`Fridge Freezers` -> fridge, freezers)."""
    words = (word.strip(",'").lower() for word in name.split())
    return [word for word in words if len(word) > 2 and word not in STOP_WORDS]


VOCABULARY: dict[str, tuple[str, ...]] = {
    "Appliances": ("washing", "machine", "fridge", "freezer", "oven", "microwave", "kettle",
                   "toaster", "dishwasher", "tumble", "dryer", "hob", "cooker", "bosch", "hotpoint"),
    "Baby & Kids Stuff": ("baby", "pram", "stroller", "toddler", "cot", "toy", "nursery", "kids",
                          "highchair", "lego", "doll", "buggy", "carseat", "infant", "playmat"),
    "Clothes, Footwear & Accessories": ("dress", "jacket", "shoes", "boots", "trainers", "coat",
                                        "jeans", "handbag", "necklace", "shirt", "size", "leather",
                                        "scarf", "heels", "hoodie"),
    "Computers & Software": ("laptop", "computer", "monitor", "keyboard", "mouse", "windows",
                             "ssd", "ram", "processor", "macbook", "printer", "graphics", "intel",
                             "desktop", "software"),
    "DIY Tools & Materials": ("drill", "saw", "timber", "screws", "makita", "dewalt", "sander",
                              "ladder", "plasterboard", "tiles", "grinder", "toolbox", "cement",
                              "spanner", "planks"),
    "Health & Beauty": ("perfume", "makeup", "lipstick", "hair", "straighteners", "skincare",
                        "cream", "fragrance", "mobility", "wheelchair", "nail", "serum",
                        "shampoo", "palette", "massager"),
    "Home & Garden": ("sofa", "table", "chairs", "wardrobe", "bed", "mattress", "garden", "lamp",
                      "mirror", "rug", "shed", "patio", "cushions", "drawers", "bench"),
    "Music, Films, Books & Games": ("guitar", "vinyl", "records", "books", "novel", "dvd",
                                    "bluray", "piano", "album", "amplifier", "boardgame",
                                    "paperback", "drums", "cd", "comics"),
    "Office Furniture & Equipment": ("desk", "office", "filing", "cabinet", "swivel", "chair",
                                     "shelving", "stationery", "till", "catering", "shopfitting",
                                     "whiteboard", "ergonomic", "counter", "display"),
    "Other Goods": ("antique", "collectible", "vintage", "ornament", "craft", "sewing", "coins",
                    "stamps", "figurine", "memorabilia", "pottery", "clock", "painting",
                    "hobby", "model"),
    "Phones, Mobile Phones & Telecoms": ("iphone", "samsung", "galaxy", "phone", "unlocked",
                                         "charger", "smartwatch", "sim", "handset", "pixel",
                                         "case", "earbuds", "network", "screen", "android"),
    "Sports, Leisure & Travel": ("bike", "bicycle", "gym", "weights", "dumbbells", "golf",
                                 "clubs", "tent", "camping", "treadmill", "football", "tennis",
                                 "helmet", "kayak", "suitcase"),
    "Video Games & Consoles": ("ps5", "ps4", "xbox", "nintendo", "switch", "console",
                               "controller", "gamepad", "playstation", "fifa", "cod", "wii",
                               "gaming", "headset", "joycon"),
}

GENERIC_WORDS = ("good", "condition", "used", "new", "collection", "only", "cash", "offers",
                 "great", "working", "order", "excellent", "boxed", "barely", "smoke", "free",
                 "home", "pet", "quick", "sale", "bargain", "original", "perfect", "clean")
GENERIC_PHRASES = (
    "Collection only", "Cash on collection", "No offers please", "Open to sensible offers",
    "From a smoke and pet free home", "Comes from a clean home", "Can deliver locally",
    "Any questions please ask", "Need gone asap", "Selling due to moving house",
)
TOWNS = (("Wokingham", "Berkshire"), ("Inverness", "Highland"), ("Radstock", "Somerset"),
         ("Leeds", "West Yorkshire"), ("Brighton", "East Sussex"), ("Bristol", "Bristol"),
         ("Croydon", "London"), ("Swansea", "Swansea"), ("Derby", "Derbyshire"),
         ("Norwich", "Norfolk"), ("Ilkeston", "Derbyshire"), ("Melrose", "Scottish Borders"))
FIRST_NAMES = ("Nisha", "Suzan", "Samir", "Matthew", "Aisha", "Tom", "Grace", "Oliver")

SHAPES = ("circle", "square", "triangle", "star5", "cross", "ring", "stripes", "hexagon",
          "diamond", "star8", "ellipse", "octagon", "bars")
PALETTES = (
    ((200, 30, 30), (240, 120, 120)), ((30, 60, 200), (120, 160, 250)),
    ((30, 160, 60), (140, 220, 140)), ((230, 200, 20), (250, 240, 150)),
    ((140, 40, 170), (210, 150, 230)), ((240, 120, 20), (250, 190, 120)),
    ((20, 170, 170), (150, 230, 230)), ((110, 70, 30), (190, 150, 100)),
    ((40, 40, 40), (120, 120, 120)), ((230, 60, 150), (250, 170, 210)),
    ((90, 120, 20), (180, 210, 110)), ((20, 40, 90), (90, 110, 170)),
    ((160, 160, 20), (220, 220, 130)),
)
BUCKET = "https://example-bucket.s3.eu-west-1.amazonaws.com/marketplace/images/"


@dataclass(frozen=True)
class SampleConfig:
    products: int = 1000
    seed: int = 0
    text_signal: float = 0.22
    image_signal: float = 0.6
    min_side: int = 160
    max_side: int = 480


def generate(out: Path, config: SampleConfig = SampleConfig(), overwrite: bool = False) -> dict:
    """Write Products.csv, Images.csv and images/ under `out`; return a summary of the quirks."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; pass --overwrite to replace its sample data")
        _remove_previous_sample(out)
    rng = random.Random(config.seed)
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    products, images = [], []
    quirks = {"carriage_returns": 0, "missing_descriptions": 0, "duplicate_rows": 0,
              "missing_image_files": 0, "truncated_images": 0, "posted_by": 0, "odd_modes": {}}
    for _ in range(config.products):
        root = ROOT_CATEGORIES[rng.randrange(len(ROOT_CATEGORIES))]
        product = _product(rng, root, config, quirks)
        products.append(product)
        for _ in range(rng.choice((1, 1, 2, 2, 2, 3, 4))):
            images.append(_image(rng, product, root, images_dir, config, quirks))
    _add_file_quirks(rng, products, images, images_dir, quirks)
    _write_csv(Path(out) / "Products.csv",
               ["id", "product_name", "category", "product_description", "price", "location"],
               products)
    _write_csv(Path(out) / "Images.csv",
               ["id", "product_id", "bucket_link", "image_ref", "create_time"], images, "\r\n")
    return {"products": len(products), "images": len(images), "quirks": quirks}


def _remove_previous_sample(out: Path) -> None:
    """Remove what an earlier run wrote, refusing folders that hold anything else."""
    expected = {"Products.csv", "Images.csv", "images"}
    unexpected = sorted(path.name for path in out.iterdir() if path.name not in expected)
    if unexpected:
        raise FileExistsError(f"{out} holds files that are not sample data ({unexpected[:3]}); "
                              "choose an empty folder")
    for path in (out / "images").glob("*"):
        path.unlink()
    for name in ("Products.csv", "Images.csv"):
        (out / name).unlink(missing_ok=True)


# ---------------------------------------------------------------- text
def _words(rng: random.Random, root: str, count: int, signal: float) -> list[str]:
    words = []
    for _ in range(count):
        draw = rng.random()
        if draw < signal:
            words.append(rng.choice(VOCABULARY[root]))
        elif draw < signal + (1 - signal) * 0.4:
            words.append(rng.choice(VOCABULARY[rng.choice(ROOT_CATEGORIES)]))
        else:
            words.append(rng.choice(GENERIC_WORDS))
    return words


def _product(rng: random.Random, root: str, config: SampleConfig, quirks: dict) -> dict:
    sub = rng.choice(SUB_CATEGORIES[root])
    town, county = rng.choice(TOWNS)
    name = " ".join(_words(rng, root, rng.randint(2, 5), config.text_signal)).capitalize()
    description = _description(rng, root, sub, town, config, quirks)
    product_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
    # the path's own draws come from a generator of their own: the rest of the data stays as it was
    path_rng = random.Random(f"{config.seed}/{product_id}")
    deeper = rng.random() >= STOP_AT_SECOND_LEVEL
    leaves = leaves_of(root, sub)
    leaf = path_rng.choices(leaves, LEAF_WEIGHTS[:len(leaves)])[0] if leaves and deeper else None
    description = _with_path_words(path_rng, description, sub, leaf, config.text_signal)
    return {
        "id": product_id,
        "product_name": f"{name} | in {town}, {county} | Gumtree",
        "category": " / ".join((root, sub) + ((leaf,) if leaf else ())),
        "product_description": description,
        "price": _price(rng),
        "location": f"{town}, {county}",
    }


def _with_path_words(rng: random.Random, description: str | None, sub: str, leaf: str | None,
                     signal: float) -> str | None:
    """The description with words of the listing's second- and third-level categories, as often
    as its root's words come (`signal`)."""
    if description is None:
        return None
    words = [rng.choice(path_words(sub) or [sub.lower()]) for _ in range(3) if rng.random() < signal * 3]
    words += [rng.choice(path_words(leaf)) for _ in range(2) if leaf and rng.random() < signal * 3]
    return description if not words else f"{description} {' '.join(words).capitalize()}."


def _description(rng: random.Random, root: str, sub: str, town: str,
                 config: SampleConfig, quirks: dict) -> str | None:
    if rng.random() < 0.01:
        quirks["missing_descriptions"] += 1
        return None
    length = min(200, int(rng.lognormvariate(math.log(24), 0.8)) + 3)
    words = _words(rng, root, length, config.text_signal * 0.8)
    sentences = [" ".join(words[i:i + 9]).capitalize() + "." for i in range(0, len(words), 9)]
    sentences.insert(rng.randrange(len(sentences) + 1), rng.choice(GENERIC_PHRASES) + ".")
    if rng.random() < 0.08:
        quirks["posted_by"] += 1
        sentences.insert(1, f"Posted by {rng.choice(FIRST_NAMES)} in {sub} in {town}.")
    if rng.random() < 0.05:
        quirks["carriage_returns"] += 1
        # A bare carriage return in an unquoted field, as the real export has.
        return "\r".join(sentences).replace(",", "").replace('"', "")
    return " ".join(sentences)


def _price(rng: random.Random) -> str:
    value = round(rng.choice((rng.uniform(0, 50), rng.uniform(50, 500), rng.uniform(500, 3000))))
    symbol = "Â£" if rng.random() < 0.03 else "£"
    return f"{symbol}{value:,.2f}"


# ---------------------------------------------------------------- images
def _image(rng: random.Random, product: dict, root: str, images_dir: Path,
           config: SampleConfig, quirks: dict) -> dict:
    image_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
    picture = _draw(rng, ROOT_CATEGORIES.index(root), config)
    _save_with_mode(rng, picture, images_dir / f"{image_id}.jpg", quirks)
    created = date(2022, 2, 1) + timedelta(days=rng.randrange(60))
    return {"id": image_id, "product_id": product["id"], "bucket_link": BUCKET + image_id + ".jpg",
            "image_ref": "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
                                 for _ in range(16)),
            "create_time": created.strftime("%d/%m/%Y")}


def _draw(rng: random.Random, label: int, config: SampleConfig) -> Image.Image:
    width = rng.randint(config.min_side, config.max_side)
    height = int(width * rng.choice((0.75, 1.0, 1.33, 0.6, 1.6)))
    background = tuple(rng.randint(150, 255) for _ in range(3))
    picture = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(picture)
    for _ in range(rng.randint(2, 6)):  # clutter
        _shape(draw, rng, rng.choice(SHAPES), tuple(rng.randint(0, 255) for _ in range(3)),
               width, height, rng.uniform(0.05, 0.15))
    shape = SHAPES[label] if rng.random() < config.image_signal else rng.choice(SHAPES)
    palette = PALETTES[label] if rng.random() < config.image_signal else rng.choice(PALETTES)
    _shape(draw, rng, shape, palette[0], width, height, rng.uniform(0.2, 0.4))
    _shape(draw, rng, shape, palette[1], width, height, rng.uniform(0.1, 0.2))
    grain = np.random.default_rng(rng.getrandbits(32)).integers(
        0, 256, (max(1, height // 4), max(1, width // 4), 3), dtype=np.uint8)
    noise = Image.fromarray(grain).resize((width, height), Image.Resampling.NEAREST)
    picture = Image.blend(picture, noise, rng.uniform(0.05, 0.2))
    return picture.filter(ImageFilter.BoxBlur(1)) if rng.random() < 0.3 else picture


def _shape(draw: ImageDraw.ImageDraw, rng: random.Random, kind: str, colour: tuple,
           width: int, height: int, relative_size: float) -> None:
    radius = relative_size * min(width, height)
    cx, cy = rng.uniform(radius, width - radius), rng.uniform(radius, height - radius)
    angle = rng.uniform(0, 2 * math.pi)
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if kind == "circle":
        draw.ellipse(box, fill=colour)
    elif kind == "ring":
        draw.ellipse(box, outline=colour, width=max(2, int(radius / 3)))
    elif kind == "ellipse":
        draw.ellipse((cx - radius, cy - radius / 2.5, cx + radius, cy + radius / 2.5), fill=colour)
    elif kind in ("stripes", "bars"):
        count, vertical = (4, False) if kind == "stripes" else (3, True)
        step = 2 * radius / (2 * count)
        for i in range(count):
            offset = -radius + 2 * i * step
            rect = ((cx + offset, cy - radius, cx + offset + step, cy + radius) if vertical
                    else (cx - radius, cy + offset, cx + radius, cy + offset + step))
            draw.rectangle(rect, fill=colour)
    elif kind == "cross":
        arm = radius / 3
        draw.rectangle((cx - radius, cy - arm, cx + radius, cy + arm), fill=colour)
        draw.rectangle((cx - arm, cy - radius, cx + arm, cy + radius), fill=colour)
    else:
        draw.polygon(_polygon(kind, cx, cy, radius, angle), fill=colour)


def _polygon(kind: str, cx: float, cy: float, radius: float, angle: float) -> list[tuple]:
    sides = {"square": 4, "triangle": 3, "hexagon": 6, "diamond": 4, "octagon": 8}
    if kind in sides:
        if kind == "diamond":
            angle = 0.0
        return [(cx + radius * math.cos(angle + 2 * math.pi * i / sides[kind]),
                 cy + radius * math.sin(angle + 2 * math.pi * i / sides[kind]))
                for i in range(sides[kind])]
    points = 5 if kind == "star5" else 8
    return [(cx + (radius if i % 2 == 0 else radius * 0.45) * math.cos(angle + math.pi * i / points),
             cy + (radius if i % 2 == 0 else radius * 0.45) * math.sin(angle + math.pi * i / points))
            for i in range(2 * points)]


def _save_with_mode(rng: random.Random, picture: Image.Image, path: Path, quirks: dict) -> None:
    draw = rng.random()
    modes = quirks["odd_modes"]
    if draw < 0.03:
        modes["L"] = modes.get("L", 0) + 1
        picture.convert("L").save(path, "JPEG", quality=85)
    elif draw < 0.05:
        modes["RGBA_png"] = modes.get("RGBA_png", 0) + 1
        rgba = picture.convert("RGBA")
        rgba.putalpha(Image.new("L", picture.size, 200))
        rgba.save(path, "PNG", compress_level=1)  # PNG bytes behind a .jpg name, as real exports have
    elif draw < 0.07:
        modes["CMYK"] = modes.get("CMYK", 0) + 1
        picture.convert("CMYK").save(path, "JPEG", quality=85)
    elif draw < 0.09:
        modes["P"] = modes.get("P", 0) + 1
        picture.convert("P", palette=Image.Palette.WEB).save(path, "PNG", compress_level=1)
    else:
        picture.save(path, "JPEG", quality=rng.randint(70, 92))


def _add_file_quirks(rng: random.Random, products: list[dict], images: list[dict],
                     images_dir: Path, quirks: dict) -> None:
    """Duplicate product rows, image rows without a file, one truncated JPEG."""
    for product in rng.sample(products, max(1, len(products) // 100)):
        products.insert(rng.randrange(len(products)), dict(product))
        quirks["duplicate_rows"] += 1
    candidates = [row for row in images
                  if (images_dir / f"{row['id']}.jpg").read_bytes()[:2] == b"\xff\xd8"]
    chosen = rng.sample(candidates, min(len(candidates), 1 + max(1, len(images) // 100)))
    truncated, missing = chosen[0], chosen[1:]
    path = images_dir / f"{truncated['id']}.jpg"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    quirks["truncated_images"] = 1
    for row in missing:
        (images_dir / f"{row['id']}.jpg").unlink()
    quirks["missing_image_files"] = len(missing)


def _write_csv(path: Path, columns: list[str], rows: list[dict], line_end: str = "\n") -> None:
    """Write like the real export: leading unnamed index (with gaps), its line ends,
    and fields quoted only for commas, quotes or newlines, so a bare `\\r` stays unquoted."""
    lines = ["," + ",".join(columns)]
    index = 0
    for row in rows:
        lines.append(",".join([str(index)] + [_field(row[column]) for column in columns]))
        index += 2 if index % 7 == 6 else 1
    path.write_bytes((line_end.join(lines) + line_end).encode("utf-8"))


def _field(value) -> str:
    if value is None:
        return ""
    text = str(value)
    if any(character in text for character in ',"\n'):
        return '"' + text.replace('"', '""') + '"'
    return text
