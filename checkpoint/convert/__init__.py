"""Converters between Kintsugi native, universal, DeepSpeed (ZeRO and universal), torch DCP
and consolidated safetensors checkpoints; the readers behind ``kintsugi ckpt``."""
from checkpoint.convert.sources import Source, detect, load_any
from checkpoint.convert.stream import TARGETS, convert

__all__ = ["Source", "detect", "load_any", "convert", "TARGETS"]
