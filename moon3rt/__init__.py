"""moon3rt: a Triton-kernel inference runtime for MOON3-style multimodal product embedders.

    import moon3rt
    vectors = moon3rt.encode(["red cotton t-shirt"])            # cached default encoder
    encoder = moon3rt.load("path/to/checkpoint")                  # or a preset name
    vectors = encoder.encode([{"text": "Red tee", "image": Path("tee.jpg")}], dim=128)
"""

from .api import EncodeError, Encoder, EncodeResult, encode, load
from .config import Moon3Config
from .items import Item, ItemError

__version__ = "0.1.0"

__all__ = ["EncodeError", "EncodeResult", "Encoder", "Item", "ItemError", "Moon3Config", "encode", "load"]
