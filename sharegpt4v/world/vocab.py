"""The world's closed vocabulary: every word a caption, question or fact may use.

Object colours and background colours are disjoint so that a colour word alone tells
whether it names an object or the background.
"""

from __future__ import annotations

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross")
COLOURS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown")
SIZES: tuple[str, ...] = ("small", "large")
BACKGROUNDS: tuple[str, ...] = ("white", "gray", "black", "beige")
TEXTURES: tuple[str, ...] = ("plain", "gradient", "stripes", "dots", "noise")
SOURCES: tuple[str, ...] = ("photo", "text", "art")
ART_STYLES: tuple[str, ...] = ("watercolor", "pixel art", "sketch", "pop art")
STYLES: tuple[str, ...] = ("photo", "poster", *ART_STYLES)
SOURCE_STYLE: dict[str, str] = {"photo": "photo", "text": "poster"}

# Row-major names of the 3x3 grid cells; index = row * 3 + col.
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)

# Short uppercase words for text-rich scenes. None of them is a colour, shape or position word.
WORDS: tuple[str, ...] = (
    "OPEN", "SALE", "EXIT", "STOP", "CAFE", "BOOK", "TAXI", "HOTEL", "MILK", "PARK",
    "BANK", "SHOP", "FOOD", "NEWS", "BUS", "POST", "GIFT", "TEA", "ZOO", "JAZZ",
)

NUMBER_WORDS: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
)

# Render colours (RGB). Chosen to stay distinct from each other and from every background.
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 210, 20),
    "green": (40, 165, 60),
    "blue": (30, 80, 220),
    "purple": (135, 50, 175),
    "pink": (245, 120, 190),
    "brown": (130, 80, 40),
}
BACKGROUND_RGB: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "black": (18, 18, 18),
    "beige": (225, 205, 165),
}


def position_name(row: int, col: int) -> str:
    return POSITIONS[row * 3 + col]


def position_cell(name: str) -> tuple[int, int]:
    index = POSITIONS.index(name)
    return divmod(index, 3)
