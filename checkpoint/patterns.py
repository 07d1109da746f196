"""The pattern language: how a layout-tied piece of a tensor maps to its consolidated atom.

A distributed checkpoint holds each logical tensor as pieces tied to the layout that saved
it. Two kinds of description turn pieces back into one atom:

- *Geometry*: the format records the global shape and each piece's offsets (Kintsugi's own
  manifest, torch DCP metadata). ``assemble`` places the pieces and checks full coverage.
- *Patterns*: the format records only per-rank slices plus regexes saying how a parameter
  was split (DeepSpeed's ``universal_checkpoint_info``, Megatron-style tensor parallelism).
  ``Patterns.merge`` turns one tensor-parallel slice per rank into the atom and
  ``Patterns.split`` is its inverse, used to write or load a tensor-parallel layout.

Rules, first match wins in this order (as in DeepSpeed's ds_to_universal):
  affine      geometry per rank (DeepSpeed's ``affine_map``, written by AutoTP): each
              shard is a list of strided blocks of the full tensor, held by one or more
              ranks, stored times a scale; it supersedes the category rules below
  replicated  every rank holds the same tensor (LayerNorm weights under TP); checked equal
  average     ranks hold diverged copies that are averaged (e.g. TP-replicated biases)
  two_sub     fused [a; b] on dim 0, each half split over ranks (SwiGLU gate/up, h_to_4h)
  sub_params  fused sub-parameters with their own per-rank widths (QKV under GQA: q, k, v
              have different widths, so an even chunk would cut heads apart)
  row         row-parallel: slices concatenate on dim 1 (attention output, MLP down)
  column      the default: slices concatenate on dim 0
After the merge, ``vocabulary`` patterns strip the rows added to pad the vocabulary to a
multiple of the TP degree; ``expert`` patterns concatenate expert-parallel ranks on the
expert dim; ``pipeline_replicated`` patterns name tied weights kept on the first and last
pipeline stage, of which only the first stage's copy is read.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

from checkpoint.state import overlap
from comms import UserError

# DeepSpeed's universal_checkpoint_info keys (deepspeed/checkpoint/constants.py), accepted as is.
DS_KEYS = {
    "tp_replicated_parameter_patterns": "replicated",
    "parameter_to_average_patterns": "average",
    "parameter_with_2_sub_params_cat_dim_0": "two_sub",
    "parameter_with_row_parallelism_patterns": "row",
    "vocabulary_parameter_patterns": "vocabulary",
    "pipeline_replicated_parameter_patterns": "pipeline_replicated",
    "expert_parameter_patterns": "expert",
}
KINDS = ("affine", "replicated", "average", "two_sub", "sub_params", "row", "column")
AFFINE_VERSION = 1  # the affine_map format this reader understands (DeepSpeed 0.19)
# How a piece's scale applies to each state: a parameter stored times s has its gradient,
# so Adam's moments, times 1/s and 1/s**2.
SCALE_POWER = {"fp32": 1, "exp_avg": -1, "exp_avg_sq": -2}


@dataclass
class AffineMap:
    """One tensor's geometry over the tensor-parallel ranks: ``pieces[r]`` are the blocks of
    rank r's shard, each ``{shape, source: [offset, strides], dest: [offset, strides],
    locations, scale}`` in element units of the flat full tensor and the flat shard (the
    arguments of ``torch.as_strided``)."""

    pattern: str
    shape: tuple
    shard_shapes: dict[int, tuple]
    pieces: dict[int, list[dict]]

    @classmethod
    def from_deepspeed(cls, pattern: str, entry: dict) -> "AffineMap":
        ranks = {int(r): v for r, v in entry["ranks"].items()}
        return cls(pattern, tuple(entry["logical_shape"]), {r: tuple(v["shard_shape"]) for r, v in ranks.items()},
                   {r: list(v["pieces"]) for r, v in ranks.items()})

    def rebuild(self, name: str, slices: list[torch.Tensor], state: str) -> torch.Tensor:
        power = SCALE_POWER.get(state, 1)
        full = torch.empty(math.prod(self.shape), dtype=slices[0].dtype, device=slices[0].device)
        seen = torch.zeros(full.numel(), dtype=torch.bool, device=slices[0].device)
        for rank, pieces in sorted(self.pieces.items()):
            if rank >= len(slices) or slices[rank].numel() != math.prod(self.shard_shapes[rank]):
                raise UserError(f"{name!r}: tensor-parallel rank {rank}'s slice does not have the "
                                f"{list(self.shard_shapes[rank])} elements its affine_map describes; "
                                "the checkpoint files are from different runs")
            flat = slices[rank].reshape(-1).clone() if slices[rank].storage_offset() else slices[rank].reshape(-1)
            for p in pieces:
                scale = float(p.get("scale", 1.0))
                if scale != 1.0 and power != 1:
                    raise UserError(f"{name!r} is stored scaled by {scale}; its optimizer state cannot be "
                                    "converted without rescaling lr and eps, which no format records")
                (src_off, src_strides), (dst_off, dst_strides) = p["source"], p["dest"]
                target = full.as_strided(p["shape"], src_strides, src_off)
                block = flat.as_strided(p["shape"], dst_strides, dst_off) / scale ** power
                mask = seen.as_strided(p["shape"], src_strides, src_off)
                if not full.is_meta and len(p["locations"]) > 1 and bool(mask.all()):
                    if not torch.equal(target, block.to(target.dtype)):
                        raise UserError(f"{name!r}: ranks {p['locations']} hold different values for the same "
                                        "replicated block; the tensor-parallel copies diverged")
                    continue
                target.copy_(block)
                mask.fill_(True)
        if not full.is_meta and not bool(seen.all()):
            raise UserError(f"the affine_map of {name!r} covers only {int(seen.sum())} of {full.numel()} elements; "
                            "fix the map or the checkpoint")
        return full.view(self.shape)

    def extract(self, name: str, full: torch.Tensor, rank: int, world: int) -> torch.Tensor:
        """Rank ``rank``'s shard of the parameter (the inverse of ``rebuild``, for the fp32 value)."""
        if world != len(self.shard_shapes):
            raise UserError(f"the affine_map of {name!r} describes {len(self.shard_shapes)} tensor-parallel ranks, "
                            f"not {world}; load it at its own degree or convert it to universal first")
        shard = torch.empty(math.prod(self.shard_shapes[rank]), dtype=full.dtype)
        flat = full.reshape(-1)
        for p in self.pieces[rank]:
            (src_off, src_strides), (dst_off, dst_strides) = p["source"], p["dest"]
            block = flat.as_strided(p["shape"], src_strides, src_off) * float(p.get("scale", 1.0))
            shard.as_strided(p["shape"], dst_strides, dst_off).copy_(block)
        return shard.view(self.shard_shapes[rank])


@dataclass
class SubParams:
    """A fused parameter made of sub-parameters along ``dim``; ``widths[j][r]`` is how many
    rows of sub-parameter j tensor-parallel rank r holds (None: even split)."""

    pattern: str
    dim: int
    sizes: list[int] | None = None  # global size of each sub-parameter along dim
    count: int | None = None  # or just how many equal sub-parameters there are
    widths: list[list[int]] | None = None
    spec: dict | None = None  # DeepSpeed's SubparamShape fields, written back into its universal files


@dataclass
class Patterns:
    rules: dict[str, list[str]] = field(default_factory=dict)  # kind -> regexes
    sub_params: list[SubParams] = field(default_factory=list)
    original_vocab_size: int | None = None
    affine: list[AffineMap] = field(default_factory=list)
    used: set = field(default_factory=set)

    @classmethod
    def from_deepspeed(cls, info: dict | None) -> "Patterns":
        """From DeepSpeed's ``universal_checkpoint_info`` (a dict, as saved in model states)."""
        info = info or {}
        rules = {kind: list(info.get(key) or []) for key, kind in DS_KEYS.items()}
        widths = info.get("sub_param_shard_widths") or {}
        subs = []
        for spec in info.get("parameter_with_sub_params") or []:
            spec = spec if isinstance(spec, dict) else vars(spec)  # SubparamShape dataclass or dict
            dim, shape = spec["partition_dim"], spec["shape"]
            at = shape[dim]
            for pattern in spec["patterns"]:
                subs.append(SubParams(pattern, dim, sizes=list(at) if isinstance(at, (tuple, list)) else None,
                                      count=None if isinstance(at, (tuple, list)) else int(at),
                                      widths=widths.get(pattern), spec=dict(spec)))
        amap = info.get("affine_map") or {}
        if int(amap.get("version", AFFINE_VERSION)) > AFFINE_VERSION:
            raise UserError(f"the checkpoint's affine_map has format version {amap['version']}, newer than the "
                            f"{AFFINE_VERSION} this tool reads; update Kintsugi")
        affine = [AffineMap.from_deepspeed(p, e) for p, e in (amap.get("params") or {}).items()]
        return cls(rules, subs, info.get("original_vocab_size"), affine)

    def _match(self, kind: str, name: str) -> str | None:
        hits = [p for p in self.rules.get(kind, []) if re.match(p, name)]
        if len(hits) > 1:
            raise UserError(f"parameter {name!r} matches several {kind} patterns {hits}; make the patterns disjoint")
        if hits:
            self.used.add(hits[0])
            return hits[0]
        return None

    def _sub(self, name: str) -> SubParams | None:
        for s in self.sub_params:
            if re.match(s.pattern, name):
                self.used.add(s.pattern)
                return s
        return None

    def _affine(self, name: str) -> AffineMap | None:
        hits = [a for a in self.affine if re.match(a.pattern, name)]
        if len(hits) > 1:
            raise UserError(f"parameter {name!r} matches several affine_map patterns; make them disjoint")
        return hits[0] if hits else None

    def kind(self, name: str) -> tuple[str, SubParams | AffineMap | None]:
        amap = self._affine(name)
        if amap is not None:
            for kind in ("replicated", "average", "two_sub", "row"):  # superseded by the map, not unused
                self._match(kind, name)
            self._sub(name)
            return "affine", amap
        for kind in ("replicated", "average", "two_sub"):
            if self._match(kind, name):
                return kind, None
        sub = self._sub(name)
        if sub:
            return "sub_params", sub
        return ("row" if self._match("row", name) else "column"), None

    def is_pipeline_replicated(self, name: str) -> bool:
        return self._match("pipeline_replicated", name) is not None

    def is_expert(self, name: str) -> bool:
        return self._match("expert", name) is not None

    def is_vocabulary(self, name: str) -> bool:
        return self._match("vocabulary", name) is not None

    def unused(self) -> list[str]:
        """Patterns no tensor matched: usually a renamed model or a typo in the patterns."""
        declared = [p for kind, ps in self.rules.items() if kind != "pipeline_replicated" for p in ps]
        declared += [s.pattern for s in self.sub_params]
        return sorted(set(declared) - self.used)

    def merge(self, name: str, slices: list[torch.Tensor], state: str = "fp32") -> tuple[torch.Tensor, dict]:
        """One tensor-parallel slice per rank (each in its own shape) -> the atom, plus the
        per-tensor keys DeepSpeed's universal loader reads (cat_dim, sub_param_shape, ...).
        Meta slices give the atom's shape without reading anything."""
        kind, sub = self.kind(name)
        extras = {}
        if kind == "affine":
            full = sub.rebuild(name, slices, state)  # DeepSpeed records no per-tensor keys for a mapped tensor
        elif kind == "replicated":
            if not slices[0].is_meta and not all(torch.equal(slices[0], s) for s in slices[1:]):
                raise UserError(f"{name!r} is declared TP-replicated but its tensor-parallel copies differ; "
                                "fix tp_replicated_parameter_patterns (maybe it is averaged)")
            full = slices[0]
        elif kind == "average":
            full = sum(s.double() for s in slices).div(len(slices)).to(slices[0].dtype)
        elif kind == "two_sub":
            halves = [s.chunk(2, dim=0) for s in slices]
            full = torch.cat([torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])])
            extras.update(cat_dim=0, param_n_sub_params=2)
        elif kind == "sub_params":
            full = torch.cat(_sub_pieces(sub, slices, name), dim=sub.dim)
            extras["sub_param_shape"] = sub.spec
        else:
            dim = 1 if kind == "row" else 0
            full = slices[0] if len(slices) == 1 else torch.cat(slices, dim=dim)  # one slice: no copy
            extras["cat_dim"] = dim
        if self.is_vocabulary(name):
            if self.original_vocab_size is None:
                raise UserError(f"{name!r} matches vocabulary_parameter_patterns but original_vocab_size is not "
                                "given in universal_checkpoint_info; add it")
            full = full[: self.original_vocab_size]
            extras["vocab_tensor"] = True
        return full, extras

    def split(self, name: str, full: torch.Tensor, rank: int, world: int) -> torch.Tensor:
        """This tensor-parallel rank's slice of an atom: the inverse of ``merge``."""
        kind, sub = self.kind(name)
        if kind == "affine":
            return sub.extract(name, full, rank, world)
        if world == 1 or kind in ("replicated", "average"):
            return full
        if self.is_vocabulary(name):
            padded = math.ceil(full.shape[0] / world) * world
            full = torch.nn.functional.pad(full, (0, 0) * (full.dim() - 1) + (0, padded - full.shape[0]))
        if kind == "two_sub":
            return torch.cat([h.chunk(world, dim=0)[rank] for h in full.chunk(2, dim=0)])
        if kind == "sub_params":
            sizes = sub.sizes or [full.shape[sub.dim] // sub.count] * sub.count
            widths = sub.widths or [[s // world] * world for s in sizes]
            parts, start = [], 0
            for size, w in zip(sizes, widths):
                parts.append(full.narrow(sub.dim, start + sum(w[:rank]), w[rank]))
                start += size
            return torch.cat(parts, dim=sub.dim)
        return full.chunk(world, dim=1 if kind == "row" else 0)[rank]


def _sub_pieces(sub: SubParams, slices: list[torch.Tensor], name: str) -> list[torch.Tensor]:
    """Reorder rank-major [q_r, k_r, v_r]* slices into sub-parameter-major [q_0.., k_0.., v_0..]."""
    world = len(slices)
    total = sum(s.shape[sub.dim] for s in slices)
    sizes = sub.sizes or ([total // sub.count] * sub.count if sub.count and total % sub.count == 0 else None)
    if sizes is None or sum(sizes) != total:
        raise UserError(f"sub-parameter shape of {name!r} does not fit its {total} rows; fix parameter_with_sub_params")
    widths = sub.widths
    if widths is None:
        if any(s % world for s in sizes):
            raise UserError(f"sub-parameters {sizes} of {name!r} do not split evenly over {world} ranks and no "
                            "sub_param_shard_widths are given; add them")
        widths = [[s // world] * world for s in sizes]
    pieces, at = [], [0] * world
    for size, w in zip(sizes, widths):
        if len(w) != world or sum(w) != size:
            raise UserError(f"sub_param_shard_widths {w} of {name!r} do not sum to {size} over {world} ranks")
        for r, s in enumerate(slices):
            pieces.append(s.narrow(sub.dim, at[r], w[r]))
            at[r] += w[r]
    return pieces


def assemble(name: str, global_shape, pieces: list[tuple[tuple, torch.Tensor]], dtype=None) -> torch.Tensor:
    """Place pieces given by their global offsets into one tensor; every element must be covered
    (replicated pieces may overlap: the first one written wins, later ones are identical)."""
    out = torch.empty(tuple(global_shape), dtype=dtype or pieces[0][1].dtype)
    seen = torch.zeros(tuple(global_shape), dtype=torch.bool)
    for offsets, t in pieces:
        ov = overlap(offsets, t.shape, (0,) * len(global_shape), global_shape)
        if ov is None:
            continue
        idx = tuple(slice(o, o + n) for o, n in zip(offsets, t.shape))
        out[idx] = t
        seen[idx] = True
    if out.numel() and not bool(seen.all()):
        raise UserError(f"the pieces of {name!r} cover only {int(seen.sum())} of {out.numel()} elements; "
                        "a shard file is missing")
    return out
