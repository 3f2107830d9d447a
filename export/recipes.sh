#!/usr/bin/env bash
# Export recipes, one per timm ViT family; each line is exactly what a user would type.
set -euo pipefail
out="$(dirname "$0")/out"
mkdir -p "$out"
filter="${1:-}"

recipe() {  # name, then tome-export arguments
  local name="$1"; shift
  [[ -z "$filter" || "$name" == *"$filter"* ]] || return 0
  echo "== $name" >&2
  tome-export "$@" -o "$out/$name.onnx" --report "$out/$name.json"
}

recipe vit_small_r16          vit_small_patch16_224 --r 16
recipe vit_small_decreasing   vit_small_patch16_224 --r 16 --r-inflect -1
recipe vit_base_r16           vit_base_patch16_224 --r 16
recipe deit_distilled_r16     deit_small_distilled_patch16_224 --r 16
recipe deit3_layerscale_r16   deit3_small_patch16_224 --r 16
recipe vit_registers_meanpool vit_medium_patch16_reg4_gap_256 --r 16
recipe vit_tensorrt_ready     vit_small_patch16_224 --r 16 --target tensorrt
recipe vit_tensorrt_fp16      vit_small_patch16_224 --r 16 --target tensorrt --precision fp16

# Engines from the TensorRT-ready exports (needs tome-deploy[tensorrt-rtx] or [tensorrt]; SM89 ahead of time).
if [[ -z "$filter" || "$filter" == *tensorrt* ]]; then
  for name in vit_tensorrt_ready vit_tensorrt_fp16; do
    if [[ -f "$out/$name.onnx" ]]; then
      tome-build "$out/$name.onnx" -o "$out/$name.plan" --compute-capability "${TOME_CC:-89}"
    fi
  done
fi
