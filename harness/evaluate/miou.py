"""mIoU as mmsegmentation computes it for ADE20K: one confusion matrix summed over the whole
validation split (not a mean of per-image scores), IoU = intersection / union per class, and the
mean over the classes that occur in the labels or the predictions (a class with an empty union is
left out: NaN, as mmseg's ``nanmean``). Pixels labelled ``ignore_index`` count nowhere.

The confusion matrix is a plain tensor so the ranks of a job can sum theirs with one all-reduce.
"""

import torch
import torch.distributed as dist
from torch import Tensor

from harness.data.segmentation import IGNORE


def confusion_matrix(predictions: Tensor, labels: Tensor, num_classes: int, ignore_index: int = IGNORE) -> Tensor:
    """[K, K] int64 counts: row = label, column = prediction, over the pixels not ignored."""
    kept = labels != ignore_index
    pairs = labels[kept].long() * num_classes + predictions[kept].long()
    return torch.bincount(pairs, minlength=num_classes**2).reshape(num_classes, num_classes).cpu()


def summed_over_ranks(confusion: Tensor, device: torch.device) -> Tensor:
    """Every rank's confusion matrix summed (one all-reduce); as it is outside a job."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return confusion
    total = confusion.to(device if device.type == "cuda" else "cpu")  # NCCL reduces CUDA tensors
    dist.all_reduce(total)
    return total.cpu()


def segmentation_scores(confusion: Tensor) -> dict[str, float]:
    """mIoU, pixel accuracy (aAcc) and mean class accuracy (mAcc), in percent."""
    confusion = confusion.double()
    intersection = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - intersection
    labelled = confusion.sum(1)
    iou = intersection / union  # NaN where the class appears in neither labels nor predictions
    class_accuracy = intersection / labelled
    return {"miou": 100 * iou.nanmean().item(), "pixel_accuracy": 100 * (intersection.sum() / labelled.sum()).item(),
            "mean_class_accuracy": 100 * class_accuracy.nanmean().item()}
