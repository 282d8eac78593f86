"""OBoW's building blocks: pure losses, vocabularies (queues), the generated prediction head, the method."""

from selfsup.ssl.obow.head import WeightGenerator, bow_logits
from selfsup.ssl.obow.loss import (bag_of_words, bow_kl, bow_targets, code_statistics, entropy, obow_loss,
                                   repeat_per_crop, soft_codes, soft_cross_entropy, squared_distances, teacher_momentum)
from selfsup.ssl.obow.vocabulary import Vocabulary

__all__ = [
    "Vocabulary",
    "WeightGenerator",
    "bag_of_words",
    "bow_kl",
    "bow_logits",
    "bow_targets",
    "code_statistics",
    "entropy",
    "obow_loss",
    "repeat_per_crop",
    "soft_codes",
    "soft_cross_entropy",
    "squared_distances",
    "teacher_momentum",
]
