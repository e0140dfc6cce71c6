"""What `encode` accepts as an item, and the checks that name a bad one."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np
from PIL import Image

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray]
DICT_KEYS = ("text", "image", "images", "id")


class ItemError(ValueError):
    """One item that cannot be embedded: its index in the request and the reason."""

    def __init__(self, index: int, reason: str):
        super().__init__(f"item {index}: {reason}")
        self.index = index
        self.reason = reason

    def detached(self) -> "ItemError":
        """This error without its traceback and exception chain, to keep in a report: their
        frames would hold the item's data (a file's bytes, decoded pixels) as long as the
        error lives. Returns self."""
        self.__traceback__ = self.__context__ = self.__cause__ = None
        return self


@dataclass
class Item:
    """A product (images and a title) or a query (text only).

    `images` are paths, encoded bytes, PIL images or HxWx3 uint8 arrays. Inside an
    `Item` or a dict a ``str`` image is a path; a bare ``str`` item is always text.
    """

    text: str | None = None
    images: Sequence[ImageSource] = field(default_factory=tuple)
    id: Any = None


def _is_image(obj: Any) -> bool:
    return isinstance(obj, (bytes, bytearray, memoryview, Image.Image, np.ndarray, os.PathLike))


def to_item(obj: Any, index: int) -> Item:
    """Normalise one user input into an `Item`, or raise `ItemError` naming what is wrong."""
    if isinstance(obj, Exception):  # an item that already failed upstream (e.g. an unparsable input line)
        raise ItemError(index, str(obj))
    if isinstance(obj, Item):
        images = obj.images
        if images is None:
            images = ()
        elif _is_image(images) or isinstance(images, str):  # one image, not a sequence of them
            images = (images,)
        elif not isinstance(images, (list, tuple)):
            raise ItemError(index, f"Item.images must be a list of images, got {type(images).__name__}")
        item = Item(text=obj.text, images=tuple(images), id=obj.id)
    elif isinstance(obj, str):
        item = Item(text=obj)
    elif _is_image(obj):
        item = Item(images=(obj,))
    elif isinstance(obj, dict):
        unknown = sorted(str(k) for k in obj if k not in DICT_KEYS)
        if unknown:
            raise ItemError(index, f"unknown key(s) {unknown}; an item dict takes {list(DICT_KEYS)}")
        if "image" in obj and "images" in obj:
            raise ItemError(index, "give either 'image' or 'images', not both")
        if "images" in obj:
            images = obj["images"]
            if not isinstance(images, (list, tuple)):
                raise ItemError(index, f"'images' must be a list, got {type(images).__name__}")
        elif isinstance(obj.get("image"), (list, tuple)):
            raise ItemError(index, f"'image' takes one image, got a {type(obj['image']).__name__} of "
                                   f"{len(obj['image'])}; give several as 'images': [...]")
        elif obj.get("image") is not None:
            images = (obj["image"],)
        else:
            images = ()
        item = Item(text=obj.get("text"), images=tuple(images), id=obj.get("id"))
    else:
        raise ItemError(
            index,
            f"unsupported item type {type(obj).__name__}; expected a str (text), an image "
            "(pathlib.Path, bytes, PIL image, numpy array), a dict or moon3rt.Item",
        )
    if item.text is not None and not isinstance(item.text, str):
        raise ItemError(index, f"'text' must be a string, got {type(item.text).__name__}")
    if item.text is not None:
        try:
            item.text.encode("utf-8")
        except UnicodeEncodeError as err:  # e.g. a lone surrogate; the tokenizer cannot take it
            raise ItemError(index, f"'text' is not valid Unicode ({err.reason} at position {err.start})") from None
    for j, image in enumerate(item.images):
        if not (_is_image(image) or isinstance(image, str)):
            raise ItemError(index, f"image {j} has unsupported type {type(image).__name__}")
    if not item.images and not (item.text and item.text.strip()):
        raise ItemError(index, "empty item: no text and no image")
    return item
