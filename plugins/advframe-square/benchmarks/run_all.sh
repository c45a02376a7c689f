#!/bin/bash
# The query-attack tables of the square, simba, nes and bandits READMEs, in one go (one bench lock):
#   OMP_NUM_THREADS=1 ADVFRAME_PROGRESS=0 flock /tmp/advframe-bench-c.lock bash plugins/advframe-square/benchmarks/run_all.sh [OUT]
# (single-threaded: about 20 minutes on a shared machine; the first six rows are each attack's default,
# the L2 Square row and the SimBA pixel-basis ablation, the last five the other ablations)
# Trains small-cnn with erm (core defaults: embedded MNIST, 5 epochs) for seeds 0-2, then attacks the
# same 100 class-balanced test images of each model (budget 1000; L-inf eps 0.2, L2 eps 2.0).
# Rows are appended to OUT/table.md as they finish (a first look on seed 0 to OUT/table-seed0.md).
set -u
cd "$(dirname "$0")/../../.."
OUT=${1:-/tmp/bb}
mkdir -p "$OUT"
train() { [ -f "$OUT/erm-$1/results.json" ] || .venv/bin/advframe run --plugin erm --set seed=$1 --out "$OUT/erm-$1" > "$OUT/train-$1.log" 2>&1; }
L2="--set attack.norm=l2 --set attack.eps=2.0"
# a first look on seed 0 only (OUT/table-seed0.md), then the three seeds (OUT/table.md)
train 0
Q="plugins/advframe-square/benchmarks/query_attacks.py $OUT/erm-0 --examples 100"
for attack in square simba nes bandits; do
  extra=""; [ $attack = simba ] && extra="$L2"
  .venv/bin/python $Q --attack $attack --set plugins.$attack.budget=1000 $extra >> "$OUT/table-seed0.md" 2>> "$OUT/errors.log"
done
train 1
train 2
Q="plugins/advframe-square/benchmarks/query_attacks.py $OUT/erm-0 $OUT/erm-1 $OUT/erm-2 --examples 100"
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
