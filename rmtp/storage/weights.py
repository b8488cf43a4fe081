"""Reading and writing weight files safely.

Checkpoints come from outside (a colleague's run, a download), so they are untrusted: a ``.pth``
file is a pickle, and a pickle can run any code while it loads. This module therefore reads
pickles only with ``torch.load(..., weights_only=True)``, which refuses every global except the
tensor and container types a state dict needs, and prefers safetensors (no code at all) when it
writes. Every failure is a :class:`~rmtp.errors.CheckpointError` whose one-line message names the
file, what is wrong with it and what would be accepted, because the CLI shows exactly that line.
"""

from __future__ import annotations

import os
import pickle
import re
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rmtp.errors import CheckpointError

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pth", ".pt", ".bin")
#: Keys under which training scripts commonly nest the model's state dict (timm, Lightning, plain loops).
NESTED_KEYS = ("state_dict", "model", "model_state_dict")
#: Prefix ``torch.nn.parallel.DistributedDataParallel`` puts in front of every key.
DDP_PREFIX = "module."
#: How many offending keys an error lists before it says "and N more".
MAX_LISTED_KEYS = 5

_ALLOWED = (
    f"allowed: {', '.join(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)} files holding a state dict "
    f"(parameter name -> tensor), optionally nested under {', '.join(repr(k) for k in NESTED_KEYS)}"
)


def read_state_dict(path: Path | str) -> dict[str, torch.Tensor]:
    """The state dict stored in ``path``, on the CPU, with a DDP ``module.`` prefix removed.

    Only data is read: safetensors files, or pickles that ``weights_only=True`` accepts. A nested
    state dict (``{"state_dict": {...}, "epoch": 3}``) is unwrapped so training checkpoints load as
    they are.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise CheckpointError(f"checkpoint {path}: {what}; {_ALLOWED}")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        loaded = _load_safetensors(path)
    elif suffix in PICKLE_SUFFIXES:
        loaded = _load_weights_only_pickle(path)
    else:
        raise CheckpointError(f"checkpoint {path}: unknown file type {path.suffix or '(no suffix)'!r}; {_ALLOWED}")
    return _strip_prefix(_as_tensor_dict(_unwrap(loaded), path), DDP_PREFIX)


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # any parser failure means the file is not a valid safetensors file
        raise CheckpointError(
            f"checkpoint {path}: not a valid safetensors file (truncated or corrupt?): {_one_line(exc)}"
        ) from exc


def _load_weights_only_pickle(path: Path) -> Any:
    """``torch.load`` restricted to tensors and plain containers: a pickle cannot run code this way."""
    try:
        with warnings.catch_warnings():
            # A pickle of another protocol than torch's own (2) makes torch warn before it refuses
            # or reads the file; rmtp's refusal (or success) is the whole message.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's own message advises weights_only=False; that advice must not reach users.
        raise CheckpointError(
            f"checkpoint {path}: refused to unpickle it: it holds Python objects other than tensors and "
            f"plain containers ({_refusal_reason(exc)}); only weights-only pickles are read, because a "
            f"pickle can run arbitrary code: re-save the state dict alone (torch.save(model.state_dict(), ...)) "
            f"or as .safetensors"
        ) from exc
    except Exception as exc:  # zip/pickle parser failures on a truncated or foreign file
        raise CheckpointError(
            f"checkpoint {path}: not a readable PyTorch checkpoint (truncated or corrupt?): {_one_line(exc)}"
        ) from exc


def _refusal_reason(exc: Exception) -> str:
    """What torch's weights-only unpickler refused, without its advice on how to allow it anyway."""
    text = str(exc)
    named = re.search(r"GLOBAL ([\w.]+)", text)
    if named:
        return f"it references {named.group(1)}"
    for line in text.splitlines():
        if "Unsupported" in line:
            return line.split(". ")[0].replace("WeightsUnpickler error: ", "").strip().rstrip(".")
    return "unsupported pickle content"


def _one_line(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split())
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{exc.__class__.__name__}: {text}" if text else exc.__class__.__name__


def _unwrap(loaded: Any) -> Any:
    """The state dict inside a training checkpoint, or ``loaded`` itself if it already is one."""
    if not isinstance(loaded, Mapping) or _all_tensors(loaded):
        return loaded
    for key in NESTED_KEYS:
        inner = loaded.get(key)
        if isinstance(inner, Mapping):
            return inner
    return loaded


def _all_tensors(mapping: Mapping) -> bool:
    return all(isinstance(value, torch.Tensor) for value in mapping.values())


def _as_tensor_dict(loaded: Any, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(loaded, Mapping):
        raise CheckpointError(f"checkpoint {path}: holds a {type(loaded).__name__}, not a state dict; {_ALLOWED}")
    if not loaded:
        raise CheckpointError(f"checkpoint {path}: the state dict is empty; {_ALLOWED}")
    for key, value in loaded.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"checkpoint {path}: not a dict of tensors (entry {key!r} holds a {type(value).__name__}); {_ALLOWED}"
            )
    return dict(loaded)


def _strip_prefix(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Drop ``prefix`` when every key has it (a model saved while wrapped in DDP)."""
    if all(key.startswith(prefix) for key in state_dict):
        return {key[len(prefix):]: value for key, value in state_dict.items()}
    return state_dict


def load_state_dict_into(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str) -> None:
    """Load ``state_dict`` into ``model`` strictly, or explain in one line why it does not fit.

    Strict, because a silently half-loaded model would be pruned and evaluated as if it were the
    trained one. The check runs before ``load_state_dict`` so the message can list shapes, which
    torch's own error buries in a multi-line dump.
    """
    expected = model.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    mismatched = [
        f"{key}: checkpoint {_shape(state_dict[key])} vs model {_shape(expected[key])}"
        for key in expected
        if key in state_dict and tuple(state_dict[key].shape) != tuple(expected[key].shape)
    ]
    problems = [
        f"{label} ({len(items)}): {_listed(items)}"
        for label, items in (("shape mismatch", mismatched), ("missing keys", missing), ("unexpected keys", unexpected))
        if items
    ]
    if problems:
        raise CheckpointError(
            f"checkpoint {source} does not fit the model: {'; '.join(problems)}; model.kwargs (num_classes, "
            f"img_size, depth, embed_dim, ...) must describe the architecture the checkpoint was trained with"
        )
    try:
        model.load_state_dict(dict(state_dict), strict=True)
    except RuntimeError as exc:  # e.g. a dtype that cannot be copied into the parameter
        raise CheckpointError(f"checkpoint {source} could not be loaded into the model: {_one_line(exc)}") from exc


def _shape(tensor: torch.Tensor) -> str:
    return "(" + ", ".join(str(n) for n in tensor.shape) + ")"


def _listed(items: list[str]) -> str:
    shown = ", ".join(items[:MAX_LISTED_KEYS])
    return shown + (f" and {len(items) - MAX_LISTED_KEYS} more" if len(items) > MAX_LISTED_KEYS else "")


def write_safetensors_atomic(
    tensors: Mapping[str, torch.Tensor], path: Path | str, metadata: dict[str, str] | None = None
) -> None:
    """Write ``tensors`` to ``path`` as safetensors so that ``path`` is never seen half-written.

    The file is written next to ``path`` under a temporary name and then moved over it with
    ``os.replace`` (atomic on one file system), so a crash or a full disk leaves the old file
    intact. safetensors refuses tensors that share storage (tied weights) or are strided views,
    so such tensors are saved as compact copies. safetensors creates its file 0600; the weights
    get the permissions of any file created under the umask, so a shared model stays readable.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    from rmtp.storage.atomic import _umask

    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError("safetensors metadata must map str to str")
    path = Path(path)
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        save_file(_compact(tensors), str(temp), metadata=metadata)
        os.chmod(temp, 0o666 & ~_umask())
        with open(temp, "rb") as handle:
            os.fsync(handle.fileno())  # the data must be on disk before the name points at it
        os.replace(temp, path)
    except (OSError, SafetensorError) as exc:  # missing folder, no permission, full disk
        raise CheckpointError(f"could not write {path}: {_one_line(exc)}") from exc
    finally:
        temp.unlink(missing_ok=True)


def _compact(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, each owning its storage (safetensors' requirement)."""
    out: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()
    for key, tensor in tensors.items():
        tensor = tensor.detach().cpu()
        storage = tensor.untyped_storage()
        owns_storage = (
            tensor.is_contiguous()
            and tensor.storage_offset() == 0
            and tensor.numel() * tensor.element_size() == storage.nbytes()
        )
        if not owns_storage or storage.data_ptr() in seen_storages:
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        seen_storages.add(tensor.untyped_storage().data_ptr())
        out[key] = tensor
    return out
