"""Export a model (an rmtp output folder, or an ``nn.Module``) to a file a runtime executes.

:func:`export_model` writes one of two formats, each verified before it is put in place:

``onnx``
    ``torch.onnx.export`` with the TorchScript exporter (``dynamo=False``), then loaded and run in
    ``onnxruntime.InferenceSession(providers=["CPUExecutionProvider"])``. Why not the newer
    ``torch.export``-based exporter (``dynamo=True``, the default since torch 2.9): with torch
    2.14 both export every rmtp pruner's output once the token code avoids ``sort(stable=True)``,
    but the TorchScript exporter does it 4-10x faster (a timm ViT-Ti at 224: 2 s vs 8.5 s), needs no
    ``onnxscript``, and its graphs run as fast or faster in ONNX Runtime (ResNet-18 on 2 cores:
    16 ms vs 27 ms; ViT-Ti 24 ms either way). torch marks it deprecated; rmtp pins torch to
    <= 2.14.1, where it is there.
``pt2``
    ``torch.export.export(model, (example,))`` and ``torch.export.save``; verified by
    ``torch.export.load(...).module()`` on the same inputs.

Graphs are static: one batch size (``batch``) and one input shape, which is what lets token
reduction (a fixed number of tokens per block) export at all. Verification compares the file's
outputs with the PyTorch model's: on one seeded random batch, or with ``check=True`` on
``check_images`` real val images of the folder's dataset (from its saved ``recipe.yaml``). A
maximum absolute difference above :data:`TOLERANCE` (fp32) fails the export.

What no exporter can write is refused before anything is written, with the reason: ``torch.sparse``
tensors (the 2:4 semi-structured weights ``rmtp_plugins.nm.to_semi_structured`` makes run only on
CUDA sparse tensor cores), weights off the CPU, weights that are not float32, and ONNX files over
protobuf's 2 GB (which would need external data files beside the ``.onnx``; pt2 has no such limit).

The file is written under a temporary name in the target folder and renamed into place only once
verified (:func:`rmtp.storage.atomic.replace_atomically`): a failed export or verification leaves any
previous file as it was and no temporary file behind.

The package: :mod:`rmtp.export.refusals` (formats, options, what cannot export),
:mod:`rmtp.export.runtimes` (each format written and run back), :mod:`rmtp.export.core`
(:func:`export_model`: the source, its inputs, the atomic write).
"""

from __future__ import annotations

from rmtp.export.core import ExportReport, export_model
from rmtp.export.refusals import (
           DEFAULT_OPSET,
           FORMATS,
           INSTALL_HINT,
           TOLERANCE,
           ExportError,
           export_problems,
)

__all__ = ["DEFAULT_OPSET", "FORMATS", "INSTALL_HINT", "TOLERANCE", "ExportError", "ExportReport", "export_model",
           "export_problems"]
