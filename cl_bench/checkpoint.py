"""Checkpoints: everything a run needs to continue as if it had never stopped, in one file.

``<run_dir>/checkpoint.pt`` is written by the loop (:mod:`cl_bench.loop`) every
``checkpoint_every`` steps and every ``checkpoint_minutes``, at every experience boundary, and at
the step boundary after SIGTERM/SIGINT (:mod:`cl_bench.interrupts`). It is a ``torch.save`` file
of plain containers and tensors only, read back with ``weights_only=True`` (loading it runs no
code), written atomically: temporary file, fsync, rename, fsync of the directory, so the previous
checkpoint stays whole until the new one is. Format version :data:`FORMAT_VERSION`
(docs/checkpoints.md lists every key):

- ``model``: the backbone and head tensors that training can change. The original frozen weights
  of an adapter method are left out (the checkpoint of a ViT-B/16 LoRA run is MBs, not the 600 MB
  backbone) and checked instead by :func:`fingerprint` when the run resumes; strategies that write
  into them (``finetune``, ``lisa``, ``merge_each_experience``) keep them all
  (:meth:`~cl_bench.strategy.Strategy.changes_frozen_weights`);
- ``strategy``: the strategy's own state (:meth:`~cl_bench.strategy.Strategy.extra_state`);
- ``optimizer``/``scheduler``: the loop's optimizer and schedule (inside an experience);
- ``rng``: python, numpy, torch CPU and CUDA generators and the loop's own;
- ``loop``: the position (experience, step, the epoch's sample order and place in it, the loss
  window) and ``record``: the partial run record (JSON text), timings and segments.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cl_bench import results
from cl_bench.errors import ClBenchError

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT = "cl-bench-checkpoint"
FORMAT_VERSION = 1
# run settings that do not change the numbers: a resume may change them
NON_EXPERIMENT_KEYS = frozenset(
    {
        "out",
        "run_id",
        "overwrite",
        "report",
        "threads",
        "log",
        "checkpoint_every",
        "host_memory_gb",
        "checkpoint_minutes",
        "keep_checkpoints",
        "restart",
    }
)


class CheckpointError(ClBenchError):
    """A checkpoint that cannot be used: unreadable, truncated, another format or another run."""


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint read back: its path and its contents (see the module docstring)."""

    path: Path
    data: dict[str, Any]

    @property
    def training(self) -> bool:
        """True: written inside an experience (optimizer state and sample order included)."""
        return bool(self.data["loop"]["training"])

    @property
    def experience(self) -> int:
        """The experience the run continues with."""
        return int(self.data["loop"]["experience"])


# -- what the model holds ------------------------------------------------------------------------


def model_tensors(
    modules: Mapping[str, nn.Module], skip: frozenset[int]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The tensors of ``modules`` (``{"backbone": ..., "head": ...}``) by ``<prefix>.<name>``, split
    into (saved, skipped): a parameter whose ``id`` is in ``skip`` (an original frozen weight) is
    skipped unless it requires grad now."""
    saved: dict[str, torch.Tensor] = {}
    skipped: dict[str, torch.Tensor] = {}
    for prefix, module in modules.items():
        for name, tensor in module.state_dict(keep_vars=True).items():
            key = f"{prefix}.{name}"
            if isinstance(tensor, nn.Parameter) and id(tensor) in skip and not tensor.requires_grad:
                skipped[key] = tensor
            elif isinstance(tensor, torch.Tensor):
                saved[key] = tensor.detach()
            else:
                saved[key] = tensor  # a module's extra state (get_extra_state)
    return saved, skipped


def fingerprint(tensors: Mapping[str, torch.Tensor]) -> str:
    """A SHA-256 over the names, shapes, dtypes and a strided sample (about 4k values) of each
    tensor: it tells whether the frozen weights a resumed run rebuilt are the checkpointed run's
    (another weights file, another init seed), in milliseconds even for ViT-L."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach()
        flat = t.reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].float().cpu()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def load_model(modules: Mapping[str, nn.Module], saved: Mapping[str, Any], skipped: set[str]) -> None:
    """Load ``saved`` into ``modules``; every key but the skipped ones must be there, and no other."""
    for prefix, module in modules.items():
        part = {k[len(prefix) + 1 :]: v for k, v in saved.items() if k.startswith(prefix + ".")}
        result = module.load_state_dict(part, strict=False)
        missing = [f"{prefix}.{k}" for k in result.missing_keys if f"{prefix}.{k}" not in skipped]
        unexpected = [f"{prefix}.{k}" for k in result.unexpected_keys]
        if missing or unexpected:
            raise CheckpointError(
                f"the checkpoint does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )


# -- random number generators ---------------------------------------------------------------------


def rng_state(loop_generator: torch.Generator) -> dict[str, Any]:
    """Every generator a run draws from: python's, numpy's, torch's (CPU, each CUDA device) and
    the loop's own (batches, augmentation), as plain containers and tensors."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [
            str(kind),
            torch.from_numpy(np.asarray(keys).copy()),
            int(pos),
            int(has_gauss),
            float(cached),
        ],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "loop": loop_generator.get_state(),
    }


def set_rng_state(state: Mapping[str, Any], loop_generator: torch.Generator) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    loop_generator.set_state(state["loop"])


# -- the file ---------------------------------------------------------------------------------------


def write(run_dir: Path, data: dict[str, Any]) -> tuple[Path, int]:
    """Write ``run_dir/checkpoint.pt`` atomically (:func:`cl_bench.results.write_bytes_atomic`: the
    old one stays whole until the rename); returns its path and size in bytes. OS errors
    propagate (the loop turns them into one line)."""
    path = run_dir / CHECKPOINT_FILE
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "version": FORMAT_VERSION, **data}, buffer)
    blob = buffer.getbuffer()
    results.write_bytes_atomic(path, blob)
    return path, len(blob)


def read(run_dir: Path) -> Checkpoint | None:
    """The checkpoint in ``run_dir`` (None: there is none); a CheckpointError names what is wrong."""
    path = run_dir / CHECKPOINT_FILE
    if not path.exists():
        return None
    hint = "; pass --restart to discard it and start the run over"
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated zip, a foreign pickle: torch raises many types
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"cannot read the checkpoint {path}: {first[:200]}{hint}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a cl-bench checkpoint{hint}")
    if data.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {data.get('version')}; this cl-bench reads "
            f"version {FORMAT_VERSION}{hint}"
        )
    missing = {"config", "loop", "model", "strategy", "rng", "record", "backbone_fingerprint"} - set(data)
    if missing:
        raise CheckpointError(f"{path} lacks {sorted(missing)}{hint}")
    return Checkpoint(path, data)


def remove(run_dir: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (run_dir / CHECKPOINT_FILE).unlink()


def config_text(config: Mapping[str, Any]) -> str:
    return json.dumps(config, sort_keys=True)


def differing_keys(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """The experiment keys whose values differ between two record configs (component arguments
    as ``strategy.r``), ignoring :data:`NON_EXPERIMENT_KEYS`."""

    def flat(config: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in config.items():
            if key in NON_EXPERIMENT_KEYS:
                continue
            if key.endswith("_args") and isinstance(value, dict):
                out.update({f"{key[:-5]}.{k}": v for k, v in value.items()})
            else:
                out[key] = value
        return out

    a, b = flat(saved), flat(current)
    return sorted(k for k in a.keys() | b.keys() if a.get(k, "<absent>") != b.get(k, "<absent>"))
