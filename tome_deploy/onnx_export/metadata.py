"""The metadata an export records about itself, built from the patched model and its schedule.

batch: the fixed batch of a static-batch export, None for a dynamic batch axis. weights: the loader's
description, which names checkpoint files by their file name only (artifacts carry no local paths)."""

from __future__ import annotations

import json
from typing import Any, Optional

import torch

from tome_deploy import __version__
from tome_deploy.artifact.checks import FieldError
from tome_deploy.artifact.metadata import METADATA_PREFIX, ToMeMetadata
from tome_deploy.core.flops import theoretical_speedup
from tome_deploy.core.schedule import Schedule
from tome_deploy.models.adapter import checked_input_spec, refused_metadata
from tome_deploy.models.patch import tome_blocks


def build_metadata(
    model: torch.nn.Module,
    schedule: Schedule,
    schedule_spec,
    *,
    arch: str,
    weights: str,
    weights_sha256: str,
    merge: str,
    opset: int,
    batch: Optional[int],
    example_batch: int,
    precision: str = "fp32",
    target: str = "onnxruntime",
    quality: Optional[dict[str, Any]] = None,
) -> ToMeMetadata:
    """model: the ToMe model apply_tome returned (its recorded shape gives width and MLP width, its family
    adapter the input spec). quality: what tome-tune measured for this schedule (ToMeMetadata.quality),
    None when the schedule was not tuned. Raises MetadataError when the reader of the files it is written to
    would refuse it (`check_readable`)."""
    record = tome_blocks(model)
    metadata = ToMeMetadata(
        tool_version=__version__,
        model=arch,
        weights=weights,
        weights_sha256=weights_sha256,
        merge=merge,
        opset=opset,
        batch=batch,
        schedule=list(schedule_spec) if isinstance(schedule_spec, (list, tuple)) else schedule_spec,
        r_requested=list(schedule.requested),
        r_effective=list(schedule.effective),
        tokens_per_layer=list(schedule.tokens),
        num_prefix_tokens=schedule.num_prefix,
        theoretical_speedup=round(theoretical_speedup(schedule.tokens, record.shape.width, record.shape.mlp_ratio), 4),
        example_batch=example_batch,
        precision=precision,
        target=target,
        quality=quality,
        input=checked_input_spec(record.adapter, model, f"{arch} ({weights})"),
    )
    check_readable(metadata)
    return metadata


def check_readable(metadata: ToMeMetadata) -> None:
    """Read the metadata back as tome-serve, tome-validate and tome-build read an export's `metadata_props`
    (JSON text per `tome.*` key, then ToMeMetadata.from_dict, the reader under ToMeMetadata.from_props), before
    any file is written: a value that reader refuses, such as a std below its bound or a NaN from a model's
    preprocessing, is a MetadataError (exit 2) here instead of an artifact nothing can load."""
    values = {key[len(METADATA_PREFIX) :]: json.loads(raw) for key, raw in metadata.to_props().items()}
    try:
        ToMeMetadata.from_dict(values, metadata.model)
    except FieldError as err:
        raise refused_metadata(f"{metadata.model} ({metadata.weights})", str(err)) from None
