"""A real model side by side with TRL (docs/real_models.md): SmolLM2-135M-Instruct trained on HH-RLHF pairs as a
reward model and with DPO (full and LoRA), and with GRPO on one-digit arithmetic (rewards:exact_answer), by our
script and by TRL 1.16's trainer, one after the other, with the same data in the same order, hyperparameters and
optimizer steps; wall time and peak memory of each whole process (benchmark/run.py's `timed`) and the held-out
curves of both (GRPO: greedy accuracy of the saved checkpoints, benchmark/accuracy.py, after the timed runs), plotted.

    PY=$(bash benchmark/setup_trl.sh); SMOL=$(../shared/bench/smollm2_local.sh python)
    python benchmark/make_hh.py /tmp/hh-rlhf/harmless-base/test.jsonl.gz /tmp/hh
    python benchmark/real_models.py /tmp/hh $SMOL /tmp/real --trl-python $PY [--only hh_reward arith_grpo ...]

Writes OUT/{name}.{ours,trl}.log, OUT/results.json and OUT/{name}.png."""

import argparse
import ast
import json
import os
import re
import shutil
import subprocess
import sys

from make_arithmetic import arithmetic
from run import ROOT, timed

BATCH, MICRO, EVAL_PAIRS = 16, 4, 128
"""pairs per optimizer step, per forward pass, and held-out pairs scored at each evaluation"""
PROMPTS, SAVE_EVERY = 16, 2
"""GRPO: prompts per generation (each answered 4 times), and generations between checkpoints scored for accuracy"""


def workloads(out, model, rm_steps=20, grpo_steps=6):
    """name -> (description, our command, TRL's command, steps, eval every): each trains one epoch over its own
    first steps × BATCH training pairs (so both sides see the same pairs in the same order)."""
    shared = f"--max-length 512 --batch-size {BATCH} --per-device-batch-size {MICRO}"

    head = os.path.join(out, "with_head")  # the reward model's start: both sides read the same scalar head

    def ours(script, name, every, flags, start=model):
        data = os.path.join(out, f"data_{name}")
        return [
            *(sys.executable, os.path.join(ROOT, script), "--model-name", start, "--dataset-name", data),
            *f"{shared} --num-epochs 1 --eval-every {every} --lr-schedule linear --adam-eps 1e-8".split(),
            *f"--output-dir {out}/{name} {flags}".split(),
        ]

    def trl(mode, name, steps, every, flags, start=model):
        data = os.path.join(out, f"data_{name}")
        flags = f"{shared} --max-steps {steps} --eval-every {every} --order-seed 1 {flags}"
        return [os.path.join(ROOT, "benchmark", "trl_side.py"), mode, start, data, *flags.split()]

    rm = "--learning-rate 1e-5"
    dpo = "--learning-rate 5e-6 --beta 0.1"
    lora = "--learning-rate 5e-5 --beta 0.1 --lora-r 16"
    grpo = f"--reward-fn rewards:exact_answer --batch-size {PROMPTS * 4} --per-device-batch-size 16"
    grpo += f" --learning-rate 1e-5 --save-every {SAVE_EVERY}"
    arith, saved = os.path.join(out, "data_arith_grpo"), os.path.join(out, "arith_grpo")
    ours_grpo = f" --dataset-name {arith} --output-dir {saved} --kl-coef 0 --generation-batch-size 64"
    ours_grpo += " --num-epochs 4 --response-length 32 --lr-schedule constant --adam-eps 1e-8"  # 4: episodes / prompts
    ours_grpo += " --missing-eos-penalty 0"  # TRL has none
    trl_grpo = f" --output-dir {saved}_trl --beta 0 --iterations {grpo_steps} --order-seed 1"
    return {
        "hh_reward": (
            f"reward model, lr 1e-5, {rm_steps} steps of 16 pairs",
            ours("reward_model.py", "hh_reward", rm_steps // 2, f"{rm} --num-reference-examples 64", head),
            trl("reward", "hh_reward", rm_steps, rm_steps // 2, rm, head),
            rm_steps,
        ),
        "hh_dpo": (
            "DPO, β 0.1, lr 5e-6, 16 steps of 16 pairs",
            ours("dpo.py", "hh_dpo", 8, dpo),
            trl("dpo", "hh_dpo", 16, 8, dpo),
            16,
        ),
        "hh_dpo_lora": (
            "DPO with LoRA r 16 (α 32, every linear layer), β 0.1, lr 5e-5, 16 steps of 16 pairs",
            ours("dpo.py", "hh_dpo_lora", 8, lora),
            trl("dpo", "hh_dpo_lora", 16, 8, lora),
            16,
        ),
        "arith_grpo": (
            f"GRPO, exact_answer, β 0, lr 1e-5, {grpo_steps} generations of {PROMPTS} prompts × 4, 4 epochs × 4 steps",
            [sys.executable, os.path.join(ROOT, "grpo.py"), "--model-name", model, *(grpo + ours_grpo).split()],
            [os.path.join(ROOT, "benchmark", "trl_side.py"), "grpo", model, arith, *(grpo + trl_grpo).split()],
            grpo_steps,
        ),
    }


def save_with_head(model, path):
    """The model with a seeded random scalar head (transformers' initialisation), saved once: without it
    each side draws its own head, and 20 steps do not wash out the difference."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if not os.path.exists(os.path.join(path, "config.json")):
        torch.manual_seed(1)
        AutoModelForSequenceClassification.from_pretrained(model, num_labels=1).save_pretrained(path)
        AutoTokenizer.from_pretrained(model).save_pretrained(path)
        if os.path.exists(os.path.join(model, "generation_config.json")):  # its end tokens, which we read
            shutil.copy(os.path.join(model, "generation_config.json"), path)


def our_curve(log, steps):
    """[(step, {accuracy, margin, loss})] from our script's "step N: ..." evaluation lines, the last step's
    completed by the final results it prints ("saved to ...: {...}")."""
    with open(log) as f:
        text = f.read()
    curve = {}
    for step, rest in re.findall(r"^.*?step (\d+): (.*eval.*)$", text, re.MULTILINE):
        curve[int(step)] = {k: float(v) for k, v in re.findall(r"(accuracy|margin|loss) (-?[\d.]+)", rest)}
    initial = re.search(r"at initialisation: eval/loss ([\d.]+)", text)  # DPO: the policy is its reference,
    if initial:  # so every implicit reward is exactly 0 (tests/test_dpo.py)
        curve[0] = {"loss": float(initial.group(1)), "accuracy": 0.0, "margin": 0.0}
    final = re.search(r"saved to [^:]*: (\{.*\})", text)
    if final:
        values = ast.literal_eval(final.group(1))
        names = {"accuracy": "accuracy", "rewards/accuracies": "accuracy", "margin": "margin"}
        names |= {"rewards/margins": "margin", "loss": "loss"}
        curve.setdefault(steps, {}).update({names[k]: v for k, v in values.items() if k in names})
    return sorted(curve.items())


def trl_curve(log, every):
    """[(step, {accuracy, margin, loss})] from the eval dicts TRL prints, at 0 (eval_on_start), every, 2 every ..."""
    names = {"eval_accuracy": "accuracy", "eval_rewards/accuracies": "accuracy", "eval_margin": "margin"}
    names |= {"eval_rewards/margins": "margin", "eval_loss": "loss"}
    curve = []
    with open(log) as f:
        lines = list(f)
    for line in lines:
        if line.startswith("{") and "eval_loss" in line:
            logged = json.loads(line.replace("'", '"'))
            curve.append((len(curve) * every, {names[k]: float(v) for k, v in logged.items() if k in names}))
    return curve


def grpo_curves(out, model, data, steps, logs):
    """{side: [(generation, {accuracy, score})]}: the greedy held-out accuracy of the start and of every saved
    model (benchmark/accuracy.py), and the training score (each generation's mean sampled reward) from the logs."""
    saved = {"ours": {}, "TRL": {}}
    for g in range(SAVE_EVERY, steps + 1, SAVE_EVERY):
        saved["ours"][g] = f"{out}/arith_grpo/checkpoints/episode_{g * PROMPTS * 4:07d}"
        saved["TRL"][g] = f"{out}/arith_grpo_trl/checkpoint-{g * 16}"  # 4 epochs × 4 steps a generation
    dirs = [model, *saved["ours"].values(), *saved["TRL"].values()]
    cmd = [sys.executable, os.path.join(ROOT, "benchmark", "accuracy.py"), data, *dirs]
    text = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    accuracy = {d: float(v) for d, v in re.findall(r"^(.*?): accuracy ([\d.]+)", text, re.MULTILINE)}
    scores = {}
    for side, pattern in (("ours", r"iteration \d+: score (-?[\d.]+)"), ("TRL", r"'reward': '?(-?[\d.e-]+)")):
        with open(logs["ours" if side == "ours" else "trl"]) as f:
            scores[side] = [float(v) for v in re.findall(pattern, f.read())]
    curves = {}
    for side, models in saved.items():
        curve = {0: {"accuracy": accuracy[model]}}
        for g, score in enumerate(scores[side], 1):
            curve.setdefault(g, {})["score"] = score
        for g, d in models.items():
            curve.setdefault(g, {})["accuracy"] = accuracy[d]
        curves[side] = sorted(curve.items())
    return curves


def plot(name, what, curves, path, keys):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, key in zip(axes, keys):
        for side, curve in curves.items():
            points = [(s, v[key]) for s, v in curve if key in v]
            ax.plot(*zip(*points), marker="o", label=side)
        ax.set_xlabel("generation" if "score" in keys else "optimizer step")
        ax.set_ylabel("training score" if key == "score" else f"held-out {key}")
        ax.legend()
    fig.suptitle(f"{name}: {what}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("data", help="folder written by make_hh.py (train.jsonl, test.jsonl)")
    p.add_argument("model", help="SmolLM2-135M-Instruct's folder")
    p.add_argument("out")
    p.add_argument("--trl-python", required=True)
    p.add_argument("--only", nargs="*")
    p.add_argument("--reward-steps", type=int, default=20, help="the reward model's steps (evaluated halfway)")
    p.add_argument("--grpo-steps", type=int, default=6, help="GRPO's generations (checkpoints every 2)")
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    results_path = os.path.join(a.out, "results.json")
    results = {}
    if os.path.exists(results_path):  # earlier workloads of this folder stay
        with open(results_path) as f:
            results = json.load(f)
    for name, (what, ours, trl, steps) in workloads(a.out, a.model, a.reward_steps, a.grpo_steps).items():
        if a.only and name not in a.only:
            continue
        if name == "hh_reward":
            save_with_head(a.model, os.path.join(a.out, "with_head"))
        data = os.path.join(a.out, f"data_{name}")  # the first training rows these steps take, the test rows
        os.makedirs(data, exist_ok=True)
        for split, n in (("train", steps * (PROMPTS if name == "arith_grpo" else BATCH)), ("test", EVAL_PAIRS)):
            if name == "arith_grpo":  # make_arithmetic.py's one-digit rows: 0.555 greedy at the start (grpo.md)
                rows = arithmetic(2000, 0, 1)[:n] if split == "train" else arithmetic(200, 1, 1)
                rows = [json.dumps(r) + "\n" for r in rows]
            else:
                with open(os.path.join(a.data, f"{split}.jsonl")) as f:
                    rows = list(f)[:n]
            with open(os.path.join(data, f"{split}.jsonl"), "w") as g:
                g.writelines(rows)
        logs = {side: os.path.join(a.out, f"{name}.{side}.log") for side in ("ours", "trl")}
        t_ours, m_ours = timed(ours, env, logs["ours"])
        t_trl, m_trl = timed([a.trl_python, *trl], env, logs["trl"])
        if name == "arith_grpo":
            curves = grpo_curves(a.out, a.model, data, steps, logs)
        else:
            every = int(ours[ours.index("--eval-every") + 1])
            curves = {"ours": our_curve(logs["ours"], steps), "TRL": trl_curve(logs["trl"], every)}
        results[name] = {"workload": what, "ours_s": round(t_ours, 1), "trl_s": round(t_trl, 1)}
        results[name] |= {"ours_mib": round(m_ours), "trl_mib": round(m_trl), "curves": curves}
        print(json.dumps({name: results[name]}), flush=True)
        keys = ("accuracy", "score") if name == "arith_grpo" else ("accuracy", "margin")
        plot(name, what, curves, os.path.join(a.out, f"{name}.png"), keys)
        with open(results_path, "w") as f:
            json.dump(results, f, indent=1)
