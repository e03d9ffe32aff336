"""The 13 root categories of the marketplace and the label encoder built from them."""

from __future__ import annotations

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


def name_to_index(mapping: dict[str, str]) -> dict[str, int]:
    return {name: int(index) for index, name in mapping.items()}
