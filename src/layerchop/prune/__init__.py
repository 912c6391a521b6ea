"""Model compression methods: LayerChop (depth pruning)."""

from layerchop.prune.chop import chop_layers, removed_indices

__all__ = ["chop_layers", "removed_indices"]
