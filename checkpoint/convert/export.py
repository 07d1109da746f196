"""Model weights in the Hugging Face layout: safetensors files plus, when sharded, the index.

    DST/model.safetensors                                   all weights fit one shard
    DST/model-00001-of-00003.safetensors ...                otherwise, shards of at most max_shard_size
    DST/model.safetensors.index.json                        {"metadata": {"total_size"}, "weight_map": {name: file}}

Names are the checkpoint's ``model.<fqn>`` without ``model.`` (what ``from_pretrained`` and
``safetensors.torch.load_file`` expect of a model's own state dict). Each shard's header is
written first from the plan and every tensor goes to its offset, so tensors are converted in
any order, in parallel; a journal in DST.partial/ records which tensors are durable, so a
rerun after an interruption writes only the rest. The index is written last.
"""
from __future__ import annotations

import json
import os
import struct
import threading
from pathlib import Path

import torch

from checkpoint.format import fsync_dir, write_all
from checkpoint.shards import DTYPES, as_bytes

PREFIX = "model."
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def shard_names(names: list[str], nbytes: dict[str, int], max_shard: int) -> list[list[str]]:
    """Consecutive groups of at most ``max_shard`` bytes (a larger tensor is a shard of its own)."""
    shards, size = [[]], 0
    for name in names:
        if shards[-1] and size + nbytes[name] > max_shard:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes[name]
    return shards if shards[0] else []


class SafetensorsWriter:
    JOURNAL = ".written"

    def __init__(self, root: Path, src, plan):
        self.root, self.dtype = root, plan.dtype
        nbytes = {n: plan.infos[n].nbytes for n in plan.names}
        groups = shard_names(plan.names, nbytes, plan.shard_bytes)
        self.files = [SINGLE] if len(groups) == 1 else \
            [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
        self.where: dict[str, tuple[Path, int]] = {}  # name -> (file, absolute offset of its bytes)
        self.total = sum(nbytes.values())
        for file, group in zip(self.files, groups):
            header, offset, offsets = {}, 0, {}
            for name in group:
                info = plan.infos[name]
                header[name[len(PREFIX):]] = {"dtype": DTYPES[info.dtype], "shape": list(info.shape),
                                              "data_offsets": [offset, offset + info.nbytes]}
                offsets[name] = offset
                offset += info.nbytes
            header["__metadata__"] = {"format": "pt", "step": str(src.step)}
            blob = json.dumps(header, separators=(",", ":")).encode()
            blob += b" " * (-len(blob) % 8)
            start = 8 + len(blob)
            path = root / file
            if not path.exists():
                with open(path, "wb") as f:
                    f.write(struct.pack("<Q", len(blob)) + blob)
                    f.truncate(start + offset)
            self.where.update({name: (path, start + off) for name, off in offsets.items()})
        self.journal = root / self.JOURNAL
        self.written = set(self.journal.read_text().split()) if self.journal.exists() else set()
        self.lock = threading.Lock()

    def done(self, name: str) -> bool:
        return name in self.written

    def write(self, name: str, t: torch.Tensor):
        path, offset = self.where[name]
        fd = os.open(path, os.O_WRONLY)
        try:
            write_all(fd, as_bytes(t.to(self.dtype or t.dtype).contiguous()), offset)
            os.fsync(fd)
        finally:
            os.close(fd)
        with self.lock, open(self.journal, "a") as j:  # journaled only after the bytes are durable
            j.write(name + "\n")

    def finish(self):
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total},
                     "weight_map": {name[len(PREFIX):]: path.name for name, (path, _) in sorted(self.where.items())}}
            tmp = self.root / (INDEX + ".tmp")
            with open(tmp, "w") as f:
                json.dump(index, f, indent=2)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.root / INDEX)
            fsync_dir(self.root)
        self.journal.unlink(missing_ok=True)
