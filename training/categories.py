"""The 13 root categories of the marketplace and the label encoder built from them."""

from __future__ import annotations

import json
from pathlib import Path

ROOT_CATEGORIES: tuple[str, ...] = (
    "Appliances",
    "Baby & Kids Stuff",
    "Clothes, Footwear & Accessories",
    "Computers & Software",
    "DIY Tools & Materials",
    "Health & Beauty",
    "Home & Garden",
    "Music, Films, Books & Games",
    "Office Furniture & Equipment",
    "Other Goods",
    "Phones, Mobile Phones & Telecoms",
    "Sports, Leisure & Travel",
    "Video Games & Consoles",
)

CATEGORY_SEPARATOR = " / "


def root_category(path: str) -> str:
    """`Home & Garden / Garden & Patio / Other` -> `Home & Garden`."""
    return path.split(CATEGORY_SEPARATOR)[0].strip()


def build_index_to_name(names) -> dict[str, str]:
    """Label decoder: sorted class names keyed by their index as a string."""
    return {str(i): name for i, name in enumerate(sorted(set(names)))}


def write_index_to_name(mapping: dict[str, str], path: Path) -> None:
    path.write_text(json.dumps(mapping, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def read_index_to_name(path: Path) -> dict[str, str]:
    mapping = json.loads(Path(path).read_text(encoding="utf-8"))
    expected = [str(i) for i in range(len(mapping))]
    if sorted(mapping, key=int) != expected:
        raise ValueError(f"{path}: keys must be the indices 0..{len(mapping) - 1}")
    return mapping


def name_to_index(mapping: dict[str, str]) -> dict[str, int]:
    return {name: int(index) for index, name in mapping.items()}
