"""Classifier heads on cached features, in the scikit-learn manner."""
from .crt import CRT
from .crt_grid import CRTGrid
from .linear import JointHead
from .lws import LWS
from .ncm import NCM, NCM_VARIANTS
from .tau_norm import DEFAULT_TAUS, TauNorm, tau_normalize, tau_sweep

__all__ = ["CRT", "CRTGrid", "JointHead", "LWS", "NCM", "NCM_VARIANTS", "DEFAULT_TAUS", "TauNorm", "tau_normalize", "tau_sweep"]
