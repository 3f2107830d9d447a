#!/usr/bin/env bash
# One call on a machine with a CUDA GPU (< 8 min): ToMe on the GPU, written to one JSON file and printed.
#   1. the fused merge (Triton kernel) vs the scatter and matmul formulations, PyTorch eager
#      (benchmarks/token_merge_formulations.py --backends torch);
#   2. PyTorch eager and torch.compile of the fixed-shape ToMe model vs the unmerged model, batch 1/8/64
#      (benchmarks/gpu_torch_throughput.py);
#   3. where TensorRT is installed, engine throughput ToMe vs unmerged (benchmarks/trt_throughput.py).
# Usage: bash benchmarks/gpu_check.sh [OUT.json]     (default gpu_check.json); run from the repository root.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu_check.json}"
work="$(mktemp -d)"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'error: no CUDA GPU visible to PyTorch; run this on a GPU machine')" || exit 2
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$work/gpu.txt" 2>/dev/null || echo "unknown" > "$work/gpu.txt"

step() {  # name, time limit (s), command...: a failing or slow step is recorded, the others still run
    local name="$1" limit="$2"; shift 2
    echo "== $name" >&2
    if timeout "$limit" "$@" > "$work/$name.log" 2>&1; then echo ok > "$work/$name.status"; else echo "failed ($?)" > "$work/$name.status"; fi
    tail -n 30 "$work/$name.log" >&2
}
step merge_kernels 120 python benchmarks/token_merge_formulations.py --backends torch --batches 1,8,64 --rounds 15 --json "$work/merge_kernels.json"
step torch_models 200 python benchmarks/gpu_torch_throughput.py --batches 1,8,64 --json "$work/torch_models.json"
if python -c "import tensorrt" 2>/dev/null || python -c "import tensorrt_rtx_bindings" 2>/dev/null; then
    step tensorrt 150 python benchmarks/trt_throughput.py --batches 1,8,64 --rounds 3  # prints its table (kept in the JSON as text)
else
    echo "TensorRT not installed: skipped" > "$work/tensorrt.status"
fi

python - "$work" "$out" <<'PY'
import json, pathlib, sys
work, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
report = {"gpu": (work / "gpu.txt").read_text().strip()}
for name in ("merge_kernels", "torch_models", "tensorrt"):
    data = work / f"{name}.json"
    report[name] = {"status": (work / f"{name}.status").read_text().strip() if (work / f"{name}.status").exists() else "not run",
                    "rows": json.loads(data.read_text()) if data.exists() else []}
    log = work / f"{name}.log"
    if not report[name]["rows"] and log.exists():
        report[name]["output"] = log.read_text().splitlines()[-40:]
out.write_text(json.dumps(report, indent=2) + "\n")
print(f"GPU: {report['gpu']}")
for name, part in report.items():
    if name == "gpu":
        continue
    print(f"\n{name}: {part['status']}")
    for line in part.get("output", []):
        print("  " + line)
    for row in part["rows"]:
        print("  " + "  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
print(f"\nwrote {out}")
PY
