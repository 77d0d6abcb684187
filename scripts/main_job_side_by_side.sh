#!/bin/bash
# The main job at an old commit and at HEAD, side by side (issues 30 / 33), alternating old, new, old,
# new; CPU seconds (user + system) and wall from /usr/bin/time. By default one process and one thread
# each; with MODE=ci, CI's own command (two xdist workers, a module each, each tree's thread default),
# whose wall time is CI's "pytest hypotheses/ took" line.
#   bash scripts/main_job_side_by_side.sh 9f4bfa5 [ROUNDS]
#   MODE=ci bash scripts/main_job_side_by_side.sh 9f4bfa5 [ROUNDS]
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
# plugins by hand: the installed package's entry point names this tree's plugin module, not the old one's
export PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
workers=()
if [ "${MODE:-one}" = ci ]; then
  workers=(-p xdist.plugin -n 2 --dist loadfile)
else
  export CIRCUITS_THREADS=1 OMP_NUM_THREADS=1
fi
for round in $(seq 1 "$rounds"); do
  for which in old new; do
    cd "$work/$which"
    plugin=circuits.plugin.pytest_plugin; runid=--circuits-run-id
    if [ ! -f circuits/plugin/pytest_plugin.py ]; then plugin=circuits.pytest_plugin; runid=--run-id; fi
    echo "== round $round $which $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)"
    /usr/bin/time -f "TIME $which round $round wall %e user %U sys %S" \
      python -m pytest -p "$plugin" "${workers[@]}" hypotheses/ -q -p no:cacheprovider "$runid" "sbs-$which-$round" 2>&1 | tail -3
  done
done
