"""Side by side against TRL: each workload through our script and through TRL's trainer, one after the
other on this machine, whole process under /usr/bin/time -v (wall seconds, peak resident memory), same
model folder, data files, batch shapes and number of optimizer steps. From the project root:

    PY=$(bash benchmark/setup_trl.sh)                       # TRL 1.16 (+ 1.12 for PPO) in its own venv
    python benchmark/make_workloads.py /tmp/bench           # the shared inputs
    python benchmark/run.py /tmp/bench --trl-python $PY     # all workloads; --only toy_dpo smol_dpo ... for some

Prints a Markdown table (ours / TRL: lower is better) and writes OUT/results.json. Quote ratios measured in
one sitting; absolute times on a shared machine drift from day to day."""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def workloads(out):
    """name -> (description, our command, TRL's command); the same inputs, batch and steps on both sides."""
    toy, smol, tmp = os.path.join(out, "toy"), os.path.join(out, "smol"), tempfile.mkdtemp()

    def ours(script, flags):
        return [sys.executable, os.path.join(ROOT, script), "--output-dir", os.path.join(tmp, script), *flags.split()]

    def trl(mode, flags):
        return [os.path.join(HERE, "trl_side.py"), mode, *flags.split()]

    toy_flags = f"--model-name {toy}/model --batch-size 64 --max-length 64 --eval-every 1000"
    smol_flags = f"--model-name {smol}/model --batch-size 8 --max-length 256 --eval-every 1000"
    ppo = (
        "--num-epochs 0.5 --batch-size 256 --num-minibatches 4 --num-ppo-epochs 4 --response-length 24 --max-length 64"
    )
    return {
        "toy_sft": (
            "SFT, toy model, 5,120 examples, batch 64",
            ours(
                "sft.py",
                f"{toy_flags} --dataset-name {toy}/sft --num-epochs 1 --learning-rate 3e-3 --num-sample-completions 0",
            ),
            trl("sft", f"{toy}/model {toy}/sft --learning-rate 3e-3"),
        ),
        "toy_reward": (
            "reward model, toy model, 5,120 pairs, batch 64",
            ours("reward_model.py", f"{toy_flags} --dataset-name {toy}/pairs --learning-rate 1e-3"),
            trl("reward", f"{toy}/model {toy}/pairs --learning-rate 1e-3"),
        ),
        "toy_dpo": (
            "DPO, toy model, 5,120 pairs, batch 64",
            ours("dpo.py", f"{toy_flags} --dataset-name {toy}/pairs --learning-rate 5e-4 --beta 1"),
            trl("dpo", f"{toy}/model {toy}/pairs --learning-rate 5e-4 --beta 1"),
        ),
        "toy_ppo": (
            "PPO, toy model, 10 iterations of 256 episodes, 4 minibatches x 4 epochs (TRL 1.12)",
            ours(
                "ppo.py",
                f"--model-name {toy}/model --reward-model-name {toy}/model --dataset-name {toy}/prompts {ppo} "
                "--learning-rate 3e-4 --kl-coef 0.5 --generation-batch-size 256 --rollout-forward-batch-size 256",
            ),
            trl("ppo", f"{toy}/model {toy}/prompts --learning-rate 3e-4 --iterations 10 --rollout-batch-size 256"),
        ),
        "toy_grpo": (
            "GRPO, toy model, 10 iterations of 64 prompts x 4 responses, 4 minibatches x 4 epochs (TRL 1.16)",
            ours(
                "grpo.py",
                f"--model-name {toy}/model --reward-model-name {toy}/model --dataset-name {toy}/prompts "
                f"{ppo} --group-size 4 --learning-rate 3e-4 --kl-coef 0.5 --kl-penalty k3_loss "
                "--generation-batch-size 256",  # scoring passes of 64, as TRL's (per_device_train_batch_size)
            ),
            trl("grpo", f"{toy}/model {toy}/prompts --learning-rate 3e-4 --iterations 10"),
        ),
        "toy_rloo": (
            "RLOO, toy model, 10 iterations of 64 prompts x 4 responses, 4 minibatches x 4 epochs (TRL 1.16)",
            ours(
                "grpo.py",
                f"--model-name {toy}/model --reward-model-name {toy}/model --dataset-name {toy}/prompts "
                f"{ppo} --group-size 4 --learning-rate 3e-4 --kl-coef 0.5 --advantage rloo "
                "--generation-batch-size 256",  # scoring passes of 64, as TRL's (per_device_train_batch_size)
            ),
            trl("rloo", f"{toy}/model {toy}/prompts --learning-rate 3e-4 --iterations 10"),
        ),
        "smol_sft": (
            "SFT, SmolLM2-135M architecture, 64 chat-shaped examples (prompt ~150 tokens masked, answer ~50), batch 8",
            ours(
                "sft.py",
                f"{smol_flags} --dataset-name {smol}/sft --num-epochs 1 --learning-rate 1e-5 "
                "--num-sample-completions 0",
            ),
            trl("sft", f"{smol}/model {smol}/sft --batch-size 8 --max-length 256 --learning-rate 1e-5"),
        ),
        "smol_dpo_lora": (
            "DPO with LoRA r = 16 (every linear layer), the same pairs and batch",
            ours("dpo.py", f"{smol_flags} --dataset-name {smol}/pairs --learning-rate 1e-5 --beta 0.1 --lora-r 16"),
            trl(
                "dpo",
                f"{smol}/model {smol}/pairs --batch-size 8 --max-length 256 --learning-rate 1e-5 --beta 0.1 "
                "--lora-r 16",
            ),
        ),
        "smol_dpo": (
            "DPO, SmolLM2-135M architecture, 32 chat-shaped pairs (prompt ~150 tokens, responses ~50), batch 8",
            ours("dpo.py", f"{smol_flags} --dataset-name {smol}/pairs --learning-rate 1e-6 --beta 0.1"),
            trl("dpo", f"{smol}/model {smol}/pairs --batch-size 8 --max-length 256 --learning-rate 1e-6 --beta 0.1"),
        ),
    }


def timed(cmd, env, log):
    """(wall seconds, peak resident set in MiB) of one whole process; its output goes to `log`."""
    with open(log, "w") as f:
        proc = subprocess.run(
            ["/usr/bin/time", "-v", *cmd], check=False, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT
        )
    with open(log) as f:
        text = f.read()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode}); see {log}")
    h, m, s = ([0, 0] + re.search(r"Elapsed \(wall clock\) time.*: ([\d:.]+)", text).group(1).split(":"))[-3:]
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1))
    return 3600 * float(h) + 60 * float(m) + float(s), rss_kb / 1024


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("out", help="folder written by make_workloads.py")
    p.add_argument("--trl-python", required=True, help="python of TRL's environment (setup_trl.sh prints it)")
    p.add_argument("--only", nargs="*", help="run these workloads only")
    a = p.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    trl112 = os.path.join(os.path.dirname(os.path.dirname(a.trl_python)), "trl112")
    results = {}
    for name, (what, ours, trl) in workloads(a.out).items():
        if a.only and name not in a.only:
            continue
        trl_env = {**env, "PYTHONPATH": trl112} if name.endswith("ppo") else env
        t_ours, m_ours = timed(ours, env, os.path.join(a.out, f"{name}.ours.log"))
        t_trl, m_trl = timed([a.trl_python, *trl], trl_env, os.path.join(a.out, f"{name}.trl.log"))
        results[name] = {
            "workload": what,
            "ours_s": round(t_ours, 1),
            "trl_s": round(t_trl, 1),
            "ours_mib": round(m_ours),
            "trl_mib": round(m_trl),
            "time_ratio": round(t_ours / t_trl, 2),
            "memory_ratio": round(m_ours / m_trl, 2),
        }
        print(json.dumps({name: results[name]}), flush=True)
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump({"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "results": results}, f, indent=2)
    print(f"\n{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores; whole process, ours / TRL (lower is better)\n")
    print("| workload | wall ours / TRL | seconds ours vs TRL | peak memory ours vs TRL (MiB) |\n|---|---|---|---|")
    for r in results.values():
        print(
            f"| {r['workload']} | **{r['time_ratio']:.2f}** | {r['ours_s']:.0f} vs {r['trl_s']:.0f} | "
            f"{r['ours_mib']} vs {r['trl_mib']} ({r['memory_ratio']:.2f}) |"
        )
