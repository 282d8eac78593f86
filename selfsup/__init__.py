"""selfsup: self-supervised pretraining of vision backbones.

Importing the package is cheap on purpose (the CLI's start-up depends on it): heavy modules
(torch, lightning, timm) are imported by the sub-packages that need them.
"""

__version__ = "0.1.0"
