"""DINO-style weighted k-nearest-neighbour classification of frozen features."""

import torch
import torch.nn.functional as F
from timm.utils import AverageMeter, accuracy
from torch import Tensor


@torch.inference_mode()
def knn_classify(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    *,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
    device: torch.device | None = None,
) -> dict[str, float]:
    """Top-1 (and top-5) accuracy in percent of a temperature-weighted k-NN vote.

    Features are L2-normalised so the dot product is the cosine similarity; each test sample's k
    most similar training samples vote for their class with weight exp(similarity / temperature),
    as in DINO. Test samples are processed `chunk_size` at a time, so peak memory is about
    `chunk_size * len(train_features) * 4` bytes on `device` (default CPU) beyond the features
    themselves.
    `num_classes` defaults to one more than the largest label seen; "knn_top5" is only reported
    when there are at least 5 classes.
    """
    if len(train_features) != len(train_labels) or len(test_features) != len(test_labels):
        raise ValueError("features and labels differ in length")
    if len(train_features) == 0 or len(test_features) == 0:
        raise ValueError("k-NN needs at least one training and one test sample")
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    k = min(k, len(train_features))
    device = device or torch.device("cpu")

    bank = F.normalize(train_features.to(device, torch.float32), dim=1)
    bank_labels = train_labels.to(device, torch.long)
    top1, top5 = AverageMeter(), AverageMeter()
    for start in range(0, len(test_features), chunk_size):
        queries = F.normalize(
            test_features[start : start + chunk_size].to(device, torch.float32), dim=1
        )
        targets = test_labels[start : start + chunk_size].to(device, torch.long)
        similarity, neighbours = (queries @ bank.T).topk(k, dim=1)
        # Subtracting each row's best similarity rescales that row's votes by a constant, which
        # leaves the ranking unchanged but keeps exp() finite at small temperatures (exp(1 / 0.01)
        # overflows float32).
        weights = ((similarity - similarity[:, :1]) / temperature).exp()
        votes = torch.zeros(len(queries), num_classes, device=device)
        votes.scatter_add_(1, bank_labels[neighbours], weights)
        acc1, acc5 = accuracy(votes, targets, topk=(1, 5))
        top1.update(acc1.item(), len(queries))
        top5.update(acc5.item(), len(queries))

    metrics = {"knn_top1": top1.avg}
    if num_classes >= 5:
        metrics["knn_top5"] = top5.avg
    return metrics
