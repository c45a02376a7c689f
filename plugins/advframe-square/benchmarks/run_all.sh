#!/bin/bash
# The query-attack tables of the square, simba, nes and bandits READMEs, in one go (one bench lock):
#   flock /tmp/advframe-bench.lock bash plugins/advframe-square/benchmarks/run_all.sh [OUT]
# Trains small-cnn with erm (core defaults: embedded MNIST, 5 epochs) for seeds 0-2, then attacks the
# same 100 class-balanced test images of each model (budget 1000; L-inf eps 0.2, L2 eps 2.0).
# Rows are appended to OUT/table.md as they finish.
set -u
cd "$(dirname "$0")/../../.."
OUT=${1:-/tmp/bb}
mkdir -p "$OUT"
for s in 0 1 2; do
  [ -f "$OUT/erm-$s/results.json" ] || .venv/bin/advframe run --plugin erm --set seed=$s --out "$OUT/erm-$s" > "$OUT/train-$s.log" 2>&1
done
Q="plugins/advframe-square/benchmarks/query_attacks.py $OUT/erm-0 $OUT/erm-1 $OUT/erm-2 --examples 100"
L2="--set attack.norm=l2 --set attack.eps=2.0"
row() { echo "<!-- $* -->" >> "$OUT/table.md"; .venv/bin/python $Q "$@" >> "$OUT/table.md" 2>> "$OUT/errors.log"; }
row --attack square --set plugins.square.budget=1000
row --attack simba --set plugins.simba.budget=1000 $L2
row --attack nes --set plugins.nes.budget=1000
row --attack bandits --set plugins.bandits.budget=1000
row --attack square --set plugins.square.budget=1000 $L2
row --attack simba --set plugins.simba.budget=1000 --set plugins.simba.basis=pixel $L2
row --attack bandits --set plugins.bandits.budget=1000 --set plugins.bandits.online_lr=100.0
row --attack bandits --set plugins.bandits.budget=1000 --set plugins.bandits.tiling=false
row --attack simba --set plugins.simba.budget=1000
row --attack nes --set plugins.nes.budget=1000 $L2
row --attack bandits --set plugins.bandits.budget=1000 $L2
echo "<!-- finished -->" >> "$OUT/table.md"
