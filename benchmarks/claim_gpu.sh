#!/usr/bin/env bash
# The regime map of docs/claim.md on one lent accelerator, in priority order, within a budget.
#
#   bash benchmarks/claim_gpu.sh [--budget SECONDS] [--out PATH] [--parallel N] [--cells A,B] [--smoke]
#
# Defaults: --budget 300, --out claim_gpu_results.json, 12 comparisons side by side on a GPU (2 on
# a CPU). Cells, in order: paper (lr 1e-5 constant, 2000 steps: qat, fraqat, linear:0.44), continuous
# (default: linear:0.44, cosine:0.44), steps900 (fraqat), paper_4000, paper_lr3e-6, paper_restart,
# paper_more (seeds 1242+), sana (configs/sana_default.py). Each seed of a cell is one `python -m fraqat_jax.compare --seeds 1`; the
# JSON is rewritten after each, so a call cut off at its deadline keeps what finished. Merge it into
# the map with `python docs/claim_map.py --json PATH ...`. --smoke: two cells, one seed, 4 steps
# (a CPU check in under a minute). On a lent GPU with 15 minutes: benchmarks/gpu.sh first (about 8),
# then this with the rest, e.g. --budget 360. Details: benchmarks/claim_gpu.py.
set -u
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" benchmarks/claim_gpu.py "$@"
