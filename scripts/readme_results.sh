#!/usr/bin/env bash
# Reruns every command whose numbers the README shows (beyond the main sweep, which
# tests/test_readme.py reruns), each into the sweep folder the README names, from an empty
# cache of their own (outputs/cache-readme) so that no result of older code is reused.
# About 45 minutes on the project's 2-core CPU machine. Run after scripts/setup.sh:
#   bash scripts/readme_results.sh            # all
#   bash scripts/readme_results.sh cross      # one part: conditions | null | robustness |
#                                             # knockout | cross | helm
set -euo pipefail
cd "$(dirname "$0")/.."
SWEEP=".venv/bin/ih-sweep"
CACHE="paths.cache_dir=outputs/cache-readme"
parts=${*:-conditions null robustness knockout cross helm}
run() {  # name, then the command's overrides; the README gives the same command
  local name=$1; shift
  echo "== $name: ih-sweep $*" >&2
  $SWEEP "$@" "hydra.sweep.dir=outputs/multirun/readme-$name" "$CACHE" eval.progress=false \
    > "outputs/readme-$name.log" 2>&1 || { echo "failed: see outputs/readme-$name.log" >&2; exit 1; }
}
run_refusing() {  # the same for a sweep one of whose jobs is refused by design (exit 1)
  local name=$1; shift
  echo "== $name: ih-sweep $* (one job refused by design)" >&2
  $SWEEP "$@" "hydra.sweep.dir=outputs/multirun/readme-$name" "$CACHE" eval.progress=false \
    > "outputs/readme-$name.log" 2>&1 || true
  [ -f "outputs/multirun/readme-$name/summary.csv" ] || { echo "failed: see outputs/readme-$name.log" >&2; exit 1; }
}
mkdir -p outputs
for part in $parts; do
  case $part in
    conditions)
      run conditions -m n_heads=1%,3%,10%,20% scoring=prefix,fv,prefix_not_fv,fv_not_prefix \
        condition=high,low,random,none control_seeds=20 ;;
    null)
      # N=16: no norm-matched control exists on the tiny model (refused in one line)
      run_refusing norm-null -m n_heads=4,8,16 condition=high,low,random,none \
        control_seeds=200 control.match=layer_norm
      run fv-seeds -m n_heads=10%,20% scoring=fv,prefix_not_fv scoring.fv_seed=0,1,2 \
        condition=high,none ;;
    robustness)
      run robustness -m n_heads=8,16 condition=high,low,none \
        ablation=zero,mean,position_mean,resample
      run resample-align -m n_heads=8 condition=high ablation=resample \
        ablation.align=start,end
      run resample-end -m n_heads=8,16 condition=high,low,none ablation=resample \
        ablation.align=end ;;
    knockout)
      run knockout -m n_heads=4,8,16 condition=high,low,none ablation=zero,knockout
      run knockout-zero -m n_heads=4,8,16 condition=high,low,none ablation=knockout \
        ablation.knockout=zero ;;
    cross)
      run tiny-fp32 -m n_heads=4,8,16 condition=high,low,none
      run tiny-bf16 -m n_heads=4,8,16 condition=high,low,none model.dtype=bfloat16
      run tiny-nf4 -m n_heads=4,8,16 condition=high,low,none quantization=nf4
      .venv/bin/python -m ih_sweep.report outputs/multirun/readme-tiny-fp32 \
        outputs/multirun/readme-tiny-bf16 outputs/multirun/readme-tiny-nf4 \
        --out outputs/compare/readme-tiny > outputs/readme-cross.log 2>&1 ;;
    helm)
      run helm -m eval=helm n_heads=16 condition=high,low,none data.n_stories=200
      run helm-contains -m eval=helm eval.metric=contains n_heads=16 condition=high,low,none \
        data.n_stories=200 ;;
    *) echo "unknown part: $part (conditions, robustness, knockout, cross, helm)" >&2; exit 2 ;;
  esac
done
echo "done: outputs/multirun/readme-*/summary.md, outputs/compare/readme-tiny/cross_model.md" >&2
