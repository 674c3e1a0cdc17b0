"""Functional ops: `import gansparse.functional as GF`."""
from .ops.attention import attention_distill_loss, attention_map, attention_maps

__all__ = ["attention_distill_loss", "attention_map", "attention_maps"]
