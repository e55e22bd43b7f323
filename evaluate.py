"""Evaluate policies: reward against KL, next to the exact optimum, best-of-n and each other.

Per policy, on the same held-out prompts (mean ± standard error): reward-model score, KL to the
reference (SFT) policy, length, entropy, end-token rate, win rate against the data's references; toy
task: also gold reward, KL to P_ref and optimality ratios (R_π − R_0) / (R*(KL_π) − R_0) vs P_ref and
vs SFT. Baseline: best-of-n of the reference (Stiennon et al. 2020). How: docs/evaluate.md.

    python evaluate.py  # every policy of runs/models on the toy task's held-out prompts, CPU, 4 min
    python evaluate.py --policies runs/models/ppo --checkpoints-dirs runs/models/ppo/checkpoints
"""

import json
import math
import os
import random
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
import tyro

import common
import toy_task

METHODS = ["sft", "ppo", "dpo", "grpo", "rloo", "expert_iteration"]  # default: runs/models/{method}


@dataclass
class Sampling:
    """The flags best_of_n.py shares."""

    seed: int = 1
    """seed of Python, NumPy and PyTorch (sampling, bootstrap)"""
    device: str = "auto"
    """auto (CUDA if there is one), cpu or cuda"""
    bf16: bool = False
    """bfloat16 autocast for the forward passes"""
    ref_policy: str = "runs/models/sft"
    """the reference policy: KLs are to it, best-of-n samples it"""
    reward_model_name: str = "runs/models/reward_model"
    """reward model from reward_model.py (minus its config.reward_bias)"""
    dataset_name: str = "toy"
    """toy, a local file or folder, or a Hub id: prompt, and completion (reference responses)"""
    max_length: int | None = None
    """tokens per sequence (prompt + response); default 64 on the toy task, else 1024"""
    response_length: int | None = None
    """most tokens per response, end token included; default 24 on the toy task, else 256"""
    num_samples: int = 1000
    """prompts: the held-out ones, the same for every row (best_of_n.py: the first training ones)"""
    temperature: float = 1.0
    """sampling temperature of every policy; KLs are between sampling distributions"""
    best_of_n: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64])
    """n of best-of-n; max(n) reference samples per prompt, also for the optimum vs SFT"""
    per_device_batch_size: int = 250
    """sequences per generate call or forward pass"""


@dataclass
class Args(Sampling):
    output_dir: str = "runs/evaluate"
    """folder of the table (results.md, results.json) and the plots"""
    policies: list[str] = field(default_factory=list)
    """policy folders to evaluate; default those of runs/models/{METHODS} there are"""
    judge: str | None = None
    """reward model judging win rates against the references; default the toy's gold"""
    dataset_eval_split: str = "test"
    """split whose prompts are evaluated"""
    min_kl_for_ratio: float = 0.05
    """no optimality ratio for a policy closer than this to the reference (nats): 0/0"""
    num_bootstrap: int = 200
    """resamples of the prompts for the ratios' standard errors"""
    checkpoints_dirs: list[str] = field(default_factory=list)
    """folders of policies saved along training (--save-every): each evaluated and plotted"""


# ---- pure functions (tests/test_evaluate.py) ----
def best_of_n_kl(n):
    """KL(best-of-n ‖ reference) = log n − (n − 1)/n nats (Stiennon et al. 2020, App. G;
    Nakano et al. 2021): exact without ties in reward, else an upper bound."""
    return math.log(n) - (n - 1) / n


def best_of_n_expectation(scores, values, n):
    """Expected `values` (N,) of the top-`scores` (N,) of n of N samples, over all C(N, n) subsets:
    the i-th lowest is the best with probability C(i − 1, n − 1) / C(N, n)."""
    order = np.argsort(scores, kind="stable")
    subsets = [math.comb(i - 1, n - 1) for i in range(1, len(scores) + 1)]
    weights = np.array(subsets, float) / math.comb(len(scores), n)
    return float(np.dot(weights, np.asarray(values, float)[order]))


def frontier_reward_at(kl, frontier):
    """R*(kl) of a frontier [(kl, reward)] sorted by kl, linear in between, flat beyond its ends."""
    kls, rewards = zip(*frontier)
    return float(np.interp(kl, kls, rewards))


def optimality_ratio(reward, kl, ref_reward, frontier):
    """(R_π − R_ref) / (R*(KL_π) − R_ref): 1 on the frontier, 0 no better than the reference."""
    return (reward - ref_reward) / (frontier_reward_at(kl, frontier) - ref_reward)


def wins(policy_scores, reference_scores):
    """Per prompt: 1 if the policy's response is judged better than the reference's, ½ if tied."""
    p, r = np.asarray(policy_scores, float), np.asarray(reference_scores, float)
    return (p > r) + 0.5 * (p == r)


def best_of_n_per_prompt(selector, values, n):
    """(P,): per prompt, the expected `values` (P, N) of the best of n by `selector` (P, N)."""
    return np.array([best_of_n_expectation(s, v, n) for s, v in zip(selector, values)])


def snis_optimum(rewards, betas):
    """π*_β ∝ π_0 exp(r/β) (DPO paper, eq. 4) by self-normalised importance sampling from rewards
    (P, N) of N samples of π_0: ŵ ∝ exp(r/β), E*[r] ≈ Σ ŵ r, KL ≈ Σ ŵ log(N ŵ), ESS = 1/Σ ŵ².
    Returns (P, B) kl, reward, ess; β = inf: π_0."""
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
    """Optimality ratio of the means of gold, kl (P,), ref_gold (P,) or scalar on a frontier (P, B)
    or (B,), ± its sd over bootstrap resamples of the prompts; (None, None) where KL_π < min_kl
    or beyond the frontier."""
    P = len(gold)
    cols = [np.broadcast_to(np.asarray(a, float), (P,)) for a in (gold, kl, ref_gold)]
    f_kl, f_r = (np.broadcast_to(np.asarray(f, float), (P, np.shape(f)[-1])) for f in (frontier_kl, frontier_reward))

    def ratio(idx):
        fk, fr = f_kl[idx].mean(0), f_r[idx].mean(0)
        g, k, g0 = (c[idx].mean() for c in cols)
        if k < min_kl or k > fk.max():
            return None
        return optimality_ratio(g, k, g0, sorted(zip(fk, fr)))

    point = ratio(np.arange(P))
    if point is None:
        return None, None
    boots = [ratio(rng.integers(0, P, P)) for _ in range(num_bootstrap)]
    boots = [b for b in boots if b is not None]
    return point, float(np.std(boots, ddof=1)) if len(boots) > 1 else float("nan")


# ---- helpers ----
LOGITS_PER_PASS = 8192  # response tokens' float32 logits a pass keeps: 1.6 GB at V = 49k


def start(args):
    """Sets the lengths' defaults, checks args, seeds; the --device."""
    on_toy = args.dataset_name == "toy"
    args.max_length = args.max_length or (64 if on_toy else 1024)
    args.response_length = args.response_length or (24 if on_toy else 256)
    if args.temperature <= 0 or min(args.best_of_n, default=0) < 1 or args.response_length >= args.max_length:
        raise ValueError("need --temperature > 0, --best-of-n ≥ 1, --response-length < --max-length")
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if cuda else "cpu")


def load_model(name, tokenizer, device, scorer=False):
    """A frozen float32 policy, or with `scorer` a reward model, fit to `tokenizer`."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    kw = {"num_labels": 1} if scorer else {}
    cls = AutoModelForSequenceClassification if scorer else AutoModelForCausalLM
    model = cls.from_pretrained(name, dtype=torch.float32, **kw)
    common.fit_model(model, tokenizer)
    return model.requires_grad_(False).eval().to(device)


def load_models(args, device, others):
    """The reference policy's tokenizer (checked to be every model's), that policy, the reward model."""
    tok = common.load_tokenizer(args.ref_policy, ": run `python sft.py`, or pass --ref-policy")
    for name in [args.reward_model_name, *others]:
        if common.load_tokenizer(name, ": train it first, or pass another folder").get_vocab() != tok.get_vocab():
            raise ValueError(f"{name} has another tokenizer than {args.ref_policy}: KLs need one")
    ref = load_model(args.ref_policy, tok, device)
    return tok, ref, load_model(args.reward_model_name, tok, device, scorer=True)


def batches(size, *lists):
    """Consecutive slices of `size` items of each list."""
    for i in range(0, len(lists[0]), size):
        yield [x[i : i + size] for x in lists]


@torch.no_grad()
def sample(model, queries, tok, args, device):
    """One response per prompt (ids), cut after its first end token if any."""
    stops, out = common.stop_token_ids(tok, model), []
    for (q,) in batches(args.per_device_batch_size, queries):
        batch = {k: v.to(device) for k, v in common.collate_prompts(q, tok.pad_token_id).items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            new = common.generate(
                model, **batch, tokenizer=tok, max_new_tokens=args.response_length, temperature=args.temperature
            )
        for g in new.tolist():
            ends = [g.index(s) for s in stops if s in g]
            out.append(g[: min(ends) + 1] if ends else g)
    return out


def logprobs_and_entropy(logits, tokens, temperature, pad_id, entropy_grad=False, chunk_size=1024):
    """logits (R, V), tokens (R,) -> float32 log-probs, entropies (R,) of softmax(logits / T) without
    PAD, by chunks recomputed in backward; entropies get a gradient if `entropy_grad`."""

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
    ]  # R = 0: one empty chunk
    return tuple(map(torch.cat, zip(*out)))


def scatter(values, mask):
    """values (R,) in the row-major order of mask's (B, T) True entries -> (B, T), 0 elsewhere."""
    return values.new_zeros(mask.shape).masked_scatter(mask, values)


def forward(model, queries, responses, tok, args, device, **kw):
    """The model's logits on prompt + response ids, padded."""
    seqs = [a + b for a, b in zip(queries, responses)]
    ids, mask = common.pad(seqs, tok.pad_token_id).to(device), common.attention_mask(seqs).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
        return model(input_ids=ids, attention_mask=mask, **kw).logits


@torch.no_grad()
def response_logprobs(model, queries, responses, tok, args, device):
    """(N,) Σ over response tokens of log softmax(logits / T) without PAD, (N,) mean entropy per
    token; as in the trainers, logits only where a response token is predicted."""
    longest = max(map(len, responses), default=1)
    size, out = max(1, min(args.per_device_batch_size, LOGITS_PER_PASS // max(longest, 1))), []
    for q, r in batches(size, queries, responses):
        labels = [[common.IGNORE_INDEX] * len(a) + b for a, b in zip(q, r)]
        labels = common.pad(labels, common.IGNORE_INDEX)[:, 1:].to(device)  # (n, L − 1): for t + 1
        keep = labels != common.IGNORE_INDEX
        logits = forward(model, q, r, tok, args, device, logits_to_keep=F.pad(keep, (0, 1)))  # (R, V)
        logp, ent = logprobs_and_entropy(logits, labels[keep], args.temperature, tok.pad_token_id)
        n = keep.sum(1).clamp(min=1)
        out.append(torch.stack([scatter(logp, keep).sum(1), scatter(ent, keep).sum(1) / n], 1).cpu())
    out = torch.cat(out).numpy()
    return out[:, 0], out[:, 1]


@torch.no_grad()
def reward_scores(model, queries, responses, tok, args, device):
    """(N,) the reward of prompt + response at its last token, minus config.reward_bias."""
    out = [
        forward(model, q, r, tok, args, device).squeeze(-1).float().cpu()
        for q, r in batches(args.per_device_batch_size, queries, responses)
    ]
    return torch.cat(out).numpy() - getattr(model.config, "reward_bias", 0.0)


# ---- the measurement: the prompts, what rows are measured against, the rows ----
def held_out_prompts(args, tok):
    """The first --num-samples held-out prompts within the length limit: ids, as the data gives
    them, and the reference responses' ids (toy: P_ref's) if there are any."""
    kind = "sft" if args.dataset_name == "toy" else "prompt"
    ds = common.load_splits(args.dataset_name, kind, eval_split=args.dataset_eval_split, seed=args.seed)[1]
    ds = ds.select(range(min(args.num_samples, len(ds))))
    rows, cols = ds.to_list(), ds.column_names
    replies = "messages" in cols and all(r["messages"][-1]["role"] == "assistant" for r in rows)
    kind = "sft" if "completion" in cols or replies else "prompt"
    prompt_ids, completions, _ = common.encode_dataset(tok, ds, kind)
    keep = [i for i, p in enumerate(prompt_ids) if len(p) <= args.max_length - args.response_length]
    if not keep:
        raise ValueError("every prompt over --max-length − --response-length; raise --max-length")
    print(f"{len(keep)} held-out prompts ({len(ds) - len(keep)} over the length limit dropped)")
    prompts = [common.prompt_and_responses(rows[i], kind)[0] for i in keep]
    references = [completions[0][i] for i in keep] if completions else None
    return [prompt_ids[i] for i in keep], prompts, references


@dataclass
class Evaluation:
    """What every row is measured against; the toy task's optima None on other data."""

    args: Args
    tokenizer: object
    device: torch.device
    ref_model: object
    reward_model: object
    judge: object  # --judge's reward model, or None (toy: the gold reward)
    queries: list  # P prompts' token ids
    prompts: list  # as the data gives them
    rng: np.random.Generator  # the bootstrap's
    ref_judged: np.ndarray | None = None  # (P,) the judge's verdicts on the references
    frontier: list | None = None  # [(KL to P_ref, gold)] of π*_β ∝ P_ref exp(r/β), exact
    ref_gold: float | None = None  # P_ref's gold reward (KL 0)
    bon_gold: np.ndarray | None = None  # (P, N) gold of N reference samples per prompt
    ref_frontier: list | None = None  # [(β, KL, gold, ESS)] of π*_β ∝ π_ref exp(r/β), SNIS
    ref_kl: np.ndarray | None = None  # (P, B) its KL
    ref_reward: np.ndarray | None = None  # (P, B) its gold
    check: list | None = None  # [(KL, the SNIS optimum's share of the exact one's gain)]


def judged(ev, responses, texts):
    """The judge's verdicts: the --judge reward model's, else (toy task) the exact gold reward."""
    if ev.judge is not None:
        return reward_scores(ev.judge, ev.queries, responses, ev.tokenizer, ev.args, ev.device)
    if ev.args.dataset_name == "toy":
        return np.array(toy_task.gold_reward(ev.prompts, texts))


def toy_values(prompts, texts, length):
    """Toy task: (gold reward, log P_ref) of each response."""
    gold = np.array(toy_task.gold_reward(prompts, texts))
    return gold, np.array([toy_task.ref_logprob(p, t, length) for p, t in zip(prompts, texts)])


def add_optima(ev, bon_prompts):
    """Toy task: the exact frontier, the one of the reference by SNIS from ev.bon_gold, and that
    estimate's shortfall where the answer is exact (the same from N samples of P_ref)."""
    args, P, N = ev.args, *ev.bon_gold.shape
    length, betas = args.response_length, [math.inf, *np.geomspace(20, 0.05, 80)]
    ev.frontier = [(kl, r) for _, kl, r in toy_task.optimal_frontier(ev.prompts, betas, length)]  # by KL
    ev.ref_gold = ev.frontier[0][1]
    betas = [math.inf, *np.geomspace(20, 0.1, 60)]
    ev.ref_kl, ev.ref_reward, ess = snis_optimum(ev.bon_gold, betas)  # (P, B)
    ev.ref_frontier = list(zip(betas, ev.ref_kl.mean(0), ev.ref_reward.mean(0), ess.mean(0)))
    texts = toy_task.TASK.sample_responses(np.random.default_rng(args.seed), bon_prompts, length)
    gold = np.array(toy_task.gold_reward(bon_prompts, texts)).reshape(P, N)
    kl, reward, _ = (x.mean(0) for x in snis_optimum(gold, betas))
    gain = [frontier_reward_at(k, ev.frontier) - ev.ref_gold for k in kl[1:]]  # the optimum's
    ev.check = sorted(zip(kl[1:], (reward[1:] - reward[0]) / gain))


def with_se(row, **per_prompt):
    """Into `row`: each per-prompt array's mean, and as key_se its standard error (sample sd / √n)."""
    for key, x in per_prompt.items():
        x = np.asarray(x, float)
        se = x.std(ddof=1) / math.sqrt(len(x)) if len(x) > 1 else math.nan
        row[key], row[key + "_se"] = float(x.mean()), float(se)
    return row


def add_toy(ev, row, gold, kl_p_ref, kl_ref):
    """From per-prompt (P,) gold rewards and KLs: gold, KL to P_ref, both ratios, the ESS of the
    optimum vs SFT at this KL and its shortfall."""
    with_se(row, gold_reward=gold, kl_to_p_ref=kl_p_ref)
    row["optimum_gold_at_kl"] = frontier_reward_at(row["kl_to_p_ref"], ev.frontier)
    boot = ev.rng, ev.args.num_bootstrap, ev.args.min_kl_for_ratio
    vs_p_ref = ratio_with_se(gold, kl_p_ref, ev.ref_gold, *zip(*ev.frontier), *boot)
    row["optimality_ratio_vs_p_ref"], row["optimality_ratio_vs_p_ref_se"] = vs_p_ref
    vs_sft = ratio_with_se(gold, kl_ref, ev.bon_gold.mean(1), ev.ref_kl, ev.ref_reward, *boot)
    row["optimality_ratio_vs_sft"], row["optimality_ratio_vs_sft_se"] = vs_sft
    kl = float(np.mean(kl_ref))
    row["optimum_vs_sft_ess"] = float(np.interp(kl, *zip(*sorted((k, e) for _, k, _, e in ev.ref_frontier))))
    if vs_sft[0] is not None:
        row["optimum_vs_sft_check"] = float(np.interp(kl, *zip(*ev.check)))
    return row


def evaluate_policy(ev, name):
    """Every per-policy metric of the policy in folder `name`."""
    tok, args, device, queries = ev.tokenizer, ev.args, ev.device, ev.queries
    model = ev.ref_model if name == args.ref_policy else load_model(name, tok, device)
    responses = sample(model, queries, tok, args, device)
    texts = tok.batch_decode(responses, skip_special_tokens=True)
    logp, entropy = response_logprobs(model, queries, responses, tok, args, device)
    logp_ref = response_logprobs(ev.ref_model, queries, responses, tok, args, device)[0]
    stops = common.stop_token_ids(tok, ev.ref_model)
    row = with_se(
        {"policy": name},
        score=reward_scores(ev.reward_model, queries, responses, tok, args, device),
        kl_to_ref_policy=logp - logp_ref,
        response_length=[len(r) for r in responses],
        eos_rate=[bool(r) and r[-1] in stops for r in responses],
        entropy=entropy,
    )
    if ev.ref_judged is not None:
        with_se(row, win_rate=wins(judged(ev, responses, texts), ev.ref_judged))
    if ev.frontier is not None:
        gold, ref_lp = toy_values(ev.prompts, texts, args.response_length)
        add_toy(ev, row, gold, logp - ref_lp, logp - logp_ref)
    print("  " + ", ".join(f"{k} {v}" for k, v in row.items() if not k.endswith("_se")))
    return row


def best_of_n_rows(ev, selector, scores, gap, label):
    """A row per n: expectations over n-subsets of the sample `selector` (P, N) ranks highest; KL
    to P_ref: the formula + E_bon[`gap` (P, N)]."""
    out = []
    for n in ev.args.best_of_n:
        row = with_se({"policy": f"best-of-{n}{label}"}, score=best_of_n_per_prompt(selector, scores, n))
        row["kl_to_ref_policy"] = kl = best_of_n_kl(n)
        if ev.frontier is not None:
            gold = best_of_n_per_prompt(selector, ev.bon_gold, n)
            add_toy(ev, row, gold, kl + best_of_n_per_prompt(selector, gap, n), np.full(len(selector), kl))
        out.append(row)
    return out


def cell(row, column):
    """A table cell: mean ± standard error, a plain value, or empty."""
    v, se = row.get(column), row.get(column + "_se")
    if not isinstance(v, float):
        return "" if v is None else str(v)
    return f"{v:.3f} ± {se:.3f}" if isinstance(se, float) and math.isfinite(se) else f"{v:.3f}"


COLUMNS = ["policy", "score", "kl_to_ref_policy", "response_length", "eos_rate", "entropy", "win_rate"]
COLUMNS += ["gold_reward", "kl_to_p_ref", "optimality_ratio_vs_p_ref", "optimality_ratio_vs_sft"]
COLUMNS += ["optimum_vs_sft_ess", "optimum_vs_sft_check"]


def markdown_table(ev, rows):
    """The table of every row (mean ± standard error over prompts); toy task: the optima below."""
    columns = [c for c in COLUMNS if any(r.get(c) is not None for r in rows)]
    table = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    table += "\n".join("| " + " | ".join(cell(r, c) for c in columns) + " |" for r in rows)
    if ev.frontier is None:
        return table
    (P, N), at1 = ev.bon_gold.shape, min(ev.ref_frontier[1:], key=lambda f: abs(f[1] - 1.0))
    return table + (
        f"\n\n{P} prompts for every row. P_ref: gold reward {ev.ref_gold:.3f} at KL 0 (exact); "
        f"optimum at KL 1: {frontier_reward_at(1.0, ev.frontier):.3f}. Optimum relative to the "
        f"reference policy (importance sampling, {N} samples per prompt): at KL {at1[1]:.3f} "
        f"(β = {at1[0]:.2f}) gold {at1[2]:.3f}, effective sample size {at1[3]:.1f} of {N}; no "
        f"ratio where the KL is under {ev.args.min_kl_for_ratio} or beyond the frontier"
    )


def two_plots(size):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, 2, figsize=size, dpi=100)


def plot_frontiers(results, labels, path):
    """Gold reward against KL to P_ref (left: exact optimum) and to SFT (right: SNIS optimum), with
    best-of-n and every policy, of one or more evaluations."""
    fig, axes = two_plots((11, 4.5))
    shown = [r for res in results for r in res["policies"] + res["best_of_n"][:4]]  # to n = 8
    limit = 1.1 * max(r["kl_to_p_ref"] for r in shown)
    for c, label, res in zip([f"C{i}" for i in range(len(results))], labels, results):
        vs_sft = sorted((k, r) for _, k, r, _ in res["frontier_vs_ref_policy"])
        for ax, x, frontier in zip(axes, ("kl_to_p_ref", "kl_to_ref_policy"), (res["frontier"], vs_sft)):
            ax.plot(*zip(*[f for f in frontier if f[0] <= limit]), "-", color=c, lw=1, label=f"{label}: optimum")
            bon = [(r[x], r["gold_reward"]) for r in res["best_of_n"] if r[x] <= limit]
            ax.plot(*zip(*bon), ".:", color=c, lw=0.8, label=f"{label}: best-of-n")
            for r, marker in zip(res["policies"], "o*^sDvP"):
                name = os.path.basename(r["policy"].rstrip("/"))
                name = f"{label}: {name}" if len(labels) > 1 else name
                point = r[x], r["gold_reward"], r["gold_reward_se"], r[x + "_se"]
                ax.errorbar(*point, marker, color=c, ms=8, label=name)
    for ax, x in zip(axes, ("P_ref (exact optimum ∝ P_ref", "the SFT model (optimum ∝ π_SFT")):
        ax.set(xlabel=f"KL to {x}·exp(r/β)), nats per response", ylabel="gold reward")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path)


def plot_checkpoints(rows, path):
    """Per checkpoints folder: score and gold reward against KL (over-optimisation: Gao et al.
    2022), the corrected ratio vs SFT against episodes."""
    fig, (left, right) = two_plots((11, 4))
    for c, (run, rs) in zip([f"C{i}" for i in range(len(rows))], rows.items()):
        x = [r.get("kl_to_p_ref", r["kl_to_ref_policy"]) for r in rs]
        left.plot(x, [r["score"] for r in rs], "o-", color=c, label=f"{run}: reward-model score")
        if "gold_reward" in rs[0]:
            left.plot(x, [r["gold_reward"] for r in rs], "s--", color=c, label=f"{run}: gold reward")
            rs = [r for r in rs if r.get("optimality_ratio_vs_sft") is not None]
            corrected = [r["optimality_ratio_vs_sft"] * r["optimum_vs_sft_check"] for r in rs]
            if rs:
                right.plot([r["episodes"] for r in rs], corrected, "o-", color=c, label=run)
    left.set(xlabel="KL to P_ref (toy) or to the reference policy, nats", ylabel="reward")
    right.set(xlabel="episodes", ylabel="optimality ratio vs SFT, corrected", ylim=(0, 1.05))
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    args = tyro.cli(Args)
    device = start(args)
    if not args.policies:
        args.policies = [f"runs/models/{m}" for m in METHODS if os.path.isdir(f"runs/models/{m}")]
    judges = [args.judge] if args.judge else []
    tok, ref_model, reward_model = load_models(args, device, args.policies + judges)
    judge = load_model(args.judge, tok, device, scorer=True) if judges else None

    # 1. the held-out prompts, and their reference responses if the data has them
    queries, prompts, references = held_out_prompts(args, tok)
    rng = np.random.default_rng(args.seed)  # the bootstrap's
    ev = Evaluation(args, tok, device, ref_model, reward_model, judge, queries, prompts, rng)
    if references:
        ev.ref_judged = judged(ev, references, tok.batch_decode(references, skip_special_tokens=True))

    # 2. N reference samples per prompt: best-of-n; toy task: the optima
    P, N, on_toy = len(queries), max(args.best_of_n), args.dataset_name == "toy"
    bon_q, bon_p = [q for q in queries for _ in range(N)], [p for p in prompts for _ in range(N)]
    bon_r = sample(ref_model, bon_q, tok, args, device)
    bon_scores = reward_scores(reward_model, bon_q, bon_r, tok, args, device).reshape(P, N)
    gap = None
    if on_toy:
        gold, ref_lp = toy_values(bon_p, tok.batch_decode(bon_r, skip_special_tokens=True), args.response_length)
        ev.bon_gold = gold.reshape(P, N)
        add_optima(ev, bon_p)
        lp = response_logprobs(ref_model, bon_q, bon_r, tok, args, device)[0]
        gap = (lp - ref_lp).reshape(P, N)  # log π_ref − log P_ref

    # 3. every policy; best-of-n chosen by the reward model and (toy: a perfect one) by gold
    print("policies:")
    rows = [evaluate_policy(ev, name) for name in args.policies]
    bon = best_of_n_rows(ev, bon_scores, bon_scores, gap, "")
    bon_gold = best_of_n_rows(ev, ev.bon_gold, bon_scores, gap, " (gold selector)") if on_toy else []

    # 4. intermediate policies: over-optimisation (score up, gold reward not), learning curves
    checkpoints = {}
    for folder in args.checkpoints_dirs:
        run = os.path.dirname(os.path.normpath(folder)) or folder  # runs/seeds/1/ppo, not ppo
        if run in checkpoints:
            raise ValueError(f"--checkpoints-dirs names {folder} twice")
        print(f"checkpoints of {run}:")
        checkpoints[run] = [  # episode_0000512, ...: episodes seen
            evaluate_policy(ev, f"{folder}/{name}") | {"episodes": int(name.split("_")[-1])}
            for name in sorted(os.listdir(folder))
        ]

    # 5. the table, JSON and plots
    table = markdown_table(ev, rows + bon + bon_gold + [r for v in checkpoints.values() for r in v])
    print(table)
    out = args.output_dir
    os.makedirs(out, exist_ok=True)
    with open(f"{out}/results.md", "w") as f:
        f.write(table + "\n")
    results = {"args": vars(args), "policies": rows, "best_of_n": bon, "best_of_n_gold": bon_gold}
    results |= {"checkpoints": checkpoints, "frontier": ev.frontier, "frontier_vs_ref_policy": None}
    if on_toy:
        results["frontier_vs_ref_policy"] = [list(map(float, f)) for f in ev.ref_frontier]
        plot_frontiers([results], ["this run"], f"{out}/frontier.png")
    with open(f"{out}/results.json", "w") as f:
        json.dump(results, f, indent=2)
    if checkpoints:
        plot_checkpoints(checkpoints, f"{out}/checkpoints.png")
    print(f"wrote {out}/results.md, results.json and its plots")
