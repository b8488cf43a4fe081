"""Evaluating on unlabeled images (``data.unlabeled: true``): top-1 agreement with the dense model.

Images without labels have no top-1. What they can tell is how often the pruned model's top class
is the dense model's: the *top-1 agreement* (100% for the dense model itself; the README's first
table shows it beside top-1 on a real pretrained ViT). An ``evaluate`` step on unlabeled data runs
:func:`rmtp.run.steps.evaluate_step`, the same step as on labelled data (params, MACs, latency timed
against dense), on the val images labelled with the dense model's top class, which makes its
top-1 the agreement by definition; the figure is then moved out of ``top1`` into a note, so no
report ever shows it as an accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from rmtp.data.bundle import batch_images
from rmtp.errors import RmtpError
from rmtp.measure.running import evaluating
from rmtp.reports.records import StepReport
from rmtp.run import steps
from rmtp.run.progress import NULL_PROGRESS, Progress

__all__ = ["agreement_step", "dense_labelled"]


class _Relabelled(Dataset):
    """``dataset``'s images, item *i* labelled ``labels[i]``."""

    def __init__(self, dataset: Dataset, labels: Sequence[int]) -> None:
        self.dataset, self.labels = dataset, list(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        item = self.dataset[index]
        return (item[0] if isinstance(item, (tuple, list)) else item), self.labels[index]


def dense_labelled(loader: DataLoader, dense: nn.Module, device: torch.device,
                   progress: Progress = NULL_PROGRESS) -> DataLoader:
    """``loader``'s images (in order: a loader that does not shuffle) labelled with ``dense``'s top
    class, one pass of the dense model; a loader of the same batch size and workers."""
    labels: list[int] = []
    with progress.task("evaluating dense model", total=len(loader)) as advance, \
            evaluating(dense), torch.inference_mode():
        for batch in loader:
            images = batch_images(batch)
            labels.extend(dense(images.to(device)).argmax(dim=-1).tolist())
            advance()
    if len(labels) != len(loader.dataset):
        raise RmtpError(f"evaluate: the loader gave {len(labels)} images of its {len(loader.dataset)}; "
                        f"agreement needs every image once, in order")
    return DataLoader(_Relabelled(loader.dataset, labels), batch_size=loader.batch_size,
                      num_workers=loader.num_workers)


def agreement_step(model: nn.Module, labelled: DataLoader, settings: object, *, device: torch.device,
                   input_shape: tuple[int, ...], dense: nn.Module, progress: Progress = NULL_PROGRESS,
                   index: int = 0, label: str = "evaluate") -> StepReport:
    """An evaluate step on unlabeled images: ``labelled`` is :func:`dense_labelled`'s loader. The
    report has no top-1 (``stats.top1`` None) and says the agreement in its first note."""
    report = steps.evaluate_step(model, labelled, settings, device=device, input_shape=input_shape, dense=dense,
                                 dense_top1=None, progress=progress, index=index, label=label)
    agreement, report.stats.top1 = report.stats.top1, None
    report.notes.insert(0, f"unlabeled data (data.unlabeled): no top-1; top-1 agreement with the dense model "
                           f"{agreement:.2f}% on {len(labelled.dataset)} val images")
    return report
