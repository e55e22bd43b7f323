"""Evaluate policies: reward against KL, next to the exact optimum, best-of-n and each other.

Every row is measured on the same held-out prompts, as a mean over prompts with its standard error. For every
policy, one response per prompt: the reward-model score; the KL to the reference policy (the SFT model), the mean
of Σ_t log π − log π_ref; length, per-token entropy, the share that ends with an end token; the win rate against
the dataset's reference responses under a judge. On the toy task also the exact gold reward and KL to P_ref of
every sample, and two optimality ratios (R_π − R_0) / (R*(KL_π) − R_0), the share of the best improvement
achievable at that KL, each with a bootstrap standard error over prompts:
* vs P_ref: R* the exact frontier of π*_β ∝ P_ref exp(r/β) (toy_task.optimal_frontier);
* vs SFT: R* the frontier of π*_β ∝ π_SFT exp(r/β), what the methods aim at, estimated by self-normalised
  importance sampling from the reference's samples (low with few effective samples: `optimum_vs_sft_check` is
  that shortfall, measured with as many samples of P_ref against its exact frontier; ratio × check = corrected).
Best-of-n sampling from the reference (Stiennon et al. 2020; Nakano et al. 2021) is the baseline, at KL log n −
(n − 1)/n. With --write-best-of-n it writes expert iteration's data instead (AlpacaFarm; Dubois et al. 2023).

    python evaluate.py  # every policy of runs/models on the toy task's held-out prompts, CPU, ~4 minutes
    python evaluate.py --policies runs/models/ppo --checkpoints-dirs runs/models/ppo/checkpoints  # along training
    python evaluate.py --seeds 1 2 3 --output-dir runs/reference  # every method's chain per seed, then mean ± sd
    python evaluate.py --write-best-of-n runs/data/expert_iteration.jsonl --best-of-n 16 --num-samples 4000
"""

import json
import math
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
import tyro

import common

METHODS = ["sft", "ppo", "dpo", "grpo", "rloo", "expert_iteration"]  # runs/models/{method}: the default policies


@dataclass
class Args:
    seed: int = 1
    """seed of Python, NumPy and PyTorch (sampling, bootstrap)"""
    device: str = "auto"
    """auto (CUDA if there is one), cpu or cuda"""
    bf16: bool = False
    """bfloat16 autocast for the forward passes"""
    output_dir: str = os.path.join("runs", "evaluate")
    """folder of the table (results.md, results.json) and the plots"""
    policies: list[str] = field(default_factory=list)
    """policy folders to evaluate; default those of runs/models/{sft,ppo,dpo,grpo,rloo,expert_iteration} there are"""
    ref_policy: str = os.path.join("runs", "models", "sft")
    """the reference policy: KLs are measured to it and best-of-n samples from it"""
    reward_model_name: str = os.path.join("runs", "models", "reward_model")
    """reward model from reward_model.py (its config.reward_bias is subtracted)"""
    judge: str | None = None
    """reward model judging win rates against the reference responses; default the gold reward on the toy task"""
    dataset_name: str = "toy"
    """toy, a local file or folder, or a Hub id: prompt, and completion (the reference responses) for win rates"""
    dataset_eval_split: str = "test"
    """split whose prompts are evaluated"""
    max_length: int | None = None
    """tokens per sequence (prompt + response); default 64 on the toy task, else 1024"""
    response_length: int | None = None
    """most tokens per response, its end token included; default 24 on the toy task, else 256"""
    num_samples: int = 1000
    """prompts: every row (policies, best-of-n, checkpoints) is measured on the same ones"""
    temperature: float = 1.0
    """sampling temperature of every policy; KLs are between the sampling distributions"""
    best_of_n: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64])
    """n of best-of-n; max(n) reference samples per prompt, which also give the SFT-relative optimum"""
    min_kl_for_ratio: float = 0.05
    """no optimality ratio for a policy closer than this to the reference (nats): 0/0 at KL 0"""
    num_bootstrap: int = 200
    """resamples of the prompts for the ratios' standard errors"""
    checkpoints_dirs: list[str] = field(default_factory=list)
    """folders of intermediate policies (--save-every): every one evaluated, for the plots along training"""
    per_device_batch_size: int = 250
    """sequences per generate call or forward pass"""
    seeds: list[int] = field(default_factory=list)
    """instead: every method's chain (sft, reward model, ppo, dpo, grpo, rloo, expert iteration, then this
    evaluation) once per seed in runs/seeds/{seed}, skipping stages whose output is there (delete it to rerun);
    seeds.json, seeds.md and frontier_seeds.png to --output-dir"""
    write_best_of_n: str | None = None
    """instead: a .jsonl of (prompt, completion) rows, the reward model's best of max(--best-of-n) reference
    samples for each of --num-samples training prompts: expert iteration's data for sft.py"""


# ---- pure functions (tested in tests/test_evaluate.py) ----
def best_of_n_kl(n):
    """KL(best-of-n ‖ reference) = log n − (n − 1)/n nats (Stiennon et al. 2020, App. G; Nakano et al. 2021): exact
    without ties in reward, an upper bound otherwise."""
    return math.log(n) - (n - 1) / n


def best_of_n_expectation(scores, values, n):
    """Expected `values` (N,) of the highest-`scores` (N,) sample among n drawn without replacement from N, over
    all C(N, n) subsets: sorted by score, the i-th lowest is the best of a subset iff the subset holds it and n − 1
    of the i − 1 below it, with probability C(i − 1, n − 1) / C(N, n). Unbiased for every n ≤ N; ties by position."""
    order = np.argsort(scores, kind="stable")
    weights = np.array([math.comb(i - 1, n - 1) for i in range(1, len(scores) + 1)], float) / math.comb(len(scores), n)
    return float(np.dot(weights, np.asarray(values, float)[order]))


def frontier_reward_at(kl, frontier):
    """R*(kl) of a frontier [(kl, reward)] sorted by kl, interpolated linearly (flat beyond its ends)."""
    kls, rewards = zip(*frontier)
    return float(np.interp(kl, kls, rewards))


def optimality_ratio(reward, kl, ref_reward, frontier):
    """(R_π − R_ref) / (R*(KL_π) − R_ref): 1 on the frontier, 0 no better than the reference."""
    return (reward - ref_reward) / (frontier_reward_at(kl, frontier) - ref_reward)


def wins(policy_scores, reference_scores):
    """Per prompt: 1 if the policy's response is judged better than the reference's, ½ on a tie, else 0."""
    p, r = np.asarray(policy_scores, float), np.asarray(reference_scores, float)
    return (p > r) + 0.5 * (p == r)


def mean_se(x):
    """(mean over prompts, its standard error: sample standard deviation / √n)."""
    x = np.asarray(x, float)
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")


def snis_optimum(rewards, betas):
    """The KL-regularised optimum relative to a sampling policy π_0, by self-normalised importance sampling from
    its samples: rewards (P, N) of N samples for each of P prompts. For each β the target is π*_β ∝ π_0 exp(r/β)
    (DPO paper, eq. 4, π_0 in place of π_ref). Per prompt, with w_j = exp(r_j/β) normalised to ŵ_j: E*[r] ≈
    Σ ŵ_j r_j and KL(π* ‖ π_0) ≈ Σ ŵ_j log(N ŵ_j) (≤ log N: with few effective samples the optimum is
    underestimated). ESS = (Σw)²/Σw². Exact as N → ∞. Returns per-prompt (P, B) kl, reward, ess; β = inf: π_0."""
    r = np.asarray(rewards, float)
    kl, reward, ess = (np.zeros((len(r), len(betas))) for _ in range(3))
    for b, beta in enumerate(betas):
        w = np.exp(np.zeros_like(r) if math.isinf(beta) else (r - r.max(1, keepdims=True)) / beta)
        w_hat = w / w.sum(1, keepdims=True)
        reward[:, b] = (w_hat * r).sum(1)
        kl[:, b] = (w_hat * np.log(np.maximum(w_hat * r.shape[1], 1e-300))).sum(1)
        ess[:, b] = 1 / (w_hat**2).sum(1)
    return kl, reward, ess


def ratio_with_se(gold, kl, ref_gold, frontier_kl, frontier_reward, rng, num_bootstrap=200, min_kl=0.05):
    """Optimality ratio of per-prompt gold rewards and KLs (P,), against a frontier per prompt (P, B) or exact
    (B,), with R_ref per prompt (P,) or a scalar: the point estimate from the means over prompts, its standard
    error the spread over `num_bootstrap` resamples of the prompts (every per-prompt quantity resampled together).
    (None, None) where KL_π < min_kl (0/0) or beyond the frontier's largest KL (no extrapolation)."""
    P = len(gold)
    cols = [np.broadcast_to(np.asarray(a, float), (P,)) for a in (gold, kl, ref_gold)]
    f_kl, f_r = (np.broadcast_to(np.asarray(a, float), (P, np.shape(a)[-1])) for a in (frontier_kl, frontier_reward))

    def ratio(idx):
        fk, fr = f_kl[idx].mean(0), f_r[idx].mean(0)
        g, k, g0 = (c[idx].mean() for c in cols)  # gold, KL, the reference's gold
        if k < min_kl or k > fk.max():
            return None
        return optimality_ratio(g, k, g0, sorted(zip(fk, fr)))

    point = ratio(np.arange(P))
    if point is None:
        return None, None
    boots = [b for b in (ratio(rng.integers(0, P, P)) for _ in range(num_bootstrap)) if b is not None]
    return point, float(np.std(boots, ddof=1)) if len(boots) > 1 else float("nan")


ROW_FIELDS = {"gold_reward": "gold_reward", "kl_to_sft": "kl_to_ref_policy", "kl_to_p_ref": "kl_to_p_ref"}
ROW_FIELDS |= {
    k: k for k in ("optimality_ratio_vs_sft", "optimality_ratio_vs_p_ref", "optimum_vs_sft_ess", "optimum_vs_sft_check")
}
SEED_FIELDS = ["sft_excess_nll", "sft_kl_to_p_ref", "rm_accuracy", "bayes_accuracy", "rm_gold_pearson"]
SEED_FIELDS += [f"{m}_{k}" for m in METHODS[1:] for k in [*ROW_FIELDS, "optimality_ratio_vs_sft_corrected"]]


def seed_record(seed, sft, rm, ev):
    """One seed's numbers, flat: sft.py's and reward_model.py's training_args.json results, and this script's
    results.json, whose policy rows are named by folder (sft, ppo, ...); a field a row lacks is None."""
    rows = {os.path.basename(r["policy"].rstrip("/")): r for r in ev["policies"]}
    record = {"seed": seed, "sft_excess_nll": sft["excess_nll"], "sft_kl_to_p_ref": rows["sft"]["kl_to_p_ref"]}
    record |= {
        "rm_accuracy": rm["accuracy"],
        "bayes_accuracy": rm["bayes_accuracy"],
        "rm_gold_pearson": rm["gold_pearson"],
    }
    for m in METHODS[1:]:
        row = rows.get(m, {})
        for k, key in ROW_FIELDS.items():
            record[f"{m}_{k}"] = row.get(key)  # None where not reported (a ratio at KL < --min-kl-for-ratio)
            if key + "_se" in row:
                record[f"{m}_{k}_se"] = row[key + "_se"]
        ratio, check = row.get("optimality_ratio_vs_sft"), row.get("optimum_vs_sft_check")
        record[f"{m}_optimality_ratio_vs_sft_corrected"] = None if ratio is None or check is None else ratio * check
    return record


def mean_sd(records, key):
    """(mean, sample standard deviation) of records[i][key] over the seeds: sd nan for one seed, both nan where
    a seed has no value."""
    x = np.array([math.nan if r[key] is None else r[key] for r in records], float)
    return float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else float("nan")


# ---- helpers ----
LOGITS_PER_PASS = 8192
"""response tokens whose logits one scoring pass keeps (float32: 8192 × V × 4 bytes, 1.6 GB at a 49k vocabulary)"""


def read_json(path):
    with open(path) as f:
        return json.load(f)


def load_model(cls, name, tokenizer, device):
    model = cls.from_pretrained(name, dtype=torch.float32, **({"num_labels": 1} if "Sequence" in cls.__name__ else {}))
    common.fit_model(model, tokenizer)
    return model.requires_grad_(False).eval().to(device)


def batches(size, *lists):
    """Consecutive slices of `size` items of each list."""
    for i in range(0, len(lists[0]), size):
        yield [x[i : i + size] for x in lists]


@torch.no_grad()
def sample(model, queries, tokenizer, args, device):
    """One response per prompt id list, cut after its first end token (one without reached the cap)."""
    stops, out = common.stop_token_ids(tokenizer, model), []
    for (q,) in batches(args.per_device_batch_size, queries):
        batch = {k: v.to(device) for k, v in common.collate_prompts(q, tokenizer.pad_token_id).items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            new = common.generate(
                model, **batch, tokenizer=tokenizer, max_new_tokens=args.response_length, temperature=args.temperature
            )
        out += [g[: min(g.index(s) for s in stops if s in g) + 1] if set(g) & set(stops) else g for g in new.tolist()]
    return out


def logprobs_and_entropy(logits, tokens, temperature, pad_id, entropy_grad=False, chunk_size=1024):
    """logits (R, V), tokens (R,) -> float32 log-probs and entropies (R,) of softmax(logits / T)
    without PAD, by chunks recomputed in backward; entropies get a gradient if `entropy_grad`."""

    def chunk(x, y):  # (r, V), (r,) -> (r,), (r,)
        x = x.float() / temperature
        x[:, pad_id] = -1e9  # finite, so that p log p is 0 (not NaN) for PAD
        logp = x - x.logsumexp(-1, keepdim=True)
        lp = logp.gather(1, y[:, None]).squeeze(1)
        # last, so that backward's recomputation stops before it
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            return lp, -(logp.exp() * logp).sum(-1)

    grad = torch.is_grad_enabled() and logits.requires_grad
    out = [
        torch.utils.checkpoint.checkpoint(chunk, x, y, use_reentrant=False) if grad else chunk(x, y)
        for x, y in zip(logits.split(chunk_size), tokens.split(chunk_size))
    ]
    empty = logits.new_zeros(0, dtype=torch.float32)
    return tuple(torch.cat(v) for v in zip(*out)) if out else (empty, empty)


def scatter(values, mask):
    """values (R,) in the row-major order of mask's (B, T) True entries -> (B, T), 0 elsewhere."""
    out = torch.zeros(mask.shape, dtype=values.dtype, device=values.device)
    return out.masked_scatter(mask, values)


@torch.no_grad()
def response_logprobs(model, queries, responses, tokenizer, args, device):
    """(N,) Σ over response tokens of log softmax(logits / temperature) with PAD excluded, as sampled, and (N,)
    the mean over each response's tokens of that distribution's entropy. As in the trainers, the LM head runs only
    where a response token is predicted and its softmax in float32 chunks: no (N, L, V) tensor of logits, and each
    pass over at most LOGITS_PER_PASS response tokens, whatever --per-device-batch-size."""
    size = max(1, min(args.per_device_batch_size, LOGITS_PER_PASS // max(map(len, responses), default=1)))
    out = []
    for q, r in batches(size, queries, responses):
        seqs = [a + b for a, b in zip(q, r)]
        ids, mask = common.pad(seqs, tokenizer.pad_token_id).to(device), common.attention_mask(seqs).to(device)
        labels = common.pad([[common.IGNORE_INDEX] * len(a) + b for a, b in zip(q, r)], common.IGNORE_INDEX)
        labels = labels[:, 1:].to(device)  # (n, L − 1): position t predicts token t + 1
        keep = labels != common.IGNORE_INDEX
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=F.pad(keep, (0, 1))).logits  # (R, V)
        logp, entropy = logprobs_and_entropy(logits, labels[keep], args.temperature, tokenizer.pad_token_id)
        n = keep.sum(1).clamp(min=1)
        out.append(torch.stack([scatter(logp, keep).sum(1), scatter(entropy, keep).sum(1) / n], 1).cpu())
    out = torch.cat(out).numpy()
    return out[:, 0], out[:, 1]


@torch.no_grad()
def reward_scores(model, queries, responses, tokenizer, args, device):
    """(N,) the reward of prompt + response at its last real token (right padding), minus config.reward_bias."""
    out = []
    for q, r in batches(args.per_device_batch_size, queries, responses):
        seqs = [a + b for a, b in zip(q, r)]
        ids, mask = common.pad(seqs, tokenizer.pad_token_id).to(device), common.attention_mask(seqs).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            out.append(model(input_ids=ids, attention_mask=mask).logits.squeeze(-1).float().cpu())
    return torch.cat(out).numpy() - getattr(model.config, "reward_bias", 0.0)


# expert iteration in the seeds' chain (and the README's command): the best-of-n data, then sft.py from the SFT model
EI_DATA = "--best-of-n 16 --num-samples 4000"
EI_SFT = "--max-length 64 --learning-rate 1e-3 --num-epochs 1 --warmup-ratio 0"


def run_seeds(args):
    """Every method's chain once per seed (CleanRL's benchmark habit), each stage a fresh process with only --seed
    and the folders changed; then the seeds' records, their mean ± sd and one frontier plot."""
    records, results = [], []
    for seed in args.seeds:
        root = os.path.join("runs", "seeds", str(seed))
        sft, rm, ei, out = f"{root}/sft", f"{root}/reward_model", f"{root}/expert_iteration", f"{root}/evaluate"
        data = f"{root}/expert_iteration.jsonl"
        trio = f"--model-name {sft} --reward-model-name {rm}"
        policies = "--policies " + " ".join(f"{root}/{m}" for m in METHODS)
        stages = {  # name: script and flags; every stage also gets --seed
            "sft": f"sft.py --output-dir {sft}",
            "reward_model": f"reward_model.py --model-name {sft} --output-dir {rm}",
            "ppo": f"ppo.py {trio} --output-dir {root}/ppo",
            "dpo": f"dpo.py --model-name {sft} --output-dir {root}/dpo",
            "grpo": f"grpo.py {trio} --output-dir {root}/grpo",
            "rloo": f"grpo.py {trio} --advantage rloo --output-dir {root}/rloo",
            "best_of_n": f"evaluate.py --ref-policy {sft} --reward-model-name {rm} --write-best-of-n {data} {EI_DATA}",
            "expert_iteration": f"sft.py --model-name {sft} --dataset-name {data} {EI_SFT} --output-dir {ei}",
            "evaluate": f"evaluate.py --ref-policy {sft} --reward-model-name {rm} --output-dir {out} {policies}",
        }
        seconds = {}
        for name, command in stages.items():
            done = {"best_of_n": data, "evaluate": f"{out}/results.json"}.get(name, f"{root}/{name}/training_args.json")
            if os.path.exists(done):  # a killed chain resumes at the first stage without its output
                print(f"seed {seed}: {name} done ({done})", flush=True)
                continue
            print(f"seed {seed}: python {command} --seed {seed}", flush=True)
            start = time.time()
            subprocess.run([sys.executable, *command.split(), "--seed", str(seed)], check=True)
            seconds[name] = round(time.time() - start, 1)
        results.append(read_json(f"{root}/evaluate/results.json"))
        sft_result, rm_result = (read_json(f"{root}/{m}/training_args.json")["result"] for m in ("sft", "reward_model"))
        records.append({**seed_record(seed, sft_result, rm_result, results[-1]), "seconds": seconds})
        print(f"seed {seed}: {sum(seconds.values()):.0f} s {seconds}", flush=True)
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "seeds.json"), "w") as f:
        json.dump(records, f, indent=2)
    keys = ["seed"] + SEED_FIELDS
    table = "| " + " | ".join(keys) + " |\n|" + "---|" * len(keys) + "\n"
    for r in records:
        table += "| " + " | ".join(f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |\n"
    table += "| mean ± sd | " + " | ".join("{:.3f} ± {:.3f}".format(*mean_sd(records, k)) for k in SEED_FIELDS) + " |\n"
    with open(os.path.join(args.output_dir, "seeds.md"), "w") as f:
        f.write(table)
    plot_frontiers(results, [r["seed"] for r in records], os.path.join(args.output_dir, "frontier_seeds.png"))


def plot_frontiers(results, labels, path):
    """Gold reward against KL to P_ref (left: the exact optimum) and to the SFT model (right: the importance-sampled
    one), with best-of-n and every policy, for each of one or more evaluations (seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), dpi=100)
    limit = 1.1 * max(r["kl_to_p_ref"] for res in results for r in res["policies"] + res["best_of_n"][:4])  # to n = 8
    for i, (label, res) in enumerate(zip(labels, results)):
        sft_frontier = sorted((k, r) for _, k, r, _ in res["frontier_vs_ref_policy"])
        for ax, x, frontier in ((axes[0], "kl_to_p_ref", res["frontier"]), (axes[1], "kl_to_ref_policy", sft_frontier)):
            ax.plot(*zip(*[f for f in frontier if f[0] <= limit]), "-", color=f"C{i}", lw=1, label=f"{label}: optimum")
            bon = [(r[x], r["gold_reward"]) for r in res["best_of_n"] if r[x] <= limit]
            ax.plot(*zip(*bon), ".:", color=f"C{i}", lw=0.8, label=f"{label}: best-of-n")
            for row, marker in zip(res["policies"], "o*^sDvP"):
                name = os.path.basename(row["policy"].rstrip("/"))
                name = f"{label}: {name}" if len(labels) > 1 else name
                point = (row[x], row["gold_reward"], row["gold_reward_se"], row[x + "_se"])
                ax.errorbar(*point, fmt=marker, color=f"C{i}", markersize=8, label=name)
    for ax, x in zip(
        axes, ("KL to P_ref (exact optimum ∝ P_ref·exp(r/β))", "KL to the SFT model (optimum ∝ π_SFT·exp(r/β))")
    ):
        ax.set(xlabel=x + ", nats per response", ylabel="gold reward")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path)


def plot_checkpoints(rows, path):
    """Along training, per checkpoints folder: the reward-model score and gold reward against KL (over-optimisation:
    Gao et al. 2022), and the corrected optimality ratio against episodes (learning curves)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    for i, (run, run_rows) in enumerate(rows.items()):
        x = [r.get("kl_to_p_ref", r["kl_to_ref_policy"]) for r in run_rows]
        left.plot(x, [r["score"] for r in run_rows], "o-", color=f"C{i}", label=f"{run}: reward-model score")
        if "gold_reward" in run_rows[0]:
            left.plot(x, [r["gold_reward"] for r in run_rows], "s--", color=f"C{i}", label=f"{run}: gold reward")
            corrected = [
                (r["episodes"], r["optimality_ratio_vs_sft"] * r["optimum_vs_sft_check"])
                for r in run_rows
                if r.get("optimality_ratio_vs_sft") is not None
            ]
            if corrected:
                right.plot(*zip(*corrected), "o-", color=f"C{i}", label=run)
    left.set(xlabel="KL to P_ref (toy) or to the reference policy, nats", ylabel="reward")
    right.set(xlabel="episodes", ylabel="optimality ratio vs SFT, corrected", ylim=(0, 1.05))
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    args = tyro.cli(Args)
    on_toy = args.dataset_name == "toy"  # lengths: the toy task's, or the usual ones for pretrained LMs
    args.max_length = args.max_length or (64 if on_toy else 1024)
    args.response_length = args.response_length or (24 if on_toy else 256)
    if args.temperature <= 0 or min(args.best_of_n, default=0) < 1 or args.response_length >= args.max_length:
        raise ValueError("--temperature must be > 0, --best-of-n positive, --response-length less than --max-length")
    if args.seeds:
        if not on_toy:
            raise ValueError("--seeds runs the chain on the toy task; drop --dataset-name")
        run_seeds(args)
        raise SystemExit
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if on_toy:
        import toy_task
    if not (args.policies or args.write_best_of_n):  # the default policies; none to write expert iteration's data
        args.policies = [f"runs/models/{m}" for m in METHODS if os.path.isdir(f"runs/models/{m}")]
    tokenizer = common.load_tokenizer(args.ref_policy, ": run `python sft.py` first, or pass --ref-policy")
    for name in [args.reward_model_name, *args.policies, *([args.judge] if args.judge else [])]:
        hint = ": run its training script first, or pass another folder"
        if common.load_tokenizer(name, hint).get_vocab() != tokenizer.get_vocab():
            raise ValueError(f"{name} has another tokenizer than {args.ref_policy}: KLs and scores need one vocabulary")
    ref_model = load_model(AutoModelForCausalLM, args.ref_policy, tokenizer, device)
    reward_model = load_model(AutoModelForSequenceClassification, args.reward_model_name, tokenizer, device)
    judge = load_model(AutoModelForSequenceClassification, args.judge, tokenizer, device) if args.judge else None
    stops, N = common.stop_token_ids(tokenizer, ref_model), max(args.best_of_n)

    if args.write_best_of_n:  # expert iteration's data: the reward model's best of N samples of each prompt
        ds = common.load_splits(args.dataset_name, "prompt", seed=args.seed)[0]
        ds = ds.select(range(min(args.num_samples, len(ds))))
        lengths = [len(p) for p in common.encode_dataset(tokenizer, ds, "prompt")[0]]
        ds = ds.select([i for i, n in enumerate(lengths) if n <= args.max_length - args.response_length])  # as below
        queries = common.tokenize_prompts(tokenizer, ds, args.max_length - args.response_length)[0]  # (len(ds),)
        responses = sample(ref_model, [q for q in queries for _ in range(N)], tokenizer, args, device)
        scores = reward_scores(reward_model, [q for q in queries for _ in range(N)], responses, tokenizer, args, device)
        scores = np.asarray(scores) - 1e9 * np.array([not r or r[-1] not in stops for r in responses])  # cut: last
        best = [responses[i * N + int(np.argmax(scores[i * N : (i + 1) * N]))] for i in range(len(queries))]
        os.makedirs(os.path.dirname(args.write_best_of_n) or ".", exist_ok=True)
        with open(args.write_best_of_n, "w") as f:
            for row, q, b in zip(ds, queries, best):  # the text after the prompt's: decoded together, as tokenized
                text = tokenizer.decode(q + b, skip_special_tokens=True)[
                    len(tokenizer.decode(q, skip_special_tokens=True)) :
                ]
                prompt = common.prompt_and_responses(row, "prompt")[0]  # a string, or messages (a `messages` row's)
                completion = [{"role": "assistant", "content": text.strip()}] if isinstance(prompt, list) else text
                f.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")
        dropped = f"{len(lengths) - len(ds)} over the length limit dropped"
        print(f"wrote the best of {N} samples for {len(best)} prompts ({dropped}) to {args.write_best_of_n}")
        raise SystemExit

    # 1. the held-out prompts, and their reference responses if the data has them (toy: P_ref's, in its SFT split)
    kind = "sft" if on_toy else "prompt"
    eval_ds = common.load_splits(args.dataset_name, kind, eval_split=args.dataset_eval_split, seed=args.seed)[1]
    eval_ds = eval_ds.select(range(min(args.num_samples, len(eval_ds))))
    rows = eval_ds.to_list()  # reference responses: a completion column, or conversations that end with a reply
    replies = "messages" in eval_ds.column_names and all(r["messages"][-1]["role"] == "assistant" for r in rows)
    kind = "sft" if "completion" in eval_ds.column_names or replies else "prompt"
    prompt_ids, completions, _ = common.encode_dataset(tokenizer, eval_ds, kind)
    keep = [i for i, p in enumerate(prompt_ids) if len(p) <= args.max_length - args.response_length]
    queries, prompts = [prompt_ids[i] for i in keep], [common.prompt_and_responses(rows[i], kind)[0] for i in keep]
    references = [completions[0][i] for i in keep] if completions else None
    if not queries:
        raise ValueError("every held-out prompt is over --max-length − --response-length tokens; raise --max-length")
    print(f"{len(queries)} held-out prompts ({len(eval_ds) - len(queries)} over the length limit dropped)")
    P, rng = len(queries), np.random.default_rng(args.seed)  # rng: the bootstrap's resamples of the prompts

    def judged(responses, texts):
        """The judge's verdicts: the --judge reward model's, else (toy task) the exact gold reward, else None."""
        if judge is not None:
            return reward_scores(judge, queries, responses, tokenizer, args, device)
        return np.array(toy_task.gold_reward(prompts, texts)) if on_toy else None

    ref_texts = tokenizer.batch_decode(references or [], skip_special_tokens=True)
    ref_judged = judged(references, ref_texts) if references else None

    # 2. N reference samples for every prompt: best-of-n; on the toy task the exact frontier, the optimum relative to
    # the reference policy (π*_β ∝ π_ref exp(r/β), what the methods aim at) and that estimate's own shortfall
    bon_queries, bon_prompts = [q for q in queries for _ in range(N)], [p for p in prompts for _ in range(N)]
    bon_responses = sample(ref_model, bon_queries, tokenizer, args, device)
    bon_scores = reward_scores(reward_model, bon_queries, bon_responses, tokenizer, args, device).reshape(P, N)
    if on_toy:
        betas = [math.inf, *np.geomspace(20, 0.05, 80)]  # a fine grid of β: (KL to P_ref, gold reward), sorted by KL
        frontier = [(kl, r) for _, kl, r in toy_task.optimal_frontier(prompts, betas, args.response_length)]
        ref_gold = frontier[0][1]  # P_ref's exact expected gold reward (KL 0)
        bon_texts = tokenizer.batch_decode(bon_responses, skip_special_tokens=True)
        gold = np.array(toy_task.gold_reward(bon_prompts, bon_texts)).reshape(P, N)
        # best-of-n's KL to P_ref = its KL to the reference (the formula) + E_bon[log π_ref − log P_ref]
        lp, _ = response_logprobs(ref_model, bon_queries, bon_responses, tokenizer, args, device)
        ref_lp = [toy_task.ref_logprob(p, t, args.response_length) for p, t in zip(bon_prompts, bon_texts)]
        gap = (lp - np.array(ref_lp)).reshape(P, N)
        ref_betas = [math.inf, *np.geomspace(20, 0.1, 60)]
        ref_kl, ref_reward, ref_ess = snis_optimum(gold, ref_betas)  # per prompt (P, B)
        ref_frontier = list(zip(ref_betas, ref_kl.mean(0), ref_reward.mean(0), ref_ess.mean(0)))
        # the estimator's shortfall where the answer is exact: the same importance sampling from N samples of P_ref
        # (toy_task's sampler) against the exact frontier; P_ref and the SFT model are close, so the SFT-relative
        # estimate falls about as short: a ratio vs SFT times this share is the corrected ratio
        check_rng = np.random.default_rng(args.seed)
        check_texts = toy_task.TASK.sample_responses(check_rng, bon_prompts, args.response_length)
        check_gold = np.array(toy_task.gold_reward(bon_prompts, check_texts)).reshape(P, N)
        check_kl, check_reward, _ = (x.mean(0) for x in snis_optimum(check_gold, ref_betas))
        check = [
            (k, (r - check_reward[0]) / (frontier_reward_at(k, frontier) - ref_gold))
            for k, r in zip(check_kl, check_reward)
        ]
        check = sorted(check[1:])

    def with_se(row, **per_prompt):
        """The mean over prompts of each per-prompt array into `row`, its standard error as key_se."""
        for key, values in per_prompt.items():
            row[key], row[key + "_se"] = mean_se(values)
        return row

    def add_toy(row, gold_pp, kl_p_ref_pp, kl_ref_pp):
        """The toy task's exact gold reward and KL to P_ref, both optimality ratios with bootstrap standard errors,
        the effective samples behind the SFT-relative optimum at this KL and the estimate's measured shortfall."""
        with_se(row, gold_reward=gold_pp, kl_to_p_ref=kl_p_ref_pp)
        row["optimum_gold_at_kl"] = frontier_reward_at(row["kl_to_p_ref"], frontier)
        row["optimality_ratio_vs_p_ref"], row["optimality_ratio_vs_p_ref_se"] = ratio_with_se(
            gold_pp, kl_p_ref_pp, ref_gold, *zip(*frontier), rng, args.num_bootstrap, args.min_kl_for_ratio
        )
        row["optimality_ratio_vs_sft"], row["optimality_ratio_vs_sft_se"] = ratio_with_se(
            gold_pp, kl_ref_pp, gold.mean(1), ref_kl, ref_reward, rng, args.num_bootstrap, args.min_kl_for_ratio
        )
        kl = float(np.mean(kl_ref_pp))
        row["optimum_vs_sft_ess"] = float(np.interp(kl, *zip(*sorted((k, e) for _, k, _, e in ref_frontier))))
        if row["optimality_ratio_vs_sft"] is not None:
            row["optimum_vs_sft_check"] = float(np.interp(kl, *zip(*check)))
        return row

    def evaluate_policy(name):
        """Every per-policy metric for the policy in folder `name`, on the same prompts as every other row."""
        model = ref_model if name == args.ref_policy else load_model(AutoModelForCausalLM, name, tokenizer, device)
        responses = sample(model, queries, tokenizer, args, device)
        texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
        logp, entropy = response_logprobs(model, queries, responses, tokenizer, args, device)
        logp_ref = response_logprobs(ref_model, queries, responses, tokenizer, args, device)[0]
        score = reward_scores(reward_model, queries, responses, tokenizer, args, device)
        eos_rate, response_length = [bool(r) and r[-1] in stops for r in responses], [len(r) for r in responses]
        row = with_se(
            {"policy": name},
            score=score,
            kl_to_ref_policy=logp - logp_ref,
            response_length=response_length,
            eos_rate=eos_rate,
            entropy=entropy,
        )
        if ref_judged is not None:
            with_se(row, win_rate=wins(judged(responses, texts), ref_judged))
        if on_toy:
            gold_pp = np.array(toy_task.gold_reward(prompts, texts))
            ref_lp = np.array([toy_task.ref_logprob(p, t, args.response_length) for p, t in zip(prompts, texts)])
            add_toy(row, gold_pp, logp - ref_lp, logp - logp_ref)
        print("  " + ", ".join(f"{k} {v}" for k, v in row.items() if not k.endswith("_se")))
        return row

    # 3. every policy; best-of-n, chosen by the reward model and (toy: a perfect reward model) by the gold reward
    print("policies:")
    rows = [evaluate_policy(name) for name in args.policies]

    def best_of_n_rows(selector, label):
        """One row per n: the expectations over the n-subsets of each prompt's N samples of the sample `selector`
        (P, N) ranks highest: score, gold reward, KLs (to P_ref: the formula + E_bon[log π_ref − log P_ref])."""

        def at_best(values, n):  # (P,) per prompt
            return np.array([best_of_n_expectation(s, v, n) for s, v in zip(selector, values)])

        out = []
        for n in args.best_of_n:
            row = with_se({"policy": f"best-of-{n}{label}"}, score=at_best(bon_scores, n))
            row["kl_to_ref_policy"] = best_of_n_kl(n)  # exact (an upper bound when samples tie)
            if on_toy:
                add_toy(row, at_best(gold, n), best_of_n_kl(n) + at_best(gap, n), np.full(P, best_of_n_kl(n)))
            out.append(row)
        return out

    bon = best_of_n_rows(bon_scores, "")
    bon_gold = best_of_n_rows(gold, " (gold selector)") if on_toy else []

    # 4. intermediate policies: over-optimisation (score rising, gold reward not) and learning curves
    checkpoints = {}
    for folder in args.checkpoints_dirs:
        run = os.path.dirname(os.path.normpath(folder)) or folder  # runs/seeds/1/ppo, not ppo: runs stay apart
        if run in checkpoints:
            raise ValueError(f"--checkpoints-dirs names {folder} twice")
        print(f"checkpoints of {run}:")
        names = sorted(os.listdir(folder))  # episode_0000512, ...: episodes seen
        checkpoints[run] = [evaluate_policy(f"{folder}/{c}") | {"episodes": int(c.split("_")[-1])} for c in names]

    # 5. the table (mean ± standard error over prompts), JSON and plots
    all_rows = rows + bon + bon_gold + [r for v in checkpoints.values() for r in v]
    columns = "policy score kl_to_ref_policy response_length eos_rate entropy win_rate gold_reward kl_to_p_ref"
    columns += " optimality_ratio_vs_p_ref optimality_ratio_vs_sft optimum_vs_sft_ess optimum_vs_sft_check"
    columns = [c for c in columns.split() if any(r.get(c) is not None for r in all_rows)]

    def cell(r, c):
        v, se = r.get(c), r.get(c + "_se")
        if not isinstance(v, float):
            return "" if v is None else str(v)
        return f"{v:.3f} ± {se:.3f}" if isinstance(se, float) and math.isfinite(se) else f"{v:.3f}"

    table = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    table += "\n".join("| " + " | ".join(cell(r, c) for c in columns) + " |" for r in all_rows)
    if on_toy:
        at1 = min(ref_frontier[1:], key=lambda f: abs(f[1] - 1.0))
        table += (
            f"\n\n{P} prompts for every row. P_ref: gold reward {ref_gold:.3f} at KL 0 (exact); optimum at KL 1: "
            f"{frontier_reward_at(1.0, frontier):.3f}. Optimum relative to the reference policy (importance sampling, "
            f"{N} samples per prompt): at KL {at1[1]:.3f} (β = {at1[0]:.2f}) gold {at1[2]:.3f}, effective sample size "
            f"{at1[3]:.1f} of {N}; no ratio where the KL is under {args.min_kl_for_ratio} or beyond the frontier"
        )
    print(table)
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "results.md"), "w") as f:
        f.write(table + "\n")
    results = {"args": vars(args), "policies": rows, "best_of_n": bon, "best_of_n_gold": bon_gold}
    results |= {"checkpoints": checkpoints, "frontier": None, "frontier_vs_ref_policy": None}
    if on_toy:
        results |= {"frontier": frontier, "frontier_vs_ref_policy": [list(map(float, f)) for f in ref_frontier]}
        plot_frontiers([results], ["this run"], os.path.join(args.output_dir, "frontier.png"))
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    if checkpoints:
        plot_checkpoints(checkpoints, os.path.join(args.output_dir, "checkpoints.png"))
    print(f"wrote {args.output_dir}/results.md, results.json and its plots")
