"""Reward modelling: fit a scalar reward to pairwise human preferences (Bradley–Terry).

Stiennon et al. 2020 (§3.4) and Ouyang et al. 2022 (§3.5): a copy of the SFT model with a scalar
head reads the prompt and a response and outputs r(x, y) at the response's last token, its end
token (the EOS, or the chat template's end-of-turn).
Training maximises log σ(r(x, y_chosen) − r(x, y_rejected)) over labelled pairs. After training,
the mean reward of reference responses (the SFT data's completions) is recorded with the model
as `config.reward_bias`, so that r − reward_bias scores those responses 0 on average (Stiennon
et al.). PPO reads this model to score its samples and initialises its value function from it.

    # default: from runs/models/sft (run `python sft.py` first) on the toy task's pairs, CPU
    python reward_model.py
    # real scale (one node, 8 GPUs): Pythia 1B SFT model on TL;DR preference pairs
    torchrun --nproc_per_node 8 reward_model.py --model-name runs/models/sft \
        --dataset-name trl-lib/tldr-preference --reference-dataset-name trl-lib/tldr \
        --learning-rate 3e-6 --batch-size 64 --per-device-batch-size 8 --max-length 640 --bf16 --track
"""

import contextlib
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
    """peak AdamW learning rate; default 1e-3 on the toy task, 3e-6 otherwise (Huang et al. 2024)"""
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

    # ---- reward model ----
    center_rewards_coefficient: float = 0.0
    """weight of the auxiliary loss mean((r_chosen + r_rejected)^2) that centres rewards at 0 (Eisenstein et al. 2023)"""
    reference_dataset_name: Optional[str] = None
    """SFT-format dataset (prompt, completion or messages) whose responses define reward 0 after training (Stiennon
    et al.); default: the toy SFT data on the toy task, otherwise the chosen responses of the training pairs"""
    num_reference_examples: int = 2000
    """reference responses averaged for that normalisation (the first of the dataset)"""

    # ---- derived right after parsing (not flags) ----
    world_size: tyro.conf.Suppress[int] = 1
    grad_accum_steps: tyro.conf.Suppress[int] = 1
    num_steps: tyro.conf.Suppress[int] = 0


def reward_loss(chosen_rewards, rejected_rewards, margin=None, center_rewards_coefficient=0.0):
    """Bradley–Terry negative log-likelihood of the preferences, a mean over pairs.

    chosen_rewards, rejected_rewards: (B,) rewards of the preferred and the other response;
    margin: optional (B,) how much the chosen one should win by (Llama 2's margin loss).
    loss = mean_b −log σ(r_c − r_r − m) + coef · mean_b (r_c + r_r)², the second term keeping the
    rewards centred (Eisenstein et al. 2023). logsigmoid keeps huge gaps finite."""
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * ((chosen_rewards + rejected_rewards) ** 2).mean()
    return loss


def rewards_at_eos(model, input_ids, attention_mask):
    """Reward of each right-padded sequence, read at its last real token (the response's end token),
    minus the stored normalisation `config.reward_bias`. input_ids, attention_mask: (N, L).
    Returns (N,). Hugging Face's sequence-classification models apply the head at the rightmost
    token that is not PAD; with right padding and a PAD distinct from every end token
    (common.load_tokenizer) that is exactly the end token, and causal attention never sees the pads after it, so the reward does
    not depend on how the sequence is padded or batched (tested). `model` may be DDP-wrapped."""
    bias = getattr(getattr(model, "module", model).config, "reward_bias", 0.0)
    return model(input_ids=input_ids, attention_mask=attention_mask).logits.squeeze(-1).float() - bias


def collate_pairs(pairs, pad_id):
    """B pairs -> right-padded (2B, L) input_ids and attention_mask: rows 0..B-1 the chosen
    sequences (prompt + chosen), rows B..2B-1 the rejected ones, so one forward pass scores both."""
    seqs = [p["prompt"] + p["chosen"] for p in pairs] + [p["prompt"] + p["rejected"] for p in pairs]
    return {"input_ids": common.pad(seqs, pad_id), "attention_mask": common.attention_mask(seqs)}


def lr_at(step, args):
    """Learning-rate multiplier at optimizer step `step` (0-based): linear warmup, then decay to 0."""
    warmup = int(args.warmup_ratio * args.num_steps)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, args.num_steps - warmup)
    return {"cosine": 0.5 * (1 + math.cos(math.pi * progress)), "linear": 1 - progress, "constant": 1.0}[args.lr_schedule]


@torch.no_grad()
def score_sequences(model, seqs, pad_id, args, device, rank):
    """Rewards of a list of token-id sequences, in order; each rank scores a share, gathered."""
    model.eval()
    mine = list(range(rank, len(seqs), args.world_size))
    out = torch.zeros(len(seqs), device=device)
    # as many forward passes on every rank (under FSDP each is a collective): one out of sequences
    # scores sequence 0 and keeps nothing
    for i in range(0, math.ceil(len(seqs) / args.world_size), 2 * args.per_device_batch_size):
        idx = mine[i: i + 2 * args.per_device_batch_size]
        batch = [seqs[j] for j in idx or [0]]
        ids, mask = common.pad(batch, pad_id).to(device), common.attention_mask(batch).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            r = rewards_at_eos(model, ids, mask)
        if idx:
            out[idx] = r
    if args.world_size > 1:
        dist.all_reduce(out)  # every index was filled by exactly one rank
    model.train()
    return out.cpu()


def evaluate(model, pairs, pad_id, args, device, rank):
    """Held-out metrics over all pairs: loss, accuracy, mean margin, chosen/rejected means, std."""
    seqs = [p["prompt"] + p["chosen"] for p in pairs] + [p["prompt"] + p["rejected"] for p in pairs]
    r = score_sequences(model, seqs, pad_id, args, device, rank)
    rc, rr = r[: len(pairs)], r[len(pairs):]
    return {"loss": reward_loss(rc, rr).item(), "accuracy": (rc > rr).float().mean().item(),
            "margin": (rc - rr).mean().item(), "reward_chosen": rc.mean().item(),
            "reward_rejected": rr.mean().item(), "reward_std": r.std().item()}


def pearson(x, y):
    x, y = np.asarray(x, float) - np.mean(x), np.asarray(y, float) - np.mean(y)
    return float((x * y).sum() / np.sqrt((x * x).sum() * (y * y).sum()))


def ranks(x):
    """Ranks 1..n with ties given their average rank (what Spearman's correlation uses)."""
    x = np.asarray(x, float)
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):  # average the ranks of tied values
        tied = x == v
        r[tied] = r[tied].mean()
    return r


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
    args.learning_rate = args.learning_rate if args.learning_rate is not None else 1e-3 if toy else 3e-6
    args.max_length = args.max_length if args.max_length is not None else 64 if toy else 1024
    if args.reference_dataset_name is None and toy:
        args.reference_dataset_name = "toy"
    args.world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    args.per_device_batch_size = args.per_device_batch_size or max(1, args.batch_size // args.world_size)
    if args.batch_size % (args.per_device_batch_size * args.world_size):
        raise ValueError(f"--batch-size {args.batch_size} must be a multiple of --per-device-batch-size "
                         f"{args.per_device_batch_size} x {args.world_size} ranks")
    args.grad_accum_steps = args.batch_size // (args.per_device_batch_size * args.world_size)
    if args.fsdp and "LOCAL_RANK" not in os.environ:
        raise SystemExit("--fsdp runs under torchrun, e.g. `torchrun --nproc_per_node 8 reward_model.py --fsdp`")
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
    from transformers import AutoConfig, AutoModelForSequenceClassification

    transformers.utils.logging.disable_progress_bar()
    tokenizer = common.load_tokenizer(args.model_name, hint=": run `python sft.py` first, or pass --model-name")
    pad_id = tokenizer.pad_token_id
    config = AutoConfig.from_pretrained(args.model_name, num_labels=1)
    for key, value in config.to_dict().items():  # dropout off: it makes rewards noisy (Huang et al. 2024)
        if any(k in key for k in ("dropout", "pdrop", "layerdrop", "jitter")) and isinstance(value, float):
            setattr(config, key, 0.0)
    config.reward_bias = 0.0
    model = AutoModelForSequenceClassification.from_pretrained(args.model_name, config=config, dtype=torch.float32)
    common.resize_embeddings(model, tokenizer)
    # head ~ N(0, 1/sqrt(d + 1)), bias-free, as in Stiennon et al.'s and Huang et al.'s reward models (DDP
    # broadcasts rank 0's draw; FSDP keeps the head's single row whole on rank 0, so rank 0's draw again)
    torch.nn.init.normal_(model.score.weight, std=1 / math.sqrt(model.config.hidden_size + 1))
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    plan = memory_plan([("reward model", model, True)], args)
    shard(model, device, args) if args.fsdp else model.to(device)
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
              f"{args.world_size} rank(s) x {args.grad_accum_steps} micro-batch(es) of {args.per_device_batch_size}")
        print(plan)

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
    stat_names = ["loss", "accuracy", "margin", "reward_chosen", "reward_rejected"]
    log_stats, log_pairs, tokens_seen, start = torch.zeros(len(stat_names), device=device), 0, 0, time.time()
    for step in tqdm(range(first_step, args.num_steps), initial=first_step, total=args.num_steps, disable=rank != 0):
        lr = args.learning_rate * lr_at(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # 2. one optimizer step on a global batch of pairs: each rank its slice, in micro-batches;
        # every micro-batch's mean is weighted by its share of the global batch (a mean over all pairs)
        global_batch = [train_pairs[i] for i in schedule[step]]
        mine = global_batch[rank * per_rank: (rank + 1) * per_rank]
        step_stats = torch.zeros(len(stat_names), device=device)
        for k in range(args.grad_accum_steps):
            micro = mine[k * args.per_device_batch_size: (k + 1) * args.per_device_batch_size]
            batch = {key: v.to(device) for key, v in collate_pairs(micro, pad_id).items()}
            # DDP all-reduces once per step; FSDP reduce-scatters every micro-batch, so gradients stay sharded
            sync = k == args.grad_accum_steps - 1 or args.world_size == 1 or args.fsdp
            with contextlib.nullcontext() if sync else train_model.no_sync():
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                    r = rewards_at_eos(train_model, **batch)  # (2b,)
                rc, rr = r[: len(micro)], r[len(micro):]  # (b,) chosen, (b,) rejected
                loss = reward_loss(rc, rr, center_rewards_coefficient=args.center_rewards_coefficient)
                # DDP averages gradients over ranks, hence the world_size factor
                (loss * len(micro) / args.batch_size * args.world_size).backward()
            rc, rr = rc.detach(), rr.detach()
            step_stats += len(micro) * torch.stack([loss.detach(), (rc > rr).float().mean(), (rc - rr).mean(),
                                                    rc.mean(), rr.mean()])
        if args.world_size > 1:
            dist.all_reduce(step_stats)
        # the global gradient norm (clipped if --max-grad-norm > 0); checked on every rank before the update
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm or math.inf)
        if not (math.isfinite(step_stats[0].item()) and math.isfinite(grad_norm.item())):
            raise FloatingPointError(f"non-finite loss or gradient at step {step}, before the update: "
                                     "lower --learning-rate, or check the data")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # 3. log: pair-weighted means over every step since the last log, not one micro-batch's
        log_stats += step_stats
        log_pairs += args.batch_size
        tokens_seen += sum(len(p["prompt"]) * 2 + len(p["chosen"]) + len(p["rejected"]) for p in global_batch)
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
            metrics = evaluate(model, eval_pairs, pad_id, args, device, rank)
            if writer:
                for name, value in metrics.items():
                    writer.add_scalar(f"eval/{name}", value, global_step)
                tqdm.write(f"step {step + 1}: eval/accuracy {metrics['accuracy']:.4f}, eval/loss {metrics['loss']:.4f}")

    # 4. normalise: the mean reward of the reference responses becomes the stored bias, so that
    # they score 0 on average (Stiennon et al. 2020; Huang et al. 2024 detail 11). A reference over
    # --max-length would be read mid-response (or, in a chat, after a user turn), so it is skipped
    if args.reference_dataset_name is not None:
        ref_ds, _ = common.load_splits(args.reference_dataset_name, "sft", seed=args.seed)
        ref_ds = ref_ds.select(range(min(args.num_reference_examples, len(ref_ds))))
        ref_examples, _ = common.tokenize_sft(tokenizer, ref_ds, max_length=10**9)  # whole: none cut
        ref_seqs = [e["input_ids"] for e in ref_examples if len(e["input_ids"]) <= args.max_length]
        what = f"{len(ref_seqs)} responses of {args.reference_dataset_name!r} ({len(ref_ds) - len(ref_seqs)} too long or dropped: skipped)"
    else:
        ref_seqs = [p["prompt"] + p["chosen"] for p in train_pairs[: args.num_reference_examples]]
        what = f"the chosen responses of {len(ref_seqs)} training pairs (pass --reference-dataset-name for SFT demonstrations)"
    if not ref_seqs:
        raise ValueError(f"no reference response fits --max-length {args.max_length} with its end token; raise it")
    ref_rewards = score_sequences(model, ref_seqs, pad_id, args, device, rank)
    if rank == 0:
        print(f"reward normalisation: mean reward of {what} is stored as config.reward_bias")
    model.config.reward_bias = ref_rewards.mean().item()
    final = evaluate(model, eval_pairs, pad_id, args, device, rank)  # accuracy and margins do not move; means do
    final["reward_bias"] = model.config.reward_bias

    # 5. toy task: how close to a perfect reward model, and how well the reward tracks the gold one
    if args.dataset_name == "toy":
        import toy_task

        final["bayes_accuracy"] = toy_task.bayes_accuracy(eval_ds)
        samples = toy_task.make_dataset("sft", "eval", seed=args.seed)  # held-out P_ref samples
        sample_examples, _ = common.tokenize_sft(tokenizer, samples, args.max_length)
        rm = score_sequences(model, [e["input_ids"] for e in sample_examples], pad_id, args, device, rank).numpy()
        gold = [toy_task.gold_reward(p, c) for p, c in zip(samples["prompt"], samples["completion"])]
        final["gold_pearson"], final["gold_spearman"] = pearson(rm, gold), pearson(ranks(rm), ranks(gold))

    # 6. save model (with config.reward_bias), tokenizer and results
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
