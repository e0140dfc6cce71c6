"""ONNX Runtime backend: the loaded model exported once to ONNX, then run by onnxruntime.

On first use the model is exported (`moon3rt.export.export_onnx`, fp32, the full graph)
into ``$MOON3RT_CACHE/onnx/<hash>/`` (default ``~/.cache/moon3rt``), the hash covering
the config, every weight and the model and export code, so another process with the same model
reuses the file and a changed model or exporter never does. Providers: CUDA when the
device is CUDA and onnxruntime has it, else CPU.

The graph computes in fp32 whatever the model's dtype (see export/export_onnx.py), so
a bf16 model's vectors here are those of its weights evaluated in fp32.

Batches are grouped by length (`moon3rt.batching.attention_buckets`): the graph runs
attention per segment in a padded (segments, L) layout (export/onnx_model.py), so each
part holds items of similar length, and its budget counts attention cells, segments x
L^2 summed over items and images (default 2^20 on a CPU, 2^23 on CUDA;
`max_attention_cells` or MOON3RT_ORT_MAX_CELLS; the scores take heads x cells x 4 bytes
per layer), so one large image among small ones does not pad the rest. Every vector is the same whatever part its item runs in. Text-only parts run
the full graph with its one-window placeholder image
(`moon3rt.export.onnx_model.export_inputs`).

Session (environment, since `moon3rt.load` passes only the backend's name; the
constructor's arguments win): ``intra_op_num_threads`` MOON3RT_ORT_THREADS (default:
torch's thread count in the process when the session is made, so the two backends
compare at the same threads), spinning off (MOON3RT_ORT_SPIN=1 turns it on: idle
threads that spin steal cores from the other processes on a shared host), sequential
execution, all graph optimisations; MOON3RT_ORT_ATTENTION=onnx runs the graph whose
attentions are opset-23 ``Attention`` nodes (onnxruntime >= 1.23) instead of standard
ops. `settings` holds what the session was made with (the benchmark records it).
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

from ..batching import attention_buckets, segment_lengths, take_items
from ..model import Moon3Model, PackedBatch

INSTALL_HINT = "pip install 'moon3rt[onnx]'"
DEFAULT_MAX_CELLS = 2**23  # attention cells per part: segments x L^2, items and images
# On a CPU a part's score tensors (heads x cells x 4 bytes per attention) should stay in the
# last-level cache: with moon3-small's 336-px images (4 vision heads, 576 patches) a part of
# 16 images at 2^23 cells made each item cost 1.23x batch 1 (bench/throughput.py, docs/ONNX.md).
CPU_MAX_CELLS = 2**20


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


def run_in_parts(batch: PackedBatch, groups: list[list[int]], merge: int, run) -> np.ndarray:
    """`run(part)` (-> (items, D) array) on each group of item indices; rows in batch order."""
    if len(groups) == 1 and groups[0] == list(range(batch.num_items)):
        return run(batch)
    out = None
    for group in groups:
        rows = run(take_items(batch, group, merge))
        if out is None:
            out = np.empty((batch.num_items, rows.shape[1]), dtype=rows.dtype)
        out[group] = rows
    return out


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, model: Moon3Model, device: torch.device, cache_dir: str | os.PathLike | None = None,
                 max_attention_cells: int | None = None, threads: int | None = None,
                 spin: bool | None = None, attention: str | None = None):
        from ..export.onnx_model import ATTENTION

        self._ort = _require_onnx()
        self.model = model
        self.device = torch.device(device)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        env_cells = os.environ.get("MOON3RT_ORT_MAX_CELLS")
        if max_attention_cells is None and env_cells:
            max_attention_cells = int(env_cells)
        if max_attention_cells is None:
            max_attention_cells = DEFAULT_MAX_CELLS if self.device.type == "cuda" else CPU_MAX_CELLS
        if max_attention_cells < 1:
            raise ValueError(f"max_attention_cells must be positive, got {max_attention_cells}")
        self.max_attention_cells = max_attention_cells
        env_threads = os.environ.get("MOON3RT_ORT_THREADS")
        if threads is None and env_threads:
            threads = int(env_threads)
        if threads is not None and threads < 1:
            raise ValueError(f"onnxruntime intra-op threads must be positive, got {threads}")
        self.threads = threads  # None: torch's thread count when the session is made
        self.spin = _env_flag("MOON3RT_ORT_SPIN") if spin is None else bool(spin)
        self.attention = attention or os.environ.get("MOON3RT_ORT_ATTENTION") or "ops"
        if self.attention not in ATTENTION:
            raise ValueError(f"MOON3RT_ORT_ATTENTION must be one of {ATTENTION}, got {self.attention!r}")
        self.providers = ["CPUExecutionProvider"]
        if self.device.type == "cuda":
            if "CUDAExecutionProvider" in self._ort.get_available_providers():
                self.providers.insert(0, ("CUDAExecutionProvider", {"device_id": self.device.index or 0}))
            else:
                warnings.warn("onnxruntime has no CUDAExecutionProvider here: the onnxruntime backend runs on CPU "
                              "(install onnxruntime-gpu for CUDA)", stacklevel=3)
        self.model_path: Path | None = None
        self.settings: dict = {}
        self._session = None
        self._lock = threading.Lock()

    def session_options(self):
        """The SessionOptions the session is made with (and `settings`, what they say)."""
        options = self._ort.SessionOptions()
        options.intra_op_num_threads = self.threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.execution_mode = self._ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = self._ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        spin = "1" if self.spin else "0"
        options.add_session_config_entry("session.intra_op.allow_spinning", spin)
        options.add_session_config_entry("session.inter_op.allow_spinning", spin)
        self.settings = {
            "onnxruntime": self._ort.__version__, "intra_op_num_threads": options.intra_op_num_threads,
            "inter_op_num_threads": 1, "allow_spinning": self.spin, "execution_mode": "sequential",
            "graph_optimization_level": "all", "attention": self.attention,
            "max_attention_cells": self.max_attention_cells,
            "providers": [p if isinstance(p, str) else p[0] for p in self.providers],
        }
        return options

    def session(self):
        """The inference session, exporting the model first if the cache lacks it."""
        with self._lock:
            if self._session is None:
                self.model_path = self._export()
                self._session = self._ort.InferenceSession(str(self.model_path), self.session_options(),
                                                           providers=self.providers)
            return self._session

    def _export(self) -> Path:
        from ..export.export_onnx import export_onnx

        suffix = "" if self.attention == "ops" else f"-attention-{self.attention}"
        target = (self.cache_dir or cache_root() / "onnx") / (model_digest(self.model) + suffix)
        if (target / "model.json").exists():  # written last, and the directory appears whole
            return target / "model.onnx"
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        staging.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
        try:
            export_onnx(self.model, staging / "model.onnx", attention=self.attention)
            os.replace(staging, target)
        except OSError:
            if not (target / "model.json").exists():  # not another process winning the race
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target / "model.onnx"

    def parts(self, batch: PackedBatch) -> list[list[int]]:
        """Item indices of the parts a batch runs in (`attention_buckets`)."""
        merge = self.model.cfg.vision.spatial_merge_size
        return attention_buckets(*segment_lengths(batch, merge), self.max_attention_cells)

    def embed(self, batch: PackedBatch) -> torch.Tensor:
        """Un-normalised vectors (B, output_dim), float32, on the CPU."""
        from ..export.onnx_model import OUTPUT, export_inputs

        session, cfg = self.session(), self.model.cfg
        names = [i.name for i in session.get_inputs()]  # a model without MHMF has no title_mask

        def run(part: PackedBatch) -> np.ndarray:
            inputs = export_inputs(part, cfg)
            return session.run([OUTPUT], {name: inputs[name] for name in names})[0]

        return torch.from_numpy(run_in_parts(batch, self.parts(batch), cfg.vision.spatial_merge_size, run))
