"""fused_sam: Sharpness-Aware Minimization for PyTorch in a few fused multi-tensor launches."""

from fused_sam.bn import frozen_bn_stats
from fused_sam.functional import BackendUnavailableError, available_backends
from fused_sam.masks import DynamicMask, FisherMask, MaskPolicy, MaskRequest, RandomMask
from fused_sam.optimizer import FusedSAM
from fused_sam.variants import (
    GSAM,
    Direction,
    EveryK,
    FriendlySAM,
    LookSAM,
    MomentumSAM,
    StepSchedule,
)

__version__ = "0.1.0"

__all__ = [
    "GSAM",
    "BackendUnavailableError",
    "Direction",
    "DynamicMask",
    "EveryK",
    "FisherMask",
    "FriendlySAM",
    "FusedSAM",
    "LookSAM",
    "MaskPolicy",
    "MaskRequest",
    "MomentumSAM",
    "RandomMask",
    "StepSchedule",
    "__version__",
    "available_backends",
    "frozen_bn_stats",
]
