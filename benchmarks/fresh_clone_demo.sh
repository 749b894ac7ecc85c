#!/bin/bash
# `make demo` from a fresh clone with an empty saeflow cache, timed to the "serving" line
# (docs/benchmarks.md). The cache is moved aside and put back afterwards.
#   benchmarks/fresh_clone_demo.sh [REPO] [OUT]      (default: this checkout, /tmp/saeflow-demo)
set -u
repo=${1:-$(cd "$(dirname "$0")/.." && pwd)}
out=${2:-/tmp/saeflow-demo}
cache=~/.cache/saeflow
[ -e "$cache" ] && mv "$cache" "$cache.keep"
trap '[ -e "$cache.keep" ] && rm -rf "$cache" && mv "$cache.keep" "$cache"' EXIT
rm -rf "$out" && git clone -q "$repo" "$out" && cd "$out" || exit 1
t0=$(date +%s)
make install > install.log 2>&1
t1=$(date +%s)
echo "install $((t1 - t0)) s"
make demo > demo.log 2>&1 &
pid=$!
until grep -q "\[saeflow\] serving" demo.log; do
  kill -0 $pid 2>/dev/null || { echo "make demo exited early; see $out/demo.log"; exit 1; }
  sleep 5
done
echo "make demo to serving $(($(date +%s) - t1)) s"
pkill -P $pid; kill $pid 2>/dev/null; pkill -f "saeflow run --out runs/embedded"
python3 -c "
import json
for k, v in json.load(open('runs/embedded/pipeline.json'))['stages'].items():
    print(f'{k:9s} {v.get(\"seconds\")} s')"
