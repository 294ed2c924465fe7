"""Downstream evaluation of a pretrained encoder given as a timm VisionTransformer.

Four protocols, each plain arguments in and a dict of metrics (accuracies in percent) out, with no
knowledge of pretraining, configuration files, tracking or launching:

- `extract_features`: cls-token features after the final norm, for the frozen protocols;
- `knn_classify`: DINO-style weighted k-NN on such features;
- `linear_probe`: MAE/MILAN linear probing (BatchNorm + linear head, LARS);
- `finetune`: MAE/MILAN end-to-end fine-tuning (layer decay, Mixup/CutMix), with
  `finetune_transform` for its training augmentation.
"""

from harness.evaluate.features import extract_features
from harness.evaluate.finetune import finetune, finetune_transform
from harness.evaluate.knn import knn_classify
from harness.evaluate.linear_probe import linear_probe, linear_probe_on_features

__all__ = ["extract_features", "finetune", "finetune_transform", "knn_classify", "linear_probe", "linear_probe_on_features"]
