"""Attention masks for hyperschedules: one type, ``IntervalMask`` (docs/conventions.md, masks), its constructors and
its converters (dense, FlexAttention ``BlockMask``, kernel tile maps)."""

from .inference import inference, kv_cacheable
from .interval_mask import IntervalMask
from .tiles import MaskTiles, TileBounds

__all__ = ["IntervalMask", "inference", "kv_cacheable", "MaskTiles", "TileBounds"]
