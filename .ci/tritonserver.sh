#!/usr/bin/env bash
# Provide a CPU-capable tritonserver with the Python backend for the real-server tests, idempotently.
# It is taken from the nvidia-pytriton wheel (pinned), downloaded WITHOUT its dependencies (the package pins
# numpy<2) and unpacked, never installed. The stub of the interpreter that runs the tests is copied to
# where the Python backend looks for it. Prints the tritonserver path; tests find it the same way
# (tome_deploy/serving/tritonserver.py: $TOME_TRITONSERVER, else this cache folder).
set -euo pipefail
version=0.7.0
home="${TOME_TRITON_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/tome-deploy/pytriton-$version}"
server="$home/pytriton/tritonserver"
py="$(python -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
if [ ! -x "$server/bin/tritonserver" ] || [ ! -x "$server/backends/python/triton_python_backend_stub" ]; then
  work="$(mktemp -d "${TMPDIR:-/tmp}/pytriton.XXXXXX")"
  trap 'rm -rf "$work"' EXIT
  python -m pip download --quiet --no-deps "nvidia-pytriton==$version" -d "$work/wheel"
  python -m zipfile -e "$work"/wheel/nvidia_pytriton-*.whl "$work/unpacked"
  unpacked="$work/unpacked/pytriton/tritonserver"
  cp "$unpacked/python_backend_stubs/$py/triton_python_backend_stub" "$unpacked/backends/python/"
  chmod +x "$unpacked/bin/tritonserver" "$unpacked/backends/python/triton_python_backend_stub"
  mkdir -p "$(dirname "$home")"
  rm -rf "$home"
  mv "$work/unpacked" "$home"  # whole folder at once: an interrupted run leaves no half-unpacked server
fi
echo "$server/bin/tritonserver"
