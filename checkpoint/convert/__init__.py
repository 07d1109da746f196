"""Converters between Kintsugi native, universal, DeepSpeed (ZeRO and universal), torch DCP
(any job's, torchtitan's included) and safetensors checkpoints (Hugging Face shards); the
readers behind ``kintsugi ckpt``. ``NameMap`` renames a foreign checkpoint's tensors."""
from checkpoint.convert.sources import NameMap, Source, detect, load_any
from checkpoint.convert.stream import TARGETS, convert

__all__ = ["NameMap", "Source", "detect", "load_any", "convert", "TARGETS"]
