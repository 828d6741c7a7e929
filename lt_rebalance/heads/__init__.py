"""Classifier heads on cached features, in the scikit-learn manner."""
from .crt import CRT
from .crt_grid import CRTGrid
from .disalign import DisAlign
from .experts import LogitAdjustedExperts
from .knn import KNN
from .linear import JointHead
from .linear_probe import LinearProbe
from .lws import LWS
from .marc import MARC
from .ncm import NCM, NCM_VARIANTS
from .tau_norm import DEFAULT_TAUS, TauNorm, tau_normalize, tau_sweep
from .text_init import TextInitCosine
from .wb import WeightBalancing
from .zero_shot import GLA, ZeroShot, ZeroShotDebiased

__all__ = ["CRT", "CRTGrid", "DisAlign", "JointHead", "KNN", "LinearProbe", "LogitAdjustedExperts", "LWS", "MARC", "NCM",
           "NCM_VARIANTS", "DEFAULT_TAUS", "TauNorm", "TextInitCosine", "WeightBalancing", "GLA", "ZeroShot",
           "ZeroShotDebiased", "tau_normalize", "tau_sweep"]
