#!/usr/bin/env bash
# The GPU figures still missing from the open issues, as one device call (one command, logs under
# $OUT, each log's tail printed at the end so the call's output is the table).
#
# Usage, from the project root on the GPU machine:
#   bash benchmarks/device_session.sh [PART ...]
# PARTs, run in the order given (default: tests speed federated flower, about 9 minutes):
#   tests        the gpu tests of the Triton gate kernels and of the graph runner (LISA's graphs)
#   speed        cl-bench bench rows of lora, smora, flylora, lisa, finetune, loraprune (issues 20, 21)
#   speed-all    the whole cl-bench bench table (issue 21; longer than one call's 10 minutes
#                together with other parts)
#   federated    federated lora vs finetune, sequential backend, K=10, R=5 (issue 19)
#   flower       federated lora on Flower's simulation engine (issue 19)
#   multidomain  the X-TAIL-shaped run against the bench's lora step (issue 16)
#   profile      benchmarks.profile_step of mora (10 experiences), loraprune, smora and flylora
# Without avalanche-lib/open_clip installed, the site packed by `.ci/device-site` is unpacked first
# (carry .devsite in the call).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-device-logs}
mkdir -p "$out"
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(tests speed federated flower)
known=" tests speed speed-all federated flower multidomain profile "
for part in "${parts[@]}"; do
  if [[ $known != *" $part "* ]]; then
    echo "error: unknown part '$part' (one of:$known)" >&2
    exit 2
  fi
done
rm -f "$out/summary.log"
if ! python3 -c "import avalanche, open_clip" 2> /dev/null; then
  if [ ! -f .devsite/devsite.tar.xz ]; then
    echo "error: avalanche-lib/open_clip are missing and .devsite/devsite.tar.xz is not here" >&2
    echo "(build it with 'bash .ci/device-site' and carry .devsite in the call)" >&2
    exit 2
  fi
  mkdir -p /tmp/cl-bench-site && tar -xJf .devsite/devsite.tar.xz -C /tmp/cl-bench-site
  export PATH=/tmp/cl-bench-site/devsite/bin:$PATH
  export PYTHONPATH=/tmp/cl-bench-site/devsite:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} HF_HUB_OFFLINE=1 WANDB_MODE=disabled
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

run_part() {
  local name=$1 limit=$2
  shift 2
  local started=$SECONDS
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc in $((SECONDS - started)) s" >> "$out/summary.log"
}

for part in "${parts[@]}"; do
  case $part in
    tests) run_part tests 90 python3 -m pytest -q -p no:cacheprovider -o addopts="" -m gpu \
      tests/core/test_rank_kernels.py tests/core/test_graphs.py ;;
    speed) run_part speed 240 python3 -m benchmarks.speed --no-eager-rows \
      --only lora smora flylora lisa finetune loraprune --out "$out/bench.json" ;;
    speed-all) run_part speed-all 580 python3 -m benchmarks.speed --no-eager-rows --out "$out/bench-all.json" ;;
    federated) run_part federated 170 python3 -m benchmarks.federated --device cuda \
      --runs lora/sequential finetune/sequential ;;
    flower) run_part flower 130 python3 -m benchmarks.federated --device cuda --runs lora/flower ;;
    multidomain) run_part multidomain 400 python3 -m benchmarks.multidomain --workdir /tmp/cl-bench-xtail ;;
    profile) run_part profile 300 python3 -m benchmarks.profile_step mora loraprune smora flylora \
      --experiences 10 --rows 12 ;;
  esac
done
for part in "${parts[@]}"; do
  echo
  echo "######## $part (last lines of $out/$part.log)"
  tail -n 30 "$out/$part.log"
done
echo
cat "$out/summary.log"
