"""Evaluate policies: reward against KL, compared with the exact optimum, best-of-n and each other.

Every row is measured on the same held-out prompts, as a mean over prompts with its standard
error. For every policy: one response per prompt; the reward-model score; the sequence KL to the
reference policy (the mean over samples of Σ_t log π − log π_ref over response tokens); length,
per-token entropy and the share ending with an end token (eos_rate); the win rate against the
dataset's reference responses under a judge. On the toy task also the exact gold reward and the
exact KL to P_ref of every sample, and two optimality ratios (R_π − R_0) / (R*(KL_π) − R_0), the
share of the best improvement achievable at that KL:
* vs P_ref: R* the exact frontier of π*_β ∝ P_ref exp(r/β) (toy_task.optimal_frontier);
* vs SFT (the reference policy): R* the frontier of π*_β ∝ π_SFT exp(r/β), which is what PPO and
  DPO aim at, estimated by self-normalised importance sampling from max(--best-of-n) samples of
  the reference per prompt (biased low when few samples carry the weight: the effective sample
  size is reported, and `optimum_vs_sft_check` measures the shortfall where the answer is exact:
  the same estimator on as many samples of P_ref, against the exact frontier);
each with a bootstrap standard error over prompts. Best-of-n sampling from the reference
(Stiennon et al. 2020; Nakano et al. 2021) is the baseline, at KL log n − (n − 1)/n. Results go
to a table on stdout and CSV/JSON/PNG under --output-dir.

    # default: the SFT, PPO and DPO models of the default chain on the toy task's held-out prompts, CPU
    python evaluate.py
    # PPO checkpoints saved with --save-every: the over-optimisation picture (Gao et al. 2022)
    python evaluate.py --policies runs/models/ppo --checkpoints-dir runs/models/ppo/checkpoints
    # the default chain for seeds 1, 2 and 3, then mean ± sd: runs/reference/seeds.json, seeds.md, frontier_seeds.png
    python evaluate.py --seeds 1 2 3 --output-dir runs/reference
"""

import csv
import json
import math
import os
import random
from dataclasses import dataclass, field

import numpy as np
import torch
import tyro

import common


@dataclass
class Args:
    seed: int = 1
    """seed of Python, NumPy and PyTorch (sampling)"""
    torch_deterministic: bool = True
    """use deterministic cuDNN kernels (torch.backends.cudnn.deterministic)"""
    device: str = "auto"
    """where to run: auto (CUDA if available, else CPU), cpu or cuda"""
    bf16: bool = False
    """run forward passes under bfloat16 autocast"""
    output_dir: str = os.path.join("runs", "evaluate")
    """folder the table (CSV, JSON) and the plots (PNG) are written to"""

    policies: list[str] = field(
        default_factory=lambda: [os.path.join("runs", "models", s) for s in ("sft", "ppo", "dpo")]
    )
    """policy folders (or Hub ids) to evaluate"""
    ref_policy: str = os.path.join("runs", "models", "sft")
    """reference policy: KLs are measured to it and best-of-n samples from it"""
    reward_model_name: str = os.path.join("runs", "models", "reward_model")
    """reward model from reward_model.py (its config.reward_bias is subtracted)"""
    judge: str | None = None
    """reward model judging win rates against the reference responses; default: the gold reward on the toy task, none elsewhere"""
    dataset_name: str = "toy"
    """toy, a local file or folder, or a Hub id; column prompt, and completion (reference responses) for win rates"""
    dataset_eval_split: str = "test"
    """split whose prompts are evaluated (toy: the held-out prompts)"""
    max_length: int | None = None
    """tokens per sequence (prompt + response); prompts over max_length − response_length are dropped;
    default 64 on the toy task, 1024 otherwise (as in ppo.py)"""
    response_length: int | None = None
    """most tokens generated per response, its end token included; default 24 on the toy task, 256 otherwise"""
    num_samples: int = 1000
    """held-out prompts: every row of the table (policies, best-of-n, checkpoints) is measured on the same ones"""
    temperature: float = 1.0
    """sampling temperature of every policy; KLs are between the sampling distributions"""
    best_of_n: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64])
    """n of the best-of-n baseline; max(best_of_n) reference samples are drawn for every prompt, and (toy task)
    also give the optimum relative to the reference policy by importance sampling"""
    min_kl_for_ratio: float = 0.05
    """optimality ratios of policies closer than this (nats) to the reference are not reported: the ratio is 0/0 at KL 0"""
    num_bootstrap: int = 200
    """resamples of the prompts for the standard errors of the optimality ratios"""
    checkpoints_dir: str | None = None
    """folder of intermediate policies (ppo.py --save-every); each is evaluated for the over-optimisation plot"""
    per_device_batch_size: int = 250
    """sequences per generation or forward pass"""
    seeds: list[int] = field(default_factory=list)
    """instead of evaluating: run the whole default chain (sft, reward_model, ppo, dpo, then this evaluation)
    once per seed in runs/seeds/{seed}, and write seeds.json, seeds.md and frontier_seeds.png to --output-dir"""


# ---- pure functions (imported by the tests) --------------------------------------------------------
def best_of_n_kl(n):
    """KL(best-of-n ‖ reference) = log n − (n − 1)/n nats (Stiennon et al. 2020, App. G; Nakano et al.
    2021): exact when the reference has no ties in reward and no atoms, an upper bound otherwise."""
    return math.log(n) - (n - 1) / n


def best_of_n_expectation(scores, values, n):
    """Expected `values` of the highest-`scores` sample of n drawn without replacement from the N given
    samples of one prompt, averaged over all C(N, n) subsets: sorted by score, the i-th smallest is the
    best of a subset iff the subset holds it and n − 1 of the i − 1 below it, with probability
    C(i − 1, n − 1) / C(N, n). An unbiased estimate that uses all N samples for every n ≤ N.
    scores, values: (N,) arrays; ties in score are broken by position."""
    N = len(scores)
    order = np.argsort(scores, kind="stable")
    weights = np.array([math.comb(i - 1, n - 1) for i in range(1, N + 1)], float) / math.comb(N, n)
    return float(np.dot(weights, np.asarray(values, float)[order]))


def frontier_reward_at(kl, frontier):
    """R*(kl): the exact frontier [(kl, reward)], sorted by kl, linearly interpolated (held flat beyond
    its ends). Linear interpolation of a concave curve slightly underestimates between grid points."""
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
    """The KL-regularised optimum relative to a sampling policy π_0, from its samples, by self-normalised
    importance sampling. rewards: (P, N) rewards of N samples of π_0 for each of P prompts. For each β the
    target is π*_β(y|x) ∝ π_0(y|x) exp(r(x,y)/β) (DPO paper, eq. 4, with π_0 in place of π_ref). Per prompt,
    with weights w_j = exp(r_j/β) normalised to ŵ_j: E*[r] ≈ Σ_j ŵ_j r_j, and KL(π* ‖ π_0) = E*[r]/β − log E_0[e^{r/β}]
    ≈ Σ_j ŵ_j log(N ŵ_j), the KL of the reweighted samples to the uniform ones (≤ log N: with few effective
    samples the optimum is underestimated). ESS = (Σw)²/Σw², out of N. Exact as N → ∞.
    Returns per-prompt (P, B) arrays kl, reward, ess; β = inf gives π_0 itself."""
    r = np.asarray(rewards, float)
    kl, reward, ess = (np.zeros((len(r), len(betas))) for _ in range(3))
    for b, beta in enumerate(betas):
        logw = np.zeros_like(r) if math.isinf(beta) else (r - r.max(1, keepdims=True)) / beta
        w = np.exp(logw)
        w_hat = w / w.sum(1, keepdims=True)
        reward[:, b] = (w_hat * r).sum(1)
        kl[:, b] = (w_hat * np.log(np.maximum(w_hat * r.shape[1], 1e-300))).sum(1)
        ess[:, b] = 1 / (w_hat**2).sum(1)
    return kl, reward, ess


def ratio_with_se(gold, kl, ref_gold, frontier_kl, frontier_reward, rng, num_bootstrap=200, min_kl=0.05):
    """Optimality ratio (R_π − R_ref) / (R*(KL_π) − R_ref) of per-prompt gold rewards and KLs (P,), against a
    frontier given per prompt (P, B) or exactly (B,), and R_ref per prompt (P,) or exactly (scalar). The
    point estimate uses the means over prompts; its standard error is the spread over `num_bootstrap`
    resamples of the prompts (every per-prompt quantity resampled together: the policy's, the reference's
    and an estimated frontier's noise all count). (None, None) where KL_π < min_kl (0/0) or beyond the
    frontier's largest KL (it would be extrapolated)."""
    P = len(gold)
    cols = [np.broadcast_to(np.asarray(a, float), (P,)) for a in (gold, kl, ref_gold)]
    f_kl, f_r = (np.broadcast_to(np.asarray(a, float), (P, np.shape(a)[-1])) for a in (frontier_kl, frontier_reward))

    def ratio(idx):
        fk, fr = f_kl[idx].mean(0), f_r[idx].mean(0)
        order = np.argsort(fk)
        g, k, g0 = (c[idx].mean() for c in cols)  # gold, KL, the reference's gold
        if k < min_kl or k > fk.max():
            return None
        return optimality_ratio(g, k, g0, list(zip(fk[order], fr[order])))

    point = ratio(np.arange(P))
    if point is None:
        return None, None
    boots = [ratio(rng.integers(0, P, P)) for _ in range(num_bootstrap)]
    boots = [b for b in boots if b is not None]
    return point, float(np.std(boots, ddof=1)) if len(boots) > 1 else float("nan")


SEED_FIELDS = ["sft_excess_nll", "sft_kl_to_p_ref", "rm_accuracy", "bayes_accuracy", "rm_gold_pearson"] + [
    f"{m}_{k}"
    for m in ("ppo", "dpo")
    for k in (
        "gold_reward",
        "kl_to_sft",
        "kl_to_p_ref",
        "optimality_ratio_vs_sft",
        "optimality_ratio_vs_p_ref",
        "optimum_vs_sft_ess",
        "optimum_vs_sft_check",
        "optimality_ratio_vs_sft_corrected",
    )
]


def seed_record(seed, sft, rm, ev):
    """One seed's numbers, flat: from sft.py's and reward_model.py's training_args.json results and this
    script's results.json (policies in the order sft, ppo, dpo)."""
    sft_row, ppo_row, dpo_row = ev["policies"]
    record = {
        "seed": seed,
        "sft_excess_nll": sft["excess_nll"],
        "sft_kl_to_p_ref": sft_row["kl_to_p_ref"],
        "rm_accuracy": rm["accuracy"],
        "bayes_accuracy": rm["bayes_accuracy"],
        "rm_gold_pearson": rm["gold_pearson"],
    }
    for m, row in (("ppo", ppo_row), ("dpo", dpo_row)):
        for k, key in (
            ("gold_reward", "gold_reward"),
            ("kl_to_sft", "kl_to_ref_policy"),
            ("kl_to_p_ref", "kl_to_p_ref"),
            ("optimality_ratio_vs_sft", "optimality_ratio_vs_sft"),
            ("optimality_ratio_vs_p_ref", "optimality_ratio_vs_p_ref"),
            ("optimum_vs_sft_ess", "optimum_vs_sft_ess"),
            ("optimum_vs_sft_check", "optimum_vs_sft_check"),
        ):
            record[f"{m}_{k}"] = row.get(key)  # None where not reported (a ratio at KL < --min-kl-for-ratio)
            if key + "_se" in row:
                record[f"{m}_{k}_se"] = row[key + "_se"]
        ratio, check = row.get("optimality_ratio_vs_sft"), row.get("optimum_vs_sft_check")
        record[f"{m}_optimality_ratio_vs_sft_corrected"] = None if ratio is None or check is None else ratio * check
    return record


def mean_sd(records, key):
    """(mean, sample standard deviation) of records[i][key] over the seeds (sd nan for one seed; nan where
    a seed has no value)."""
    x = np.array([math.nan if r[key] is None else r[key] for r in records], float)
    return float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else float("nan")


# ---- model helpers ----------------------------------------------------------------------------------
def load_model(cls, name, tokenizer, device):
    kwargs = {"num_labels": 1} if "Sequence" in cls.__name__ else {}
    model = cls.from_pretrained(name, dtype=torch.float32, **kwargs)
    common.fit_model(model, tokenizer)
    return model.requires_grad_(False).eval().to(device)


@torch.no_grad()
def sample(model, queries, tokenizer, args, device):
    """One response per prompt id list, cut after its first end token (the EOS, the chat template's
    end-of-turn or a stop id the model declares); a response without one reached the cap."""
    pad_id, stops = tokenizer.pad_token_id, common.stop_token_ids(tokenizer, model)
    out = []
    for i in range(0, len(queries), args.per_device_batch_size):
        batch = {
            k: v.to(device)
            for k, v in common.collate_prompts(queries[i : i + args.per_device_batch_size], pad_id).items()
        }
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            gen = common.generate(
                model, batch["input_ids"], batch["attention_mask"], tokenizer, args.response_length, args.temperature
            )
        out += [g[: min(g.index(s) for s in stops if s in g) + 1] if set(g) & set(stops) else g for g in gen.tolist()]
    return out


@torch.no_grad()
def response_logprobs(model, queries, responses, tokenizer, args, device):
    """(N,) Σ over response tokens of log softmax(logits / temperature), PAD excluded as in sampling, and
    (N,) the mean over each response's tokens of the entropy of that sampling distribution."""
    out = []
    for i in range(0, len(queries), args.per_device_batch_size):
        q, r = queries[i : i + args.per_device_batch_size], responses[i : i + args.per_device_batch_size]
        seqs = [a + b for a, b in zip(q, r)]
        labels = common.pad([[common.IGNORE_INDEX] * len(a) + b for a, b in zip(q, r)], common.IGNORE_INDEX).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            logits = model(
                input_ids=common.pad(seqs, tokenizer.pad_token_id).to(device),
                attention_mask=common.attention_mask(seqs).to(device),
            ).logits
        logits = logits[:, :-1].float() / args.temperature  # position t predicts token t + 1
        logits[..., tokenizer.pad_token_id] = -1e9  # finite, so that p·log p is 0 (not NaN) for PAD
        labels = labels[:, 1:]
        mask = labels != common.IGNORE_INDEX
        logp_all = logits.log_softmax(-1)  # (n, L-1, V)
        logp = torch.gather(logp_all, 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        entropy = -(logp_all.exp() * logp_all).sum(-1)  # (n, L-1)
        out.append(
            torch.stack(
                [
                    torch.where(mask, logp, 0.0).sum(1),
                    torch.where(mask, entropy, 0.0).sum(1) / mask.sum(1).clamp(min=1),
                ],
                1,
            ).cpu()
        )
    out = torch.cat(out).numpy()
    return out[:, 0], out[:, 1]


@torch.no_grad()
def reward_scores(model, queries, responses, tokenizer, args, device):
    """(N,) reward of prompt + response at its last real token (right padding), minus config.reward_bias."""
    out = []
    for i in range(0, len(queries), args.per_device_batch_size):
        seqs = [
            a + b
            for a, b in zip(queries[i : i + args.per_device_batch_size], responses[i : i + args.per_device_batch_size])
        ]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            logits = model(
                input_ids=common.pad(seqs, tokenizer.pad_token_id).to(device),
                attention_mask=common.attention_mask(seqs).to(device),
            ).logits
        out.append(logits.squeeze(-1).float().cpu() - getattr(model.config, "reward_bias", 0.0))
    return torch.cat(out).numpy()


def run_seeds(args):
    """The default chain once per seed (CleanRL's benchmark habit), each stage a fresh process with only
    --seed and the folders changed, then the seeds' records, mean ± sd table and frontier plot."""
    import subprocess
    import sys
    import time

    records, results = [], []
    for seed in args.seeds:
        root = os.path.join("runs", "seeds", str(seed))
        sft, rm, ppo, dpo = (os.path.join(root, "models", s) for s in ("sft", "reward_model", "ppo", "dpo"))
        stages = [
            ("sft.py", "--output-dir", sft),
            ("reward_model.py", "--model-name", sft, "--output-dir", rm),
            ("ppo.py", "--model-name", sft, "--reward-model-name", rm, "--output-dir", ppo),
            ("dpo.py", "--model-name", sft, "--output-dir", dpo),
            (
                "evaluate.py",
                "--policies",
                sft,
                ppo,
                dpo,
                "--ref-policy",
                sft,
                "--reward-model-name",
                rm,
                "--output-dir",
                os.path.join(root, "evaluate"),
            ),
        ]
        seconds = {}
        for script, *flags in stages:
            print(f"seed {seed}: python {script} --seed {seed} {' '.join(flags)}", flush=True)
            start = time.time()
            subprocess.run([sys.executable, script, "--seed", str(seed), *flags], check=True)
            seconds[script[:-3]] = round(time.time() - start, 1)

        def result(folder):
            with open(os.path.join(folder, "training_args.json")) as f:
                return json.load(f)["result"]

        with open(os.path.join(root, "evaluate", "results.json")) as f:
            results.append(json.load(f))
        records.append({**seed_record(seed, result(sft), result(rm), results[-1]), "seconds": seconds})
        print(f"seed {seed}: {sum(seconds.values()):.0f} s {seconds}", flush=True)
    write_seed_summary(records, results, args.output_dir)


def write_seed_summary(records, results, output_dir):
    """seeds.json (the records), seeds.md (a row per seed and the mean ± sd) and frontier_seeds.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "seeds.json"), "w") as f:
        json.dump(records, f, indent=2)
    keys = ["seed"] + SEED_FIELDS
    table = "| " + " | ".join(keys) + " |\n|" + "---|" * len(keys) + "\n"
    table += "".join(
        "| " + " | ".join(f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |\n"
        for r in records
    )
    table += "| mean ± sd | " + " | ".join("{:.3f} ± {:.3f}".format(*mean_sd(records, k)) for k in SEED_FIELDS) + " |\n"
    with open(os.path.join(output_dir, "seeds.md"), "w") as f:
        f.write(table)
    print(table)

    # gold reward against KL for every seed: left the exact optimum relative to P_ref (each seed draws its
    # own toy data, so its own held-out prompts), right each seed's optimum relative to its SFT model
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    limit = 1.1 * max(
        r["kl_to_p_ref"] for res in results for r in res["policies"] + res["best_of_n"][:4]
    )  # up to n = 8
    for i, (seed, res) in enumerate(zip([r["seed"] for r in records], results)):
        color = f"C{i}"
        left.plot(
            *zip(*[(k, g) for k, g in res["frontier"] if k <= limit]),
            "-",
            color=color,
            lw=1,
            label=f"seed {seed}: exact optimum ∝ P_ref·exp(r/β)",
        )
        sft_frontier = sorted((k, r) for _, k, r, _ in res["frontier_vs_ref_policy"])
        right.plot(
            *zip(*[(k, r) for k, r in sft_frontier if k <= limit]),
            "-",
            color=color,
            lw=1,
            label=f"seed {seed}: optimum ∝ π_SFT·exp(r/β) (importance sampling)",
        )
        for ax, x in ((left, "kl_to_p_ref"), (right, "kl_to_ref_policy")):
            bon = [r for r in res["best_of_n"] if r[x] <= limit]
            ax.plot(
                [r[x] for r in bon],
                [r["gold_reward"] for r in bon],
                ".:",
                color=color,
                lw=0.8,
                label=f"seed {seed}: best-of-n" if ax is left else None,
            )
            for row, marker in zip(res["policies"][1:], ("*", "^")):
                ax.errorbar(
                    row[x],
                    row["gold_reward"],
                    yerr=row["gold_reward_se"],
                    xerr=row[x + "_se"],
                    fmt=marker,
                    color=color,
                    markersize=11 if marker == "*" else 8,
                    label=f"seed {seed}: {os.path.basename(row['policy'])}",
                )
    for ax, x in ((left, "KL to P_ref"), (right, "KL to the seed's SFT model")):
        ax.set_xlabel(x + " (nats per response)")
        ax.set_ylabel("gold reward")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(os.path.join(output_dir, "frontier_seeds.png"))
    print(f"wrote {output_dir}/seeds.json, seeds.md, frontier_seeds.png")


if __name__ == "__main__":
    args = tyro.cli(Args)
    toy = args.dataset_name == "toy"  # lengths default to the toy task's, or to the usual ones for pretrained LMs
    args.max_length = args.max_length if args.max_length is not None else 64 if toy else 1024
    args.response_length = args.response_length if args.response_length is not None else 24 if toy else 256
    if args.temperature <= 0:
        raise ValueError("--temperature must be > 0: KLs need a sampling distribution with log-probabilities")
    if not args.best_of_n or min(args.best_of_n) < 1:
        raise ValueError("--best-of-n takes positive integers")
    if args.response_length >= args.max_length:
        raise ValueError(
            f"--response-length {args.response_length} leaves no room for a prompt in --max-length {args.max_length}"
        )
    if args.seeds:
        if not toy:
            raise ValueError("--seeds runs the default chain on the toy task; drop --dataset-name")
        run_seeds(args)
        raise SystemExit(0)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic

    import transformers
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    transformers.utils.logging.disable_progress_bar()
    if toy:
        import toy_task
    tokenizer = common.load_tokenizer(args.ref_policy, ": run `python sft.py` first, or pass --ref-policy")
    for name in [args.reward_model_name] + args.policies + ([args.judge] if args.judge else []):
        script = os.path.basename(name.rstrip(os.sep)) + ".py"
        hint = f": run `python {script if os.path.isfile(script) else 'its training script'}` first, or pass another folder"
        if common.load_tokenizer(name, hint).get_vocab() != tokenizer.get_vocab():
            raise ValueError(
                f"{name} has another tokenizer than the reference {args.ref_policy}; token-level KLs and "
                "scores need one vocabulary (train every stage from the same SFT model)"
            )
    ref_model = load_model(AutoModelForCausalLM, args.ref_policy, tokenizer, device)
    reward_model = load_model(AutoModelForSequenceClassification, args.reward_model_name, tokenizer, device)
    stops = common.stop_token_ids(tokenizer, ref_model)
    judge = load_model(AutoModelForSequenceClassification, args.judge, tokenizer, device) if args.judge else None
    os.makedirs(args.output_dir, exist_ok=True)

    # 1. held-out prompts (and their reference responses, if the data has them)
    # (the toy task's SFT split: held-out prompts with P_ref's responses as the references)
    _, eval_ds = common.load_splits(
        args.dataset_name, "sft" if toy else "prompt", eval_split=args.dataset_eval_split, seed=args.seed
    )
    eval_ds = eval_ds.select(range(min(args.num_samples, len(eval_ds))))
    prompt_ids, completions, _ = common.encode_dataset(
        tokenizer, eval_ds, "sft" if "completion" in eval_ds.column_names else "prompt"
    )
    keep = [i for i, p in enumerate(prompt_ids) if 0 < len(p) <= args.max_length - args.response_length]
    queries = [prompt_ids[i] for i in keep]
    prompts = [eval_ds["prompt"][i] for i in keep] if toy else None
    references = [completions[0][i] for i in keep] if completions else None
    if not queries:
        raise ValueError(
            f"every held-out prompt is empty or over --max-length − --response-length = "
            f"{args.max_length - args.response_length} tokens; raise --max-length"
        )
    print(f"{len(queries)} held-out prompts ({len(eval_ds) - len(queries)} over the length limit dropped)")

    def judge_scores(q, responses, texts):
        """The judge's verdicts: the exact gold reward on the toy task, else the --judge reward model."""
        if judge is not None:
            return reward_scores(judge, q, responses, tokenizer, args, device)
        if toy:
            return np.array([toy_task.gold_reward(p, t) for p, t in zip(prompts, texts)])
        return None

    rng = np.random.default_rng(args.seed)  # bootstrap resamples of the prompts
    P, N = len(queries), max(args.best_of_n)
    frontier = None
    if toy:  # the exact frontier on a fine grid of β, as (KL to P_ref, gold reward), sorted by KL
        betas = [math.inf] + list(np.geomspace(20, 0.05, 80))
        frontier = [(kl, r) for _, kl, r in toy_task.optimal_frontier(prompts, betas, args.response_length)]
        ref_gold = frontier[0][1]  # P_ref's exact expected gold reward (KL 0)
    ref_judged = (
        judge_scores(queries, references, tokenizer.batch_decode(references, skip_special_tokens=True))
        if references is not None
        else None
    )

    # 2. N = max(best_of_n) samples of the reference policy for every prompt: best-of-n, and on the toy task
    # the optimum relative to the reference policy (π*_β ∝ π_ref exp(r/β), what PPO and DPO aim at)
    bon_queries = [q for q in queries for _ in range(N)]
    bon_responses = sample(ref_model, bon_queries, tokenizer, args, device)
    bon_scores = reward_scores(reward_model, bon_queries, bon_responses, tokenizer, args, device).reshape(P, N)
    if toy:
        bon_texts = tokenizer.batch_decode(bon_responses, skip_special_tokens=True)
        bon_prompts = [p for p in prompts for _ in range(N)]
        gold = np.array([toy_task.gold_reward(p, t) for p, t in zip(bon_prompts, bon_texts)]).reshape(P, N)
        # KL of best-of-n to P_ref = KL to the reference policy (formula) + E_bon[log π_ref − log P_ref]
        lp, _ = response_logprobs(ref_model, bon_queries, bon_responses, tokenizer, args, device)
        gap = (
            lp - np.array([toy_task.ref_logprob(p, t, args.response_length) for p, t in zip(bon_prompts, bon_texts)])
        ).reshape(P, N)
        # per prompt (P, B): KL to the reference policy and gold reward of its optimum, by importance sampling
        ref_betas = [math.inf] + list(np.geomspace(20, 0.1, 60))
        ref_kl, ref_reward, ref_ess = snis_optimum(gold, ref_betas)
        ref_frontier = [
            (b, k, r, e) for b, k, r, e in zip(ref_betas, ref_kl.mean(0), ref_reward.mean(0), ref_ess.mean(0))
        ]
        ref_policy_gold = gold.mean(1)  # (P,) the reference policy's own gold reward per prompt
        # the estimator's own error, measured where the answer is exact: the same importance sampling from N
        # samples of P_ref itself (toy_task's sampler) against the exact frontier. Its share of the exact
        # optimum's gain at a KL is how far N samples fall short there (P_ref and the SFT model are close, so
        # the SFT-relative estimate falls short about as much): a ratio vs SFT times this share corrects it
        check_texts = toy_task.TASK.sample_responses(
            np.random.default_rng(args.seed), bon_prompts, args.response_length
        )
        check_gold = np.array([toy_task.gold_reward(p, t) for p, t in zip(bon_prompts, check_texts)]).reshape(P, N)
        check_kl, check_reward, _ = (x.mean(0) for x in snis_optimum(check_gold, ref_betas))
        check = sorted(
            (k, (r - check_reward[0]) / (frontier_reward_at(k, frontier) - ref_gold))
            for k, r in zip(check_kl[1:], check_reward[1:])
        )

    def add_ratios(row, gold_pp, kl_p_ref_pp, kl_ref_pp):
        """Both optimality ratios of a row, with bootstrap standard errors: against the exact optimum
        relative to P_ref, and against the importance-sampled optimum relative to the reference policy."""
        row["optimum_gold_at_kl"] = frontier_reward_at(row["kl_to_p_ref"], frontier)
        fk, fr = zip(*frontier)
        row["optimality_ratio_vs_p_ref"], row["optimality_ratio_vs_p_ref_se"] = ratio_with_se(
            gold_pp, kl_p_ref_pp, ref_gold, fk, fr, rng, args.num_bootstrap, args.min_kl_for_ratio
        )
        row["optimality_ratio_vs_sft"], row["optimality_ratio_vs_sft_se"] = ratio_with_se(
            gold_pp, kl_ref_pp, ref_policy_gold, ref_kl, ref_reward, rng, args.num_bootstrap, args.min_kl_for_ratio
        )
        # effective samples behind the optimum at this KL: few of N means the optimum is underestimated
        # (the ratio then overestimated); raise max(--best-of-n) for more samples
        kls, _, _, ess = map(np.array, zip(*sorted((k, b, r, e) for b, k, r, e in ref_frontier)))
        row["optimum_vs_sft_ess"] = float(np.interp(float(np.mean(kl_ref_pp)), kls, ess))
        if row["optimality_ratio_vs_sft"] is not None:
            row["optimum_vs_sft_check"] = float(np.interp(float(np.mean(kl_ref_pp)), *zip(*check)))

    def with_se(row, **per_prompt):
        """Put the mean over prompts of each per-prompt array in `row`, and its standard error as key_se."""
        for key, values in per_prompt.items():
            row[key], row[key + "_se"] = mean_se(values)
        return row

    def evaluate_policy(name):
        """Every per-policy metric for the policy in folder `name`, on the same prompts as every other row."""
        model = ref_model if name == args.ref_policy else load_model(AutoModelForCausalLM, name, tokenizer, device)
        responses = sample(model, queries, tokenizer, args, device)
        texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
        logp, entropy = response_logprobs(model, queries, responses, tokenizer, args, device)
        logp_ref = (
            logp if model is ref_model else response_logprobs(ref_model, queries, responses, tokenizer, args, device)[0]
        )
        row = with_se(
            {"policy": name},
            score=reward_scores(reward_model, queries, responses, tokenizer, args, device),
            kl_to_ref_policy=logp - logp_ref,
            response_length=[len(r) for r in responses],
            eos_rate=[bool(r) and r[-1] in stops for r in responses],
            entropy=entropy,
        )
        judged = judge_scores(queries, responses, texts)
        if judged is not None and ref_judged is not None:
            with_se(row, win_rate=wins(judged, ref_judged))
        if toy:
            gold_pp = np.array([toy_task.gold_reward(p, t) for p, t in zip(prompts, texts)])
            kl_pp = logp - np.array([toy_task.ref_logprob(p, t, args.response_length) for p, t in zip(prompts, texts)])
            with_se(row, gold_reward=gold_pp, kl_to_p_ref=kl_pp)
            add_ratios(row, gold_pp, kl_pp, logp - logp_ref)
        print(
            "  "
            + ", ".join(
                f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items() if not k.endswith("_se")
            )
        )
        return row

    # 3. every policy
    print("policies:")
    rows = [evaluate_policy(name) for name in args.policies]

    def best_of_n_rows(selector, label):
        """One row per n: expected score, gold reward and KLs of the sample that `selector` (P, N) ranks
        highest among n of a prompt's N (KL to P_ref = the formula + E_bon[log π_ref − log P_ref])."""

        def at_best(values, n):  # (P,) per prompt
            return np.array([best_of_n_expectation(s, v, n) for s, v in zip(selector, values)])

        out = []
        for n in args.best_of_n:
            row = with_se({"policy": f"best-of-{n}{label}"}, score=at_best(bon_scores, n))
            row["kl_to_ref_policy"] = best_of_n_kl(n)  # exact (an upper bound when samples tie)
            if toy:
                gold_pp, kl_pp = at_best(gold, n), best_of_n_kl(n) + at_best(gap, n)
                with_se(row, gold_reward=gold_pp, kl_to_p_ref=kl_pp)
                add_ratios(row, gold_pp, kl_pp, np.full(P, best_of_n_kl(n)))
            out.append(row)
        return out

    bon = best_of_n_rows(bon_scores, "")
    # diagnostic on the toy task: the same samples with the gold reward choosing (a perfect reward model)
    bon_gold = best_of_n_rows(gold, " (gold selector)") if toy else []

    # 4. intermediate checkpoints (over-optimisation: reward-model score keeps rising, gold stalls)
    checkpoints = []
    if args.checkpoints_dir:
        print("checkpoints:")
        names = sorted(os.listdir(args.checkpoints_dir))
        checkpoints = [evaluate_policy(os.path.join(args.checkpoints_dir, c)) for c in names]

    # 5. table (mean ± standard error over prompts), CSV, JSON and plots
    all_rows = rows + bon + bon_gold + checkpoints
    columns = [
        "policy",
        "score",
        "kl_to_ref_policy",
        "response_length",
        "eos_rate",
        "entropy",
        "win_rate",
        "gold_reward",
        "kl_to_p_ref",
        "optimum_gold_at_kl",
        "optimality_ratio_vs_p_ref",
        "optimality_ratio_vs_sft",
        "optimum_vs_sft_ess",
        "optimum_vs_sft_check",
    ]
    columns = [c for c in columns if any(r.get(c) is not None for r in all_rows)]

    def cell(r, c):
        v, se = r.get(c), r.get(c + "_se")
        if not isinstance(v, float):
            return "" if v is None else str(v)
        return f"{v:.3f} ± {se:.3f}" if isinstance(se, float) and math.isfinite(se) else f"{v:.3f}"

    table = (
        "| "
        + " | ".join(columns)
        + " |\n|"
        + "---|" * len(columns)
        + "\n"
        + "\n".join("| " + " | ".join(cell(r, c) for c in columns) + " |" for r in all_rows)
    )
    if toy:
        at1 = min(ref_frontier[1:], key=lambda f: abs(f[0] - 1.0))
        table += (
            f"\n\n{P} prompts for every row. P_ref: gold reward {ref_gold:.3f} at KL 0 (exact); optimum at KL 1: "
            f"{frontier_reward_at(1.0, frontier):.3f}. Optimum relative to the reference policy (importance sampling, "
            f"{N} samples per prompt): β = {at1[0]:.2f} gives KL {at1[1]:.3f}, gold {at1[2]:.3f}, effective sample size "
            f"{at1[3]:.1f} of {N}; a ratio is blank where the KL is under {args.min_kl_for_ratio} or beyond the frontier"
        )
    print(table)
    fields = [k for c in columns for k in (c, c + "_se") if any(k in r for r in all_rows)]
    with open(os.path.join(args.output_dir, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(all_rows)
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump(
            {
                "args": vars(args),
                "policies": rows,
                "best_of_n": bon,
                "best_of_n_gold": bon_gold,
                "checkpoints": checkpoints,
                "frontier": frontier,
                "frontier_vs_ref_policy": ref_frontier if toy else None,
            },
            f,
            indent=2,
        )
    with open(os.path.join(args.output_dir, "results.md"), "w") as f:
        f.write(table + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def draw(ax, x_key, y_key, optimum, optimum_label):
        """Reward against KL: an optimum curve (or none), best-of-n, and every policy as a star."""
        if optimum:
            limit = 1.1 * max([r[x_key] for r in rows + bon + bon_gold] + [1.0])
            ax.plot(
                [k for k, _ in optimum if k <= limit], [v for k, v in optimum if k <= limit], "k-", label=optimum_label
            )
        if all(y_key in r for r in bon):
            ax.plot(
                [r[x_key] for r in bon], [r[y_key] for r in bon], "o--", color="gray", label=f"best-of-n (n = 1 … {N})"
            )
        if bon_gold:
            ax.plot(
                [r[x_key] for r in bon_gold],
                [r[y_key] for r in bon_gold],
                "s:",
                color="silver",
                label="best-of-n, gold reward as selector",
            )
        for r in rows:
            ax.errorbar(
                r[x_key],
                r[y_key],
                yerr=r.get(y_key + "_se"),
                fmt="*",
                markersize=14,
                label=os.path.basename(r["policy"].rstrip("/")),
            )
        ax.set_xlabel(
            x_key.replace("kl_to_p_ref", "KL to P_ref").replace("kl_to_ref_policy", "KL to the reference policy")
            + " (nats per response)"
        )
        ax.set_ylabel(y_key.replace("_", " "))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)

    if toy:  # left: against the exact optimum relative to P_ref; right: relative to the reference (SFT) policy
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
        draw(left, "kl_to_p_ref", "gold_reward", frontier, "exact optimum π*_β ∝ P_ref·exp(r/β)")
        draw(
            right,
            "kl_to_ref_policy",
            "gold_reward",
            [(k, r) for _, k, r, _ in ref_frontier],
            f"optimum π*_β ∝ π_SFT·exp(r/β) (importance sampling, {N} samples)",
        )
    else:
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        draw(ax, "kl_to_ref_policy", "win_rate" if ref_judged is not None else "score", None, None)
    fig.tight_layout()
    fig.savefig(os.path.join(args.output_dir, "frontier.png"))
    x_key = "kl_to_p_ref" if toy else "kl_to_ref_policy"
    if checkpoints:
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        ax.plot([r[x_key] for r in checkpoints], [r["score"] for r in checkpoints], "o-", label="reward-model score")
        if toy:
            ax.plot([r[x_key] for r in checkpoints], [r["gold_reward"] for r in checkpoints], "s-", label="gold reward")
        ax.set_xlabel("KL to P_ref (nats per response)" if toy else "KL to the reference policy (nats per response)")
        ax.set_ylabel("reward")
        ax.set_title("along training (checkpoints)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(args.output_dir, "overoptimisation.png"))
    print(
        f"wrote {args.output_dir}/results.csv, results.json, results.md, frontier.png"
        + (", overoptimisation.png" if checkpoints else "")
    )
