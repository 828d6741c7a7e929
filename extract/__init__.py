"""Feature extraction (installed as ``lt_rebalance.extract``): the only code that touches images and backbones.

Python API (no torch import until called)::

    from lt_rebalance.extract.run import ExtractConfig, extract_features
    from lt_rebalance.extract.datasets import ArraySource, reference_config
    from lt_rebalance.extract.checkpoints import linear_head, load_checkpoint, save_reference_checkpoint
"""
