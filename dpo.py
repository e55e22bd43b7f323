"""Direct Preference Optimization (DPO) and its main variants: IPO, cDPO, hinge (SLiC), robust DPO, RPO.

Rafailov et al. 2023: the KL-regularised RLHF objective max E[r] − β KL(π ‖ π_ref) has the optimum
π*(y|x) ∝ π_ref(y|x) exp(r(x,y)/β) (their eq. 4), so the reward is implied by the policy,
r̂(x,y) = β log π(y|x)/π_ref(y|x) + const, and the Bradley–Terry likelihood of the preferences
can be maximised over π directly (their eq. 7): loss = −log σ(r̂(x,y_c) − r̂(x,y_r)). The policy
starts from the SFT model; a frozen copy of it is the reference π_ref. Sequence log-probabilities
sum over the response tokens and their end token only; the shared prompt runs through each model
once, and both responses on its cached keys and values.

    # default: from runs/models/sft (run `python sft.py` first) on the toy task's pairs, CPU
    python dpo.py
    # real scale (one node, 8 GPUs): Pythia 1B SFT model on TL;DR preference pairs
    torchrun --nproc_per_node 8 dpo.py --model-name runs/models/sft --dataset-name trl-lib/tldr-preference \
        --beta 0.05 --learning-rate 3e-6 --batch-size 64 --per-device-batch-size 4 --max-length 640 --bf16 --track
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
    """Hub id or local folder of the model to start from (default: the output of sft.py)"""
    dataset_name: str = "toy"
    """toy (the embedded task), a local .json/.jsonl/.parquet/.csv file or folder, or a Hub id; columns prompt, chosen, rejected"""
    dataset_train_split: str = "train"
    """split to train on"""
    dataset_eval_split: str = "test"
    """held-out split; if the dataset lacks it, 5% of the training split is held out"""
    max_length: Optional[int] = None
    """tokens per sequence (prompt + response + end token); default 64 on the toy task, 1024 otherwise"""
    truncation_mode: Literal["drop", "keep_end"] = "drop"
    """a pair over --max-length: drop it, or keep_end: cut its prompt's oldest tokens after the BOS (long chat
    histories); pairs whose responses alone do not fit are dropped; all counted and reported"""
    batch_size: int = 64
    """preference pairs per optimizer step, summed over all ranks and micro-batches"""
    per_device_batch_size: Optional[int] = None
    """pairs per forward/backward pass on one device (the rest of --batch-size is gradient accumulation);
    default --batch-size / the number of ranks"""
    num_epochs: float = 1.0
    """passes over the training split (fractions allowed)"""
    learning_rate: Optional[float] = None
    """peak AdamW learning rate; default 5e-4 on the toy task, 3e-6 otherwise (Huang et al. 2024; 5e-7 for Zephyr-7B)"""
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """decay of the learning rate after warmup, down to 0 at the last step"""
    warmup_ratio: float = 0.0
    """fraction of the optimizer steps spent warming the learning rate up linearly from 0"""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay"""
    adam_eps: float = 1e-5
    """AdamW epsilon (1e-5 as in Huang et al. 2024)"""
    max_grad_norm: float = 1.0
    """clip the global gradient norm to this (0 disables clipping)"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass: less memory, ~30% more compute"""
    eval_every: int = 100
    """optimizer steps between held-out evaluations"""

    # ---- DPO ----
    beta: Optional[float] = None
    """strength β of the KL regularisation: the policy aims at π_ref·exp(r/β). Default 1.0 on the toy task, whose
    annotators' rewards have unit scale; 0.05 otherwise (Huang et al. 2024; 0.01–0.5 is usual for LLMs)"""
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid"
    """sigmoid: DPO (cDPO with label smoothing); ipo: Azar et al. 2023; hinge: SLiC-HF; robust: Chowdhury et al. 2024"""
    label_smoothing: float = 0.0
    """assumed probability ε that a preference label is flipped (sigmoid: cDPO; robust: the noise rate), in [0, 0.5)"""
    rpo_alpha: float = 0.0
    """weight α of the chosen responses' token-mean NLL added to the loss (RPO, Pang et al. 2024); 0 disables it"""
    share_prompt: bool = True
    """run each prompt once and both responses on its cached keys and values instead of prompt + chosen and
    prompt + rejected (equal log-probabilities; off with --gradient-checkpointing and dynamic RoPE past its range)"""
    precompute_ref_logps: bool = False
    """compute the reference log-probabilities once before training and free the reference model (saves memory)"""
    num_toy_samples: int = 1000
    """toy task only: held-out prompts sampled at the end to measure the gold reward and the exact KL to P_ref"""

    # ---- derived right after parsing (not flags) ----
    world_size: tyro.conf.Suppress[int] = 1
    grad_accum_steps: tyro.conf.Suppress[int] = 1
    num_steps: tyro.conf.Suppress[int] = 0


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
             loss_type="sigmoid", label_smoothing=0.0):
    """Per-pair preference losses and implicit rewards.

    All four inputs are (B,) sequence log-probabilities (sums over response tokens; length-averaged
    for IPO). With h = (π_c − ref_c) − (π_r − ref_r) and ε = label_smoothing:
      sigmoid: −(1−ε) log σ(βh) − ε log σ(−βh)          DPO eq. 7 (ε = 0), cDPO (ε > 0)
      ipo:     (h − 1/(2β))²                             Azar et al. 2023, eq. 17
      hinge:   max(0, 1 − βh)                             SLiC-HF, Zhao et al. 2023
      robust:  (−(1−ε) log σ(βh) + ε log σ(−βh)) / (1−2ε) Chowdhury et al. 2024, eq. 5
    Returns (losses (B,), chosen_rewards (B,), rejected_rewards (B,)); the rewards β(π − ref) are
    detached. The caller reduces the losses (a mean over pairs)."""
    h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def sequence_logps(logits, labels, average=False):
    """Sum (or, with `average`, mean) over each row's labelled tokens of log p(token).

    logits: (N, L, V), position t predicting token t + 1; labels: (N, L) aligned with the input ids,
    −100 on the prompt and padding. Returns (logps (N,), token counts (N,))."""
    logits, labels = logits[:, :-1, :].float(), labels[:, 1:]  # (N, L-1, V), (N, L-1)
    mask = labels != common.IGNORE_INDEX
    token_logps = torch.gather(logits.log_softmax(-1), 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (N, L-1)
    sums, counts = (token_logps * mask).sum(-1), mask.sum(-1)
    return (sums / counts.clamp(min=1) if average else sums), counts


def token_logps(logits, targets, chunk_size=1024):
    """log p(target) of each row: logits (R, V) in any dtype, targets (R,) -> (R,) float32.

    The same number as sequence_logps's log_softmax + gather, but the log-sum-exp runs over chunks of
    rows, each cast to float32 on its own, and with gradients each chunk is recomputed in the backward
    pass: no float32 copy of all R × V logits is ever kept (at a 128k vocabulary one row is 0.5 MB)."""
    def chunk_logps(x, y):  # (r, V), (r,) -> (r,)
        x = x.float()
        return torch.gather(x, 1, y[:, None]).squeeze(1) - x.logsumexp(-1)

    out = []
    for x, y in zip(logits.split(chunk_size), targets.split(chunk_size)):
        grad = torch.is_grad_enabled() and x.requires_grad
        out.append(torch.utils.checkpoint.checkpoint(chunk_logps, x, y, use_reentrant=False) if grad else chunk_logps(x, y))
    return torch.cat(out) if out else logits.new_zeros(0, dtype=torch.float32)


def row_sums(values, mask):
    """values (R,) listed in row-major order of mask's (N, L) True entries -> (N,) the sum of each row."""
    return torch.zeros(mask.shape, dtype=values.dtype, device=values.device).masked_scatter(mask, values).sum(-1)


def collate_pairs(pairs, pad_id):
    """B pairs -> right-padded (2B, L) input_ids, attention_mask and labels (−100 on prompt and
    padding): rows 0..B-1 prompt + chosen, rows B..2B-1 prompt + rejected, for one forward pass."""
    seqs = [p["prompt"] + p["chosen"] for p in pairs] + [p["prompt"] + p["rejected"] for p in pairs]
    labels = [[common.IGNORE_INDEX] * len(p["prompt"]) + p[k] for k in ("chosen", "rejected") for p in pairs]
    return {"input_ids": common.pad(seqs, pad_id), "attention_mask": common.attention_mask(seqs),
            "labels": common.pad(labels, common.IGNORE_INDEX)}


def collate_shared_prompts(pairs, pad_id):
    """B pairs -> the prompts once, left-padded: prompt_ids and prompt_mask (B, P), so that every prompt
    ends at column P − 1; and the responses, right-padded and interleaved (row 2i chosen i, row 2i + 1
    rejected i, the order of the cache after batch_repeat_interleave(2)): response_ids and
    response_mask (2B, T). Each response token's position id continues its own prompt."""
    prompts = [p["prompt"] for p in pairs]
    responses = [p[k] for p in pairs for k in ("chosen", "rejected")]
    prompt_mask = common.attention_mask(prompts, "left")  # (B, P)
    response_mask = common.attention_mask(responses)  # (2B, T)
    T = response_mask.shape[1]
    return {"prompt_ids": common.pad(prompts, pad_id, "left"), "prompt_mask": prompt_mask,
            "prompt_positions": (prompt_mask.cumsum(1) - 1).clamp(min=0),  # (B, P), 0 on the left padding
            "response_ids": common.pad(responses, pad_id), "response_mask": response_mask,
            # (2B, T): each response continues its prompt; 0 on the padding, as on the prompt's (a padding slot's
            # position must stay in range for learned positions and must not move a dynamic RoPE's scaling)
            "response_positions": (prompt_mask.sum(1).repeat_interleave(2)[:, None] + torch.arange(T)) * response_mask}


def lr_at(step, args):
    """Learning-rate multiplier at optimizer step `step` (0-based): linear warmup, then decay to 0."""
    warmup = int(args.warmup_ratio * args.num_steps)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, args.num_steps - warmup)
    return {"cosine": 0.5 * (1 + math.cos(math.pi * progress)), "linear": 1 - progress, "constant": 1.0}[args.lr_schedule]


def pair_logps(model, batch, bf16=False, average=False):
    """(chosen logps (B,), rejected logps (B,), chosen token counts (B,)) of a batch of collate_pairs
    (one pass over prompt + chosen and prompt + rejected) or of collate_shared_prompts (the prompt once);
    `average`: the token mean (IPO) instead of the sum. The LM head runs only where a response token is
    predicted (logits_to_keep), never over the prompt or the padding."""
    with torch.autocast(next(iter(batch.values())).device.type, dtype=torch.bfloat16, enabled=bf16):
        if "prompt_ids" not in batch:
            labels = batch["labels"][:, 1:]  # (2B, L-1): position t predicts token t + 1
            keep = labels != common.IGNORE_INDEX
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           logits_to_keep=F.pad(keep, (0, 1))).logits  # (R, V), R = response tokens, row-major
            logps, counts = row_sums(token_logps(logits, labels[keep]), keep), keep.sum(-1)  # (2B,), (2B,)
        else:
            # a) the prompts once (B rows), keeping their keys and values; the last prompt position predicts
            # response token 0 (left padding puts it in column P − 1 for every row)
            out = model(input_ids=batch["prompt_ids"], attention_mask=batch["prompt_mask"],
                        position_ids=batch["prompt_positions"], use_cache=True, logits_to_keep=1)
            cache = out.past_key_values
            cache.batch_repeat_interleave(2)  # (B, ...) -> (2B, ...): each prompt's keys/values for both responses
            # b) both responses on top, attending to their prompt; gradients flow back through the cache
            ids, m = batch["response_ids"], batch["response_mask"].bool()  # (2B, T)
            keep = F.pad(m[:, 1:], (0, 1))  # response position t predicts response token t + 1
            rest = model(input_ids=ids, position_ids=batch["response_positions"], past_key_values=cache,
                         attention_mask=torch.cat([batch["prompt_mask"].repeat_interleave(2, 0), batch["response_mask"]], 1),
                         logits_to_keep=keep).logits  # (R', V), the response tokens after the first
            first = token_logps(out.logits[:, -1].repeat_interleave(2, 0), ids[:, 0])  # (2B,)
            logps = first + row_sums(token_logps(rest, ids[:, 1:][m[:, 1:]]), m[:, 1:])  # (2B,)
            counts = m.sum(-1)  # (2B,) response tokens per row
    if average:
        logps = logps / counts
    if "prompt_ids" in batch:  # interleaved rows: chosen at even, rejected at odd
        return logps[0::2], logps[1::2], counts[0::2]
    B = len(logps) // 2
    return logps[:B], logps[B:], counts[:B]


def prompt_sharing_off(config, args):
    """Why the prompt-once pass would not equal the concatenated one for this model, or None."""
    rope = getattr(config, "rope_parameters", None) or {}
    if args.gradient_checkpointing:
        return "--gradient-checkpointing recomputes activations without a cache"
    if rope.get("rope_type") in ("dynamic", "longrope") and args.max_length > rope.get(
            "original_max_position_embeddings", config.max_position_embeddings):
        # the frequencies follow the longest position in each call, so a prompt run alone is scaled otherwise
        return f"its {rope['rope_type']} RoPE rescales past {config.max_position_embeddings} positions"
    return None


def collate(pairs, pad_id, args):
    """The batch layout pair_logps takes: the prompt once (--share-prompt) or concatenated."""
    return collate_shared_prompts(pairs, pad_id) if args.share_prompt else collate_pairs(pairs, pad_id)


@torch.no_grad()
def all_pair_logps(model, pairs, pad_id, args, device, rank):
    """(chosen, rejected) logps (P,) of every pair; each rank computes a share, summed across ranks."""
    was_training = model.training
    model.eval()
    out = torch.zeros(2, len(pairs), device=device)
    mine = list(range(rank, len(pairs), args.world_size))
    # as many forward passes on every rank (under FSDP each is a collective): one out of pairs
    # repeats pair 0 and keeps nothing
    for i in range(0, math.ceil(len(pairs) / args.world_size), args.per_device_batch_size):
        idx = mine[i: i + args.per_device_batch_size]
        batch = {k: v.to(device) for k, v in collate([pairs[j] for j in idx or [0]], pad_id, args).items()}
        chosen, rejected, _ = pair_logps(model, batch, args.bf16, args.loss_type == "ipo")
        if idx:
            out[0, idx], out[1, idx] = chosen, rejected
    if args.world_size > 1:
        dist.all_reduce(out)
    model.train(was_training)  # the frozen reference stays in eval mode
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
    fully_shard(model, mesh=mesh, mp_policy=mp)


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
    toy = args.dataset_name == "toy"
    args.learning_rate = args.learning_rate if args.learning_rate is not None else 5e-4 if toy else 3e-6
    args.max_length = args.max_length if args.max_length is not None else 64 if toy else 1024
    args.beta = args.beta if args.beta is not None else 1.0 if toy else 0.05
    args.world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    args.per_device_batch_size = args.per_device_batch_size or max(1, args.batch_size // args.world_size)
    if args.batch_size % (args.per_device_batch_size * args.world_size):
        raise ValueError(f"--batch-size {args.batch_size} must be a multiple of --per-device-batch-size "
                         f"{args.per_device_batch_size} x {args.world_size} ranks")
    args.grad_accum_steps = args.batch_size // (args.per_device_batch_size * args.world_size)
    if not 0 <= args.label_smoothing < 0.5:
        raise ValueError("--label-smoothing is a flip probability in [0, 0.5)")
    if args.label_smoothing and args.loss_type not in ("sigmoid", "robust"):
        raise ValueError(f"--label-smoothing applies to --loss-type sigmoid (cDPO) or robust, not {args.loss_type}")
    if args.fsdp and "LOCAL_RANK" not in os.environ:
        raise SystemExit("--fsdp runs under torchrun, e.g. `torchrun --nproc_per_node 8 dpo.py --fsdp`")
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
    from transformers import AutoConfig, AutoModelForCausalLM

    transformers.utils.logging.disable_progress_bar()
    tokenizer = common.load_tokenizer(args.model_name, hint=": run `python sft.py` first, or pass --model-name")
    pad_id = tokenizer.pad_token_id
    config = AutoConfig.from_pretrained(args.model_name)
    for key, value in config.to_dict().items():  # dropout off: it would make π/π_ref ≠ 1 at the start
        if any(k in key for k in ("dropout", "pdrop", "layerdrop", "jitter")) and isinstance(value, float):
            setattr(config, key, 0.0)
    models = []
    for trained in (True, False):  # policy, then reference: loaded on the CPU, then onto the device one at a time
        m = AutoModelForCausalLM.from_pretrained(args.model_name, config=config, dtype=torch.float32)
        if "logits_to_keep" not in inspect.signature(m.forward).parameters:
            raise SystemExit(f"{args.model_name}: its forward takes no logits_to_keep, which this script uses to compute "
                             "logits only where a token is predicted; use a transformers causal LM class that has it (transformers >= 5)")
        common.resize_embeddings(m, tokenizer)
        if not trained:
            m.requires_grad_(False).eval()
        elif args.gradient_checkpointing:
            m.gradient_checkpointing_enable()
            m.config.use_cache = False
        # under FSDP the frozen reference is sharded too: at 7B its whole copy would be 28 GB on every rank
        shard(m, device, args) if args.fsdp else m.to(device)
        models.append(m)
    model, ref_model = models
    plan = memory_plan([("policy", model, True), ("reference", ref_model, False)], args)
    train_model = torch.nn.parallel.DistributedDataParallel(model) if args.world_size > 1 and not args.fsdp else model

    # 1. data: prompt + chosen and prompt + rejected, each ending with its end token; ties and long pairs dropped
    train_ds, eval_ds = common.load_splits(args.dataset_name, "preference", args.dataset_train_split,
                                           args.dataset_eval_split, seed=args.seed)
    train_pairs, train_stats = common.tokenize_preferences(tokenizer, train_ds, args.max_length, args.truncation_mode)
    eval_pairs, eval_stats = common.tokenize_preferences(tokenizer, eval_ds, args.max_length, args.truncation_mode)
    if rank == 0:
        common.report("train pairs", train_stats), common.report("eval pairs", eval_stats)
    args.num_steps = int(args.num_epochs * len(train_pairs)) // args.batch_size
    if args.num_steps < 1:
        raise ValueError(f"{len(train_pairs)} training pairs make no step of --batch-size {args.batch_size}")
    schedule = common.batch_schedule(len(train_pairs), args.batch_size, args.num_steps, args.seed)
    lengths = [len(p["prompt"]) + max(len(p["chosen"]), len(p["rejected"])) for p in train_pairs]  # less padding
    schedule = [common.group_by_length(b, lengths, args.per_device_batch_size, args.world_size) for b in schedule]

    # 2. the prompt once, unless a stated rule says it would change the log-probabilities (tests/test_families.py
    # proves them equal for every family it covers, sliding windows included)
    why_not = prompt_sharing_off(config, args)
    if args.share_prompt and why_not:
        args.share_prompt = False
        if rank == 0:
            print(f"--share-prompt is off: {why_not}; prompt and responses are concatenated")

    # 3. reference log-probabilities: once for the eval pairs; for the training pairs either all
    # at once now (then the reference model is freed) or per batch during training
    ref_eval = all_pair_logps(ref_model, eval_pairs, pad_id, args, device, rank)  # (2, P_eval)
    ref_train = None
    if args.precompute_ref_logps:
        ref_train = all_pair_logps(ref_model, train_pairs, pad_id, args, device, rank)  # (2, P_train)
        del ref_model

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
        print(f"run {run_name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
              f"{len(train_pairs)} train / {len(eval_pairs)} eval pairs, {args.num_steps} steps, "
              f"{args.world_size} rank(s) x {args.grad_accum_steps} micro-batch(es) of {args.per_device_batch_size}, "
              f"{'each prompt run once for both responses' if args.share_prompt else 'prompt and response concatenated'}")
        print(plan)

    def metrics_of(losses, rc, rr, pc, pr, nll):
        """The logged statistics of a set of pairs, as sums over pairs (divided later by the count)."""
        return torch.stack([losses.sum(), rc.sum(), rr.sum(), (rc > rr).float().sum(), (rc - rr).sum(),
                            pc.sum(), pr.sum(), nll.sum()])

    # loss: the preference loss alone; nll/chosen: the chosen responses' token-mean NLL (what RPO adds, × α)
    stat_names = ["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                  "logps/chosen", "logps/rejected", "nll/chosen"]
    eval_chosen_tokens = torch.tensor([len(p["chosen"]) for p in eval_pairs], device=device)

    def evaluate():
        pol = all_pair_logps(model, eval_pairs, pad_id, args, device, rank)
        losses, rc, rr = dpo_loss(pol[0], pol[1], ref_eval[0], ref_eval[1], args.beta, args.loss_type,
                                  args.label_smoothing)
        nll = -(pol[0] if args.loss_type == "ipo" else pol[0] / eval_chosen_tokens)
        return dict(zip(stat_names, (metrics_of(losses, rc, rr, pol[0], pol[1], nll) / len(eval_pairs)).tolist()))

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, eps=args.adam_eps,
                                  weight_decay=args.weight_decay)
    first_step = 0
    if args.resume:  # model, optimizer and RNG states as they were after step `first_step`
        path, state = load_checkpoint(args.output_dir, model, optimizer, rank, args.world_size, args.num_steps, args.seed)
        first_step = state["step"]
        if first_step >= args.num_steps:
            raise SystemExit(f"{path} is the last step: nothing left to train")
        if rank == 0:
            print(f"resumed from {path} at step {first_step}")
    peak_memory(device, args.world_size, reset=True)
    per_rank = args.batch_size // args.world_size
    log_stats, log_pairs, tokens_seen, start = torch.zeros(len(stat_names), device=device), 0, 0, time.time()
    if first_step == 0:
        initial = evaluate()
        if rank == 0:
            print(f"at initialisation (policy = reference): eval/loss {initial['loss']:.4f} (ln 2 = {math.log(2):.4f} for sigmoid)")
    for step in tqdm(range(first_step, args.num_steps), initial=first_step, total=args.num_steps, disable=rank != 0):
        lr = args.learning_rate * lr_at(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # 4. one optimizer step on a global batch of pairs: each rank its slice, in micro-batches;
        # each micro-batch's mean weighted by its share of the global batch (a mean over all pairs)
        idx_global = schedule[step]
        idx_mine = idx_global[rank * per_rank: (rank + 1) * per_rank]
        step_stats = torch.zeros(len(stat_names), device=device)
        for k in range(args.grad_accum_steps):
            idx = idx_mine[k * args.per_device_batch_size: (k + 1) * args.per_device_batch_size]
            batch = {key: v.to(device) for key, v in collate([train_pairs[i] for i in idx], pad_id, args).items()}
            if ref_train is not None:
                ref_c, ref_r = ref_train[0, idx], ref_train[1, idx]
            else:
                with torch.no_grad():
                    ref_c, ref_r, _ = pair_logps(ref_model, batch, args.bf16, args.loss_type == "ipo")
            # DDP all-reduces once per step; FSDP reduce-scatters every micro-batch, so gradients stay sharded
            sync = k == args.grad_accum_steps - 1 or args.world_size == 1 or args.fsdp
            with contextlib.nullcontext() if sync else train_model.no_sync():
                pol_c, pol_r, n_chosen = pair_logps(train_model, batch, args.bf16, args.loss_type == "ipo")
                losses, rc, rr = dpo_loss(pol_c, pol_r, ref_c, ref_r, args.beta, args.loss_type, args.label_smoothing)
                chosen_nll = -(pol_c if args.loss_type == "ipo" else pol_c / n_chosen)  # token mean per pair
                # RPO adds α × the chosen NLL; DDP averages gradients over ranks, hence the world_size factor
                ((losses + args.rpo_alpha * chosen_nll).sum() / args.batch_size * args.world_size).backward()
            step_stats += metrics_of(losses.detach(), rc, rr, pol_c.detach(), pol_r.detach(), chosen_nll.detach())
        if args.world_size > 1:
            dist.all_reduce(step_stats)
        # the global gradient norm (clipped if --max-grad-norm > 0); checked on every rank before the update
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm or math.inf)
        if not (math.isfinite(step_stats[0].item()) and math.isfinite(grad_norm.item())):
            raise FloatingPointError(f"non-finite loss or gradient at step {step}, before the update: "
                                     "lower --learning-rate, or check the data")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # 5. log: pair-weighted means over every step since the last log, not one micro-batch's
        log_stats += step_stats
        log_pairs += args.batch_size
        tokens_seen += sum(2 * len(train_pairs[i]["prompt"]) + len(train_pairs[i]["chosen"])
                           + len(train_pairs[i]["rejected"]) for i in idx_global)
        global_step = (step + 1) * args.batch_size  # pairs seen
        if writer and ((step + 1) % 10 == 0 or step + 1 == args.num_steps):
            for name, value in zip(stat_names, (log_stats / log_pairs).tolist()):
                writer.add_scalar(f"train/{name}", value, global_step)
            writer.add_scalar("train/learning_rate", lr, global_step)
            writer.add_scalar("charts/tokens_per_sec", tokens_seen / (time.time() - start), global_step)
            log_stats, log_pairs = torch.zeros_like(log_stats), 0
        if args.checkpoint_every and (step + 1) % args.checkpoint_every == 0:
            save_checkpoint(os.path.join(args.output_dir, "resume", f"step_{step + 1:07d}"), model, optimizer,
                            {"step": step + 1, "world_size": args.world_size, "num_steps": args.num_steps, "seed": args.seed}, rank)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.num_steps:
            final = evaluate()
            if writer:
                for name, value in final.items():
                    writer.add_scalar(f"eval/{name}", value, global_step)
                tqdm.write(f"step {step + 1}: eval/rewards/accuracies {final['rewards/accuracies']:.4f}, "
                           f"eval/loss {final['loss']:.4f}, eval/rewards/margins {final['rewards/margins']:.4f}")

    # 6. toy task: gold reward and exact KL(π ‖ P_ref) of samples from the trained policy
    toy_eval = args.dataset_name == "toy" and args.num_toy_samples
    with gathered(model) if toy_eval else contextlib.nullcontext():  # under FSDP the full weights, for rank 0
        if toy_eval and rank == 0:
            import toy_task

            prompts = toy_task.make_dataset("prompt", "eval", seed=args.seed)["prompt"][: args.num_toy_samples]
            ids = common.encode_prompts(tokenizer, prompts, templated=False)
            model.eval()
            gold, kl = [], []
            with torch.no_grad():
                for i in range(0, len(ids), 250):
                    batch = {k: v.to(device) for k, v in common.collate_prompts(ids[i: i + 250], pad_id).items()}
                    out = common.generate(model, batch["input_ids"], batch["attention_mask"], tokenizer,
                                          toy_task.MAX_RESPONSE_TOKENS)
                    seqs, labels, responses = [], [], []
                    for p, gen in zip(ids[i: i + 250], out.tolist()):
                        eos = tokenizer.eos_token_id  # keep up to the first EOS; without one it was cut at the cap
                        resp = gen[: gen.index(eos) + 1] if eos in gen else gen
                        seqs.append(p + resp)
                        labels.append([common.IGNORE_INDEX] * len(p) + resp)
                        responses.append(tokenizer.decode(resp, skip_special_tokens=True))
                    # log π of each sample from a forward pass over prompt + response
                    logits = model(input_ids=common.pad(seqs, pad_id).to(device),
                                   attention_mask=common.attention_mask(seqs).to(device)).logits
                    logp_pi, _ = sequence_logps(logits, common.pad(labels, common.IGNORE_INDEX).to(device))
                    for prompt, r, lp in zip(prompts[i: i + 250], responses, logp_pi.tolist()):
                        gold.append(toy_task.gold_reward(prompt, r))
                        kl.append(lp - toy_task.ref_logprob(prompt, r))
            final["toy/gold_reward"], final["toy/kl_to_ref"] = float(np.mean(gold)), float(np.mean(kl))
            frontier = toy_task.optimal_frontier(prompts, [math.inf, args.beta])
            final["toy/ref_gold_reward"], final["toy/optimum_kl"], final["toy/optimum_gold_reward"] = \
                frontier[0][2], frontier[1][1], frontier[1][2]

    # 7. save the policy and tokenizer
    peaks = peak_memory(device, args.world_size)  # of training: loading and saving not counted
    save_model(model, tokenizer, args.output_dir, args, rank)
    if rank == 0:
        for name, value in final.items():
            writer.add_scalar(f"eval/{name}", value, args.num_steps * args.batch_size)
        with open(os.path.join(args.output_dir, "training_args.json"), "w") as f:
            json.dump({"args": vars(args), "result": final, "peak_memory_gib": peaks}, f, indent=2, default=str)
        print(f"saved to {args.output_dir}: " + ", ".join(f"{k} {v:.4f}" for k, v in final.items()))
        print(f"peak memory per rank (GiB): {peaks}")
        writer.close()
    if dist.is_initialized():  # every rank waits for rank 0's save, then all leave together
        dist.barrier()
        del train_model  # DDP's reducer holds the process group: freed now, not during interpreter teardown
        dist.destroy_process_group()
