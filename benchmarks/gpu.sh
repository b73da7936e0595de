#!/usr/bin/env bash
# Every figure that needs an accelerator, in one call of at most ~8 minutes, written to one JSON.
#
#   bash benchmarks/gpu.sh [--smoke] [--out PATH]      (default PATH: gpu_results.json)
#
# Parts, each under its own time limit so one slow part cannot take the others down (a part that
# fails or times out is recorded with its exit status and the tail of its output):
#   block       benchmarks/block.py: one SD3.5-M joint block at 1024 tokens, QAT / FP step time and
#               peak memory (fp32, then bf16 compute)
#   train_step  benchmarks/train_step.py --iters 60: the default's FraQAT step / unquantized step
#   peers       benchmarks/peers.py: fraqat_jax against Qwix (step ratios, compiles, numerics)
#   sd35        python -m fraqat_jax.plan --topology local --run 3 on configs/sd35_medium.py (random
#               SD3.5-Medium student and teacher, bf16, 512x512): the largest batch of 16/8/4/2
#               that compiles and fits, its step time, peak memory and MFU (skipped when
#               fraqat_jax.plan is missing)
#   models      benchmarks/models.py: full SD3.5-Medium forward, JAX port / diffusers, bf16
# --smoke: tiny sizes of the same parts (a CPU check that the script still works; models.py is
# only imported, since its smallest run is a full-width block).
set -u
cd "$(dirname "$0")/.."
SMOKE=0
OUT=gpu_results.json
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE=1 ;;
    --out) shift; OUT="${1:?--out needs a path}" ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "benchmarks/gpu.sh: unknown argument '$1' (allowed: --smoke, --out PATH)" >&2; exit 2 ;;
  esac
  shift
done
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
PARTS=$(mktemp -d)
trap 'rm -rf "$PARTS"' EXIT

# run NAME LIMIT_SECONDS COMMAND...: the command's JSON (if it writes $PARTS/NAME.json), exit
# status, seconds and output tail are gathered at the end.
run() {
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "== $name: $*"
  timeout "$limit" "$@" > "$PARTS/$name.log" 2>&1
  local rc=$?
  echo "$rc $((SECONDS - t0))" > "$PARTS/$name.rc"
  grep -v -i "warning" "$PARTS/$name.log" | tail -n 15
  echo "== $name: exit $rc after $((SECONDS - t0)) s"
}

if [ "$SMOKE" = 1 ]; then
  run block 300 "$PY" benchmarks/block.py --smoke --json "$PARTS/block.json"
  run train_step 300 "$PY" benchmarks/train_step.py --iters 2 --set steps=9 --set batch_size=8 --json "$PARTS/train_step.json"
  run peers 300 "$PY" benchmarks/peers.py --smoke --json "$PARTS/peers.json"
  run models 120 "$PY" benchmarks/models.py --help
else
  # Limits sum to ~8 minutes with the compiles included; sd35 tries smaller batches only while
  # there is time left for one more compile.
  run block 90 "$PY" benchmarks/block.py --json "$PARTS/block.json"
  run block_bf16 60 "$PY" benchmarks/block.py --dtype bfloat16 --json "$PARTS/block_bf16.json"
  run train_step 75 "$PY" benchmarks/train_step.py --iters 60 --json "$PARTS/train_step.json"
  run peers 90 "$PY" benchmarks/peers.py --json "$PARTS/peers.json"
  if "$PY" -c "import fraqat_jax.plan" 2>/dev/null; then
    for batch in 16 8 4 2; do
      left=$((390 - SECONDS))
      [ "$left" -lt 60 ] && break
      run "sd35_b$batch" "$left" "$PY" -m fraqat_jax.plan --config configs/sd35_medium.py --topology local --run 3 \
        --batch-size "$batch" --set data=datafree --set resolution=512 --json "$PARTS/sd35_b$batch.json"
      [ "$(cut -d' ' -f1 "$PARTS/sd35_b$batch.rc")" = 0 ] && break
    done
  else
    echo "== sd35: fraqat_jax.plan is missing, skipped"
  fi
  run models 90 "$PY" benchmarks/models.py
fi

"$PY" - "$PARTS" "$OUT" "$SMOKE" <<'EOF'
import glob, json, os, platform, sys, time

parts_dir, out, smoke = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
# Dense bf16 peak of the card, for MFU (NVIDIA's datasheets, SXM parts).
PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}
result = {"smoke": smoke, "host": platform.node(), "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "parts": {}}
for rc_file in sorted(glob.glob(os.path.join(parts_dir, "*.rc"))):
    name = os.path.basename(rc_file)[:-3]
    rc, seconds = (int(v) for v in open(rc_file).read().split())
    part = {"exit": rc, "seconds": seconds}
    js = os.path.join(parts_dir, name + ".json")
    if os.path.exists(js):
        part["result"] = json.load(open(js))
    if rc != 0 or "result" not in part:
        lines = [l for l in open(os.path.join(parts_dir, name + ".log")).read().splitlines() if "warning" not in l.lower()]
        part["output_tail"] = lines[-25:]
    result["parts"][name] = part
fits = [p for n, p in result["parts"].items() if n.startswith("sd35_") and p["exit"] == 0 and "result" in p]
if fits:
    r = fits[0]["result"]
    kind = str(r.get("device_kind", ""))
    peak = r.get("peak_flops_per_chip") or next((v for k, v in PEAK_BF16.items() if k in kind), None)
    t = r.get("measured_step_seconds")
    result["sd35"] = {"batch_size": r.get("batch_size"), "step_seconds": t, "peak_bytes": r.get("peak_bytes"),
                      "flops_per_step": r.get("flops_per_step"), "device_kind": kind,
                      "mfu": (r["flops_per_step"] / t / peak) if (peak and t and r.get("flops_per_step")) else None}
with open(out, "w") as f:
    json.dump(result, f, indent=1)
bad = [n for n, p in result["parts"].items() if p["exit"] != 0 and not n.startswith("sd35_")]
print(f"wrote {out}; parts: " + ", ".join(f"{n} ({'ok' if p['exit'] == 0 else 'exit ' + str(p['exit'])})"
                                           for n, p in result["parts"].items()))
sys.exit(1 if bad else 0)
EOF
