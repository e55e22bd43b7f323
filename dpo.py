"""Direct Preference Optimization (Rafailov et al. 2023, eq. 7) and IPO, cDPO, hinge, robust DPO, RPO:
−log σ(r̂_c − r̂_r) with the implied reward r̂ = β log π/π_ref, from the SFT model. See docs/dpo.md.

    python dpo.py  # from runs/models/sft on the toy task's pairs, β = 1, CPU, ~3 minutes
    torchrun --nproc_per_node 8 dpo.py --dataset-name trl-lib/tldr-preference --beta 0.05 \
        --learning-rate 3e-6 --per-device-batch-size 4 --max-length 640 --bf16 --track
"""

import copy
import glob
import json
import math
import os
import resource
import time
from dataclasses import dataclass, field
from typing import Literal

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
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from tqdm import tqdm

import common


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
    """Hub id or folder of the model to start from (sft.py's) and its reference"""
    dataset_name: str = "toy"
    """toy, a .json/.jsonl/.parquet/.csv file/folder or Hub id: prompt, chosen, rejected"""
    dataset_train_split: str = "train"
    """split to train on"""
    dataset_eval_split: str = "test"
    """held-out split; without one, 5% of the training split"""
    max_length: int | None = None
    """tokens per sequence (prompt, response, end token); default 64 on toy, else 1024"""
    truncation_mode: Literal["drop", "keep_end"] = "drop"
    """a pair over --max-length: dropped, or its prompt's oldest tokens cut (keep_end)"""
    batch_size: int = 64
    """pairs per optimizer step, summed over ranks and micro-batches"""
    per_device_batch_size: int | None = None
    """pairs per forward pass on a device (the rest: accumulation); default batch / ranks"""
    num_epochs: float = 1.0
    """passes over the training split"""
    learning_rate: float | None = None
    """peak AdamW rate; default 5e-4 on toy, else 3e-6 (Huang et al. 2024); LoRA: 10×"""
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """decay after the warmup, to 0 one step after the last"""
    warmup_ratio: float = 0.0
    """share of steps warming the learning rate up linearly from 0"""
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
    """dropout on the adapters' input"""
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """modules given adapters; all-linear: all linear layers but the LM head and MoE routers"""
    lora_merge: bool = True
    """with --lora-r, save the merged model (adapters: {output_dir}/adapter)"""
    eval_every: int = 100
    """optimizer steps between evaluations on the held-out pairs"""

    # ---- DPO ----
    beta: float | None = None
    """β of the KL regularisation; default 1 on the toy task, else 0.05 (Huang et al. 2024)"""
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid"
    """sigmoid: DPO (cDPO with --label-smoothing), ipo: IPO, hinge: SLiC-HF, robust: robust DPO"""
    label_smoothing: float = 0.0
    """probability ε in [0, 0.5) that a label is flipped (sigmoid: cDPO; robust: the noise rate)"""
    rpo_alpha: float = 0.0
    """weight α of the chosen responses' token-mean NLL added to the loss (RPO, Pang et al. 2024)"""
    share_prompt: bool = True
    """run each prompt once, both responses on its cached keys and values (off where not exact)"""
    precompute_ref_logprobs: bool = False
    """compute the reference's log-probabilities before training, then free the reference model"""

    # ---- derived after parsing, not flags ----
    world_size: tyro.conf.Suppress[int] = 1
    grad_accum_steps: tyro.conf.Suppress[int] = 1
    num_steps: tyro.conf.Suppress[int] = 0


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, loss_type="sigmoid", label_smoothing=0.0):
    """Per-pair losses and implicit rewards from (B,) sequence log-probabilities (IPO: token
    means). h = (π_c − ref_c) − (π_r − ref_r), ε = label_smoothing:
      sigmoid: −(1−ε) log σ(βh) − ε log σ(−βh)              DPO eq. 7 (ε = 0), cDPO (ε > 0)
      ipo:     (h − 1/(2β))²                                 Azar et al. 2023, eq. 17
      hinge:   max(0, 1 − βh)                                 SLiC-HF, Zhao et al. 2023
      robust:  (−(1−ε) log σ(βh) + ε log σ(−βh)) / (1−2ε)    Chowdhury et al. 2024, eq. 5
    Returns losses (B,), chosen and rejected rewards β(π − ref) (B,), detached."""
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    eps = label_smoothing
    as_given = F.logsigmoid(beta * h)
    flipped = F.logsigmoid(-beta * h)
    if loss_type == "sigmoid":
        losses = -(1 - eps) * as_given - eps * flipped
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    elif loss_type == "robust":
        losses = (-(1 - eps) * as_given + eps * flipped) / (1 - 2 * eps)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    return losses, beta * (policy_chosen - ref_chosen).detach(), beta * (policy_rejected - ref_rejected).detach()


def token_logprobs(logits, targets, chunk_size=1024):
    """logits (R, V), targets (R,) -> float32 log p(target) (R,), by chunks of rows recomputed in
    backward: no float32 copy of all R × V logits."""

    def chunk(x, y):
        x = x.float()
        return x.gather(1, y[:, None]).squeeze(1) - x.logsumexp(-1)

    grad = torch.is_grad_enabled() and logits.requires_grad
    out = [
        torch.utils.checkpoint.checkpoint(chunk, x, y, use_reentrant=False) if grad else chunk(x, y)
        for x, y in zip(logits.split(chunk_size), targets.split(chunk_size))
    ]  # R = 0: one empty chunk
    return torch.cat(out)


def scatter(values, mask):
    """values (R,) in the row-major order of mask's (B, T) True entries -> (B, T), 0 elsewhere."""
    return values.new_zeros(mask.shape).masked_scatter(mask, values)


def collate_concatenated(pairs, pad_id):
    """B pairs -> right-padded input_ids, attention_mask, labels (−100 on prompt and padding),
    (2B, L): row 2i prompt i + chosen i, row 2i + 1 prompt i + rejected i."""
    seqs = [p["prompt"] + p[k] for p in pairs for k in ("chosen", "rejected")]
    labels = [[common.IGNORE_INDEX] * len(p["prompt"]) + p[k] for p in pairs for k in ("chosen", "rejected")]
    return {
        "input_ids": common.pad(seqs, pad_id),
        "attention_mask": common.attention_mask(seqs),
        "labels": common.pad(labels, common.IGNORE_INDEX),
    }


def collate_shared_prompts(pairs, pad_id):
    """B pairs -> the prompts left-padded: prompt_ids, prompt_mask, prompt_positions (B, P); the
    responses right-padded: response_ids, response_mask, response_positions (2B, T), row 2i chosen i,
    2i + 1 rejected i (batch_repeat_interleave's order)."""
    prompts = [p["prompt"] for p in pairs]
    responses = [p[k] for p in pairs for k in ("chosen", "rejected")]
    prompt_mask = common.attention_mask(prompts, "left")
    response_mask = common.attention_mask(responses)
    # positions count each row's real tokens; padding gets 0 (no dynamic RoPE rescales for it)
    start = prompt_mask.sum(1).repeat_interleave(2)[:, None]  # (2B, 1)
    return {
        "prompt_ids": common.pad(prompts, pad_id, "left"),
        "prompt_mask": prompt_mask,
        "prompt_positions": (prompt_mask.cumsum(1) - 1).clamp(min=0),
        "response_ids": common.pad(responses, pad_id),
        "response_mask": response_mask,
        "response_positions": (start + torch.arange(response_mask.shape[1])) * response_mask,
    }


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


def pair_logprobs(model, batch, bf16=False, average=False):
    """(chosen (B,), rejected (B,), chosen token counts (B,)): the responses' log-probabilities
    (`average`: token means, IPO) from a collate_concatenated or collate_shared_prompts batch."""
    with torch.autocast(next(iter(batch.values())).device.type, dtype=torch.bfloat16, enabled=bf16):
        if "prompt_ids" not in batch:
            labels = batch["labels"][:, 1:]  # (2B, L-1): position t predicts token t + 1
            keep = labels != common.IGNORE_INDEX
            logits = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                logits_to_keep=F.pad(keep, (0, 1)),
            ).logits  # (R, V): R response tokens, row-major
            logprobs = scatter(token_logprobs(logits, labels[keep]), keep).sum(-1)  # (2B,)
            counts = keep.sum(-1)  # (2B,)
        else:
            # a) the prompts once (B rows), keeping their keys and values; the last column predicts token 0
            prompt = model(
                input_ids=batch["prompt_ids"],
                attention_mask=batch["prompt_mask"],
                position_ids=batch["prompt_positions"],
                use_cache=True,
                logits_to_keep=1,
            )
            cache = prompt.past_key_values
            cache.batch_repeat_interleave(2)  # (B, ...) -> (2B, ...): one per response
            # b) both responses on top; gradients flow back through the cache into the prompt
            ids = batch["response_ids"]  # (2B, T)
            mask = batch["response_mask"].bool()
            later = mask[:, 1:]  # (2B, T-1): the response tokens after the first
            rest = model(
                input_ids=ids,
                attention_mask=torch.cat([batch["prompt_mask"].repeat_interleave(2, 0), batch["response_mask"]], 1),
                position_ids=batch["response_positions"],
                past_key_values=cache,
                logits_to_keep=F.pad(later, (0, 1)),  # response position t predicts token t + 1
            ).logits  # (R', V)
            first = token_logprobs(prompt.logits[:, -1].repeat_interleave(2, 0), ids[:, 0])  # (2B,)
            logprobs = first + scatter(token_logprobs(rest, ids[:, 1:][later]), later).sum(-1)
            counts = mask.sum(-1)
    if average:
        logprobs = logprobs / counts
    return logprobs[0::2], logprobs[1::2], counts[0::2]  # chosen rows even, rejected odd


def lr_multiplier(step, num_steps, args):
    """LR at `step` (from 0) over the peak: linear warmup, then a decay to 0 at step `num_steps`."""
    warmup = int(args.warmup_ratio * num_steps)
    progress = (step - warmup) / max(1, num_steps - warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    decay = {"cosine": cosine, "linear": 1 - progress, "constant": 1.0}
    return (step + 1) / warmup if step < warmup else decay[args.lr_schedule]


@torch.no_grad()
def all_pair_logprobs(model, pairs, pad_id, args, device, rank):
    """(2, P) chosen and rejected log-probabilities of every pair, in eval mode; each rank a share,
    summed over ranks."""
    was_training = model.training
    model.eval()
    out = torch.zeros(2, len(pairs), device=device)
    collate = collate_shared_prompts if args.share_prompt else collate_concatenated
    mine = list(range(rank, len(pairs), args.world_size))
    # as many forward passes on every rank (under FSDP each is a collective)
    for i in range(0, math.ceil(len(pairs) / args.world_size), args.per_device_batch_size):
        idx = mine[i : i + args.per_device_batch_size]
        batch = collate([pairs[j] for j in idx or [0]], pad_id)  # a rank out of pairs keeps none
        batch = {k: v.to(device) for k, v in batch.items()}
        chosen, rejected, _ = pair_logprobs(model, batch, args.bf16, args.loss_type == "ipo")
        out[:, idx] = torch.stack([chosen, rejected])[:, : len(idx)]
    if dist.is_initialized():
        dist.all_reduce(out)
    model.train(was_training)
    return out


@torch.no_grad()
def pair_metrics(losses, chosen_rewards, rejected_rewards, chosen, rejected, chosen_nll):
    """The logged statistics of B pairs by name, sums over the pairs, from (B,) tensors."""
    return {
        "loss": losses.sum(),
        "rewards/chosen": chosen_rewards.sum(),
        "rewards/rejected": rejected_rewards.sum(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum(),
        "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
        "logprobs/chosen": chosen.sum(),
        "logprobs/rejected": rejected.sum(),
        "nll/chosen": chosen_nll.sum(),
    }


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
    lr_default = args.learning_rate is None
    defaults = {"max_length": (64, 1024), "learning_rate": (5e-4, 3e-6), "beta": (1.0, 0.05)}
    for name, (toy, other) in defaults.items():  # the toy task's, else pretrained LMs'
        if getattr(args, name) is None:
            setattr(args, name, toy if on_toy else other)
    if args.lora_r and lr_default:  # LoRA wants ~10× the rate (Schulman et al. 2025; TRL #4207)
        args.learning_rate *= 10
    smoothed = args.loss_type in ("sigmoid", "robust")
    if not 0 <= args.label_smoothing < 0.5 or (args.label_smoothing and not smoothed):
        raise ValueError("--label-smoothing is a flip probability in [0, 0.5) for --loss-type sigmoid (cDPO) or robust")
    average = args.loss_type == "ipo"  # IPO's log-probabilities are token means
    rank, device = setup(args)
    per_device = args.per_device_batch_size = args.per_device_batch_size or max(1, args.batch_size // args.world_size)
    args.grad_accum_steps, rest = divmod(args.batch_size, per_device * args.world_size)
    if rest or not args.grad_accum_steps:
        raise ValueError(f"--batch-size must be a multiple of --per-device-batch-size x {args.world_size} ranks")

    # 1. the policy and its frozen reference, both from the SFT model, dropout off (so π = π_ref)
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = common.load_tokenizer(args.model_name, ": run `python sft.py` first, or pass --model-name")
    config = common.without_dropout(AutoConfig.from_pretrained(args.model_name))
    models = []
    for trained in [True] if args.lora_r else [True, False]:  # each onto the device in turn
        m = AutoModelForCausalLM.from_pretrained(args.model_name, config=config, dtype=torch.float32)
        common.fit_model(m, tokenizer, args.max_length)
        if args.gradient_checkpointing and trained:
            m.gradient_checkpointing_enable()
        models.append(to_device(m.train(trained).requires_grad_(trained), device, args))
    model = train_model = with_lora(models[0], args) if args.lora_r else models[0]
    ref_model = AdaptersOff(model) if args.lora_r else models[1]  # LoRA: the policy, adapters off
    if args.world_size > 1 and not args.fsdp:
        train_model = torch.nn.parallel.DistributedDataParallel(model)

    # 2. the prompt once, unless a stated rule says otherwise
    why_not = prompt_sharing_off(config, args)
    if args.share_prompt and why_not and rank == 0:
        print(f"--share-prompt is off: {why_not}; prompt and response are concatenated")
    args.share_prompt = args.share_prompt and not why_not
    collate = collate_shared_prompts if args.share_prompt else collate_concatenated

    # 3. data: prompt + chosen, prompt + rejected, each with its end token; ties, long pairs dropped
    train_ds, eval_ds = common.load_splits(
        args.dataset_name, "preference", args.dataset_train_split, args.dataset_eval_split, seed=args.seed
    )
    cut = (args.max_length, args.truncation_mode)
    train_pairs, train_stats = common.tokenize_preferences(tokenizer, train_ds, *cut)
    eval_pairs, eval_stats = common.tokenize_preferences(tokenizer, eval_ds, *cut)
    if rank == 0:
        common.report("train pairs", train_stats)
        common.report("eval pairs", eval_stats)
    args.num_steps = int(args.num_epochs * len(train_pairs)) // args.batch_size
    if args.num_steps < 1:
        raise ValueError(f"{len(train_pairs)} training pairs make no step of --batch-size: raise --num-epochs")
    schedule = common.batch_schedule(len(train_pairs), args.batch_size, args.num_steps, args.seed)
    # micro-batches of like lengths: less padding
    lengths = [len(p["prompt"]) + max(len(p["chosen"]), len(p["rejected"])) for p in train_pairs]
    schedule = [common.group_by_length(b, lengths, per_device, args.world_size) for b in schedule]
    pad_id = tokenizer.pad_token_id
    # the reference's log-probabilities (2, P): of the eval pairs now; of the training pairs now or per batch
    ref_eval = all_pair_logprobs(ref_model, eval_pairs, pad_id, args, device, rank)
    ref_train = None
    if args.precompute_ref_logprobs:
        ref_train = all_pair_logprobs(ref_model, train_pairs, pad_id, args, device, rank)
        del ref_model
    eval_chosen_tokens = torch.tensor([len(p["chosen"]) for p in eval_pairs], device=device)

    def evaluate():
        """Held-out means of pair_metrics."""
        chosen, rejected = all_pair_logprobs(model, eval_pairs, pad_id, args, device, rank)
        losses, *rewards = dpo_loss(chosen, rejected, *ref_eval, args.beta, args.loss_type, args.label_smoothing)
        sums = pair_metrics(losses, *rewards, chosen, rejected, -(chosen if average else chosen / eval_chosen_tokens))
        return {name: (value / len(eval_pairs)).item() for name, value in sums.items()}

    # TRY NOT TO MODIFY: logging
    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        run_name = f"{args.exp_name}__{args.seed}__{int(time.time())}"
        if args.track:
            import wandb

            wandb.init(config=vars(args), name=run_name, sync_tensorboard=True)
        writer = SummaryWriter(f"runs/{run_name}")
        table = "".join(f"\n|{k}|{v}|" for k, v in vars(args).items())
        writer.add_text("hyperparameters", "|param|value|\n|-|-|" + table)
        how = "each prompt run once for both responses" if args.share_prompt else "prompt and response concatenated"
        if args.lora_r:
            how += f"; LoRA r={args.lora_r}, the reference the policy with its adapters off"
        print(f"{run_name}: {len(train_pairs)} train / {len(eval_pairs)} eval pairs, {args.num_steps} steps")
        print(f"{args.world_size} rank(s) x {args.grad_accum_steps} micro-batch(es) of {per_device}, {how}")

    optimizer = torch.optim.AdamW(
        model.parameters(), args.learning_rate, eps=args.adam_eps, weight_decay=args.weight_decay
    )
    run = {"world_size": args.world_size, "num_steps": args.num_steps, "seed": args.seed}
    first_step = load_checkpoint(args.output_dir, model, optimizer, run)["step"] if args.resume else 0
    if first_step == 0:
        initial = evaluate()  # the policy is the reference: each loss is its value at h = 0
        if rank == 0:
            print(f"at initialisation: eval/loss {initial['loss']:.4f} (ln 2 = {math.log(2):.4f})")
    log_every = 10  # optimizer steps between logs of the train/ statistics
    per_rank = args.batch_size // args.world_size
    start = time.time()
    tokens_seen = 0
    log_stats, log_pairs = {}, 0
    for step in tqdm(range(first_step, args.num_steps), initial=first_step, total=args.num_steps, disable=rank != 0):
        torch.manual_seed(hash((args.seed, rank, step)))  # resumable
        lr = args.learning_rate * lr_multiplier(step, args.num_steps, args)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # 4. one optimizer step: each rank its slice of the global batch, in micro-batches; each
        # micro-batch's sum over pairs divided by the global batch size: a mean over all its pairs
        global_batch = [train_pairs[i] for i in schedule[step]]
        rank_indices = schedule[step][rank * per_rank : (rank + 1) * per_rank]
        step_stats = {}
        for k in range(args.grad_accum_steps):
            idx = rank_indices[k * per_device : (k + 1) * per_device]
            batch = collate([train_pairs[i] for i in idx], pad_id)
            batch = {key: v.to(device) for key, v in batch.items()}
            if ref_train is not None:
                ref_logprobs = ref_train[:, idx]  # (2, b): chosen, rejected
            else:
                with torch.no_grad():
                    ref_logprobs = pair_logprobs(ref_model, batch, args.bf16, average)[:2]
            train_model.require_backward_grad_sync = k == args.grad_accum_steps - 1  # DDP: once a step
            chosen, rejected, chosen_tokens = pair_logprobs(train_model, batch, args.bf16, average)
            losses, *rewards = dpo_loss(
                chosen, rejected, *ref_logprobs, args.beta, args.loss_type, args.label_smoothing
            )
            chosen_nll = -(chosen if average else chosen / chosen_tokens)  # a token mean per pair
            # RPO adds α × the chosen NLL; × world_size: DDP averages over ranks
            ((losses + args.rpo_alpha * chosen_nll).sum() / args.batch_size * args.world_size).backward()
            accumulate(step_stats, pair_metrics(losses, *rewards, chosen, rejected, chosen_nll))
        step_stats = all_reduce_sums(step_stats, device)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm or math.inf)
        if not math.isfinite(step_stats["loss"] + grad_norm.item()):  # the same on every rank
            raise FloatingPointError(f"non-finite loss or gradient at step {step}, not applied: lower --learning-rate")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # 5. log: pair-weighted means over all steps since the last log
        accumulate(log_stats, step_stats)
        log_pairs += args.batch_size
        tokens_seen += sum(len(p["prompt"] * 2 + p["chosen"] + p["rejected"]) for p in global_batch)
        seen = (step + 1) * args.batch_size  # pairs
        if writer and ((step + 1) % log_every == 0 or step + 1 == args.num_steps):
            for name, value in log_stats.items():
                writer.add_scalar(f"train/{name}", value / log_pairs, seen)
            writer.add_scalar("train/learning_rate", lr, seen)
            writer.add_scalar("charts/tokens_per_sec", tokens_seen / (time.time() - start), seen)
            log_stats, log_pairs = {}, 0
        if args.checkpoint_every and (step + 1) % args.checkpoint_every == 0:
            path = os.path.join(args.output_dir, "resume", f"step_{step + 1:07d}")
            save_checkpoint(path, model, optimizer, {"step": step + 1, "run": run}, rank)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.num_steps:
            final = evaluate()
            if writer:
                for name, value in final.items():
                    writer.add_scalar(f"eval/{name}", value, seen)
                tqdm.write(
                    f"step {step + 1}: eval/loss {final['loss']:.4f}, accuracy {final['rewards/accuracies']:.4f}, "
                    f"margin {final['rewards/margins']:.4f}"
                )

    if first_step == args.num_steps:  # resumed from the final checkpoint
        final = evaluate()

    # 6. save the policy, its tokenizer and the results (evaluate.py measures it against the optimum)
    save_model(model, tokenizer, args.output_dir, rank, args, last=True)
    if rank == 0:
        with open(os.path.join(args.output_dir, "training_args.json"), "w") as f:
            json.dump({"args": vars(args), "result": final}, f, indent=2, default=str)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # bytes (Linux)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device)
        print(f"saved to {args.output_dir}: {final}; peak memory of rank 0: {peak / 2**30:.2f} GiB")
        writer.close()
    # every rank waits for rank 0's save; DDP's reducer freed before the process group
    if dist.is_initialized():
        dist.barrier()
        del train_model
        dist.destroy_process_group()
