"""ONNX Runtime backend: the loaded model exported once to ONNX, then run by onnxruntime.

On first use the model is exported (`moon3rt.export.export_onnx`, fp32, the full graph)
into ``$MOON3RT_CACHE/onnx/<hash>/`` (default ``~/.cache/moon3rt``), the hash covering
the config, every weight and the model and export code, so another process with the same model
reuses the file and a changed model or exporter never does. Providers: CUDA when the
device is CUDA and onnxruntime has it, else CPU.

The graph computes in fp32 whatever the model's dtype (see export/export_onnx.py), so
a bf16 model's vectors here are those of its weights evaluated in fp32.

Batches are cut, by whole items, into parts of at most `max_batch_tokens` decoder tokens
plus patches: the standard-ops graph materialises (heads, T, T) attention scores, so
its memory grows with the square of the batch. Text-only parts run the full graph with
its one-window placeholder image (`moon3rt.export.onnx_model.export_inputs`).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import tempfile
import threading
import warnings
from pathlib import Path

import numpy as np
import torch

from ..model import Moon3Model, PackedBatch

INSTALL_HINT = "pip install 'moon3rt[onnx]'"


def _require_onnx():
    try:
        import onnx  # noqa: F401
        import onnxruntime
    except ImportError as err:
        raise ImportError(f"the onnxruntime backend needs the onnx and onnxruntime packages ({err}); "
                          f"install them with: {INSTALL_HINT}") from None
    return onnxruntime


def cache_root() -> Path:
    if os.environ.get("MOON3RT_CACHE"):
        return Path(os.environ["MOON3RT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moon3rt"


def model_digest(model: Moon3Model) -> str:
    """Hash of the config, every tensor (name, dtype, shape, bytes) and the model and export code."""
    from ..export.export_onnx import export_onnx
    from ..export.onnx_model import OnnxMoon3

    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(model.cfg.to_dict(), sort_keys=True).encode())
    for code in (Moon3Model, OnnxMoon3, export_onnx):  # the graph is traced through all three files
        h.update(Path(inspect.getfile(code)).read_bytes())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        h.update(tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def split_items(batch: PackedBatch, max_tokens: int, merge: int) -> list[PackedBatch]:
    """Cut a packed batch, by whole items in order, into parts of at most `max_tokens`
    tokens plus patches each (an item over the budget forms a part of its own)."""
    cu = batch.cu_seqlens.tolist()
    cu_img = batch.cu_images.tolist()
    cost = [cu[b + 1] - cu[b] + (cu_img[b + 1] - cu_img[b]) * merge**2 for b in range(batch.num_items)]
    if sum(cost) <= max_tokens:
        return [batch]
    groups, lo, total = [], 0, 0
    for b, c in enumerate(cost):
        if b > lo and total + c > max_tokens:
            groups.append((lo, b))
            lo, total = b, 0
        total += c
    groups.append((lo, batch.num_items))
    return [select_items(batch, lo, hi, merge) for lo, hi in groups]


def select_items(batch: PackedBatch, lo: int, hi: int, merge: int) -> PackedBatch:
    """Items lo..hi-1 of a packed batch as a batch of their own."""
    cu, cu_t, cu_i = batch.cu_seqlens.tolist(), batch.cu_titles.tolist(), batch.cu_images.tolist()
    t0, t1 = cu[lo], cu[hi]
    pixel_values = grid = None
    if batch.pixel_values is not None and cu_i[hi] > cu_i[lo]:
        g = batch.image_grid_thw.cpu().numpy()
        merged = np.concatenate([[0], np.cumsum(g.prod(axis=1) // merge**2)])
        patches = np.concatenate([[0], np.cumsum(g.prod(axis=1))])
        first, last = np.searchsorted(merged, [cu_i[lo], cu_i[hi]])
        pixel_values = batch.pixel_values[patches[first] : patches[last]]
        grid = batch.image_grid_thw[first:last]

    def offsets(c: list[int]) -> torch.Tensor:
        return torch.tensor([x - c[lo] for x in c[lo : hi + 1]], dtype=torch.int32)

    return PackedBatch(
        input_ids=batch.input_ids[t0:t1], position_ids=batch.position_ids[:, t0:t1],
        cu_seqlens=offsets(cu), pool_index=batch.pool_index[lo:hi] - t0,
        title_index=batch.title_index[cu_t[lo] : cu_t[hi]] - t0, cu_titles=offsets(cu_t),
        cu_images=offsets(cu_i), pixel_values=pixel_values, image_grid_thw=grid,
    )


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, model: Moon3Model, device: torch.device, cache_dir: str | os.PathLike | None = None,
                 max_batch_tokens: int = 4096):
        self._ort = _require_onnx()
        self.model = model
        self.device = torch.device(device)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.max_batch_tokens = max_batch_tokens
        self.providers = ["CPUExecutionProvider"]
        if self.device.type == "cuda":
            if "CUDAExecutionProvider" in self._ort.get_available_providers():
                self.providers.insert(0, ("CUDAExecutionProvider", {"device_id": self.device.index or 0}))
            else:
                warnings.warn("onnxruntime has no CUDAExecutionProvider here: the onnxruntime backend runs on CPU "
                              "(install onnxruntime-gpu for CUDA)", stacklevel=3)
        self.model_path: Path | None = None
        self._session = None
        self._lock = threading.Lock()

    def session(self):
        """The inference session, exporting the model first if the cache lacks it."""
        with self._lock:
            if self._session is None:
                self.model_path = self._export()
                self._session = self._ort.InferenceSession(str(self.model_path), providers=self.providers)
            return self._session

    def _export(self) -> Path:
        from ..export.export_onnx import export_onnx

        target = (self.cache_dir or cache_root() / "onnx") / model_digest(self.model)
        if (target / "model.json").exists():  # written last, and the directory appears whole
            return target / "model.onnx"
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        staging.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
        try:
            export_onnx(self.model, staging / "model.onnx")
            os.replace(staging, target)
        except OSError:
            if not (target / "model.json").exists():  # not another process winning the race
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target / "model.onnx"

    def embed(self, batch: PackedBatch) -> torch.Tensor:
        """Un-normalised vectors (B, output_dim), float32, on the CPU."""
        from ..export.onnx_model import OUTPUT, export_inputs

        session, cfg = self.session(), self.model.cfg
        names = [i.name for i in session.get_inputs()]  # a model without MHMF has no title_mask
        outs = []
        for part in split_items(batch, self.max_batch_tokens, cfg.vision.spatial_merge_size):
            inputs = export_inputs(part, cfg)
            outs.append(session.run([OUTPUT], {name: inputs[name] for name in names})[0])
        return torch.from_numpy(np.concatenate(outs))
