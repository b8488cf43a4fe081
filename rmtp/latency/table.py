"""The cost table: measured per-call seconds of layers, one JSON file per device, precision, batch
and thread count, so that a second run on the same machine times nothing.

A key names what was timed exactly: the module's type and ``repr`` (which carries its widths,
rank, kernel size, stride...) plus its input shape. Two layers of the same shape in different
blocks share one entry. The file is rewritten atomically after each measurement, so a killed run
leaves the previous table or the new one; a table that does not parse is refused with its path
(delete it to re-measure) rather than silently ignored.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rmtp.errors import RmtpError
from rmtp.storage.atomic import write_json_atomic

FORMAT_VERSION = 1


class LatencyError(RmtpError):
    """The latency cost model cannot run as asked (unknown device, unreadable table)."""


def module_key(module: Any, input_shape: tuple[int, ...]) -> str:
    """A stable key for timing ``module`` on an input of ``input_shape``: its type, its repr and
    the head count of attention submodules (not in timm's repr), hashed; plus the shape."""
    heads = [str(m.num_heads) for m in module.modules() if hasattr(m, "num_heads")]
    # A weight converted to a sparse kernel's layout (2:4 semi-structured) has the dense repr.
    layouts = sorted({type(p.data).__name__ for p in module.parameters()} - {"Tensor"})
    layouts += sorted({str(p.dtype) for p in module.parameters()})
    text = (f"{type(module).__module__}.{type(module).__qualname__}|{module!r}|heads={','.join(heads)}"
            f"|layouts={','.join(layouts)}")
    digest = hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]
    return f"{type(module).__name__}:{digest}:{'x'.join(map(str, input_shape))}"


def device_name(device: Any) -> str:
    """What the times were measured on: the GPU's name, or the CPU's model name (from /proc/cpuinfo
    where it exists) and architecture."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.lower().startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({platform.machine()})"


def table_path(folder: Path, device: str, precision: str, batch: int, threads: int) -> Path:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device).strip("-").lower()[:80] or "device"
    return folder / f"{slug}-{precision}-b{batch}-t{threads}.json"


@dataclass
class CostTable:
    """Seconds per call by :func:`module_key`, for one device/precision/batch/threads."""

    path: Path
    header: dict[str, Any]
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def open(cls, path: Path, header: dict[str, Any]) -> CostTable:
        """The table at ``path`` (empty if there is none yet). A table written for other settings
        (its header differs: another torch, device or batch) starts empty and is overwritten."""
        if not path.exists():
            return cls(path, header)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict) and data.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
                return cls(path, header)  # another rmtp's layout: measured again, overwritten
            entries = data["entries"]
            if not isinstance(entries, dict):
                raise TypeError("entries is not a mapping")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise LatencyError(f"latency cost table {path} is unreadable ({exc}); delete it to measure again") from None
        if data.get("header") != header:
            return cls(path, header)  # other settings: measured again, overwritten
        bad = next((key for key, entry in entries.items() if not _valid_entry(entry)), None)
        if bad is not None:
            raise LatencyError(f"latency cost table {path} is unreadable (entry {bad!r} is not "
                               f"{{\"seconds\": <a finite number ≥ 0>, ...}}); delete it to measure again")
        return cls(path, header, entries)

    def seconds(self, key: str) -> float | None:
        entry = self.entries.get(key)
        return float(entry["seconds"]) if entry is not None else None

    def record(self, key: str, seconds: float, what: str) -> None:
        self.entries[key] = {"seconds": seconds, "what": what}

    def save(self) -> None:
        """Write the table via a temp file and a rename (a killed run leaves the previous table or
        this one). A write that fails (full disk, read-only folder, a file where a folder should be)
        is one :class:`LatencyError` line naming the file and the OS error, not a traceback from the
        middle of a prune step; no temp file is left."""
        try:
            write_json_atomic(self.path, {"format_version": FORMAT_VERSION, "header": self.header,
                                          "entries": dict(sorted(self.entries.items()))})
        except OSError as exc:
            raise LatencyError(f"latency cost table {self.path}: could not write it ({_reason(exc, self.path)}); "
                               f"free some space, or point latency.cache (or RMTP_LATENCY_CACHE) at a writable "
                               f"folder") from None


def _valid_entry(entry: Any) -> bool:
    seconds = entry.get("seconds") if isinstance(entry, dict) else None
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
        return False
    try:
        return math.isfinite(float(seconds)) and seconds >= 0
    except OverflowError:  # an integer too large for a float
        return False


def _reason(exc: OSError, path: Path) -> str:
    """The OS error, naming what it is about when that is not the table or its temp file beside it:
    a folder above the table that is a file says so ("File exists" alone would not say which)."""
    reason = exc.strerror or str(exc)
    if not exc.filename or Path(exc.filename).parent == path.parent:
        return reason
    if isinstance(exc, (FileExistsError, NotADirectoryError)) and Path(exc.filename).is_file():
        return f"{exc.filename} is a file, not a folder"
    return f"{reason}: {exc.filename}"
