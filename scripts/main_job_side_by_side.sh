#!/bin/bash
# The main job at an old commit and at HEAD, side by side (issues 30 / 33): one process and one thread
# each, alternating old, new, old, new; CPU seconds (user + system) and wall from /usr/bin/time.
#   bash scripts/main_job_side_by_side.sh 9f4bfa5 [ROUNDS]
# Clones both trees under $WORK (default /tmp/side-by-side); the old tree's plugin module path and run-id
# option are those before the layered tree (circuits.pytest_plugin, --run-id).
set -eu
old=${1:?usage: main_job_side_by_side.sh OLD_COMMIT [ROUNDS]}
rounds=${2:-2}
repo=$(git rev-parse --show-toplevel)
work=${WORK:-/tmp/side-by-side}
rm -rf "$work" && mkdir -p "$work"
git clone -q "$repo" "$work/old" && git -C "$work/old" checkout -q "$old"
git clone -q "$repo" "$work/new"
export CIRCUITS_THREADS=1 OMP_NUM_THREADS=1 PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
for round in $(seq 1 "$rounds"); do
  for which in old new; do
    cd "$work/$which"
    plugin=circuits.plugin.pytest_plugin; runid=--circuits-run-id
    if [ ! -f circuits/plugin/pytest_plugin.py ]; then plugin=circuits.pytest_plugin; runid=--run-id; fi
    echo "== round $round $which $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)"
    /usr/bin/time -f "TIME $which round $round wall %e user %U sys %S" \
      python -m pytest -p "$plugin" hypotheses/ -q -p no:cacheprovider "$runid" "sbs-$which-$round" 2>&1 | tail -3
  done
done
