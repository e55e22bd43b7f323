"""RLHF with PPO: maximise a learned reward minus a KL penalty to the SFT model.

Ziegler et al. 2019, Stiennon et al. 2020 and Ouyang et al. 2022 (InstructGPT), with the details
of Huang et al. 2024 ("The N+ Implementation Details of RLHF with PPO"). Each iteration:
1. sample responses to a batch of prompts from the policy; everything after the first end token is padding;
2. score prompt + response with the frozen reward model (reward_model.py), at the response's last token;
3. per-token reward −β·KL_t(π ‖ π_ref) against the frozen SFT model, plus the score on the last token;
4. GAE advantages (Schulman et al. 2016) from a separate value model initialised from the reward model;
5. PPO's clipped policy and value losses (Schulman et al. 2017) for a few epochs over minibatches;
6. log masked means over every valid token of the whole update.

    # default: from runs/models/sft and runs/models/reward_model (run sft.py, reward_model.py first), CPU
    python ppo.py
    # real scale (one node, 8 GPUs): Pythia 1B SFT and reward models on TL;DR prompts (Huang et al. 2024)
    torchrun --nproc_per_node 8 ppo.py --dataset-name trl-lib/tldr --max-length 565 --response-length 53 \
        --temperature 0.7 --kl-coef 0.05 --learning-rate 3e-6 --batch-size 512 --num-minibatches 1 \
        --per-device-batch-size 8 --num-epochs 8 --bf16 --track
"""

import contextlib
import inspect
import json
import math
import os
import random
import time
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import tyro
from tqdm import tqdm

import common


@dataclass
class Args:
    # ---- shared by every script: keep this block identical ----
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """name of the experiment; runs are logged to runs/{exp_name}__{seed}__{unix time}"""
    seed: int = 1
    """seed of Python, NumPy and PyTorch (rank r seeds sampling with seed + r)"""
    torch_deterministic: bool = True
    """use deterministic cuDNN kernels (torch.backends.cudnn.deterministic)"""
    device: str = "auto"
    """where to run: auto (CUDA if available, else CPU), cpu or cuda; under torchrun rank r uses cuda:LOCAL_RANK"""
    bf16: bool = False
    """run forward passes under bfloat16 autocast (weights and optimizer state stay float32; with --fsdp the
    weights are also gathered in bfloat16 and gradients reduced in float32)"""
    track: bool = False
    """also log to Weights & Biases (needs `pip install wandb`)"""
    wandb_project_name: str = "minimal-alignment"
    """Weights & Biases project, with --track"""
    wandb_entity: Optional[str] = None
    """Weights & Biases entity (team or user), with --track"""
    output_dir: str = os.path.join("runs", "models", os.path.basename(__file__)[: -len(".py")])
    """folder the trained model and tokenizer are saved to with save_pretrained"""
    fsdp: bool = False
    """shard parameters, gradients and optimizer state over the ranks (FSDP2, one group per decoder layer)
    instead of replicating them (DDP); needs torchrun, also with one process"""
    checkpoint_every: int = 0
    """every this many optimizer steps (PPO: iterations), save all a run needs to continue to
    {output_dir}/resume/step_N (model, optimizer, step, RNG states of every rank); 0 = never"""
    resume: bool = False
    """continue from the latest complete checkpoint in {output_dir}/resume (same flags and number of ranks)"""

    # ---- model, data and optimisation: the same names and meanings in every script ----
    model_name: str = os.path.join("runs", "models", "sft")
    """Hub id or local folder of the model to start from (default: the output of sft.py); also the frozen reference"""
    dataset_name: str = "toy"
    """toy (the embedded task), a local .json/.jsonl/.parquet/.csv file or folder, or a Hub id; column prompt (or messages)"""
    dataset_train_split: str = "train"
    """split to train on"""
    dataset_eval_split: str = "test"
    """held-out split; if the dataset lacks it, 5% of the training split is held out"""
    max_length: Optional[int] = None
    """tokens per sequence (prompt + response); default 64 on the toy task, 1024 otherwise"""
    truncation_mode: Literal["drop", "keep_end"] = "drop"
    """a prompt over --max-length − --response-length: drop it, or keep_end: cut its oldest tokens after the BOS
    (long chat histories); counted and reported"""
    batch_size: int = 256
    """prompts per rollout batch (episodes per PPO iteration), summed over all ranks"""
    per_device_batch_size: Optional[int] = None
    """sequences per forward/backward pass on one device in the PPO update; default a minibatch / the number of ranks"""
    num_epochs: Optional[float] = None
    """passes over the training prompts (fractions allowed): iterations = num_epochs × prompts // batch_size;
    default 0.1 on the toy task (19 iterations), 1 otherwise"""
    learning_rate: Optional[float] = None
    """peak AdamW learning rate of policy and value model; default 3e-4 on the toy task, 3e-6 otherwise (Huang et al. 2024)"""
    lr_schedule: Literal["cosine", "linear", "constant"] = "linear"
    """decay of the learning rate after warmup, down to 0 at the last iteration (linear: Huang et al. 2024)"""
    warmup_ratio: float = 0.0
    """fraction of the iterations spent warming the learning rate up linearly from 0"""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay"""
    adam_eps: float = 1e-5
    """AdamW epsilon (1e-5 as in Huang et al. 2024)"""
    max_grad_norm: float = 1.0
    """clip the global gradient norm to this (0 disables clipping)"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass: less memory, ~30% more compute"""
    eval_every: int = 10
    """iterations between held-out evaluations (responses to the eval prompts, scored; sample completions)"""

    # ---- PPO ----
    reward_model_name: str = os.path.join("runs", "models", "reward_model")
    """folder (or Hub id) of the reward model from reward_model.py; its config.reward_bias is subtracted"""
    value_model_name: Optional[str] = None
    """model the value function starts from (default: the reward model, as in Stiennon et al.)"""
    response_length: Optional[int] = None
    """most tokens generated per response, its end token included; one that reaches it without an end token is
    cut; default 24 on the toy task, 256 otherwise (53 for TL;DR in Huang et al. 2024)"""
    temperature: float = 1.0
    """sampling temperature; log-probabilities use logits / temperature in rollout and update alike
    (1.0 on the toy task, whose optimum is defined for the policy itself; 0.7 in Huang et al. 2024)"""
    missing_eos_penalty: float = 1.0
    """subtracted from the score of a response cut at --response-length without an end token: the reward model
    was trained on finished responses only, so an unfinished one is scored off its training
    distribution, and without a cost a policy can drift to run-on responses (Huang et al. 2024 detail 23)"""
    kl_coef: Optional[float] = None
    """β, the weight of the per-token KL penalty log π − log π_ref to the SFT model (initial value when --target-kl
    is set); default 0.5 on the toy task, whose rewards have unit scale, 0.05 otherwise (Huang et al. 2024)"""
    target_kl: Optional[float] = None
    """adapt β toward this KL (nats per response) with Ziegler et al.'s proportional controller; None keeps β fixed"""
    kl_horizon: int = 10000
    """episodes over which the adaptive controller closes the KL error (Ziegler et al.'s horizon)"""
    gamma: float = 1.0
    """discount over response tokens (1: the score at the end counts fully for every token)"""
    lam: float = 0.95
    """GAE λ: 1 is Monte-Carlo returns, 0 is one-step TD"""
    whiten_rewards: bool = False
    """whiten the per-token rewards over the valid tokens of the batch before GAE"""
    num_ppo_epochs: int = 4
    """passes of PPO updates over each rollout batch"""
    num_minibatches: int = 4
    """optimizer steps per PPO epoch: each rollout batch is shuffled and split into this many minibatches"""
    cliprange: float = 0.2
    """PPO's ε: the probability ratio is clipped to [1 − ε, 1 + ε]"""
    cliprange_value: float = 0.2
    """the new value prediction is clipped to within this of the rollout's"""
    vf_coef: float = 0.1
    """weight of the value loss"""
    ent_coef: float = 0.0
    """weight of the entropy bonus (0: none, as in Huang et al. 2024)"""
    ptx_coef: float = 0.0
    """γ of InstructGPT's PPO-ptx: weight of the SFT loss on --ptx-dataset-name added to every minibatch (0: off)"""
    ptx_dataset_name: Optional[str] = None
    """SFT-format dataset (prompt, completion or messages) for PPO-ptx; default the toy SFT data on the toy task,
    required otherwise when --ptx-coef > 0"""
    save_every: int = 0
    """iterations between saved intermediate policies in {output_dir}/checkpoints (0: final only)"""
    generation_batch_size: Optional[int] = None
    """prompts per generate call in the rollout, on one device (default: --per-device-batch-size); samples are
    seeded per such chunk of the global batch, so this, not the number of ranks, decides them"""
    rollout_forward_batch_size: Optional[int] = None
    """sequences per no-gradient forward pass of the policy, reference, value and reward models scoring a rollout,
    on one device (default: --per-device-batch-size); larger is faster where memory allows"""
    num_eval_prompts: int = 1000
    """held-out prompts answered at each evaluation (the first of the eval split)"""
    num_sample_completions: int = 4
    """held-out completions printed and logged as text at each evaluation"""

    # ---- derived right after parsing (not flags) ----
    world_size: tyro.conf.Suppress[int] = 1
    grad_accum_steps: tyro.conf.Suppress[int] = 1
    num_steps: tyro.conf.Suppress[int] = 0
    minibatch_size: tyro.conf.Suppress[int] = 0


# ---- pure PPO math (imported by the tests) ---------------------------------------------------------
def masked_mean(x, mask):
    """Mean of x over the positions where mask is true; whatever x holds elsewhere is ignored."""
    return torch.where(mask.bool(), x, 0.0).sum() / mask.sum().clamp(min=1)


def masked_whiten(x, mask, shift_mean=True, all_reduce=None):
    """(x − mean) / std over the valid positions (population variance, +1e-8); with
    `shift_mean=False` the mean is added back (rewards keep their sign). Invalid positions get 0.
    With `all_reduce` (torch.distributed.all_reduce under DDP) the mean and variance are those of
    the valid positions of every rank together, so the result does not depend on how the batch is
    split over ranks."""
    mask = mask.bool()

    def total(*values):  # sums over the valid positions (of every rank)
        s = torch.stack([torch.where(mask, v, 0.0).sum() for v in values])
        if all_reduce is not None:
            all_reduce(s)
        return s

    x_sum, n = total(x, torch.ones_like(x))
    mean = x_sum / n.clamp(min=1)
    var = total((x - mean) ** 2)[0] / n.clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return torch.where(mask, out, 0.0)


def truncate_after_eos(responses, stop_ids, pad_id):
    """responses: (B, T) generated ids; stop_ids: the ids that end a response (an int or a list: the EOS,
    the chat template's end-of-turn, the model's declared stop ids). Returns (responses with every token
    after the first end token replaced by PAD, mask (B, T) true up to and including it, has_eos (B,)).
    A row without an end token was cut at T tokens and is valid throughout."""
    is_eos = torch.isin(responses, torch.as_tensor(stop_ids, device=responses.device))
    has_eos = is_eos.any(1)
    first = torch.where(has_eos, is_eos.int().argmax(1), responses.shape[1] - 1)  # (B,) last valid index
    mask = torch.arange(responses.shape[1], device=responses.device)[None, :] <= first[:, None]
    return torch.where(mask, responses, pad_id), mask, has_eos


def kl_shaped_rewards(scores, logprobs, ref_logprobs, mask, has_eos, kl_coef, missing_eos_penalty=0.0):
    """Per-token rewards of the KL-regularised objective (Ziegler et al. 2019; Stiennon et al. eq. 2).

    scores (B,): reward-model scores; logprobs, ref_logprobs (B, T): log π and log π_ref of the
    sampled tokens; mask (B, T): the valid response tokens (a prefix); has_eos (B,).
    kl_t = log π − log π_ref (Schulman's k1): as a reward, its expected score-function gradient is
    exactly −∇KL(π ‖ π_ref). (k3 = (r − 1) − log r, r = π_ref/π, has the right value but the gradient
    of KL(π ‖ π_ref) − KL(π_ref ‖ π): it barely pulls back near π_ref; tested.)
    rewards_t = −kl_coef · kl_t, and the score (minus `missing_eos_penalty` for a response cut without
    an end token) is added at the last valid token: the end token, or the last token of a cut response,
    not one slot later. Returns (rewards (B, T), kl (B, T), scores after the penalty (B,)); 0 on invalid
    positions."""
    mask = mask.bool()
    kl = torch.where(mask, logprobs - ref_logprobs, 0.0)
    scores = scores - missing_eos_penalty * (~has_eos).float()
    rewards = -kl_coef * kl
    last = mask.sum(1) - 1  # (B,) index of the last valid token
    rewards[torch.arange(len(scores)), last] += scores
    return rewards, kl, scores


def compute_gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16) over response tokens.

    rewards, values (B, T): per-token reward and V(state before the token); mask (B, T): the valid
    tokens, a prefix of each row. The last valid token is terminal (the value after it is 0), and
    whatever invalid positions hold is ignored. δ_t = r_t + γ V_{t+1} − V_t, A_t = δ_t + γλ A_{t+1}.
    Returns (advantages, returns = advantages + values), both (B, T) and 0 on invalid positions."""
    mask = mask.bool()
    rewards, values = torch.where(mask, rewards, 0.0), torch.where(mask, values, 0.0)
    advantages, next_adv, T = torch.zeros_like(rewards), torch.zeros_like(rewards[:, 0]), rewards.shape[1]
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(next_adv)  # 0 after the last valid token
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = delta + gamma * lam * next_adv  # invalid positions have δ = 0, so A = 0 there
        advantages[:, t] = next_adv
    return advantages, torch.where(mask, advantages + values, 0.0)


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_range):
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), as a loss: the masked mean over valid
    tokens of max(−A·ρ, −A·clip(ρ, 1 − ε, 1 + ε)), ρ = exp(log π − log π_old). All inputs (B, T).
    Returns (loss, stats: clipfrac, approxkl = mean ½(log ρ)², ratio = mean ρ), stats detached.
    mask: bool or 0/1 float, as for masked_mean."""
    mask = mask.bool()
    log_ratio = torch.where(mask, logprobs - old_logprobs, 0.0)
    ratio = torch.exp(log_ratio)
    unclipped, clipped = -advantages * ratio, -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    stats = {"clipfrac": masked_mean((clipped > unclipped).float(), mask),
             "approxkl": masked_mean(0.5 * log_ratio ** 2, mask), "ratio": masked_mean(ratio, mask)}
    return loss, {k: v.detach() for k, v in stats.items()}


def ppo_value_loss(values, old_values, returns, mask, clip_range_value):
    """Clipped value loss (Huang et al. 2024 detail; OpenAI's lm-human-preferences): ½ · masked mean
    of max((V − R)², (V_old + clip(V − V_old, −c, c) − R)²). All inputs (B, T).
    Returns (loss, stats: clipfrac), stats detached. mask: bool or 0/1 float."""
    mask = mask.bool()
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    unclipped_loss, clipped_loss = (values - returns) ** 2, (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped_loss, clipped_loss), mask)
    return loss, {"clipfrac": masked_mean((clipped_loss > unclipped_loss).float(), mask).detach()}


def adaptive_kl_coef(kl_coef, kl, target_kl, horizon, num_episodes):
    """Ziegler et al. 2019 (§2.2): β ← β · (1 + e · n / horizon), with e = clip(KL / target − 1, ±0.2)
    the proportional error and n the episodes of this iteration."""
    error = min(max(kl / target_kl - 1, -0.2), 0.2)
    return kl_coef * (1 + error * num_episodes / horizon)


def logprobs_and_entropy(logits, tokens, temperature, pad_id, entropy_grad=False, chunk_size=1024):
    """logits (R, V) predicting tokens (R,) -> (log-probabilities (R,), entropies (R,)), float32, of the
    sampling distribution: softmax(logits / temperature) with PAD excluded (generation suppresses it).
    Rows go in chunks, each cast to float32 on its own and, with gradients, recomputed in the backward
    pass, so no float32 copy of all R × V logits is kept; the entropy carries a gradient only with
    `entropy_grad` (an entropy bonus), else it is a logged statistic computed without one."""
    def chunk(x, y, entropy=True):  # (r, V), (r,) -> (r,), (r,) or None
        x = x.float() / temperature
        x[:, pad_id] = -1e9  # finite, so that p·log p is 0 (not NaN) for PAD
        lse = x.logsumexp(-1)
        lp = torch.gather(x, 1, y[:, None]).squeeze(1) - lse
        if not entropy:
            return lp, None
        logp = x - lse[:, None]  # (r, V)
        return lp, -(logp.exp() * logp).sum(-1)

    logps, entropies = [], []
    for x, y in zip(logits.split(chunk_size), tokens.split(chunk_size)):
        if not (torch.is_grad_enabled() and x.requires_grad):
            lp, ent = chunk(x, y)
        elif entropy_grad:
            lp, ent = torch.utils.checkpoint.checkpoint(chunk, x, y, use_reentrant=False)
        else:
            lp, _ = torch.utils.checkpoint.checkpoint(chunk, x, y, False, use_reentrant=False)
            with torch.no_grad():
                ent = chunk(x, y)[1]
        logps.append(lp)
        entropies.append(ent)
    empty = logits.new_zeros(0, dtype=torch.float32)
    return (torch.cat(logps), torch.cat(entropies)) if logps else (empty, empty)


def sft_loss(logits, targets):
    """Token-mean next-token NLL of PPO-ptx: logits (R, V) at the labelled positions, targets (R,)."""
    return F.cross_entropy(logits.float(), targets)


# ---- small model helpers ---------------------------------------------------------------------------
def token_scores(model, input_ids, attention_mask, position_ids):
    """The scalar head of a sequence-classification model at every position: (B, L), minus the stored
    normalisation config.reward_bias. (HF's own forward pools the head at one position; PPO needs
    the reward at the response's last token and the value before every token.)"""
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
    return model.score(hidden).squeeze(-1).float() - getattr(model.config, "reward_bias", 0.0)


class PolicyAndValue(torch.nn.Module):
    """The policy and the value model side by side: separate weights (a shared trunk would let value
    updates damage the policy, Stiennon et al.), one module so that one DDP wrapper, one optimizer
    and one backward pass serve both."""

    def __init__(self, policy, value_model):
        super().__init__()
        self.policy, self.value_model = policy, value_model

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep, ptx_batch=None):
        """(policy logits (R, V) at the True positions of logits_to_keep (B, L), values (B, L), policy logits
        at the labelled positions of the PPO-ptx batch or None); one forward call, so that DDP sees every use
        of the weights before the backward pass. The LM head runs only where a logit is needed."""
        logits = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             logits_to_keep=logits_to_keep).logits
        values = token_scores(self.value_model, input_ids, attention_mask, position_ids)
        ptx_logits = None
        if ptx_batch is not None:
            keep = F.pad(ptx_batch["labels"][:, 1:] != common.IGNORE_INDEX, (0, 1))  # position t predicts token t + 1
            ptx_logits = self.policy(input_ids=ptx_batch["input_ids"], attention_mask=ptx_batch["attention_mask"],
                                     logits_to_keep=keep).logits
        return logits, values, ptx_logits


def model_inputs(query_ids, query_mask, responses, mask):
    """Forward-pass inputs for left-padded prompts (B, Lq) followed by right-padded responses (B, T):
    input_ids, attention_mask, position_ids and logits_to_keep, all (B, Lq + T). Positions count from
    each row's first real token, as generate numbers them; rollout and update both build their inputs
    here, so that they compute the same log-probabilities. Position Lq − 1 + t predicts response token
    t: logits are kept there for the valid t only, in row-major order, i.e. the order of responses[mask]."""
    seq_mask = torch.cat([query_mask.bool(), mask], 1).long()
    return {"input_ids": torch.cat([query_ids, responses], 1), "attention_mask": seq_mask,
            "position_ids": (seq_mask.cumsum(1) - 1).clamp(min=0),
            "logits_to_keep": F.pad(mask.bool(), (query_ids.shape[1] - 1, 1))}


def scatter(values, mask):
    """values (R,) in row-major order of mask's (B, T) True entries -> (B, T), 0 where mask is False."""
    return torch.zeros(mask.shape, dtype=values.dtype, device=values.device).masked_scatter(mask, values)


def lr_at(step, args):
    """Learning-rate multiplier at iteration `step` (0-based): linear warmup, then decay to 0."""
    warmup = int(args.warmup_ratio * args.num_steps)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, args.num_steps - warmup)
    return {"cosine": 0.5 * (1 + math.cos(math.pi * progress)), "linear": 1 - progress, "constant": 1.0}[args.lr_schedule]


@torch.no_grad()
def rollout(agent, ref_model, reward_model, queries, tokenizer, args, device, sample_seed=None):
    """Steps 1–2 for a list of prompt id lists: sample responses (generate calls of generation_batch_size
    prompts), then, from forward passes over prompt + response in chunks of rollout_forward_batch_size,
    the log-probabilities under π and π_ref, the values, the entropies and the reward model's scores,
    all without gradients. Returns a dict of (B, ...) tensors, 0 after each response's end; queries are
    left-padded to a common width Lq, responses (B, T) right-padded after their end token.
    With `sample_seed`, generation chunk j samples with the random state seeded to sample_seed + j
    inside torch.random.fork_rng (the outer random state is left as it was): a chunk's samples then
    depend on its prompts and its seed only, not on how the global batch is split over ranks."""
    pad_id, policy = tokenizer.pad_token_id, agent.policy
    stop_ids = common.stop_token_ids(tokenizer, policy)  # EOS, the template's end-of-turn, declared stop ids
    gen_size = args.generation_batch_size or args.per_device_batch_size
    fwd_size = args.rollout_forward_batch_size or args.per_device_batch_size
    batch = common.collate_prompts(queries, pad_id)
    Lq = batch["input_ids"].shape[1]
    chunks = []
    with gathered(policy):  # under FSDP: the policy's full weights for the whole generation, no collective per token
        for j, i in enumerate(range(0, len(queries), gen_size)):
            ids = batch["input_ids"][i: i + gen_size].to(device)
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], enabled=sample_seed is not None):
                if sample_seed is not None:
                    torch.manual_seed(sample_seed + j)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                    out = common.generate(policy, ids, batch["attention_mask"][i: i + len(ids)].to(device), tokenizer,
                                          args.response_length, args.temperature)
            chunks.append(out)  # (b, ≤ response_length): generation stops once every row has an end token
    T = max(c.shape[1] for c in chunks)
    responses = torch.cat([F.pad(c, (0, T - c.shape[1]), value=pad_id) for c in chunks])  # (B, T)
    responses, mask, has_eos = truncate_after_eos(responses, stop_ids, pad_id)
    query_ids, query_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    out = {k: [] for k in ("logprobs", "ref_logprobs", "values", "entropy", "scores")}
    last = mask.sum(1) - 1  # (B,) index of the last valid response token
    for i in range(0, len(queries), fwd_size):
        s = slice(i, i + fwd_size)
        fwd = model_inputs(query_ids[s], query_mask[s], responses[s], mask[s])  # (b, Lq + T) each
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            logits, values, _ = agent(**fwd)  # logits (R, V) at the positions predicting valid response tokens
            ref_logits = ref_model(**fwd).logits
            fwd.pop("logits_to_keep")
            scores = token_scores(reward_model, **fwd)  # (b, Lq + T)
        tokens = responses[s][mask[s]]  # (R,)
        logprobs, entropy = logprobs_and_entropy(logits, tokens, args.temperature, pad_id)
        out["logprobs"].append(scatter(logprobs, mask[s]))  # (b, T)
        out["entropy"].append(scatter(entropy, mask[s]))
        out["ref_logprobs"].append(scatter(logprobs_and_entropy(ref_logits, tokens, args.temperature, pad_id)[0], mask[s]))
        out["values"].append(values[:, Lq - 1: -1])  # V(state before response token t), (b, T)
        out["scores"].append(scores[torch.arange(len(scores)), Lq + last[s]])  # at the last real token, (b,)
    out = {k: torch.cat(v) for k, v in out.items()}
    out.update(queries=query_ids, query_mask=query_mask, responses=responses, mask=mask, has_eos=has_eos)
    return out


# ---- distributed plumbing: FSDP2 sharding, saving, resumable checkpoints (the same in every script) ----
def shard(model, device, args):
    """FSDP2 (torch.distributed.fsdp.fully_shard): one group per decoder layer (the classes the model
    lists in _no_split_modules), then the root for the rest (embeddings, final norm, head). Each rank
    keeps 1/world_size of every parameter, gradient and AdamW state, moved to `device` a layer at a
    time (the whole model is never there); a group is all-gathered just before its forward (and again
    in backward) and freed after. With --bf16 it is gathered in bfloat16 and its gradients
    reduce-scattered in float32 into the float32 shards."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (args.world_size,))

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if args.bf16 else MixedPrecisionPolicy()
    for m in model.modules():
        if type(m).__name__ in (model._no_split_modules or ()):
            fully_shard(m, mesh=mesh, mp_policy=mp)
    # a sequence-classification model is called as its backbone, then its head (token_scores): two roots
    for root in [getattr(model, model.base_model_prefix), model.score] if hasattr(model, "score") else [model]:
        fully_shard(root, mesh=mesh, mp_policy=mp)


@contextlib.contextmanager
def gathered(model):
    """Under FSDP, all-gather every parameter of `model` once and keep it until the block ends, so that
    generate (a forward per token) needs no collective per token and may run on one rank alone; it
    costs one full copy of the weights in the compute dtype meanwhile. Every rank must enter the
    block. Without FSDP it does nothing."""
    from torch.distributed.fsdp import FSDPModule

    groups = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in groups:
        if m is not model:  # the root keeps its parameters after forward anyway
            m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in groups:
            m.reshard()
            if m is not model:
                m.set_reshard_after_forward(True, recurse=False)


def save_model(model, tokenizer, path, args, rank):
    """save_pretrained on rank 0 (every rank must call this): under FSDP the full state dict is first
    gathered, shard by shard, into rank 0's CPU memory."""
    state_dict = None
    if args.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        tied = dict(model.named_parameters(remove_duplicate=False)).keys() - dict(model.named_parameters()).keys()
        state_dict = {k: v for k, v in state_dict.items() if k not in tied}  # a tied head once, as save_pretrained writes it
    if rank == 0:
        model.save_pretrained(path, state_dict=state_dict)
        tokenizer.save_pretrained(path)
        if args.fsdp:  # fully_shard renamed the class to FSDP<name>; from_pretrained and vLLM want the real one
            model.config.architectures = [type(model).__bases__[-1].__name__]
            model.config.save_pretrained(path)


def save_checkpoint(path, model, optimizer, trainer_state, rank):
    """All a run needs to continue, in `path` (every rank must call this): model and AdamW state with
    torch.distributed.checkpoint (under FSDP each rank writes its shards; replicated tensors are
    written once), each rank's Python, NumPy and torch RNG states, and last trainer_state.json,
    whose presence marks the checkpoint complete."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=path)
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
               os.path.join(path, f"rng_rank{rank}.pt"))
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        with open(os.path.join(path, "trainer_state.json"), "w") as f:
            json.dump(trainer_state, f)


def load_checkpoint(output_dir, model, optimizer, rank, world_size, num_steps, seed):
    """Load the latest complete checkpoint in output_dir/resume into `model`, `optimizer` and this
    rank's RNGs; returns its path and trainer state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    root = os.path.join(output_dir, "resume")
    done = sorted(d for d in (os.listdir(root) if os.path.isdir(root) else [])
                  if os.path.exists(os.path.join(root, d, "trainer_state.json")))
    if not done:
        raise SystemExit(f"--resume: no complete checkpoint in {root}; save some with --checkpoint-every N")
    path = os.path.join(root, done[-1])
    with open(os.path.join(path, "trainer_state.json")) as f:
        state = json.load(f)
    if state["world_size"] != world_size:
        raise SystemExit(f"--resume: {path} was written by {state['world_size']} rank(s), not {world_size}: "
                         "each rank's data slice and random state belong to that number")
    if (state["num_steps"], state["seed"]) != (num_steps, seed):
        raise SystemExit(f"--resume: {path} belongs to a run of {state['num_steps']} steps with --seed {state['seed']}, "
                         f"this one has {num_steps} with --seed {seed}: resume with the flags of the run that wrote it")
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.load({"model": model_state, "optim": optim_state}, checkpoint_id=path)  # in place, each rank its shards
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
    rng = torch.load(os.path.join(path, f"rng_rank{rank}.pt"), weights_only=False)
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])
    return path, state


def memory_plan(models, args):
    """Bytes per rank of the float32 parameters, gradients and AdamW state (two moments) of each
    (name, model, trained) under DDP (every rank a full copy) or FSDP (1/world_size each); activations,
    the gathered layers and the logits come on top. Printed at the start."""
    shards, total, lines = args.world_size if args.fsdp else 1, 0, []
    for name, model, trained in models:
        n = sum(p.numel() for p in model.parameters())
        parts = {"parameters": 4 * n / shards, "gradients": 4 * n / shards * trained, "AdamW": 8 * n / shards * trained}
        total += sum(parts.values())
        lines.append(f"  {name} ({n / 1e6:.1f}M): " + ", ".join(f"{k} {v / 2**30:.3f}" for k, v in parts.items() if v))
    mode = f"FSDP over {args.world_size} rank(s)" if args.fsdp else f"DDP, {args.world_size} rank(s)"
    return "\n".join([f"memory per rank ({mode}), GiB, before activations: {total / 2**30:.3f}"] + lines)


def peak_memory(device, world_size, reset=False):
    """Every rank's peak memory in GiB since the last call with reset=True (made as training starts, so
    that loading does not count): CUDA tensors on GPU; on CPU the peak resident set (Linux's VmHWM)."""
    if reset:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        else:
            with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := the current resident set
        return None
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the whole run's, where /proc is missing
        with contextlib.suppress(OSError), open("/proc/self/status") as f:
            peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
    peaks = torch.zeros(world_size, dtype=torch.float64, device=device)
    peaks[dist.get_rank() if dist.is_initialized() else 0] = peak
    if dist.is_initialized():
        dist.all_reduce(peaks)
    return [round(p / 2**30, 3) for p in peaks.tolist()]


if __name__ == "__main__":
    args = tyro.cli(Args)
    # defaults that depend on the task: tuned for the toy task, the usual ones for pretrained LMs
    on_toy = args.dataset_name == "toy"
    for name, toy_value, other in (("max_length", 64, 1024), ("response_length", 24, 256), ("num_epochs", 0.1, 1.0),
                                   ("learning_rate", 3e-4, 3e-6), ("kl_coef", 0.5, 0.05)):
        if getattr(args, name) is None:
            setattr(args, name, toy_value if on_toy else other)
    if args.ptx_coef and args.ptx_dataset_name is None:
        if not on_toy:
            raise ValueError("--ptx-coef > 0 needs --ptx-dataset-name: the SFT data (prompt, completion or messages) "
                             "whose likelihood PPO-ptx keeps up")
        args.ptx_dataset_name = "toy"
    args.world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    args.per_device_batch_size = args.per_device_batch_size or max(1, args.batch_size // (args.num_minibatches * args.world_size))
    if args.batch_size % (args.num_minibatches * args.per_device_batch_size * args.world_size):
        raise ValueError(f"--batch-size {args.batch_size} must split into --num-minibatches {args.num_minibatches} "
                         f"x --per-device-batch-size {args.per_device_batch_size} x {args.world_size} ranks")
    args.generation_batch_size = args.generation_batch_size or args.per_device_batch_size
    if args.batch_size % (args.generation_batch_size * args.world_size):
        raise ValueError(f"--batch-size {args.batch_size} must split into generate calls of --generation-batch-size "
                         f"{args.generation_batch_size} x {args.world_size} ranks (samples are seeded per call)")
    args.minibatch_size = args.batch_size // args.num_minibatches
    args.grad_accum_steps = args.minibatch_size // (args.per_device_batch_size * args.world_size)
    if args.response_length >= args.max_length:
        raise ValueError(f"--response-length {args.response_length} leaves no room for a prompt in --max-length {args.max_length}")
    if args.temperature <= 0:
        raise ValueError("--temperature must be > 0: PPO needs a sampling distribution with log-probabilities")
    if args.fsdp and "LOCAL_RANK" not in os.environ:
        raise SystemExit("--fsdp runs under torchrun, e.g. `torchrun --nproc_per_node 8 ppo.py --fsdp`")
    run_name = f"{args.exp_name}__{args.seed}__{int(time.time())}"

    # TRY NOT TO MODIFY: distributed set-up, seeding, device
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(f"cuda:{local_rank}" if args.device == "cuda" else args.device)
    if args.world_size > 1 or args.fsdp:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    torch.manual_seed(args.seed + rank)
    torch.backends.cudnn.deterministic = args.torch_deterministic

    # TRY NOT TO MODIFY: model and tokenizer loading
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    transformers.utils.logging.disable_progress_bar()
    args.value_model_name = args.value_model_name or args.reward_model_name
    tokenizer = common.load_tokenizer(args.model_name, hint=": run `python sft.py` first, or pass --model-name")
    pad_id = tokenizer.pad_token_id
    for name in {args.reward_model_name, args.value_model_name}:
        if common.load_tokenizer(name, ": run `python reward_model.py` first, or pass the folder").get_vocab() != tokenizer.get_vocab():
            raise ValueError(f"{name} has another tokenizer than {args.model_name}; PPO hands the policy's token ids "
                             "to the reward and value models, so train the reward model from the SFT model")

    def load(cls, name, trained, **kwargs):
        """Load on the CPU, then onto the device: whole (DDP), or in shards (FSDP; the frozen models too,
        since at 7B each would be 28 GB whole on every rank), one model at a time."""
        config = AutoConfig.from_pretrained(name, **kwargs)
        for key, value in config.to_dict().items():  # dropout off in all four models (Huang et al. 2024):
            if any(k in key for k in ("dropout", "pdrop", "layerdrop", "jitter")) and isinstance(value, float):  # else ratio ≠ 1 at the start
                setattr(config, key, 0.0)
        model = cls.from_pretrained(name, config=config, dtype=torch.float32)
        if cls is AutoModelForCausalLM and "logits_to_keep" not in inspect.signature(model.forward).parameters:
            raise SystemExit(f"{name}: its forward takes no logits_to_keep, which this script uses to compute "
                             "logits only where a token is predicted; use a transformers causal LM class that has it (transformers >= 5)")
        common.resize_embeddings(model, tokenizer)
        if not trained:
            model.requires_grad_(False).eval()
        elif args.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            model.config.use_cache = False
        shard(model, device, args) if args.fsdp else model.to(device)
        return model

    policy = load(AutoModelForCausalLM, args.model_name, trained=True)
    ref_model = load(AutoModelForCausalLM, args.model_name, trained=False)
    reward_model = load(AutoModelForSequenceClassification, args.reward_model_name, trained=False, num_labels=1)
    value_model = load(AutoModelForSequenceClassification, args.value_model_name, trained=True, num_labels=1)
    plan = memory_plan([("policy", policy, True), ("value model", value_model, True), ("reference", ref_model, False),
                        ("reward model", reward_model, False)], args)
    agent = PolicyAndValue(policy, value_model)
    train_agent = torch.nn.parallel.DistributedDataParallel(agent) if args.world_size > 1 and not args.fsdp else agent

    # data: prompts, each rank rolling out its slice of the same seeded global batch
    train_ds, eval_ds = common.load_splits(args.dataset_name, "prompt", args.dataset_train_split,
                                           args.dataset_eval_split, seed=args.seed)
    max_prompt_length = args.max_length - args.response_length
    train_prompts, train_stats = common.tokenize_prompts(tokenizer, train_ds, max_prompt_length, args.truncation_mode)
    eval_prompts, eval_stats = common.tokenize_prompts(tokenizer, eval_ds.select(range(min(args.num_eval_prompts, len(eval_ds)))),
                                                       max_prompt_length, args.truncation_mode)
    # as many eval prompts on every rank, so as many forward passes (each a collective under FSDP)
    eval_prompts = eval_prompts[: len(eval_prompts) // args.world_size * args.world_size]
    if not eval_prompts:
        raise ValueError(f"no eval prompt for each of the {args.world_size} ranks: raise --num-eval-prompts")
    if rank == 0:
        common.report("train prompts", train_stats), common.report("eval prompts", eval_stats)
    args.num_steps = int(args.num_epochs * len(train_prompts)) // args.batch_size
    if args.num_steps < 1:
        raise ValueError(f"{len(train_prompts)} training prompts make no iteration of --batch-size {args.batch_size}")
    schedule = common.batch_schedule(len(train_prompts), args.batch_size, args.num_steps, args.seed)
    ptx_schedule = None
    if args.ptx_coef:  # InstructGPT's PPO-ptx: the SFT loss on demonstrations, in every minibatch
        ptx_ds, _ = common.load_splits(args.ptx_dataset_name, "sft", seed=args.seed)
        ptx_examples, ptx_stats = common.tokenize_sft(tokenizer, ptx_ds, args.max_length)
        if rank == 0:
            common.report("PPO-ptx examples", ptx_stats)
        ptx_schedule = iter(common.batch_schedule(len(ptx_examples), args.minibatch_size,
                                                  args.num_steps * args.num_ppo_epochs * args.num_minibatches, args.seed))
    toy = None
    if args.dataset_name == "toy":
        import toy_task as toy  # exact gold reward and log P_ref of every sample

    # TRY NOT TO MODIFY: logging set-up
    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        if args.track:
            try:
                import wandb
            except ImportError:
                raise SystemExit("--track logs to Weights & Biases: `pip install wandb` first, or drop --track")
            wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                       config=vars(args), name=run_name, save_code=True)
        writer = SummaryWriter(f"runs/{run_name}")
        writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
        print(f"run {run_name}: policy {sum(p.numel() for p in policy.parameters()) / 1e6:.2f}M parameters, "
              f"{len(train_prompts)} train / {len(eval_prompts)} eval prompts, {args.num_steps} iterations of "
              f"{args.batch_size} episodes, {args.num_ppo_epochs} epochs x {args.num_minibatches} minibatches, "
              f"{args.world_size} rank(s) x {args.grad_accum_steps} micro-batch(es) of {args.per_device_batch_size}")
        print(plan)

    def decode(r):
        """Prompt and response texts of a rollout (PAD and EOS dropped)."""
        queries = tokenizer.batch_decode([q[m.bool()] for q, m in zip(r["queries"], r["query_mask"])], skip_special_tokens=True)
        return queries, tokenizer.batch_decode([y[m] for y, m in zip(r["responses"], r["mask"])], skip_special_tokens=True)

    def rollout_sums(r, kl_seq):
        """Sums over the rollout's responses of the statistics logged per response; on the toy task
        also the exact gold reward and the exact KL to P_ref, log π − log P_ref of each sample."""
        sums = {"scores": r["scores"].sum(), "kl": kl_seq.sum(), "eos_rate": r["has_eos"].float().sum(),
                "response_length": r["mask"].sum().float()}
        if toy:
            queries, texts = decode(r)
            seq_logp = torch.where(r["mask"], r["logprobs"], 0.0).sum(1).tolist()
            sums["toy/gold_reward"] = torch.tensor(sum(toy.gold_reward(q, t) for q, t in zip(queries, texts)))
            sums["toy/kl_to_ref"] = torch.tensor(sum(lp - toy.ref_logprob(q, t, args.response_length)
                                                     for q, t, lp in zip(queries, texts, seq_logp)))
        return {k: v.to(device, torch.float32) for k, v in sums.items()}

    def evaluate(iteration):
        """Responses to the --num-eval-prompts held-out prompts (each rank a share), means across ranks:
        score, KL to the SFT model (Σ_t log π − log π_ref), EOS rate, length; toy: gold reward, KL to P_ref."""
        r = rollout(agent, ref_model, reward_model, eval_prompts[rank:: args.world_size], tokenizer, args, device,
                    sample_seed=hash((args.seed, -1, iteration)) % 2 ** 62 + rank * 100_003)
        sums = rollout_sums(r, torch.where(r["mask"], r["logprobs"] - r["ref_logprobs"], 0.0).sum(1))
        values = torch.stack(list(sums.values()))
        if args.world_size > 1:
            dist.all_reduce(values)
        queries, texts = decode(r)
        samples = list(zip(queries, texts, r["scores"].tolist()))[: args.num_sample_completions]
        return dict(zip(sums, (values / len(eval_prompts)).tolist())), samples

    # 0. the optimizer covers policy and value model (one learning rate, as in Huang et al. 2024)
    optimizer = torch.optim.AdamW(agent.parameters(), lr=args.learning_rate, eps=args.adam_eps,
                                  weight_decay=args.weight_decay)
    per_rank = args.batch_size // args.world_size
    mb_per_rank = args.minibatch_size // args.world_size
    kl_coef, start, episodes, first_iteration = args.kl_coef, time.time(), 0, 0
    if args.resume:  # models, optimizer, RNG states and β as they were after iteration `first_iteration`
        path, state = load_checkpoint(args.output_dir, agent, optimizer, rank, args.world_size, args.num_steps, args.seed)
        first_iteration, kl_coef, episodes = state["step"], state["kl_coef"], state["step"] * args.batch_size
        if first_iteration >= args.num_steps:
            raise SystemExit(f"{path} is the last iteration: nothing left to train")
        for _ in range(first_iteration * args.num_ppo_epochs * args.num_minibatches if ptx_schedule else 0):
            next(ptx_schedule)  # the PPO-ptx batches already used
        if rank == 0:
            print(f"resumed from {path} at iteration {first_iteration}")
    update_names = ["loss/policy", "loss/value", "policy/approxkl", "policy/clipfrac", "val/clipfrac", "val/ratio",
                    "val/mean", "val/sq_mean", "policy/entropy"]
    final = {}
    peak_memory(device, args.world_size, reset=True)
    for iteration in tqdm(range(first_iteration, args.num_steps), initial=first_iteration, total=args.num_steps,
                          disable=rank != 0):
        lr = args.learning_rate * lr_at(iteration, args)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # 1.–2. rollout: sample responses to this rank's prompts and score them (no gradients)
        idx = schedule[iteration][rank * per_rank: (rank + 1) * per_rank]
        agent.eval()
        # sampling seeded per chunk of the global batch: the same responses however it is split over ranks
        chunks_per_rank = per_rank // args.generation_batch_size
        r = rollout(agent, ref_model, reward_model, [train_prompts[i] for i in idx], tokenizer, args, device,
                    sample_seed=hash((args.seed, iteration)) % 2 ** 62 + rank * chunks_per_rank)
        agent.train()
        mask = r["mask"]  # (b, T) valid response tokens

        # 3. KL penalty: per-token −β·KL_t, the score (minus the missing-EOS penalty) on the last token
        rewards, kl, scores = kl_shaped_rewards(r["scores"], r["logprobs"], r["ref_logprobs"], mask, r["has_eos"],
                                                kl_coef, args.missing_eos_penalty)
        # 4. advantages: GAE over the response, the last valid token terminal; then whitened over the
        # valid tokens of the whole batch, all ranks together (TRL and Huang et al. whiten per rank)
        all_reduce = dist.all_reduce if args.world_size > 1 else None
        if args.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False, all_reduce=all_reduce)
        advantages, returns = compute_gae(rewards, r["values"], mask, args.gamma, args.lam)
        advantages = masked_whiten(advantages, mask, all_reduce=all_reduce)

        # 5. PPO epochs: shuffled minibatches; each minibatch is one optimizer step, accumulated over
        # micro-batches, its loss a mean over all valid tokens of the minibatch (across ranks)
        update_stats = torch.zeros(len(update_names), device=device)
        update_tokens, ptx_stats = torch.zeros((), device=device), torch.zeros(2, device=device)
        for ppo_epoch in range(args.num_ppo_epochs):
            perm = torch.randperm(per_rank, device=device)
            for mb in range(args.num_minibatches):
                mb_idx = perm[mb * mb_per_rank: (mb + 1) * mb_per_rank]
                mb_tokens = mask[mb_idx].sum().float()
                if args.world_size > 1:
                    dist.all_reduce(mb_tokens)
                ptx_global = [ptx_examples[i] for i in next(ptx_schedule)] if ptx_schedule else []
                ptx_batch = ptx_global[rank * mb_per_rank: (rank + 1) * mb_per_rank]
                # PPO-ptx's loss is a mean over the labelled tokens of the minibatch's whole SFT batch, as in sft.py
                ptx_tokens = sum(sum(x != common.IGNORE_INDEX for x in e["labels"][1:]) for e in ptx_global)
                for k in range(args.grad_accum_steps):
                    i = mb_idx[k * args.per_device_batch_size: (k + 1) * args.per_device_batch_size]
                    m, Lq = mask[i], r["queries"].shape[1]
                    ptx = None
                    if ptx_batch:
                        ptx = common.collate_sft(ptx_batch[k * args.per_device_batch_size: (k + 1) * args.per_device_batch_size], pad_id)
                        ptx = {key: v.to(device) for key, v in ptx.items()}
                    # DDP all-reduces once per step; FSDP reduce-scatters every micro-batch (gradients stay sharded)
                    sync = k == args.grad_accum_steps - 1 or args.world_size == 1 or args.fsdp
                    with contextlib.nullcontext() if sync else train_agent.no_sync():
                        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                            logits, values, ptx_logits = train_agent(
                                **model_inputs(r["queries"][i], r["query_mask"][i], r["responses"][i], m), ptx_batch=ptx)
                        # the same positions, temperature and PAD handling as in the rollout
                        logprobs, entropy = logprobs_and_entropy(logits, r["responses"][i][m], args.temperature, pad_id,
                                                                 entropy_grad=args.ent_coef > 0)
                        logprobs, entropy = scatter(logprobs, m), scatter(entropy, m)  # (b, T)
                        values = values[:, Lq - 1: -1]  # (b, T)
                        pg_loss, pg_stats = ppo_policy_loss(logprobs, r["logprobs"][i], advantages[i], m, args.cliprange)
                        vf_loss, vf_stats = ppo_value_loss(values, r["values"][i], returns[i], m, args.cliprange_value)
                        mean_entropy = masked_mean(entropy, m)
                        loss = pg_loss + args.vf_coef * vf_loss - args.ent_coef * mean_entropy
                        # weight: this micro-batch's share of the minibatch's valid tokens, so the step's loss is a
                        # mean over all of them; DDP averages gradients over ranks, hence the world_size factor
                        loss = loss * m.sum() / mb_tokens * args.world_size
                        ptx_loss, n_ptx = torch.zeros((), device=device), 0
                        if ptx:
                            targets = ptx["labels"][:, 1:][ptx["labels"][:, 1:] != common.IGNORE_INDEX]  # (R',)
                            ptx_loss, n_ptx = sft_loss(ptx_logits, targets), len(targets)
                        (loss + args.ptx_coef * ptx_loss * n_ptx / max(ptx_tokens, 1) * args.world_size).backward()
                    if iteration == 0 and ppo_epoch == 0 and mb == 0 and k == 0:
                        # built-in invariant: nothing has changed yet, so π = π_old exactly
                        first_ratio, first_kl = pg_stats["ratio"].item(), pg_stats["approxkl"].item()
                        if abs(first_ratio - 1) > 1e-4 or first_kl > 1e-6:
                            raise RuntimeError(f"first minibatch: ratio {first_ratio} approxkl {first_kl}, not 1 and 0: rollout and "
                                               "update compute log-probabilities differently (dropout? temperature?)")
                        if rank == 0:
                            tqdm.write(f"first minibatch: ratio {first_ratio:.6f}, approxkl {first_kl:.2e} (π = π_old)")
                    n = m.sum()
                    vm = torch.where(m, values.detach(), 0.0)
                    update_stats += n * torch.stack([pg_loss.detach(), vf_loss.detach(), pg_stats["approxkl"], pg_stats["clipfrac"],
                                                     vf_stats["clipfrac"], pg_stats["ratio"], vm.sum() / n, (vm ** 2).sum() / n,
                                                     mean_entropy.detach()])
                    update_tokens += n
                    ptx_stats += torch.stack([ptx_loss.detach() * n_ptx, torch.as_tensor(n_ptx, device=device)])
                # the global gradient norm (clipped if --max-grad-norm > 0); checked on every rank before the update
                grad_norm = torch.nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm or math.inf)
                if not math.isfinite(grad_norm.item()):
                    raise FloatingPointError(f"non-finite gradient at iteration {iteration}, before the update: "
                                             "lower --learning-rate or check the reward model")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

        # 6. log: masked means over every valid token (or every response) of the whole iteration
        seq_kl = kl.sum(1)  # (b,) Σ_t log π − log π_ref per response
        sums = rollout_sums(r, seq_kl)
        sums["non_score_reward"] = -kl_coef * seq_kl.sum()
        sums["rlhf_reward"] = sums["non_score_reward"] + scores.sum()  # scores after the missing-EOS penalty
        residual = returns - r["values"]
        token_sums = {k: torch.where(mask, v, 0.0).sum() for k, v in (("entropy", r["entropy"]), ("returns", returns),
                      ("returns_sq", returns ** 2), ("residual", residual), ("residual_sq", residual ** 2))}
        all_stats = torch.cat([torch.stack(list(sums.values())), torch.stack(list(token_sums.values())),
                               update_stats, ptx_stats, update_tokens[None], mask.sum().float()[None]])
        if args.world_size > 1:
            dist.all_reduce(all_stats)
        per_seq = dict(zip(sums, (all_stats[: len(sums)] / args.batch_size).tolist()))
        per_tok = dict(zip(token_sums, (all_stats[len(sums): len(sums) + 5] / all_stats[-1]).tolist()))
        upd = dict(zip(update_names, (all_stats[len(sums) + 5: -4] / all_stats[-2]).tolist()))
        upd["val/var"] = upd.pop("val/sq_mean") - upd["val/mean"] ** 2
        if args.ptx_coef:
            upd["loss/ptx"] = (all_stats[-4] / all_stats[-3]).item()  # per labelled token of the SFT batches
        logged = {f"objective/{k}" if k in ("scores", "kl", "non_score_reward", "rlhf_reward") else
                  k if k.startswith("toy/") else f"charts/{k}": v for k, v in per_seq.items()}
        logged["objective/entropy"] = per_tok["entropy"]
        # 1 − Var(returns − values) / Var(returns), over the valid tokens of every rank
        logged["val/explained_variance"] = 1 - (per_tok["residual_sq"] - per_tok["residual"] ** 2) / (
            per_tok["returns_sq"] - per_tok["returns"] ** 2)
        logged.update(upd)
        if not math.isfinite(logged["loss/policy"] + logged["loss/value"]):
            raise FloatingPointError(f"non-finite loss at iteration {iteration}: lower --learning-rate or check the reward model")
        episodes += args.batch_size
        logged.update({"objective/kl_coef": kl_coef, "charts/learning_rate": lr,
                       "charts/episodes_per_sec": episodes / (time.time() - start)})
        if args.target_kl is not None:  # Ziegler et al.'s adaptive β, from this batch's mean sequence KL
            kl_coef = adaptive_kl_coef(kl_coef, logged["objective/kl"], args.target_kl, args.kl_horizon, args.batch_size)
        if writer:
            for name, value in logged.items():
                writer.add_scalar(name, value, episodes)
        final = logged

        if (iteration + 1) % args.eval_every == 0 or iteration + 1 == args.num_steps:
            agent.eval()
            metrics, samples = evaluate(iteration)
            agent.train()
            if writer:
                for name, value in metrics.items():
                    writer.add_scalar(f"eval/{name}", value, episodes)
                writer.add_text("eval/samples", "\n\n".join(f"**{p}** → {t} (score {s:.2f})" for p, t, s in samples), episodes)
                tqdm.write(f"iteration {iteration + 1}: " + ", ".join(f"eval/{k} {v:.3f}" for k, v in metrics.items()))
                for p, t, s in samples:
                    tqdm.write(f"    [{p}] {t}   (score {s:+.2f})")
            final = {**logged, **{f"eval/{k}": v for k, v in metrics.items()}}
        if args.save_every and (iteration + 1) % args.save_every == 0:
            save_model(policy, tokenizer, os.path.join(args.output_dir, "checkpoints", f"episode_{episodes:07d}"), args, rank)
        if args.checkpoint_every and (iteration + 1) % args.checkpoint_every == 0:
            save_checkpoint(os.path.join(args.output_dir, "resume", f"step_{iteration + 1:07d}"), agent, optimizer,
                            {"step": iteration + 1, "world_size": args.world_size, "num_steps": args.num_steps, "seed": args.seed,
                             "kl_coef": kl_coef}, rank)

    # save the policy and tokenizer where evaluate.py looks for them
    peaks = peak_memory(device, args.world_size)  # of training: loading and saving not counted
    save_model(policy, tokenizer, args.output_dir, args, rank)
    if rank == 0:
        with open(os.path.join(args.output_dir, "training_args.json"), "w") as f:
            json.dump({"args": vars(args), "result": final, "peak_memory_gib": peaks}, f, indent=2, default=str)
        print(f"saved to {args.output_dir}: " + ", ".join(f"{k} {v:.4f}" for k, v in final.items()))
        print(f"peak memory per rank (GiB): {peaks}")
        writer.close()
    if dist.is_initialized():  # every rank waits for rank 0's save, then all leave together
        dist.barrier()
        del train_agent  # DDP's reducer holds the process group: freed now, not during interpreter teardown
        dist.destroy_process_group()
