"""DeepSpeed checkpoints: ZeRO stage 1/2/3 (fp32 and bf16/fp16 optimizer files, tensor and
pipeline parallel shards, MoE expert files) and DeepSpeed universal checkpoints, read and written.

ZeRO 1/2 keeps one flat fp32 partition per (data-parallel rank, parameter group) plus
``param_slice_mappings``: where each parameter's fragment lies in that partition; a
parameter's fragments over the data-parallel ranks, in rank order, are the parameter.
ZeRO 3 partitions every parameter on its own: rank r holds elements
[r*ceil(n/dp), (r+1)*ceil(n/dp)) of it, padded, laid out in ``param_shapes`` order.

Tensor parallel (``mp_rank_XX`` files, AutoTP's ``affine_map`` or the category patterns) and
pipeline parallel stages (``mp_rank = pp * tp + tp``; module weights in
``layer_XX[-model_YY]-model_states.pt``) are merged by checkpoint/patterns.py. Native DeepSpeed
MoE keeps expert e of layer l in ``layer_{l}_expert_{e}_mp_rank_XX_model_states.pt`` under its
global name, while the zero files name each rank's experts locally
(``deepspeed_experts.{j}``): with ep_size E and n experts, data-parallel rank d is
expert-parallel rank d % E and holds global experts (d % E) * n/E + j, partitioned over the
d // E expert-data-parallel ranks. Atoms carry the global names.

Files are opened with ``torch.load(weights_only=True, mmap=True)``: nothing but tensors and
an allowlist of DeepSpeed's plain data classes is unpickled, and tensor bytes are paged in
only for the fragments a conversion step reads, so memory stays at the tensors in flight.
A DeepSpeed universal checkpoint (``zero/<param>/{fp32,exp_avg,exp_avg_sq,step}.pt``) is
written the way ``deepspeed.checkpoint.ds_to_universal`` writes it, so an engine started
with ``"checkpoint": {"load_universal": true}`` loads it.
"""
from __future__ import annotations

import argparse
import math
import mmap
import os
import pickle
import re
import shutil
import struct
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

from checkpoint.convert.sources import Info, Source
from checkpoint.format import CorruptCheckpoint, checksum
from checkpoint.levels import write_file
from checkpoint.patterns import Patterns
from checkpoint.universal import jsonable, param_name, split_name
from comms import UserError

OPTIM_RE = re.compile(r"^(bf16_|fp16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
MODEL_RE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
Z3_MODEL_RE = re.compile(r"^(bf16_|fp16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$")
EXPERT_RE = re.compile(r"^layer_(\d+)_expert_(\d+)_mp_rank_(\d+)_model_states\.pt$")
LAYER_RE = re.compile(r"^layer_(\d+)(?:-model_(\d+))?-model_states\.pt$")  # pipeline stages' module weights
EXPERT_KEY = re.compile(r"^(.*\.deepspeed_experts\.)(\d+)(\..+)$")  # <layer prefix><expert id><rest>
# Sharded keys ds_to_universal leaves out of zero/optimizer_state.pt.
SHARDED = ("base_optimizer_state", "param_slice_mappings", "single_partition_of_fp32_groups")


def safe_classes() -> list:
    """The plain data classes DeepSpeed pickles next to its tensors (and nothing else)."""
    from deepspeed.checkpoint.universal_checkpoint import SubparamShape
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address, SubparamShape, argparse.Namespace]


_allowed = False


def load_pt(path: Path, mmap: bool = True):
    """torch.load with ``weights_only=True`` (plus DeepSpeed's data classes), errors as UserError."""
    global _allowed
    if not _allowed:  # process-wide: the safe_globals context manager is not thread-safe
        torch.serialization.add_safe_globals(safe_classes())
        _allowed = True
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise UserError(f"{path} is missing; the checkpoint is incomplete") from None
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0][:200]
        raise UserError(f"{path} holds an object outside the weights-only allowlist ({first}); "
                        "it is not a plain DeepSpeed checkpoint file") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        raise CorruptCheckpoint(f"{path} is truncated or corrupt ({str(e).splitlines()[0][:120]})") from None


def save_pt(obj, path: Path, size_hint: int = 0, seconds: dict | None = None):
    """torch.save through a tmp file and a rename (a present file is a complete file). The
    zip is built in page-aligned memory (``size_hint``: about its bytes), its records' CRC-32s
    filled in by ISA-L (torch's own miniz CRC took half of torch.save's time here), then
    written with direct I/O where the filesystem allows (buffered writes reached a third of
    its speed here) and fsynced. ``seconds`` gets the parts' times added (serialize,
    checksum, write)."""
    tmp = path.with_name(path.name + ".tmp")
    sink = _sinks.__dict__.setdefault("sink", _Sink())
    sink.reset(size_hint + (1 << 20))
    t0 = time.perf_counter()
    with _no_torch_crc:
        torch.save(obj, sink)
    view = sink.view()
    try:
        t1 = time.perf_counter()
        fill_zip_crcs(view)
        t2 = time.perf_counter()
        write_file(tmp, view)
    finally:
        view.release()
    os.replace(tmp, path)
    if seconds is not None:
        with _no_torch_crc.lock:
            for part, dt in (("serialize", t1 - t0), ("checksum", t2 - t1), ("write_fsync", time.perf_counter() - t2)):
                seconds[part] = seconds.get(part, 0.0) + dt


_sinks = threading.local()  # one per converting thread, reused: fresh memory costs a page fault per 4 KiB


class _Sink:
    """A growable page-aligned buffer that torch.save writes into (a file-like ``write``)."""

    def __init__(self):
        self.mm, self.pos = mmap.mmap(-1, 1 << 20), 0

    def reset(self, capacity: int):
        self.pos = 0
        if capacity > len(self.mm):
            self._grow(capacity)

    def _grow(self, capacity: int):
        bigger = mmap.mmap(-1, capacity)
        bigger[:self.pos] = self.mm[:self.pos]
        self.mm.close()
        self.mm = bigger

    def write(self, data) -> int:
        data = memoryview(data).cast("B")
        if self.pos + len(data) > len(self.mm):
            self._grow(max(2 * len(self.mm), self.pos + len(data)))
        self.mm[self.pos:self.pos + len(data)] = data
        self.pos += len(data)
        return len(data)

    def flush(self):
        pass

    def view(self) -> memoryview:
        return memoryview(self.mm)[:self.pos]


class _NoTorchCrc:
    """torch.save without its CRC-32s while any thread is inside (the option is process-wide)."""

    def __init__(self):
        self.lock, self.inside, self.before = threading.Lock(), 0, True

    def __enter__(self):
        with self.lock:
            if self.inside == 0:
                self.before = torch.serialization.get_crc32_options()
                torch.serialization.set_crc32_options(False)
            self.inside += 1

    def __exit__(self, *exc):
        with self.lock:
            self.inside -= 1
            if self.inside == 0:
                torch.serialization.set_crc32_options(self.before)


_no_torch_crc = _NoTorchCrc()


def fill_zip_crcs(data: memoryview):
    """Write every record's CRC-32 into a zip (in memory) that torch.save wrote without them:
    records are stored uncompressed; the CRC goes into the central directory and into the
    record's data descriptor (general flag bit 3; torch writes one after every non-empty
    record), else into its local header."""
    with zipfile.ZipFile(_Reader(data)) as z:
        infos, cd = z.infolist(), z.start_dir
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED or data[cd:cd + 4] != b"PK\x01\x02":
            raise ValueError(f"not the zip layout torch.save writes ({info.filename!r})")
        name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)
        start = info.header_offset + 30 + name_len + extra_len
        crc = checksum(data[start:start + info.file_size])
        at = info.header_offset + 14
        if info.flag_bits & 0x08:
            at = start + info.file_size
            at += 4 if data[at:at + 4] == b"PK\x07\x08" else 0
        struct.pack_into("<I", data, at, crc)
        struct.pack_into("<I", data, cd + 16, crc)
        cd += 46 + sum(struct.unpack_from("<HHH", data, cd + 28))


class _Reader:
    """A read-only file over a memoryview, for zipfile (which reads only the directory)."""

    def __init__(self, data: memoryview):
        self.data, self.pos = data, 0

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = (0, self.pos, len(self.data))[whence] + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, n: int = -1) -> bytes:
        end = len(self.data) if n is None or n < 0 else min(len(self.data), self.pos + n)
        out = bytes(self.data[self.pos:end])
        self.pos = max(self.pos, end)
        return out


def copy_into(dst: torch.Tensor, src: torch.Tensor):
    """``dst[:] = src`` for 1-d CPU tensors; of the same dtype by numpy (one memcpy), as torch's
    copy would start a thread team in every conversion worker."""
    if dst.dtype == src.dtype and dst.is_contiguous() and src.is_contiguous():
        np.copyto(dst.view(torch.uint8).numpy(), src.detach().view(torch.uint8).numpy())
    else:
        dst.copy_(src)


def _tag_dir(path: Path, latest: str) -> Path:
    if (path / latest).is_file():
        return path / (path / latest).read_text().strip()
    return path


def is_deepspeed(path: Path) -> bool:
    d = _tag_dir(Path(path), "latest")
    return d.is_dir() and any(OPTIM_RE.match(p.name) or MODEL_RE.match(p.name) for p in d.iterdir())


def is_deepspeed_universal(path: Path) -> bool:
    d = _tag_dir(Path(path), "latest_universal")
    return (d / "zero").is_dir()


class DeepSpeedSource(Source):
    """A DeepSpeed ZeRO checkpoint: a save dir with ``latest`` or one ``global_stepN`` tag dir."""

    format = "deepspeed"

    def __init__(self, path: Path):
        super().__init__(path)
        self.dir = _tag_dir(self.path, "latest")
        if not self.dir.is_dir():
            raise UserError(f"{self.dir} (named by {self.path / 'latest'}) is missing; the checkpoint is incomplete")
        names = sorted(p.name for p in self.dir.iterdir())
        self.optim = {}  # (mp, dp) -> path
        for n in names:
            m = OPTIM_RE.match(n)
            if m:
                self.optim[(int(m.group(3)), int(m.group(2)))] = self.dir / n
        if not self.optim:
            raise UserError(f"{self.dir} has no *_optim_states.pt files; it is not a DeepSpeed ZeRO checkpoint")
        mps = sorted({mp for mp, _ in self.optim})
        dps = sorted({dp for _, dp in self.optim})
        if mps != list(range(len(mps))) or dps != list(range(len(dps))) or len(self.optim) != len(mps) * len(dps):
            raise UserError(f"{self.dir} has mismatched optimizer shard counts ({len(self.optim)} files for "
                            f"{len(mps)} model-parallel x {len(dps)} data-parallel ranks); a shard file is missing")
        self.mp, self.dp = len(mps), len(dps)
        first = load_pt(self.optim[(0, 0)])["optimizer_state_dict"]
        self.stage = int(jsonable(first.get("zero_stage", 1)))
        counts = first.get("partition_count")
        saved_dp = max(counts) if isinstance(counts, list) and counts else counts
        if isinstance(saved_dp, int) and saved_dp != self.dp:
            raise UserError(f"{self.dir} was saved by {saved_dp} data-parallel ranks but holds optimizer files of "
                            f"{self.dp}; mismatched shard counts: a shard file is missing")
        self.layer_files = {(int(m.group(2) or 0), int(m.group(1))): self.dir / n
                            for n in names if (m := LAYER_RE.match(n))}
        if self.stage == 3:
            self.model_files = {(int(m.group(3)), int(m.group(2))): self.dir / n for n in names if (m := Z3_MODEL_RE.match(n))}
            if set(self.model_files) != set(self.optim):
                raise UserError(f"{self.dir} has {len(self.model_files)} ZeRO-3 model-state files for {len(self.optim)} "
                                "optimizer files; a shard file is missing")
            self.model = load_pt(self.model_files[(0, 0)])
            self.tp, self.pp = self.mp, 1
        else:
            self.model_files = {int(m.group(1)): self.dir / n for n in names if (m := MODEL_RE.match(n))}
            if sorted(self.model_files) != mps:
                raise UserError(f"{self.dir} has model-state files for ranks {sorted(self.model_files)} but optimizer "
                                f"files for model-parallel ranks {mps}; a shard file is missing")
            self.model = load_pt(self.model_files[0])
            dims = self.model.get("checkpoint_parallel_dimensions") or {}
            self.tp, self.pp = int(dims.get("tp_degree", self.mp)), int(dims.get("pp_degree", 1))
        self.patterns = Patterns.from_deepspeed(self.model.get("universal_checkpoint_info"))
        self.step = int(self.model.get("global_steps", 0) or 0)
        self.layout = {"zero_stage": self.stage, "dp": self.dp, "tp": self.tp, "pp": self.pp,
                       "optimizer_files": (OPTIM_RE.match(self.optim[(0, 0)].name).group(1) or "fp32_").rstrip("_")}
        self.experts, self.moe = self._expert_files(names)
        self.extras: dict[str, dict] = {}
        self._plan()

    # -- planning: where every parameter's pieces are ---------------------------------------

    def _plan(self):
        """Build ``self.params``: fqn -> {tp rank: (slice shape, [(mp, dp, group, start, numel, dst)])}."""
        self.params: dict[str, dict] = {}
        self.shapes: dict[str, dict[int, tuple]] = {}
        self.fallback: dict[str, int] = {}  # params DeepSpeed kept no optimizer fragments for -> mp rank
        self.has_step = False
        self.first_stage: dict[str, int] = {}
        self.copies: dict[str, dict] = {}  # a tied weight's later pipeline stages: fqn -> pp -> like params
        for mp in range(self.mp):
            tp, pp = mp % self.tp, mp // self.tp
            model = self.model if mp == 0 else load_pt(self.model_files[mp if self.stage != 3 else (mp, 0)])
            groups = model["param_shapes"]
            self._count_local_experts(groups)
            for g in groups:
                for fqn, shape in g.items():
                    if self._later_stage(fqn, pp):
                        continue
                    if model.get("module") is None:
                        self._layer_file(fqn, tp)  # a pipeline stage: its layer file must be there
                    for ep_rank in range(self._ep(fqn)):
                        self.shapes.setdefault(self._global(fqn, ep_rank), {})[tp] = tuple(shape)
            if self.stage == 3:
                self._plan_zero3(mp, tp, groups)
            else:
                self._plan_zero12(mp, tp, pp)
        for fqn, by_tp in self.shapes.items():
            if sorted(by_tp) != list(range(self.tp)):
                raise UserError(f"{fqn!r} is in the model-state files of tp ranks {sorted(by_tp)} of {self.tp}; "
                                "a shard file is missing")
            shape = self._merged_shape(fqn, by_tp)
            states = ("fp32", "exp_avg", "exp_avg_sq") + (("step",) if self.has_step else ())
            if fqn not in self.params:
                self.fallback[fqn] = 0
                self.tensors[param_name(fqn, "fp32")] = Info(shape, torch.float32)
                self.missing += [param_name(fqn, s) for s in states[1:]]
                continue
            for s in states:
                self.tensors[param_name(fqn, s)] = Info(() if s == "step" else shape, torch.float32)
        unused = self.patterns.unused()
        if unused:
            raise UserError(f"universal_checkpoint_info patterns {unused} match no parameter of {self.dir}; "
                            "fix the patterns or the model names")

    def _plan_zero12(self, mp: int, tp: int, pp: int):
        for dp in range(self.dp):
            osd = load_pt(self.optim[(mp, dp)])["optimizer_state_dict"]
            self.has_step |= any("step" in s for s in osd["base_optimizer_state"]["state"].values())
            for g, mapping in enumerate(osd["param_slice_mappings"]):
                for fqn, frag in mapping.items():
                    name = self._global(fqn, dp % self._ep(fqn))
                    piece = (mp, dp, g, frag.start, frag.numel, None)
                    if not self._later_stage(fqn, pp):
                        self.params.setdefault(name, {}).setdefault(tp, []).append(piece)
                    elif self.first_stage[fqn] != pp:  # compared with the first stage's copy when read
                        self.copies.setdefault(name, {}).setdefault(pp, {}).setdefault(tp, []).append(piece)

    def _later_stage(self, fqn: str, pp: int) -> bool:
        """A tied weight (TiedLayerSpec, or named by pipeline_replicated_parameter_patterns) is in
        every pipeline stage that uses it, kept equal by DeepSpeed: the first stage's copy is read."""
        return self.first_stage.setdefault(fqn, pp) != pp or (pp > 0 and self.patterns.is_pipeline_replicated(fqn))

    # -- native MoE experts and pipeline layer files ------------------------------------------

    def _expert_files(self, names: list[str]) -> tuple[dict, dict]:
        """{(mp, layer, expert): path} of the expert files, checked complete against
        ``num_experts``, and {layer prefix: [num_experts, ep_size, layer]} (ep_size set by the plan)."""
        files = {(int(m.group(3)), int(m.group(1)), int(m.group(2))): self.dir / n
                 for n in names if (m := EXPERT_RE.match(n))}
        counts = self.model.get("num_experts")
        if not files and not counts:
            return {}, {}
        counts = [int(c) for c in (counts if isinstance(counts, list) else [counts or 0])]
        if self.stage == 3:
            raise UserError(f"{self.dir} is a ZeRO-3 checkpoint with native MoE expert files, which this tool does "
                            "not read; save the MoE job with ZeRO stage 1 or 2")
        if (self.model.get("ds_config") or {}).get("use_data_before_expert_parallelism"):
            raise UserError(f"{self.dir} was saved with use_data_before_expert_parallelism, whose expert placement "
                            "this tool does not read; save with the default expert-then-data placement")
        want = {(mp, layer, e) for mp in range(self.mp) for layer, n in enumerate(counts) for e in range(n)}
        absent = sorted(want - set(files))
        if absent:
            mp, layer, e = absent[0]
            raise UserError(f"{self.dir / f'layer_{layer}_expert_{e}_mp_rank_{mp:02d}_model_states.pt'} is missing "
                            f"({len(files)} of the {len(want)} expert files for num_experts={counts}); "
                            "the checkpoint is incomplete")
        extra = sorted(set(files) - want)
        if extra:
            raise UserError(f"{files[extra[0]]} is beyond the checkpoint's num_experts={counts} "
                            f"({len(files)} expert files for {len(want)}); mismatched expert counts: remove the "
                            "files of another run")
        moe = {}
        for layer, n in enumerate(counts):
            for key in load_pt(files[(0, layer, 0)]):
                m = EXPERT_KEY.match(key)
                if m:
                    moe[m.group(1)] = [n, None, layer]
        self.layout.update(experts=counts)
        return files, moe

    def _count_local_experts(self, groups: list):
        """ep_size of each MoE layer: its experts over the local experts one rank's zero file names."""
        local = {}
        for g in groups:
            for fqn in g:
                m = EXPERT_KEY.match(fqn)
                if m and m.group(1) in self.moe:
                    local.setdefault(m.group(1), set()).add(int(m.group(2)))
        for prefix, ids in local.items():
            n = self.moe[prefix][0]
            if n % len(ids) or self.dp % (n // len(ids)) or sorted(ids) != list(range(len(ids))):
                raise UserError(f"{self.dir}: the zero files hold local experts {sorted(ids)} of {prefix!r} but "
                                f"the checkpoint has {n} experts over {self.dp} data-parallel ranks; mismatched "
                                "expert counts: the files are from different runs")
            self.moe[prefix][1] = n // len(ids)
            self.layout["ep"] = max(self.layout.get("ep", 1), n // len(ids))

    def _ep(self, fqn: str) -> int:
        m = EXPERT_KEY.match(fqn)
        return self.moe[m.group(1)][1] if m and m.group(1) in self.moe else 1

    def _global(self, fqn: str, ep_rank: int) -> str:
        """The global name of a parameter the zero file of expert-parallel rank ``ep_rank`` names ``fqn``."""
        m = EXPERT_KEY.match(fqn)
        if not m or m.group(1) not in self.moe:
            return fqn
        n, ep, _ = self.moe[m.group(1)]
        return f"{m.group(1)}{ep_rank * (n // ep) + int(m.group(2))}{m.group(3)}"

    def _layer_file(self, fqn: str, tp: int) -> tuple[Path, str] | None:
        """(file, key) of a pipeline layer's weight ``<layer index>.<name in the layer>``."""
        idx, _, key = fqn.partition(".")
        if not idx.isdigit():
            return None  # tied modules (``tied_modules.*``) live in their first layer's file
        path = self.layer_files.get((tp, int(idx)))
        if path is None:
            suffix = f"-model_{tp:02d}" if any(t for t, _ in self.layer_files) else ""
            raise UserError(f"{self.dir / f'layer_{int(idx):02d}{suffix}-model_states.pt'} is missing (pipeline "
                            f"layer {idx} of {fqn!r}); the checkpoint is incomplete")
        return path, key

    def _module_tensor(self, fqn: str) -> torch.Tensor:
        """A parameter's model weight (for parameters DeepSpeed kept no optimizer state for)."""
        m = EXPERT_KEY.match(fqn)
        if m and m.group(1) in self.moe:
            return load_pt(self.experts[(0, self.moe[m.group(1)][2], int(m.group(2)))])[fqn]
        if self.model.get("module") is None:
            found = self._layer_file(fqn, 0)
            if found is None:
                raise UserError(f"{fqn!r} has no optimizer state and no layer file in {self.dir}; it cannot be read")
            return load_pt(found[0])[found[1]]
        return self.model["module"][fqn]

    def _plan_zero3(self, mp: int, tp: int, groups: list):
        for dp in range(self.dp):
            osd = load_pt(self.optim[(mp, dp)])["optimizer_state_dict"]
            parts = osd.get("ds_zero_partition_groups") or []
            self.has_step |= any("step" in s for s in osd["optimizer_state_dict"]["state"].values())
            for g, shapes in enumerate(groups):
                count = parts[g].get("partition_count", self.dp) if g < len(parts) else self.dp
                rank = parts[g].get("partition_rank", dp) if g < len(parts) else dp
                offset = 0
                for fqn, shape in shapes.items():
                    numel = math.prod(shape)
                    per = math.ceil(numel / count)
                    n = max(0, min(per, numel - rank * per))
                    self.params.setdefault(fqn, {}).setdefault(tp, []).append((mp, dp, g, offset, n, rank * per))
                    offset += per

    def _merged_shape(self, fqn: str, by_tp: dict) -> tuple:
        if self.tp == 1 and not self.patterns.is_vocabulary(fqn):
            self.patterns.kind(fqn)  # marks the pattern used
            return by_tp[0]
        slices = [torch.empty(by_tp[t], device="meta") for t in range(self.tp)]
        return tuple(self.patterns.merge(fqn, slices)[0].shape)

    # -- reading ----------------------------------------------------------------------------

    def _flat(self, osd: dict, group: int, state: str) -> torch.Tensor:
        if state == "fp32":
            return osd["fp32_flat_groups" if self.stage == 3 else "single_partition_of_fp32_groups"][group]
        return osd["optimizer_state_dict" if self.stage == 3 else "base_optimizer_state"]["state"][group][state]

    def read(self, name: str) -> torch.Tensor:
        fqn, state = split_name(name)
        if fqn in self.fallback:
            self.extras[name] = {}
            return self._module_tensor(fqn).float()  # as ds_to_universal: the module's weight
        files = {}

        def osd(mp, dp):
            if (mp, dp) not in files:
                files[(mp, dp)] = load_pt(self.optim[(mp, dp)])["optimizer_state_dict"]
            return files[(mp, dp)]

        if state == "step":
            mp, dp, g, *_ = self.params[fqn][0][0]
            return torch.as_tensor(self._flat(osd(mp, dp), g, "step"), dtype=torch.float32).clone()
        slices = self._slices(fqn, self.params[fqn], state, osd)
        if state == "fp32":
            for pp, frags in self.copies.get(fqn, {}).items():
                if not all(torch.equal(a, b) for a, b in zip(slices, self._slices(fqn, frags, state, osd))):
                    raise UserError(f"{fqn!r} is in pipeline stages {self.first_stage[fqn]} and {pp} with different "
                                    "values, so it is not one tied weight (TiedLayerSpec ties only its "
                                    "tied_weight_attr); a universal checkpoint holds one value per name: give the "
                                    "copies distinct names or tie them")
        full, extras = self.patterns.merge(fqn, slices, state)
        self.extras[name] = extras
        return full

    def _slices(self, fqn: str, frags_by_tp: dict, state: str, osd) -> list[torch.Tensor]:
        """Each tensor-parallel rank's slice of ``fqn``, gathered from its data-parallel fragments."""
        slices = []
        for tp in range(self.tp):
            shape = self.shapes[fqn][tp]
            numel = math.prod(shape)
            buf = torch.empty(numel, dtype=torch.float32)
            at, covered = 0, 0
            for mp, dp, g, start, n, dst in frags_by_tp.get(tp, []):
                pos = at if dst is None else dst
                copy_into(buf[pos:pos + n], self._flat(osd(mp, dp), g, state)[start:start + n])
                at += n
                covered += n
            if covered != numel:
                raise UserError(f"the optimizer files of {self.dir} hold {covered} of {numel} elements of {fqn!r}; "
                                "a shard file is missing or from another run")
            slices.append(buf.view(shape))
        return slices

    def peak_bytes(self, name: str) -> int:
        copies = 1 + len(self.copies.get(split_name(name)[0], {}))  # a tied weight is read once per stage
        return (1 + copies) * self.tensors[name].nbytes  # the per-tp slices and the merged atom

    def objects(self) -> dict:
        osd = load_pt(self.optim[(0, 0)])["optimizer_state_dict"]
        groups = (osd["optimizer_state_dict"] if self.stage == 3 else osd["base_optimizer_state"])["param_groups"]
        m = self.model
        return jsonable({
            "step": self.step, "global_samples": m.get("global_samples"), "skipped_steps": m.get("skipped_steps"),
            "lr_scheduler": m.get("lr_scheduler"), "data_sampler": m.get("data_sampler"),
            "loss_scaler": vars(osd["loss_scaler"]) if "loss_scaler" in osd else None,
            "optim.param_groups": [{k: v for k, v in g.items() if k != "params"} for g in groups],
            "ds_config": m.get("ds_config"), "ds_version": m.get("ds_version"),
        })


class DeepSpeedUniversalSource(Source):
    """A DeepSpeed universal checkpoint (written by ds_to_universal or by this tool)."""

    format = "deepspeed-universal"

    def __init__(self, path: Path):
        super().__init__(path)
        self.dir = _tag_dir(self.path, "latest_universal")
        zero = self.dir / "zero"
        model_files = sorted(p for p in self.dir.glob("*model_states.pt") if not EXPERT_RE.match(p.name))
        if not model_files:
            raise UserError(f"{self.dir} has no *_model_states.pt; the DeepSpeed universal checkpoint is incomplete")
        self.model = load_pt(model_files[0])
        shapes = {k: tuple(v) for g in self.model.get("param_shapes") or [] for k, v in g.items()}
        self.step = int(self.model.get("global_steps", 0) or 0)
        self.files = {}
        for d in sorted(p for p in zero.iterdir() if p.is_dir()):
            for f in sorted(d.glob("*.pt")):
                state = f.stem
                name = param_name(d.name, state)
                obj = load_pt(f)
                t = obj["param"] if isinstance(obj, dict) else torch.as_tensor(obj)
                flat_zero3 = t.dim() == 1 and d.name in shapes and math.prod(shapes[d.name]) == t.numel()
                shape = () if state == "step" else shapes[d.name] if flat_zero3 else tuple(t.shape)
                self.tensors[name] = Info(shape, t.dtype)
                self.files[name] = f
        self.layout = {"zero_stage": int(jsonable(self.model.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0)))}

    def read(self, name: str) -> torch.Tensor:
        obj = load_pt(self.files[name])
        t = obj["param"] if isinstance(obj, dict) else torch.as_tensor(obj)
        return t.reshape(self.tensors[name].shape).clone()

    def objects(self) -> dict:
        path = self.dir / "zero" / "optimizer_state.pt"
        osd = load_pt(path) if path.is_file() else {}
        return jsonable({"step": self.step, "lr_scheduler": self.model.get("lr_scheduler"),
                         "optim.param_groups": [{k: v for k, v in g.items() if k != "params"}
                                                for g in osd.get("param_groups", [])]})


def write_deepspeed_universal_atom(zero: Path, src: Source, name: str, tensor: torch.Tensor,
                                   seconds: dict | None = None):
    """zero/<fqn>/<state>.pt exactly as ds_to_universal writes it for this source."""
    fqn, state = split_name(name)
    d = zero / fqn
    d.mkdir(parents=True, exist_ok=True)
    zero3 = isinstance(src, DeepSpeedSource) and src.stage == 3
    if state == "step" and zero3:
        return  # ds_to_universal keeps ZeRO-3's step in optimizer_state.pt only
    if state == "step":
        obj = tensor
    elif zero3:
        obj = tensor.reshape(-1)  # ds_to_universal keeps ZeRO-3 atoms flat
    else:
        extras = dict(getattr(src, "extras", {}).get(name, {"cat_dim": 0}))
        if "sub_param_shape" in extras:
            from deepspeed.checkpoint.universal_checkpoint import SubparamShape
            extras["sub_param_shape"] = SubparamShape(**extras["sub_param_shape"])
        obj = {**extras, "param": tensor}
    save_pt(obj, d / f"{state}.pt", tensor.nbytes, seconds)


def finish_deepspeed_universal(tag_dir: Path, src: Source):
    """The non-atom files: zero/optimizer_state.pt, the model-state files, ``latest_universal``."""
    zero = tag_dir / "zero"
    zero.mkdir(parents=True, exist_ok=True)
    if isinstance(src, DeepSpeedSource):
        sd = load_pt(src.optim[(0, 0)], mmap=False)["optimizer_state_dict"]
        if src.stage == 3:
            out = sd
            out["param_groups"] = sd["optimizer_state_dict"]["param_groups"]
        else:
            out = {k: v for k, v in sd.items() if k not in SHARDED}
            out["group_paddings"] = [0] * len(sd.get("group_paddings") or [])  # as ds_to_universal: atoms hold no padding
            out["param_groups"] = sd["base_optimizer_state"]["param_groups"]
        save_pt(out, zero / "optimizer_state.pt")
        files = src.model_files.values()
        for f in files:
            if not (tag_dir / f.name).exists():
                shutil.copyfile(f, tag_dir / (f.name + ".tmp"))
                os.replace(tag_dir / (f.name + ".tmp"), tag_dir / f.name)
    elif isinstance(src, DeepSpeedUniversalSource):
        for f in [src.dir / "zero" / "optimizer_state.pt", *src.dir.glob("*model_states.pt")]:
            dst = zero / f.name if f.parent.name == "zero" else tag_dir / f.name
            shutil.copyfile(f, dst.with_name(dst.name + ".tmp"))
            os.replace(dst.with_name(dst.name + ".tmp"), dst)
    else:
        raise UserError(f"--to deepspeed-universal needs the DeepSpeed engine's own model-state files, which a "
                        f"{src.format} checkpoint does not have; convert a DeepSpeed checkpoint, or use --to universal")
    (tag_dir.parent / "latest_universal").write_text(tag_dir.name)
