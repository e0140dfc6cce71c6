"""Checkpoint IO: HF-style directories with config.json and safetensors (one file or shards).

Names are mapped to ours by prefix, so all of these load:

- transformers-5 names: ``model.visual.*``, ``model.language_model.*``;
- original Qwen2-VL / GME names: ``visual.*``, ``model.*`` (the decoder);
- bare ``visual.*`` / ``language_model.*`` (a saved `Qwen2VLModel`);
- MOON3 heads: ``moon3.fire.*``, ``moon3.fusion.*``, ``moon3.projection.*``.

``lm_head.weight`` is optional: direct-mode embedding needs no logits. With tied embeddings
(``tie_word_embeddings``, e.g. Qwen2-VL-2B) it is a copy of the input embeddings and is
skipped; with untied ones it is loaded as ``Moon3Model.lm_head`` when present, for reasoning
mode. Everything else must match the model built from config.json exactly: missing,
unexpected and mis-shaped tensors are reported together, at load time, in one
`CheckpointError`; so are weight files that are not safetensors (empty, truncated,
garbage), tensors of an integer dtype where the model has floating-point weights, and an
index whose weight_map names a shard that does not hold the tensor.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import Moon3Config
from .model import Moon3Model

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
LM_HEAD = "lm_head.weight"


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded: the message names the file and the problem."""


@contextlib.contextmanager
def open_safetensors(file: Path):
    """`safe_open` on the CPU, with a file that is not safetensors as a CheckpointError naming it."""
    try:
        handle = safe_open(str(file), framework="pt", device="cpu")
    except (SafetensorError, OSError) as err:
        size = file.stat().st_size if file.exists() else 0
        raise CheckpointError(f"{file}: not a readable safetensors file ({size} bytes; {err}); "
                              "the file is empty, truncated or not safetensors") from None
    with handle as f:
        yield f


def canonical_name(name: str) -> str:
    """Our parameter name for a checkpoint tensor name."""
    for prefix, ours in (
        ("model.visual.", "visual."),
        ("model.language_model.", "language_model."),
        ("visual.", "visual."),
        ("language_model.", "language_model."),
        ("moon3.", "moon3."),
        ("model.", "language_model."),
    ):
        if name.startswith(prefix):
            return ours + name[len(prefix) :]
    return name


def tensor_files(directory: Path) -> list[Path]:
    index = directory / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index}: not a safetensors index with a weight_map ({err!r})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise CheckpointError(f"{index}: weight_map must map tensor names to shard file names")
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (directory / f).exists()]
        if missing:
            raise CheckpointError(f"{directory}: {INDEX_FILE} names shard files that do not exist: {missing}")
        return [directory / f for f in files]
    if (directory / SINGLE_FILE).exists():
        return [directory / SINGLE_FILE]
    found = sorted(directory.glob("*.safetensors"))
    if not found:
        raise CheckpointError(f"{directory}: no *.safetensors weights found")
    return found


def tensor_index(directory: str | os.PathLike) -> dict[str, tuple[Path, str, tuple[int, ...]]]:
    """Our name -> (file, checkpoint name, shape) of every tensor, read from the file headers only."""
    return {ours: entry[:3] for ours, entry in _tensor_entries(Path(directory)).items()}


def _tensor_entries(directory: Path) -> dict[str, tuple[Path, str, tuple[int, ...], str]]:
    """`tensor_index` plus each tensor's safetensors dtype ("F32", "BF16", "I32", ...)."""
    index: dict[str, tuple[Path, str, tuple[int, ...], str]] = {}
    duplicates = []
    for file in tensor_files(directory):
        with open_safetensors(file) as f:
            for name in f.keys():  # noqa: SIM118 - a safe_open handle is no dict
                ours = canonical_name(name)
                if ours in index:  # two layouts in one checkpoint: which one is meant is unknowable
                    duplicates.append(f"{index[ours][1]} and {name}")
                    continue
                meta = f.get_slice(name)
                index[ours] = (file, name, tuple(meta.get_shape()), meta.get_dtype())
    if duplicates:
        raise CheckpointError(f"{directory}: tensors stored twice under different names: {duplicates}")
    _check_weight_map(directory, index)
    return index


def _check_weight_map(directory: Path, index: dict[str, tuple]) -> None:
    """Every tensor the index maps must be in the shard it names: a stale index would
    otherwise show up as 'missing tensors', as if config.json were wrong."""
    path = directory / INDEX_FILE
    if not path.exists():
        return
    weight_map = json.loads(path.read_text())["weight_map"]
    held = {entry[1]: entry[0].name for entry in index.values()}
    wrong = [f"{name} (index: {shard}; " + (f"found in {held[name]})" if name in held else "in none of its shards)")
             for name, shard in sorted(weight_map.items()) if held.get(name) != shard]
    if wrong:
        raise CheckpointError(f"{path}: {len(wrong)} tensor(s) are not in the shard the index names: "
                              + ", ".join(wrong[:10]) + (", ..." if len(wrong) > 10 else ""))


def _is_float(safetensors_dtype: str) -> bool:
    return safetensors_dtype.startswith("F") or safetensors_dtype == "BF16"  # F16, F32, F64, F8_*, BF16


def check_dtypes(model: torch.nn.Module, entries: dict[str, tuple], where: str) -> None:
    """The model's floating-point weights must be floating point in the checkpoint too (an
    int tensor cannot become a parameter)."""
    expected = model.state_dict()
    wrong = [f"{entries[name][1]} in {entries[name][0].name}: {entries[name][3]}"
             for name in sorted(entries)
             if name in expected and expected[name].is_floating_point() and not _is_float(entries[name][3])]
    if wrong:
        raise CheckpointError(f"{where}: tensor(s) of a non-floating-point dtype where the model has "
                              f"floating-point weights (F16, BF16, F32 expected): {wrong}")


def read_tensors(index: dict[str, tuple[Path, str, tuple[int, ...]]], dtype: torch.dtype | None = None,
                 device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The indexed tensors, memory-mapped, cast to `dtype` (floating point ones) and moved to `device`."""
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for ours, (file, name, _) in index.items():
        by_file.setdefault(file, []).append((ours, name))
    state: dict[str, torch.Tensor] = {}
    for file, names in by_file.items():
        with open_safetensors(file) as f:
            for ours, name in names:
                tensor = f.get_tensor(name)
                cast = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
                state[ours] = tensor.to(device=device, dtype=cast)
    return state


def check_shapes(model: torch.nn.Module, shapes: dict[str, tuple[int, ...]], where: str) -> None:
    """One CheckpointError listing every missing, unexpected and mis-shaped tensor."""
    expected = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    misshaped = [
        f"{name}: checkpoint {shapes[name]}, config expects {shape}"
        for name, shape in sorted(expected.items())
        if name in shapes and shapes[name] != shape
    ]
    if missing or unexpected or misshaped:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {missing}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {unexpected}")
        if misshaped:
            parts.append(f"mis-shaped {len(misshaped)}: {misshaped}")
        raise CheckpointError(f"{where} does not match its config.json; " + "; ".join(parts))


def load_model(
    directory: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    flavour: str | None = None,
) -> Moon3Model:
    """Build the model from ``config.json`` and fill it from the safetensors files.

    Names and shapes are checked from the file headers before any weight is read.
    """
    directory = Path(directory)
    if not (directory / "config.json").exists():
        raise CheckpointError(f"{directory}: no config.json (is this a checkpoint directory?)")
    cfg = Moon3Config.from_json_file(directory / "config.json", flavour=flavour)
    entries = _tensor_entries(directory)
    if cfg.text.tie_word_embeddings:
        entries.pop(LM_HEAD, None)  # tied: the LM head is embed_tokens.weight
    with torch.device("meta"):
        model = Moon3Model(cfg, lm_head=LM_HEAD in entries)
    check_shapes(model, {name: entry[2] for name, entry in entries.items()}, str(directory))
    check_dtypes(model, entries, str(directory))
    index = {ours: entry[:3] for ours, entry in entries.items()}
    model.load_state_dict(read_tensors(index, dtype=dtype, device=device), assign=True)
    return model.eval()


def _save_file(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors' `save_file`, readable as the rest of the checkpoint: safetensors 0.8
    creates its file owner-only (0600), which a checkpoint shipped or shared must not be, so
    it takes the mode of the config.json written beside it (the umask's, without touching it)."""
    save_file(tensors, str(path), metadata={"format": "pt"})
    os.chmod(path, stat.S_IMODE((path.parent / "config.json").stat().st_mode))


def save_model(model: Moon3Model, directory: str | os.PathLike, max_shard_bytes: int | None = None) -> None:
    """Write config.json and safetensors under transformers-5 names (sharded past `max_shard_bytes`)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # An index left by an earlier sharded save would win over a new model.safetensors (and
    # stale shards would linger), so the weight files of an earlier save go first.
    for stale in [directory / INDEX_FILE, directory / SINGLE_FILE, *directory.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)
    model.cfg.to_json_file(directory / "config.json")
    tensors = {_checkpoint_name(k): _own_storage(v.detach().cpu()) for k, v in model.state_dict().items()}
    if max_shard_bytes is None:
        _save_file(tensors, directory / SINGLE_FILE)
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _save_file(shard, directory / fname)
        weight_map.update({name: fname for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2))


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """safetensors refuses tensors that share memory (e.g. the triton backend's fused q/k/v views)."""
    t = t.contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone()
    return t


def _checkpoint_name(name: str) -> str:
    if name.startswith("visual."):
        return "model." + name
    if name.startswith("language_model."):
        return "model." + name
    return name
