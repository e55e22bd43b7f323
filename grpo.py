"""Online RL without a value model: GRPO, Dr. GRPO and RLOO (--advantage), with a reward model,
reward functions (verifiable rewards) or both; the methods and the numbered steps: docs/grpo.md.

    python grpo.py  # GRPO from runs/models/sft and runs/models/reward_model, toy task, CPU, ~2 minutes
    python grpo.py --advantage rloo --output-dir runs/models/rloo  # RLOO
    python grpo.py --reward-fn toy_task:gold_reward --kl-coef 0  # the exact reward, no reference
    torchrun --nproc_per_node 8 grpo.py --model-name Qwen/Qwen2.5-1.5B-Instruct \
        --dataset-name gsm8k.jsonl --reward-fn rewards:exact_answer --group-size 8 --batch-size 512 \
        --learning-rate 1e-6 --bf16
"""

import contextlib
import copy
import glob
import json
import math
import os
import resource
import time
from dataclasses import dataclass, field
from typing import Annotated, Literal

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
import tyro
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from tqdm import tqdm

import common
from rewards import load_reward_fns, reward_fn_values


@dataclass
class Args:
    # ---- shared by every script ----
    exp_name: str = os.path.basename(__file__)[:-3]
    """run name; TensorBoard logs go to runs/{exp_name}__{seed}__{unix time}"""
    seed: int = 1
    """seed of data order, init, dropout and sampling (rank r: seed + r)"""
    device: str = "auto"
    """auto (CUDA if any), cpu or cuda; torchrun's rank r: cuda:LOCAL_RANK"""
    bf16: bool = False
    """bfloat16 autocast of forward passes (weights, AdamW state stay float32)"""
    fsdp: bool = False
    """shard weights, gradients, AdamW state over ranks (FSDP2), not copy them (DDP)"""
    track: bool = False
    """also log to Weights & Biases (WANDB_PROJECT, WANDB_ENTITY)"""
    output_dir: str = os.path.join("runs", "models", exp_name)
    """folder of the trained model and tokenizer"""
    checkpoint_every: int = 0
    """optimizer steps between --resume checkpoints in {output_dir}/resume (0: none)"""
    resume: bool = False
    """continue from the last complete checkpoint (same flags and ranks)"""

    # ---- model, data, optimisation: the same names in every script ----
    model_name: str = os.path.join("runs", "models", "sft")
    """Hub id or folder of the model to start from (sft.py's), also the frozen reference"""
    dataset_name: str = "toy"
    """toy, a .json/.jsonl/.parquet/.csv file/folder or Hub id: prompt or messages"""
    dataset_train_split: str = "train"
    """split to train on"""
    max_length: int | None = None
    """tokens per sequence (prompt + response); default 64 on toy, else 1024"""
    truncation_mode: Literal["drop", "keep_end"] = "drop"
    """a prompt over --max-length − --response-length: dropped, or its oldest tokens cut"""
    batch_size: int = 256
    """responses per iteration (episodes; --group-size per prompt), summed over ranks"""
    per_device_batch_size: int | None = None
    """sequences per forward pass of the update on a device; default minibatch / ranks"""
    num_epochs: float | None = None
    """passes over the training prompts, each answered G times (not --num-ppo-epochs); default 0.2 on toy, else 1"""
    learning_rate: float | None = None
    """peak AdamW rate; default 3e-4 on toy, else 3e-6; LoRA: 10×"""
    lr_schedule: Literal["cosine", "linear", "constant"] = "linear"
    """decay after the warmup, to 0 one iteration after the last (as transformers')"""
    warmup_ratio: float = 0.0
    """share of iterations warming the learning rate up linearly from 0"""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay"""
    adam_eps: float = 1e-5
    """AdamW's epsilon (Huang et al. 2024)"""
    max_grad_norm: float = 1.0
    """clip the global gradient norm to this (0: off)"""
    gradient_checkpointing: bool = False
    """recompute activations in backward: less memory, ~30% more compute"""
    lora_r: int = 0
    """LoRA rank (Hu et al. 2021), all else frozen (0: full fine-tuning)"""
    lora_alpha: float = 32.0
    """LoRA's α: the adapters add (α / r) · BA to each weight"""
    lora_dropout: float = 0.0
    """dropout on the adapters' input (0: the policy starts at its reference)"""
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """modules given adapters; all-linear: all linear layers but the LM head and MoE routers"""
    lora_merge: bool = True
    """with --lora-r, save the merged model (adapters: {output_dir}/adapter)"""

    # ---- GRPO ----
    advantage: Literal["grpo", "dr_grpo", "rloo", "batch_std"] = "grpo"
    """grpo: (r − group mean) / group std; dr_grpo: r − group mean; rloo: r − the others' mean;
    batch_std: (r − group mean) / the batch's std (Lite PPO); each its paper's --loss-aggregation"""
    group_size: int = 4
    """responses sampled per prompt (G)"""
    loss_aggregation: Literal["sequence_mean", "token_mean", "constant"] | None = None
    """the per-token losses' sum: each response's token mean, then their mean (GRPO); one mean over
    every token (DAPO); or the sum over responses × --response-length (Dr. GRPO); default --advantage's"""
    kl_penalty: Literal["k1_reward", "k3_loss"] = "k1_reward"
    """the KL to the SFT model: k1 summed into each response's reward or GRPO's k3 in the loss"""
    kl_coef: float | None = None
    """β, the KL penalty's weight; default 1 on the toy task, else 0.05; 0: no reference model"""
    reward_model_name: str | None = None
    """reward_model.py's model; default runs/models/reward_model unless --reward-fn is given"""
    reward_fn: Annotated[list[str], tyro.conf.UseAppendAction] = field(default_factory=list)
    """MODULE:FUNCTION, repeatable: f(prompts, completions, **columns) -> floats or None (TRL's)"""
    reward_weights: list[float] = field(default_factory=list)
    """weights of the reward model's (if any), then each --reward-fn's; default 1"""
    response_length: int | None = None
    """most tokens per response, end token included; default 24 on the toy task, else 256"""
    temperature: float = 1.0
    """sampling temperature, in rollout and update alike"""
    missing_eos_penalty: float = 1.0
    """taken off the score of a response cut without an end token"""
    overlong_buffer: int = 0
    """DAPO's soft overlong penalty: tokens before --response-length over which a score loses 0 to 1"""
    mask_truncated: bool = False
    """DAPO: responses cut without an end token carry no loss (their rewards count in their group)"""
    num_ppo_epochs: int = 4
    """passes of updates over each batch of responses"""
    num_minibatches: int = 4
    """optimizer steps per epoch (shuffled minibatches of the batch)"""
    cliprange: float = 0.2
    """ε: the ratio is clipped to [1 − ε, 1 + ε_high]"""
    cliprange_high: float | None = None
    """ε_high, the clip's upper side (DAPO's clip-higher: 0.28); default --cliprange"""
    importance_sampling_level: Literal["token", "sequence"] = "token"
    """token: each token's ratio (PPO's); sequence: GSPO's (Zheng et al. 2025), one per response"""
    save_every: int = 0
    """iterations between policies saved to {output_dir}/checkpoints (0: the final one only)"""
    generation_batch_size: int | None = None
    """responses per generate call, each seeded; default --per-device-batch-size"""
    rollout_forward_batch_size: int | None = None
    """sequences per no-gradient forward pass of the rollout; default --per-device-batch-size"""
    share_prompt: bool = True
    """update: run each prompt once for its G responses, on its cached keys and values (off where not exact,
    or where a micro-batch would split a group)"""

    # ---- derived after parsing, not flags ----
    world_size: tyro.conf.Suppress[int] = 1
    grad_accum_steps: tyro.conf.Suppress[int] = 1
    num_iterations: tyro.conf.Suppress[int] = 0
    minibatch_size: tyro.conf.Suppress[int] = 0


# ---- pure math (tested by hand in tests/test_grpo.py) ----
def group_advantages(rewards, group_size, kind="grpo", all_reduce=None):
    """Advantages (B,) of rewards (B,) in groups of `group_size` consecutive responses to a prompt
    (docs/grpo.md's table): grpo (r − mean) / (the group's sample std + 1e-4) (Shao et al. 2024);
    dr_grpo r − mean (Liu et al. 2025); rloo r − the others' mean = G/(G − 1) · (r − mean)
    (Ahmadian et al. 2024); batch_std (r − mean) / (all ranks' batch's std + 1e-4) (Lite PPO)."""
    r = rewards.view(-1, group_size)
    centred = r - r.mean(1, keepdim=True)
    if kind == "grpo":
        return (centred / (r.std(1, keepdim=True) + 1e-4)).view(-1)
    if kind == "dr_grpo":
        return centred.view(-1)
    if kind == "rloo":
        return (centred * group_size / (group_size - 1)).view(-1)
    if kind == "batch_std":
        count = torch.tensor(r.numel(), dtype=r.dtype, device=r.device)
        s = torch.stack([r.sum(), (r**2).sum(), count])
        if all_reduce is not None:
            all_reduce(s)
        std = ((s[1] - s[0] ** 2 / s[2]) / (s[2] - 1)).clamp(min=0).sqrt()  # sample std of all B
        return (centred / (std + 1e-4)).view(-1)
    raise ValueError(f"unknown advantage {kind!r}")


def token_weights(mask, aggregation, num_responses, num_tokens, response_length):
    """Weights w (B, T) of mask's (B, T) valid tokens, the loss Σ w · per-token loss, with N and Σ|y|
    of the whole minibatch (all micro-batches and ranks): sequence_mean 1 / (|y_i| · N) (GRPO),
    token_mean 1 / Σ|y| (DAPO), constant 1 / (N · --response-length) (Dr. GRPO)."""
    mask = mask.float()
    if aggregation == "sequence_mean":
        return mask / (mask.sum(1, keepdim=True).clamp(min=1) * num_responses)
    if aggregation == "token_mean":
        return mask / max(num_tokens, 1)  # 0: every response cut, with --mask-truncated
    if aggregation == "constant":
        return mask / (num_responses * response_length)
    raise ValueError(f"unknown loss aggregation {aggregation!r}")


def grpo_policy_loss(logprobs, old_logprobs, advantages, weights, clip_low, clip_high, level="token"):
    """PPO's clipped surrogate per token, max(−A·ρ, −A·clip(ρ, 1 − ε_low, 1 + ε_high)), summed with
    `weights` (B, T); logprobs, old_logprobs (B, T), advantages (B,). ρ = π/π_old per token, or with
    level="sequence" (GSPO, Zheng et al. 2025) exp(the mean of a response's log-ratios) -> (loss,
    detached means over the valid tokens: surrogate, approxkl ½(log ρ)², clipfrac, ratio)."""
    mask = weights > 0
    log_ratio = torch.where(mask, logprobs - old_logprobs, 0.0)
    if level == "sequence":
        mean_log_ratio = log_ratio.sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)
        log_ratio = torch.where(mask, mean_log_ratio, 0.0)
    ratio = log_ratio.exp()
    unclipped = -advantages[:, None] * ratio
    clipped = -advantages[:, None] * ratio.clamp(1 - clip_low, 1 + clip_high)
    surrogate = torch.max(unclipped, clipped)
    stats = {"surrogate": surrogate, "approxkl": 0.5 * log_ratio**2}
    stats |= {"clipfrac": (clipped > unclipped).float(), "ratio": ratio}
    return (weights * surrogate).sum(), {k: masked_mean(v, mask).detach() for k, v in stats.items()}


def k3(logprobs, ref_logprobs):
    """Schulman's k3 estimate of KL(π ‖ π_ref) per sampled token, (ρ − 1) − log ρ, ρ = π_ref/π; as
    GRPO's loss on samples of π, its expected gradient is KL(π_ref ‖ π)'s (docs/grpo.md)."""
    log_rho = ref_logprobs - logprobs
    return torch.expm1(log_rho) - log_rho


def overlong_penalty(lengths, max_tokens, buffer):
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13) of lengths (B,) ≤ max_tokens: 0 up to
    max_tokens − buffer, then linearly down to −1 at max_tokens."""
    return ((max_tokens - buffer - lengths) / buffer).clamp(-1.0, 0.0)


def masked_mean(x, mask):
    """Mean of x where mask (bool or 0/1) holds."""
    return torch.where(mask.bool(), x, 0.0).sum() / mask.sum().clamp(min=1)


def truncate_after_eos(responses, stop_ids, pad_id):
    """responses (B, T) -> (PAD after the first of stop_ids, mask (B, T) true through it, has_eos
    (B,)). A row without a stop id was cut at T: valid throughout."""
    is_eos = torch.isin(responses, torch.as_tensor(stop_ids, device=responses.device))
    mask = is_eos.cumsum(1) - is_eos.int() == 0  # no stop id before
    return torch.where(mask, responses, pad_id), mask, is_eos.any(1)


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


# ---- small model helpers ----
def score_responses(rm_scores, reward_fns, rows, texts, weights, iteration):
    """Step 2: the reward model's scores (B,) or None, and each reward function's values for texts
    answering rows -> (values (K, B), NaN where a reward does not apply; weighted sum (B,), NaN as 0)."""
    values = [] if rm_scores is None else [rm_scores.cpu()]
    if values and not values[0].isfinite().all():
        raise FloatingPointError(f"non-finite scores at iteration {iteration}: check --reward-model-name")
    by_reward = torch.stack(values + [reward_fn_values(fn, rows, texts) for fn in reward_fns])
    unscored = by_reward.isnan().all(0)
    if unscored.any():
        i = int(unscored.nonzero()[0])
        raise ValueError(f"no reward applies to sample {i} ({rows[i]} -> {texts[i]!r}): each returned None")
    return by_reward, (torch.tensor(weights)[:, None] * by_reward).nansum(0)


def model_inputs(query_ids, query_mask, responses, mask):
    """Inputs (B, Lq + T) for left-padded prompts (B, Lq), right-padded responses (B, T), positions as
    generate's; logits where position Lq − 1 + t predicts valid token t. Rollout and update share it."""
    seq_mask = torch.cat([query_mask.bool(), mask], 1).long()
    return {
        "input_ids": torch.cat([query_ids, responses], 1),
        "attention_mask": seq_mask,
        "position_ids": (seq_mask.cumsum(1) - 1).clamp(min=0),
        "logits_to_keep": F.pad(mask.bool(), (query_ids.shape[1] - 1, 1)),
    }


def policy_logits(model, queries, query_mask, responses, mask, group_size=1):
    """Logits (R, V) predicting mask's (B, T) valid tokens, row-major, of model_inputs' pass; with group_size
    G, rows in groups of G sharing a prompt: each prompt once, its last position predicting the first token,
    then the G responses on its cached keys and values (gradients flow back through the cache), as dpo.py."""
    inputs = model_inputs(queries, query_mask, responses, mask)
    if group_size == 1:
        return model(**inputs).logits
    Lq, rows = queries.shape[1], slice(None, None, group_size)  # one row per group
    prompt = model(
        input_ids=queries[rows],
        attention_mask=query_mask[rows],
        position_ids=inputs["position_ids"][rows, :Lq],
        use_cache=True,
        logits_to_keep=1,
    )
    prompt.past_key_values.batch_repeat_interleave(group_size)  # (B / G, ...) -> (B, ...)
    later = mask[:, 1:]  # (B, T − 1): the tokens after each response's first (always valid)
    rest = model(
        input_ids=responses,
        attention_mask=inputs["attention_mask"],
        position_ids=inputs["position_ids"][:, Lq:],
        past_key_values=prompt.past_key_values,
        logits_to_keep=F.pad(later, (0, 1)),  # response position t predicts token t + 1
    ).logits  # (R − B, V)
    # into mask's row-major order: each row's first token, then its later ones
    lengths = mask.sum(1)
    starts = lengths.cumsum(0) - lengths  # (B,)
    logits = rest.new_empty(len(rest) + len(starts), rest.shape[1])
    logits[starts] = prompt.logits[:, -1].repeat_interleave(group_size, 0)
    logits[(starts[:, None] + torch.arange(1, mask.shape[1], device=mask.device))[later]] = rest
    return logits


def prompt_sharing_off(config, args):
    """Why the prompt-once pass would not equal the concatenated one for this model, or None."""
    from transformers.cache_utils import DynamicCache, LinearAttentionCacheLayerMixin

    if args.gradient_checkpointing:
        return "--gradient-checkpointing recomputes activations without a cache"
    # transformers' linear-attention cache layers have no batch_repeat_interleave (hybrid ones repeat only K, V)
    if any(isinstance(layer, LinearAttentionCacheLayerMixin) for layer in DynamicCache(config=config).layers):
        return "its recurrent layers (linear attention, convolution, SSM) cache a state, not keys and values"
    ropes = getattr(config, "rope_parameters", None) or {}
    for rope in [ropes] if "rope_type" in ropes else ropes.values():  # one, or one per layer type
        limit = rope.get("original_max_position_embeddings", config.max_position_embeddings)
        if rope.get("rope_type") in ("dynamic", "longrope") and args.max_length > limit:
            # its frequencies follow the longest position in each call
            return f"its {rope['rope_type']} RoPE rescales past {limit} positions"
    return None


def scatter(values, mask):
    """values (R,) in the row-major order of mask's (B, T) True entries -> (B, T), 0 elsewhere."""
    return values.new_zeros(mask.shape).masked_scatter(mask, values)


def lr_multiplier(step, num_steps, args):
    """LR at `step` (from 0) over the peak: linear warmup, then a decay to 0 at step `num_steps`."""
    warmup = int(args.warmup_ratio * num_steps)
    progress = (step - warmup) / max(1, num_steps - warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    decay = {"cosine": cosine, "linear": 1 - progress, "constant": 1.0}
    return (step + 1) / warmup if step < warmup else decay[args.lr_schedule]


def accumulate(sums, stats, weight=1):
    """sums[name] += stats[name] · weight, for every name."""
    for name, value in stats.items():
        sums[name] = sums.get(name, 0) + value * weight


def all_reduce_sums(sums, device):
    """{name: sum} -> {name: float}, summed over the ranks in one all-reduce."""
    parts = [torch.as_tensor(v, dtype=torch.float32, device=device) for v in sums.values()]
    values = torch.stack(parts)
    if dist.is_initialized():
        dist.all_reduce(values)
    return dict(zip(sums, values.tolist()))


@contextlib.contextmanager
def gathered(model):
    """Under FSDP, weights gathered once for the block (every rank): no collective per token."""
    groups = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in groups:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    yield
    for m in groups:
        m.reshard()
        m.set_reshard_after_forward(True, recurse=False)


@dataclass
class Experience:
    """A rollout batch: B prompts, each with a sampled response (as tiny-grpo's)."""

    queries: torch.Tensor  # (B, Lq) prompt ids, left-padded
    query_mask: torch.Tensor  # (B, Lq)
    responses: torch.Tensor  # (B, T), PAD after the first end token
    mask: torch.Tensor  # (B, T) the valid tokens, end token included
    has_eos: torch.Tensor  # (B,) false: cut at T
    logprobs: torch.Tensor  # (B, T) log π_old
    entropy: torch.Tensor  # (B, T)
    ref_logprobs: torch.Tensor | None = None  # (B, T) log π_ref
    values: torch.Tensor | None = None  # (B, T) V before each token (PPO)
    scores: torch.Tensor | None = None  # (B,) the reward model's
    advantages: torch.Tensor | None = None  # (B, T) or (B,)
    returns: torch.Tensor | None = None  # (B, T) value targets (PPO)

    def __getitem__(self, rows):  # a minibatch: the fields at `rows` (an index tensor)
        return Experience(**{k: None if v is None else v[rows] for k, v in vars(self).items()})


@torch.no_grad()
def rollout(policy, ref_model, reward_model, queries, tokenizer, args, device, seed, value_fn=None):
    """Steps 1–2 for lists of prompt ids: responses sampled by --generation-batch-size, call j seeded
    with seed + j; then, by --rollout-forward-batch-size, per response token log π, log π_ref, the
    entropy, the value before it (value_fn), and the reward model's score at the last (None: no model)."""
    pad_id, temp, max_new = tokenizer.pad_token_id, args.temperature, args.response_length
    batch = common.collate_prompts(queries, pad_id)
    ids, ids_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)  # (B, Lq)
    chunks = []
    n = args.generation_batch_size
    with gathered(policy), torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
        for j, i in enumerate(range(0, len(queries), n)):
            torch.manual_seed(seed + j)
            s = slice(i, i + n)
            chunks.append(common.generate(policy, ids[s], ids_mask[s], tokenizer, max_new, temp))
    T = max(c.shape[1] for c in chunks)  # generate stops once every row of a call has ended
    responses = torch.cat([F.pad(c, (0, T - c.shape[1]), value=pad_id) for c in chunks])  # (B, T)
    stop_ids = common.stop_token_ids(tokenizer, policy)
    responses, mask, has_eos = truncate_after_eos(responses, stop_ids, pad_id)
    out = {k: [] for k in ("logprobs", "entropy", "ref_logprobs", "values", "scores")}
    for i in range(0, len(queries), args.rollout_forward_batch_size):
        s = slice(i, i + args.rollout_forward_batch_size)
        m = mask[s]
        fwd = model_inputs(ids[s], ids_mask[s], responses[s], m)
        tokens = responses[s][m]  # (R,)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            logprobs, entropy = logprobs_and_entropy(policy(**fwd).logits, tokens, temp, pad_id)
            out["logprobs"].append(scatter(logprobs, m))  # (b, T)
            out["entropy"].append(scatter(entropy, m))
            if ref_model is not None:
                logits = ref_model(**fwd).logits
                out["ref_logprobs"].append(scatter(logprobs_and_entropy(logits, tokens, temp, pad_id)[0], m))
            fwd.pop("logits_to_keep")
            if value_fn is not None:  # V(state before response token t), (b, T)
                out["values"].append(value_fn(**fwd)[:, ids.shape[1] - 1 : -1])
            if reward_model is not None:  # at the last real token (right padding), less the bias
                bias = getattr(reward_model.config, "reward_bias", 0.0)
                out["scores"].append(reward_model(**fwd).logits.squeeze(-1).float() - bias)
    out = {k: torch.cat(v) for k, v in out.items() if v}
    return Experience(ids, ids_mask, responses, mask, has_eos, **out)


def with_lora(model, args, head=False):
    """LoRA (Hu et al. 2021) on --lora-target-modules, all else frozen but the score head if `head`;
    B starts at 0: the model starts unchanged."""
    from peft import LoraConfig, get_peft_model

    if args.gradient_checkpointing:  # recomputed blocks need an input that requires grad
        model.enable_input_require_grads()
    targets = args.lora_target_modules
    tied = {"lm_head", "embed_tokens"} & set(targets)
    if tied and model.config.get_text_config().tie_word_embeddings:  # a merge would change both
        raise SystemExit(f"--lora-target-modules {' '.join(tied)}: the model ties its embeddings; drop it")
    heads = ["score"] if head else []
    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout)
    config.target_modules = targets[0] if targets == ["all-linear"] else targets
    config.modules_to_save = heads or None
    names = {n.rpartition(".")[2] for n, _ in model.named_modules()}
    routers = [m for m in ("router", "gate", "shared_expert_gate") if m in names]  # MoE: kept whole
    config.exclude_modules = routers + heads  # only those there: peft warns of others
    return get_peft_model(model, config)


def save_model(model, tokenizer, path, rank, args, last=False):
    """`save`; LoRA: the adapters to {path}/adapter and, with --lora-merge, the merged model to {path}
    (in place at the `last` save, else a copy)."""
    if not args.lora_r:
        return save(model, tokenizer, path, rank)
    if rank == 0:
        model.save_pretrained(f"{path}/adapter")
        tokenizer.save_pretrained(f"{path}/adapter")
    if args.lora_merge:
        save((model if last else copy.deepcopy(model)).merge_and_unload(), tokenizer, path, rank)


class AdaptersOff(torch.nn.Module):
    """A LoRA model with its adapters off: the frozen model it started from, no second copy (TRL's
    reference, #624). Held in a list: its parameters stay out of this module."""

    def __init__(self, model):
        super().__init__()
        self.lora = [model]
        self.config = model.config

    def forward(self, **inputs):
        with self.lora[0].disable_adapter(), torch.no_grad():
            return self.lora[0](**inputs)


# ---- plumbing: torchrun, FSDP2, saving, resuming (the same in every script) ----
def setup(args):
    """(rank, device); under torchrun the process group. Seeds torch with seed + rank."""
    if args.lora_r and args.fsdp:  # before any model loads
        raise SystemExit("--lora-r with --fsdp: not supported; train adapters with DDP (no --fsdp)")
    env = os.environ
    rank, args.world_size = int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1))
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{env.get('LOCAL_RANK', 0)}" if cuda else "cpu")
    if "LOCAL_RANK" in env:
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo")
    elif args.fsdp:
        raise SystemExit("--fsdp runs under torchrun: torchrun --nproc_per_node N <script> --fsdp")
    torch.manual_seed(args.seed + rank)
    return rank, device


def to_device(model, device, args):
    """Onto the device (DDP), or sharded by FSDP2: a group per decoder layer, then the root."""
    if not args.fsdp:
        return model.to(device)
    mesh = dist.init_device_mesh(device.type, (args.world_size,))  # each rank keeps 1/N
    bf16 = {"param_dtype": torch.bfloat16, "reduce_dtype": torch.float32} if args.bf16 else {}
    blocks = model._no_split_modules or ()
    for m in [m for m in model.modules() if type(m).__name__ in blocks] + [model]:
        fully_shard(m, mesh=mesh, mp_policy=MixedPrecisionPolicy(**bf16))
    return model


def save(model, tokenizer, path, rank):
    """save_pretrained on rank 0, a tied head once (all ranks call it: FSDP gathers)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    every = dict(model.named_parameters(remove_duplicate=False))
    tied = every.keys() - dict(model.named_parameters()).keys()  # a tied head's second name
    if rank == 0:
        model.save_pretrained(path, state_dict={k: v for k, v in state.items() if k not in tied})
        tokenizer.save_pretrained(path)


def save_checkpoint(path, model, optimizer, state, rank):
    """For --resume: weights, AdamW moments, trainer_state.json (steps reseed: no RNG state)."""
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=path)
    if rank == 0:  # written last: it marks the checkpoint complete
        with open(f"{path}/trainer_state.json", "w") as f:
            json.dump(state, f)


def load_checkpoint(output_dir, model, optimizer, run):
    """The last complete checkpoint of this `run` into model and optimizer; its trainer state."""
    done = sorted(glob.glob(f"{output_dir}/resume/*/trainer_state.json"))
    if not done:
        raise SystemExit(f"--resume: no complete checkpoint in {output_dir}/resume: --checkpoint-every")
    path = os.path.dirname(done[-1])
    with open(done[-1]) as f:
        state = json.load(f)
    if state["run"] != run:
        raise SystemExit(f"--resume: {path} is from a run of {state['run']}, not {run}: use its flags")
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.load({"model": model_state, "optim": optim_state}, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
    print(f"resumed from {path} at step {state['step']}")
    return state


# ---- end of plumbing ----


if __name__ == "__main__":
    args = tyro.cli(Args)
    on_toy = args.dataset_name == "toy"
    defaults = {"max_length": (64, 1024), "response_length": (24, 256), "num_epochs": (0.2, 1.0)}
    defaults |= {"learning_rate": (3e-4, 3e-6), "kl_coef": (1.0, 0.05)}
    lr_default = args.learning_rate is None
    for name, (toy, other) in defaults.items():  # the toy task's, else LMs'
        if getattr(args, name) is None:
            setattr(args, name, toy if on_toy else other)
    if args.lora_r and lr_default:  # LoRA wants ~10× full fine-tuning's rate (Schulman et al. 2025)
        args.learning_rate *= 10
    # each method's paper: GRPO a token mean per response, Lite PPO one over the minibatch, else constant
    by_paper = {"grpo": "sequence_mean", "batch_std": "token_mean"}
    args.loss_aggregation = args.loss_aggregation or by_paper.get(args.advantage, "constant")
    if args.cliprange_high is None:
        args.cliprange_high = args.cliprange
    if args.reward_model_name is None and not args.reward_fn:
        args.reward_model_name = os.path.join("runs", "models", "reward_model")
    reward_names = ["reward_model"] * bool(args.reward_model_name)
    reward_names += [spec.partition(":")[2] for spec in args.reward_fn]
    args.reward_weights = args.reward_weights or [1.0] * len(reward_names)
    if len(args.reward_weights) != len(reward_names):
        raise ValueError(f"--reward-weights: {len(reward_names)} needed, one per {', '.join(reward_names)}")
    G = args.group_size
    if G < 2 or args.batch_size % G or min(args.num_ppo_epochs, args.num_minibatches) < 1:
        raise ValueError("--group-size must be >= 2 and divide --batch-size; --num-ppo-epochs, --num-minibatches >= 1")
    if args.temperature <= 0 or args.response_length >= args.max_length:
        raise ValueError("--temperature must be > 0; --response-length < --max-length")
    if not 0 <= args.overlong_buffer < args.response_length:
        raise ValueError("--overlong-buffer is a number of tokens below --response-length (0: no overlong penalty)")
    rank, device = setup(args)
    args.minibatch_size = args.batch_size // args.num_minibatches
    mb_per_rank = args.minibatch_size // args.world_size
    pdbs = args.per_device_batch_size = args.per_device_batch_size or max(1, mb_per_rank)
    args.generation_batch_size = args.generation_batch_size or pdbs
    args.rollout_forward_batch_size = args.rollout_forward_batch_size or pdbs
    args.grad_accum_steps = args.minibatch_size // (pdbs * args.world_size)
    per_rank = args.batch_size // args.world_size
    uneven = per_rank % args.generation_batch_size or per_rank % G
    if args.batch_size % (args.num_minibatches * args.world_size * pdbs) or uneven:
        raise ValueError(
            "--batch-size must split into --num-minibatches x ranks x --per-device-batch-size, and a rank's"
            " prompts into --generation-batch-size"
        )

    # the prompts (each rank its slice of one seeded batch); reward functions checked before any model loads
    tokenizer = common.load_tokenizer(args.model_name, ": run `python sft.py` first, or pass --model-name")
    pad_id = tokenizer.pad_token_id
    split = args.dataset_train_split
    train_ds = common.load_splits(args.dataset_name, "prompt", split, seed=args.seed)[0]
    columns = [c for c in train_ds.column_names if c not in ("prompt", "messages")]
    reward_fns = load_reward_fns(args.reward_fn, columns)
    length = args.max_length - args.response_length
    prompts, kept, stats = common.tokenize_prompts(tokenizer, train_ds, length, args.truncation_mode)
    rows = train_ds.select(kept).to_list()  # each prompt's row
    args.num_iterations = int(args.num_epochs * len(prompts)) // args.batch_size
    if args.num_iterations < 1:
        raise ValueError(f"{len(prompts)} prompts make no iteration of --batch-size: raise --num-epochs")
    schedule = common.batch_schedule(len(prompts), args.batch_size // G, args.num_iterations, args.seed)
    if rank == 0:
        common.report("train prompts", stats)
    if on_toy:
        import toy_task  # the exact gold reward and log P_ref

    # policy, frozen reference (none at β = 0) and reward model (if any); no dropout (else the first ratio ≠ 1)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    if args.reward_model_name:  # it reads the policy's token ids
        hint = ": run `python reward_model.py` first, or pass --reward-model-name"
        if common.load_tokenizer(args.reward_model_name, hint).get_vocab() != tokenizer.get_vocab():
            raise ValueError(f"{args.reward_model_name}'s tokenizer is not {args.model_name}'s: train it from it")

    def load(cls, name, trained, **kwargs):
        """On the CPU with dropout off, then onto the device whole or in FSDP shards."""
        config = common.without_dropout(AutoConfig.from_pretrained(name, **kwargs))
        model = cls.from_pretrained(name, config=config, dtype=torch.float32)
        common.fit_model(model, tokenizer, args.max_length)
        if args.gradient_checkpointing and trained:
            model.gradient_checkpointing_enable()
        return to_device(model.train(trained).requires_grad_(trained), device, args)

    policy = load(AutoModelForCausalLM, args.model_name, True)
    if args.lora_r:
        policy = with_lora(policy, args)
    ref_model = reward_model = None
    if args.kl_coef:  # with LoRA: the policy with its adapters off, no second copy
        ref_model = AdaptersOff(policy) if args.lora_r else load(AutoModelForCausalLM, args.model_name, False)
    if args.reward_model_name:
        reward_model = load(AutoModelForSequenceClassification, args.reward_model_name, False, num_labels=1)
    train_policy = policy
    if args.world_size > 1 and not args.fsdp:
        train_policy = torch.nn.parallel.DistributedDataParallel(policy)
    why_not = prompt_sharing_off(policy.config, args)
    if pdbs % G:
        why_not = f"micro-batches of {pdbs} split groups of {G}"
    if args.share_prompt and why_not and rank == 0:
        print(f"--share-prompt is off: {why_not}; prompt and response are concatenated")
    args.share_prompt = args.share_prompt and not why_not
    shared = G if args.share_prompt else 1  # responses per prompt pass in the update

    # TRY NOT TO MODIFY: logging
    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        run_name = f"{args.exp_name}__{args.seed}__{int(time.time())}"
        if args.track:
            import wandb

            wandb.init(config=vars(args), name=run_name, sync_tensorboard=True)
        writer = SummaryWriter(f"runs/{run_name}")
        table = "\n".join(f"|{k}|{v}|" for k, v in vars(args).items())
        writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + table)
        sizes = f"{args.world_size} rank(s) x {args.grad_accum_steps} micro-batch(es) of {pdbs}"
        print(f"{run_name}: {len(prompts)} prompts, {args.num_iterations} iterations of {args.batch_size}, {sizes}")
        models = "policy, reference" if ref_model else "policy (β = 0: no reference)"
        models += ", reward model" if reward_model else ""
        if args.lora_r:
            models += f"; LoRA r={args.lora_r}, the reference the policy with its adapters off"
        models += f"; the update runs each prompt once for its {G} responses" if args.share_prompt else ""
        weighted = ", ".join(f"{w} × {n}" for w, n in zip(args.reward_weights, reward_names))
        print(f"models: {models}; rewards: {weighted}")

    optimizer = torch.optim.AdamW(
        policy.parameters(), args.learning_rate, eps=args.adam_eps, weight_decay=args.weight_decay
    )
    run = {"world_size": args.world_size, "num_iterations": args.num_iterations, "seed": args.seed}
    state = load_checkpoint(args.output_dir, policy, optimizer, run) if args.resume else {"step": 0}
    first_iteration = state["step"]
    logged = state.get("logged")  # the checkpoint's statistics: a run resumed at its end has them
    all_reduce = dist.all_reduce if dist.is_initialized() else None
    start = time.time()
    remaining = range(first_iteration, args.num_iterations)
    for iteration in tqdm(remaining, initial=first_iteration, disable=rank != 0):
        torch.manual_seed(hash((args.seed, rank, iteration)))  # resumable: from the iteration
        lr = args.learning_rate * lr_multiplier(iteration, args.num_iterations, args)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # 1. rollout: G responses per prompt, seeded per generate call of the global batch (1 rank or N
        # alike; 2**62: torch's 64 bits)
        indices = schedule[iteration][rank * per_rank // G : (rank + 1) * per_rank // G]  # this rank's
        queries = [prompts[i] for i in indices for _ in range(args.group_size)]
        seed = hash((args.seed, iteration)) % 2**62 + rank * per_rank // args.generation_batch_size
        policy.eval()
        batch = rollout(policy, ref_model, reward_model, queries, tokenizer, args, device, seed)
        policy.train()
        mask = batch.mask  # (b, T) the valid response tokens
        prompt_ids = [q[m.bool()] for q, m in zip(batch.queries, batch.query_mask)]
        prompt_texts = tokenizer.batch_decode(prompt_ids, skip_special_tokens=True)
        texts = tokenizer.batch_decode([y[m] for y, m in zip(batch.responses, mask)], skip_special_tokens=True)

        # 2. score: the reward model's and each reward function's (each rank its own), less the penalties
        my_rows = [rows[i] for i in indices for _ in range(args.group_size)]
        weights = args.reward_weights
        by_reward, scores = score_responses(batch.scores, reward_fns, my_rows, texts, weights, iteration)
        scores = scores.to(device)  # (b,)
        penalised = torch.where(batch.has_eos, scores, scores - args.missing_eos_penalty)
        if args.overlong_buffer:
            penalised += overlong_penalty(mask.sum(1).float(), args.response_length, args.overlong_buffer)

        # 3. the KL penalty: k1 summed over each response, in its reward (k3_loss: in the loss)
        seq_kl = torch.zeros_like(scores)
        if ref_model:
            seq_kl = torch.where(mask, batch.logprobs - batch.ref_logprobs, 0.0).sum(1)  # (b,)
        rewards = penalised - args.kl_coef * seq_kl if args.kl_penalty == "k1_reward" else penalised
        # 4. advantages: each response's reward against its group's
        batch.advantages = group_advantages(rewards, G, args.advantage, all_reduce)  # (b,)

        # 5. epochs of shuffled minibatches, each one step, its token losses weighted by --loss-aggregation
        loss_mask = mask & batch.has_eos[:, None] if args.mask_truncated else mask  # DAPO: cut: no loss
        update = {}  # token-weighted sums, by name
        for ppo_step in range(args.num_ppo_epochs * args.num_minibatches):
            if ppo_step % args.num_minibatches == 0:  # by groups, so a micro-batch holds whole ones (a group split
                # across micro-batches always splits the same way: its responses are exchangeable, nothing is lost)
                groups = torch.randperm(per_rank // G, device=device)
                perm = (groups[:, None] * G + torch.arange(G, device=device)).view(-1)  # (per_rank,)
            mb = perm[ppo_step % args.num_minibatches * mb_per_rank :][:mb_per_rank]
            mb_tokens = loss_mask[mb].sum().float()
            if all_reduce:
                all_reduce(mb_tokens)
            for k in range(args.grad_accum_steps):
                i = mb[k * pdbs : (k + 1) * pdbs]
                micro, m = batch[i], loss_mask[i]
                valid = micro.mask
                train_policy.require_backward_grad_sync = k == args.grad_accum_steps - 1  # DDP: once a step
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                    logits = policy_logits(
                        train_policy, micro.queries, micro.query_mask, micro.responses, valid, shared
                    )
                # as in the rollout: the first ratio is 1 (shared, in float32: to rounding; bf16: to ~1e-4)
                logprobs, entropy = logprobs_and_entropy(logits, micro.responses[valid], args.temperature, pad_id)
                logprobs = scatter(logprobs, valid)
                w = token_weights(m, args.loss_aggregation, args.minibatch_size, mb_tokens, args.response_length)
                clips = (args.cliprange, args.cliprange_high, args.importance_sampling_level)
                loss, pg_stats = grpo_policy_loss(logprobs, micro.logprobs, micro.advantages, w, *clips)
                stats = {"loss/policy": pg_stats.pop("surrogate")}
                stats["policy/entropy"] = masked_mean(scatter(entropy, valid), m).detach()
                stats |= {f"policy/{name}": v for name, v in pg_stats.items()}
                if ref_model:
                    kl = k3(logprobs, micro.ref_logprobs)  # (b, T) per token
                    stats["policy/k3"] = masked_mean(kl, m).detach()
                    if args.kl_penalty == "k3_loss":
                        loss = loss + args.kl_coef * (w * kl).sum()
                (loss * args.world_size).backward()  # DDP averages over ranks
                if ppo_step == k == 0:  # nothing updated yet since the rollout: π = π_old
                    first_ratio = pg_stats["ratio"]
                accumulate(update, stats, m.sum())
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm or math.inf)
            if not math.isfinite(grad_norm.item()):  # the same on every rank: all stop together
                raise FloatingPointError(f"non-finite gradient at iteration {iteration}: lower --learning-rate")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        # 6. log: means over every response or valid token of the iteration, on all ranks
        per_response = {"objective/scores": scores}
        per_response["objective/rlhf_reward"] = penalised - args.kl_coef * seq_kl
        if ref_model:
            per_response["objective/kl"] = seq_kl
        per_response["charts/eos_rate"] = batch.has_eos.float()
        per_response["charts/response_length"] = mask.sum(1).float()
        zero_std = scores.view(-1, G).std(1) == 0  # all tie: only k1 tells them apart
        per_response["charts/zero_std_groups"] = zero_std.float().repeat_interleave(G)
        if on_toy:  # exact: the gold reward, and the KL to P_ref of each sample
            logp = torch.where(mask, batch.logprobs, 0.0).sum(1).tolist()
            ref_logp = [toy_task.ref_logprob(q, t, args.response_length) for q, t in zip(prompt_texts, texts)]
            per_response["toy/gold_reward"] = torch.tensor(toy_task.gold_reward(prompt_texts, texts))
            per_response["toy/kl_to_ref"] = torch.tensor(logp) - torch.tensor(ref_logp)
        sums = {k: v.float().sum() for k, v in per_response.items()}
        for name, v in zip(reward_names, by_reward):  # each reward's mean where it applies
            sums[f"rewards/{name}"] = v.nansum()
            sums[f"applies/{name}"] = (~v.isnan()).sum()
        sums |= {"tokens": mask.sum(), "loss_tokens": loss_mask.sum(), "entropy": batch.entropy[mask].sum()}
        sums["first_ratio"] = first_ratio / args.world_size
        totals = all_reduce_sums(sums | update, device)
        logged = {k: totals[k] / args.batch_size for k in per_response}
        for name in reward_names:
            logged[f"rewards/{name}"] = totals[f"rewards/{name}"] / max(1, totals[f"applies/{name}"])
        loss_tokens = args.num_ppo_epochs * max(1, totals["loss_tokens"])  # 0: --mask-truncated, all cut
        logged |= {k: v / loss_tokens for k, v in totals.items() if k in update}
        logged["objective/entropy"] = totals["entropy"] / totals["tokens"]
        logged["objective/kl_coef"] = args.kl_coef
        logged["policy/first_minibatch_ratio"] = totals["first_ratio"]  # 1: π computed alike
        logged["charts/learning_rate"] = lr
        speed = (iteration + 1 - first_iteration) / (time.time() - start)
        logged["charts/episodes_per_sec"] = speed * args.batch_size
        episodes = (iteration + 1) * args.batch_size
        if writer:
            for name, value in logged.items():
                writer.add_scalar(name, value, episodes)
            samples = [f"**{q}** → {t} (score {x:.2f})" for q, t, x in zip(prompt_texts, texts, scores.tolist())]
            writer.add_text("samples", "\n\n".join(samples[:4]), episodes)
            score, mean_kl = logged["objective/scores"], logged.get("objective/kl", 0.0)
            ratio = logged["policy/first_minibatch_ratio"]
            tqdm.write(f"iteration {iteration + 1}: score {score:.3f}, kl {mean_kl:.3f}, ratio {ratio:.6f}")
        if args.save_every and (iteration + 1) % args.save_every == 0:
            path = os.path.join(args.output_dir, "checkpoints", f"episode_{episodes:07d}")
            save_model(policy, tokenizer, path, rank, args)
        if args.checkpoint_every and (iteration + 1) % args.checkpoint_every == 0:
            path = os.path.join(args.output_dir, "resume", f"step_{iteration + 1:07d}")
            state = {"step": iteration + 1, "run": run, "logged": logged}
            save_checkpoint(path, policy, optimizer, state, rank)

    # the policy, its tokenizer and the last iteration's statistics, where evaluate.py looks
    save_model(policy, tokenizer, args.output_dir, rank, args, last=True)
    if rank == 0:
        with open(os.path.join(args.output_dir, "training_args.json"), "w") as f:
            json.dump({"args": vars(args), "result": logged}, f, indent=2, default=str)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # bytes, the peak (Linux)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device)
        print(f"saved to {args.output_dir}; peak memory of rank 0: {peak / 2**30:.2f} GiB")
        writer.close()
    if dist.is_initialized():  # all wait for rank 0's save; DDP's reducer goes before the group
        dist.barrier()
        del train_policy
        dist.destroy_process_group()
