#!/usr/bin/env bash
# Generates the Python stubs (with mypy-protobuf .pyi) from protos/ into libs/.
# `scripts/protos.sh --check` generates into a scratch folder and fails when the checked-in
# stubs differ, so CI catches protos and stubs that disagree.
set -euo pipefail
cd "$(dirname "$0")/.."
python=.venv/bin/python
export PATH="$PWD/.venv/bin:$PATH"  # protoc finds protoc-gen-mypy here

out=libs
if [[ "${1:-}" == "--check" ]]; then
  out=$(mktemp -d)
  trap 'rm -rf "$out"' EXIT
else
  rm -rf libs/audience/v1 libs/audience/bus/v1
fi

mapfile -t files < <(cd protos && find audience -name '*.proto' | sort)
(cd protos && "../$python" -m grpc_tools.protoc -I . \
  --python_out="$( [[ $out = /* ]] && echo "$out" || echo "../$out")" \
  --grpc_python_out="$( [[ $out = /* ]] && echo "$out" || echo "../$out")" \
  --mypy_out="$( [[ $out = /* ]] && echo "$out" || echo "../$out")" \
  --mypy_grpc_out="$( [[ $out = /* ]] && echo "$out" || echo "../$out")" \
  "${files[@]}" 2> >(grep -v "^Writing mypy to" >&2))
for dir in "$out/audience/v1" "$out/audience/bus" "$out/audience/bus/v1"; do
  touch "$dir/__init__.py"
done

if [[ "${1:-}" == "--check" ]]; then
  status=0
  for dir in audience/v1 audience/bus/v1; do
    diff -r "$out/$dir" "libs/$dir" -x __pycache__ || status=1
  done
  if [[ $status -ne 0 ]]; then
    echo "The generated stubs disagree with protos/: run 'make protos' and commit." >&2
    exit 1
  fi
  echo "Stubs match protos/."
fi
