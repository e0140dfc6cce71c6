"""From the JSON of ``/v1/embeddings``'s ``input`` to items `Encoder.prepare` takes.

An image is a ``data:image/...;base64,`` URI or, only under directories the operator
allows (``--allow-path``), a file path. URLs are refused, never fetched: fetching would
let any caller make the server request addresses of the caller's choosing. The pixel limit
(``--max-image-pixels``) is `Encoder.prepare`'s, checked on the image's header before
anything decodes it.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..items import ItemError

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_DATA_URI = re.compile(r"^data:(?P<mime>[^;,]*)(?P<params>(;[^;,]*)*),", re.DOTALL)


@dataclass(frozen=True)
class ImagePolicy:
    """Where image files may come from and how large they may be (in bytes; the pixel limit is
    `Encoder.prepare`'s)."""

    allowed_dirs: tuple[Path, ...] = ()
    max_file_bytes: int = 32 * 2**20

    @classmethod
    def create(cls, allow_paths: Sequence[str | os.PathLike] = (), max_file_bytes: int = 32 * 2**20) -> ImagePolicy:
        dirs = []
        for p in allow_paths:
            path = Path(p).expanduser().resolve()
            if not path.is_dir():
                raise ValueError(f"--allow-path {os.fspath(p)!r} is not a directory")
            dirs.append(path)
        return cls(tuple(dirs), max_file_bytes)


def to_encoder_item(obj: Any, index: int, policy: ImagePolicy) -> Any:
    """One element of ``input`` as an `Encoder.prepare` item (raises `ItemError`).

    A string is text; an object takes ``text`` and ``image`` or ``images`` (and ``id``),
    checked by `moon3rt.items.to_item` as for `encode`.
    """
    if isinstance(obj, str):
        return obj
    if not isinstance(obj, dict):
        raise ItemError(index, f"expected a string or an object with 'text' and 'image'/'images', "
                        f"got {_json_type(obj)}")
    item = dict(obj)
    if item.get("image") is not None:
        item["image"] = _image(item["image"], index, "image", policy)
    if isinstance(item.get("images"), list):  # a non-list is named by to_item
        item["images"] = [_image(s, index, f"images[{j}]", policy) for j, s in enumerate(item["images"])]
    return item


def _image(value: Any, index: int, where: str, policy: ImagePolicy) -> bytes:
    if not isinstance(value, str):
        raise ItemError(index, f"'{where}' must be a data: URI or a file path string, got {_json_type(value)}")
    return read_image(value, index, where, policy)


def read_image(source: str, index: int, where: str, policy: ImagePolicy) -> bytes:
    """The encoded bytes of one image given as a data: URI or an allowed file path."""
    if source.startswith("data:"):
        return _decode_data_uri(source, index, where)
    if _URL.match(source):
        raise ItemError(index, f"{where}: URLs are not fetched; send the image as a data:image/...;base64, URI")
    return _read_file(source, index, where, policy)


def _decode_data_uri(uri: str, index: int, where: str) -> bytes:
    match = _DATA_URI.match(uri)
    if match is None:
        raise ItemError(index, f"{where}: malformed data URI (expected data:image/<type>;base64,<data>)")
    mime, params = match["mime"].strip().lower(), match["params"].lower().split(";")
    if mime and not mime.startswith("image/"):
        raise ItemError(index, f"{where}: data URI has media type {mime!r}, not an image/* type")
    if "base64" not in params:
        raise ItemError(index, f"{where}: data URI must be base64-encoded (data:image/<type>;base64,...)")
    try:
        data = base64.b64decode(uri[match.end():], validate=True)
    except (binascii.Error, ValueError) as err:
        raise ItemError(index, f"{where}: invalid base64 in data URI ({err})") from None
    if not data:
        raise ItemError(index, f"{where}: data URI holds no data")
    return data


def _read_file(source: str, index: int, where: str, policy: ImagePolicy) -> bytes:
    if not policy.allowed_dirs:
        raise ItemError(index, f"{where}: file paths are not accepted by this server (no --allow-path); "
                        "send the image as a data:image/...;base64, URI")
    path = Path(source).expanduser()
    if not path.is_absolute():
        raise ItemError(index, f"{where}: file path {source!r} must be absolute")
    real = path.resolve()  # symlinks and '..' resolved before the check
    if not any(real.is_relative_to(d) for d in policy.allowed_dirs):
        raise ItemError(index, f"{where}: {source!r} is outside the allowed directories (--allow-path)")
    try:
        size = real.stat().st_size
        if size > policy.max_file_bytes:
            raise ItemError(index, f"{where}: {source!r} has {size} bytes, more than the limit of "
                            f"{policy.max_file_bytes} (--max-body-mb)")
        return real.read_bytes()
    except FileNotFoundError:
        raise ItemError(index, f"{where}: file not found: {source!r}") from None
    except OSError as err:
        raise ItemError(index, f"{where}: cannot read {source!r}: {err.strerror or err}") from None


def _json_type(obj: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(obj), type(obj).__name__)
