"""SparK's building blocks: masks, the sparse encoder over a registry convnet, densify + decoder, loss."""

from selfsup.ssl.spark.decoder import Densify, LightDecoder, densify_norm_for
from selfsup.ssl.spark.loss import denormalised_prediction, patchify, reconstruction_picture, spark_loss, unpatchify
from selfsup.ssl.spark.masking import mask_image, num_visible, random_visible_mask, upsample_mask
from selfsup.ssl.spark.sparse_encoder import BACKENDS, SparseEncoder, batch_norm_rows

__all__ = [
    "BACKENDS",
    "Densify",
    "LightDecoder",
    "SparseEncoder",
    "batch_norm_rows",
    "denormalised_prediction",
    "densify_norm_for",
    "mask_image",
    "num_visible",
    "patchify",
    "random_visible_mask",
    "reconstruction_picture",
    "spark_loss",
    "unpatchify",
    "upsample_mask",
]
