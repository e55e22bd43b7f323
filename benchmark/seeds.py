"""Every method's chain once per seed (CleanRL's benchmark habit), each stage a fresh process with
only --seed and the folders changed, in runs/seeds/{seed}; a stage whose output is there is skipped
(delete it to rerun). Then seeds.json, seeds.md (mean ± sd) and frontier_seeds.png.

    python benchmark/seeds.py --seeds 1 2 3 --output-dir runs/reference  # from the root, 80 min
"""

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project root
from evaluate import METHODS, plot_frontiers


@dataclass
class Args:
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    """every method's chain runs once for each seed, in runs/seeds/{seed}"""
    output_dir: str = os.path.join("runs", "seeds")
    """folder of seeds.json, seeds.md and frontier_seeds.png"""


# a method's fields in a seed's record: the key of each in its results.json row
ROW_FIELDS = {"gold_reward": "gold_reward", "kl_to_sft": "kl_to_ref_policy", "kl_to_p_ref": "kl_to_p_ref"}
for k in ("optimality_ratio_vs_sft", "optimality_ratio_vs_p_ref", "optimum_vs_sft_ess", "optimum_vs_sft_check"):
    ROW_FIELDS[k] = k
SEED_FIELDS = ["sft_excess_nll", "sft_kl_to_p_ref", "rm_accuracy", "bayes_accuracy", "rm_gold_pearson"]
for m in METHODS[1:]:
    SEED_FIELDS += [f"{m}_{k}" for k in [*ROW_FIELDS, "optimality_ratio_vs_sft_corrected"]]
# expert iteration (as in the README): its data, then sft.py from the SFT model
EI_DATA = "--best-of-n 16 --num-samples 4000"
EI_SFT = "--max-length 64 --learning-rate 1e-3 --num-epochs 1 --warmup-ratio 0"


def seed_record(seed, sft, rm, ev):
    """One seed's numbers, flat, from sft.py's and reward_model.py's results and evaluate.py's
    results.json (policy rows named by folder: sft, ppo, ...); a field a row lacks is None."""
    rows = {os.path.basename(r["policy"].rstrip("/")): r for r in ev["policies"]}
    record = {"seed": seed, "sft_excess_nll": sft["excess_nll"]}
    record["sft_kl_to_p_ref"] = rows["sft"]["kl_to_p_ref"]
    record |= {k: rm[k.removeprefix("rm_")] for k in SEED_FIELDS[2:5]}  # accuracy, ..., gold_pearson
    for m in METHODS[1:]:
        row = rows.get(m, {})
        for k, key in ROW_FIELDS.items():
            record[f"{m}_{k}"] = row.get(key)  # None where not reported (a ratio at a small KL)
            if key + "_se" in row:
                record[f"{m}_{k}_se"] = row[key + "_se"]
        ratio, check = row.get("optimality_ratio_vs_sft"), row.get("optimum_vs_sft_check")
        corrected = None if ratio is None or check is None else ratio * check
        record[f"{m}_optimality_ratio_vs_sft_corrected"] = corrected
    return record


def mean_sd(records, key):
    """(mean, sample sd) of records[i][key] over the seeds: sd nan for one seed, both nan where a
    seed has no value."""
    x = np.array([math.nan if r[key] is None else r[key] for r in records], float)
    return float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else float("nan")


def read_json(path):
    with open(path) as f:
        return json.load(f)


def run_chain(seed):
    """One seed's chain (sft.py, reward_model.py, ppo.py, dpo.py, grpo.py, its RLOO, expert
    iteration: best_of_n.py and sft.py, evaluate.py), each stage a fresh process; the seconds of
    those that ran."""
    root = os.path.join("runs", "seeds", str(seed))
    sft, rm, data = f"{root}/sft", f"{root}/reward_model", f"{root}/expert_iteration.jsonl"
    trio = f"--model-name {sft} --reward-model-name {rm}"
    ref = f"--ref-policy {sft} --reward-model-name {rm}"
    policies = " ".join(f"{root}/{m}" for m in METHODS)
    stages = {  # name: script and flags (and --seed); the output folder {root}/{name}
        "sft": "sft.py",
        "reward_model": f"reward_model.py --model-name {sft}",
        "ppo": f"ppo.py {trio}",
        "dpo": f"dpo.py --model-name {sft}",
        "grpo": f"grpo.py {trio}",
        "rloo": f"grpo.py {trio} --advantage rloo",
        "best_of_n": f"best_of_n.py {ref} --output {data} {EI_DATA}",
        "expert_iteration": f"sft.py --model-name {sft} --dataset-name {data} {EI_SFT}",
        "evaluate": f"evaluate.py {ref} --policies {policies}",
    }
    seconds = {}
    for name, command in stages.items():
        if name != "best_of_n":
            command += f" --output-dir {root}/{name}"
        done = {"best_of_n": data, "evaluate": f"{root}/evaluate/results.json"}.get(name)
        done = done or f"{root}/{name}/training_args.json"
        if os.path.exists(done):  # a killed chain resumes at the first stage without its output
            print(f"seed {seed}: {name} done ({done})", flush=True)
            continue
        print(f"seed {seed}: python {command} --seed {seed}", flush=True)
        start = time.time()
        subprocess.run([sys.executable, *command.split(), "--seed", str(seed)], check=True)
        seconds[name] = round(time.time() - start, 1)
    return seconds


if __name__ == "__main__":
    args = tyro.cli(Args)
    records, results = [], []
    for seed in args.seeds:
        seconds = run_chain(seed)
        root = os.path.join("runs", "seeds", str(seed))
        results.append(read_json(f"{root}/evaluate/results.json"))
        sft, rm = (read_json(f"{root}/{s}/training_args.json")["result"] for s in ("sft", "reward_model"))
        records.append({**seed_record(seed, sft, rm, results[-1]), "seconds": seconds})
        print(f"seed {seed}: {sum(seconds.values()):.0f} s {seconds}", flush=True)
    out = args.output_dir
    os.makedirs(out, exist_ok=True)
    with open(f"{out}/seeds.json", "w") as f:
        json.dump(records, f, indent=2)
    keys = ["seed", *SEED_FIELDS]
    rows = [[f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for k in keys] for r in records]
    rows.append(["mean ± sd"] + ["{:.3f} ± {:.3f}".format(*mean_sd(records, k)) for k in SEED_FIELDS])
    with open(f"{out}/seeds.md", "w") as f:
        f.write("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys) + "\n")
        f.writelines("| " + " | ".join(r) + " |\n" for r in rows)
    plot_frontiers(results, [r["seed"] for r in records], f"{out}/frontier_seeds.png")
