#!/usr/bin/env bash
# GRPO's variants on the exact frontier (docs/results.md). After `python benchmark/seeds.py --seeds 1 2 3`, for each seed:
# every variant from that seed's SFT model, scored by the toy task's exact reward (a verifiable reward), at the toy's
# β = 1 and at β = 0 (no reference model), then one evaluation of them all; last, the mean ± sd over the seeds.
#   bash benchmark/grpo_variants.sh 1 2 3   # from the project root, ~25 minutes a seed on 2 CPU cores
set -euo pipefail
declare -A FLAGS=(
  [grpo]="--advantage grpo"
  [dr_grpo]="--advantage dr_grpo"
  [rloo]="--advantage rloo"
  [clip_higher]="--advantage grpo --cliprange-high 0.28"
  [gspo]="--advantage grpo --importance-sampling-level sequence --cliprange 3e-4 --cliprange-high 4e-4"
)
NAMES="grpo dr_grpo rloo clip_higher gspo"
for seed in "$@"; do
  root=runs/seeds/$seed
  policies=()
  for name in $NAMES; do
    for beta in 1 0; do
      out=$root/gold/${name}_beta$beta
      [ -f "$out/training_args.json" ] || python grpo.py --model-name "$root/sft" --reward-fn toy_task:gold_reward \
        ${FLAGS[$name]} --kl-coef $beta --seed "$seed" --output-dir "$out"
      policies+=("$out")
    done
  done
  python evaluate.py --ref-policy "$root/sft" --reward-model-name "$root/reward_model" --policies "${policies[@]}" \
    --seed "$seed" --output-dir "$root/gold/evaluate"
done
python - "$@" <<'PY'
import json, sys
import numpy as np
rows = {}
for seed in sys.argv[1:]:
    for r in json.load(open(f"runs/seeds/{seed}/gold/evaluate/results.json"))["policies"]:
        ratio, check = r.get("optimality_ratio_vs_sft"), r.get("optimum_vs_sft_check")
        corrected = np.nan if ratio is None or check is None else ratio * check
        rows.setdefault(r["policy"].split("/")[-1], []).append((r["gold_reward"], r["kl_to_ref_policy"], corrected))
print("| variant | gold reward | KL to SFT | ratio vs SFT, corrected |\n|---|---|---|---|")
for name, values in rows.items():
    cells = [f"{np.mean(v):.3f} ± {np.std(v, ddof=1):.3f}" for v in np.array(values).T]
    print(f"| {name} | " + " | ".join(cells) + " |")
PY
