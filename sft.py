"""Supervised fine-tuning (SFT): maximise the likelihood of demonstration completions given prompts.

The first stage of RLHF (Ouyang et al. 2022, §3.5; Stiennon et al. 2020): a causal LM is trained
with the next-token cross-entropy on the completion tokens and their end token only (every
assistant turn of a conversation, ended by the chat template's end-of-turn), the prompt tokens
masked out. The loss is a mean over every completion token of the whole optimizer step,
across micro-batches and GPUs, so gradient accumulation and DDP give the same update as one
large batch. The model and tokenizer are saved where reward_model.py, ppo.py and dpo.py look.

    # default: a ~1M-parameter model from scratch on the embedded toy task, CPU, ~3 minutes
    python sft.py
    # real scale (one node, 8 GPUs): Pythia 1B on TL;DR-style prompt/completion data
    torchrun --nproc_per_node 8 sft.py --model-name EleutherAI/pythia-1b-deduped \
        --dataset-name trl-lib/tldr --learning-rate 3e-6 --batch-size 128 --per-device-batch-size 16 \
        --max-length 600 --bf16 --warmup-ratio 0 --track
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
    model_name: str = "toy"
    """Hub id or local folder of a causal LM (AutoModelForCausalLM); "toy" = the toy task's tiny model from scratch"""
    dataset_name: str = "toy"
    """toy (the embedded task), a local .json/.jsonl/.parquet/.csv file or folder, or a Hub id; columns (prompt, completion) or messages"""
    dataset_train_split: str = "train"
    """split to train on"""
    dataset_eval_split: str = "test"
    """held-out split; if the dataset lacks it, 5% of the training split is held out"""
    max_length: Optional[int] = None
    """tokens per example (prompt + completion + end token); default 64 on the toy task, 1024 otherwise"""
    truncation_mode: Literal["keep_start", "keep_end"] = "keep_start"
    """an example over --max-length: keep_start cuts its end (the completion loses its end token), keep_end its
    oldest tokens after the BOS (long chat histories); both counted and reported"""
    batch_size: int = 128
    """examples per optimizer step, summed over all ranks and micro-batches"""
    per_device_batch_size: Optional[int] = None
    """examples per forward/backward pass on one device (the rest of --batch-size is gradient accumulation);
    default --batch-size / the number of ranks"""
    num_epochs: Optional[float] = None
    """passes over the training split (fractions allowed); default 2 on the toy task, 1 otherwise"""
    learning_rate: Optional[float] = None
    """peak AdamW learning rate; default 3e-3 for the toy model trained from scratch, 3e-6 for a pretrained LM (Huang et al. 2024)"""
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """decay of the learning rate after warmup, down to 0 at the last step"""
    warmup_ratio: float = 0.05
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

    # ---- SFT ----
    train_on_prompt: bool = False
    """also put loss on the prompt tokens (default: completions and their end tokens only)"""
    num_sample_completions: int = 4
    """held-out prompts whose sampled completions are printed and logged at each evaluation"""
    max_new_tokens: int = 24
    """tokens generated for those sample completions"""

    # ---- derived right after parsing (not flags) ----
    world_size: tyro.conf.Suppress[int] = 1
    grad_accum_steps: tyro.conf.Suppress[int] = 1
    num_steps: tyro.conf.Suppress[int] = 0


def sft_loss(logits, labels):
    """Mean next-token negative log-likelihood over every labelled token of the batch.

    logits: (B, L, V) float, position t predicting token t + 1; labels: (B, L) long, aligned with
    the input ids (Hugging Face convention: the shift happens here), IGNORE_INDEX (-100) where there
    is no loss. Returns a scalar: sum of -log p(label) over labelled positions / their number
    (a token-level mean, so long completions weigh more than short ones). This is the plain formulation
    over full logits; training computes the same number, leaner, as labelled_nll (tested equal)."""
    logits = logits[:, :-1, :].float()  # (B, L-1, V): predictions for tokens 1..L-1
    labels = labels[:, 1:]  # (B, L-1)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                          ignore_index=common.IGNORE_INDEX, reduction="sum")
    return nll / (labels != common.IGNORE_INDEX).sum().clamp(min=1)


def token_logps(logits, targets, chunk_size=1024):
    """log p(target) of each row: logits (R, V) in any dtype, targets (R,) -> (R,) float32.

    The same number as sft_loss's cross-entropy, but the log-sum-exp runs over chunks of rows, each cast
    to float32 on its own, and with gradients each chunk is recomputed in the backward pass: no float32
    copy of all R × V logits is ever kept (at a 128k vocabulary one row is 0.5 MB)."""
    def chunk_logps(x, y):  # (r, V), (r,) -> (r,)
        x = x.float()
        return torch.gather(x, 1, y[:, None]).squeeze(1) - x.logsumexp(-1)

    out = []
    for x, y in zip(logits.split(chunk_size), targets.split(chunk_size)):
        grad = torch.is_grad_enabled() and x.requires_grad
        out.append(torch.utils.checkpoint.checkpoint(chunk_logps, x, y, use_reentrant=False) if grad else chunk_logps(x, y))
    return torch.cat(out) if out else logits.new_zeros(0, dtype=torch.float32)


def labelled_nll(model, batch, bf16=False):
    """(Σ −log p(label) over the labelled tokens of a collate_sft batch, their number): sft_loss's
    numerator and denominator, with the LM head applied only at the positions that predict a label
    (logits_to_keep), never over the prompt or the padding."""
    labels = batch["labels"][:, 1:]  # (B, L-1): position t predicts token t + 1
    keep = labels != common.IGNORE_INDEX
    with torch.autocast(labels.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       logits_to_keep=F.pad(keep, (0, 1))).logits  # (R, V), R = labelled tokens
    return -token_logps(logits, labels[keep]).sum(), keep.sum()


def lr_at(step, args):
    """Learning-rate multiplier at optimizer step `step` (0-based): linear warmup, then decay to 0."""
    warmup = int(args.warmup_ratio * args.num_steps)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, args.num_steps - warmup)
    return {"cosine": 0.5 * (1 + math.cos(math.pi * progress)), "linear": 1 - progress, "constant": 1.0}[args.lr_schedule]


@torch.no_grad()
def evaluate(model, examples, pad_id, args, device, rank):
    """Token-level mean NLL of the labelled tokens of all `examples` (each rank does a share, the
    sums are reduced over ranks)."""
    model.eval()
    total, count = torch.zeros((), device=device, dtype=torch.float64), torch.zeros((), device=device)
    mine = list(range(rank, len(examples), args.world_size))
    # as many forward passes on every rank (under FSDP each is a collective): one out of examples
    # repeats example 0 and counts none of it
    for i in range(0, math.ceil(len(examples) / args.world_size), args.per_device_batch_size):
        idx = mine[i: i + args.per_device_batch_size]
        batch = common.collate_sft([examples[j] for j in idx or [0]], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        nll, n = labelled_nll(model, batch, args.bf16)
        total += nll.double() * bool(idx)
        count += n * bool(idx)
    if args.world_size > 1:
        dist.all_reduce(total), dist.all_reduce(count)
    model.train()
    return (total / count).item()


@torch.no_grad()
def sample_completions(model, tokenizer, prompts, args, device, seed):
    """Sample completions (temperature 1, no top-k/top-p) for a few prompts, as text; generation stops
    at any end token (the EOS, the chat template's end-of-turn, the model's declared stop ids). Seeded
    apart from the training's random state, which a resumed run must find as it was (dropout)."""
    model.eval()
    batch = {k: v.to(device) for k, v in common.collate_prompts(prompts, tokenizer.pad_token_id).items()}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        out = common.generate(model, batch["input_ids"], batch["attention_mask"], tokenizer, args.max_new_tokens)
    model.train()
    return [(tokenizer.decode(p), tokenizer.decode(o, skip_special_tokens=True)) for p, o in zip(prompts, out)]


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
    args.learning_rate = args.learning_rate if args.learning_rate is not None else 3e-3 if args.model_name == "toy" else 3e-6
    args.max_length = args.max_length if args.max_length is not None else 64 if args.dataset_name == "toy" else 1024
    # the toy model learns from scratch: a second epoch halves its excess over P_ref, which every later stage inherits
    args.num_epochs = args.num_epochs if args.num_epochs is not None else 2.0 if args.dataset_name == "toy" else 1.0
    args.world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    args.per_device_batch_size = args.per_device_batch_size or max(1, args.batch_size // args.world_size)
    if args.batch_size % (args.per_device_batch_size * args.world_size):
        raise ValueError(f"--batch-size {args.batch_size} must be a multiple of --per-device-batch-size "
                         f"{args.per_device_batch_size} x {args.world_size} ranks")
    args.grad_accum_steps = args.batch_size // (args.per_device_batch_size * args.world_size)
    if args.fsdp and "LOCAL_RANK" not in os.environ:
        raise SystemExit("--fsdp runs under torchrun, e.g. `torchrun --nproc_per_node 8 sft.py --fsdp`")
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
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.disable_progress_bar()

    tokenizer = common.load_tokenizer(args.model_name)
    pad_id = tokenizer.pad_token_id
    if args.model_name == "toy":  # the toy task's tiny Llama from scratch, in memory (the same on every rank)
        import toy_task

        model = toy_task.make_base_model(args.seed)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model_name, dtype=torch.float32)
    if "logits_to_keep" not in inspect.signature(model.forward).parameters:
        raise SystemExit(f"{args.model_name}: its forward takes no logits_to_keep, which this script uses to compute "
                         "logits only where a token is predicted; use a transformers causal LM class that has it (transformers >= 5)")
    common.resize_embeddings(model, tokenizer)
    model.train()  # from_pretrained returns eval mode: dropout would be off until the first evaluation
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    plan = memory_plan([("model", model, True)], args)
    shard(model, device, args) if args.fsdp else model.to(device)
    train_model = torch.nn.parallel.DistributedDataParallel(model) if args.world_size > 1 and not args.fsdp else model

    # 1. data: tokenize, mask the prompt, count truncation
    train_ds, eval_ds = common.load_splits(args.dataset_name, "sft", args.dataset_train_split,
                                           args.dataset_eval_split, seed=args.seed)
    train_examples, train_stats = common.tokenize_sft(tokenizer, train_ds, args.max_length, args.train_on_prompt, args.truncation_mode)
    eval_examples, eval_stats = common.tokenize_sft(tokenizer, eval_ds, args.max_length, args.train_on_prompt, args.truncation_mode)
    if rank == 0:
        common.report("train data", train_stats), common.report("eval data", eval_stats)
    args.num_steps = int(args.num_epochs * len(train_examples)) // args.batch_size
    if args.num_steps < 1:
        raise ValueError(f"{len(train_examples)} training examples make no step of --batch-size {args.batch_size}")
    schedule = common.batch_schedule(len(train_examples), args.batch_size, args.num_steps, args.seed)
    lengths = [len(e["input_ids"]) for e in train_examples]  # micro-batches of like lengths: less padding
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
              f"{len(train_examples)} train / {len(eval_examples)} eval examples, {args.num_steps} steps, "
              f"{args.world_size} rank(s) x {args.grad_accum_steps} micro-batch(es) of {args.per_device_batch_size}")
        print(plan)

    toy_ref_nll = None
    if args.dataset_name == "toy":  # exact -log P_ref of the same held-out tokens, to measure the excess
        import toy_task

        if eval_stats["truncated"] or eval_stats["dropped"]:
            raise ValueError(f"--max-length {args.max_length} cuts toy examples, whose exact excess over P_ref needs them "
                             f"whole: use at least {6 + toy_task.MAX_RESPONSE_TOKENS} (6 prompt words + the longest response)")
        toy_ref_nll = -sum(toy_task.ref_logprob(p, c, max_response_tokens=None)
                           for p, c in zip(eval_ds["prompt"], eval_ds["completion"]))
        toy_ref_nll /= sum(len(c.split()) + 1 for c in eval_ds["completion"])  # words + EOS
        if writer:
            writer.add_text("eval/entropy_floor", f"{toy_task.entropy_floor(eval_ds['prompt']):.4f} nats/token")

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, eps=args.adam_eps,
                                  weight_decay=args.weight_decay)
    sample_prompts, _, _ = common.encode_dataset(tokenizer, eval_ds.select(range(min(args.num_sample_completions, len(eval_ds)))), "sft")
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
    start, log_loss, log_tokens, tokens_seen = time.time(), 0.0, 0, 0
    for step in tqdm(range(first_step, args.num_steps), initial=first_step, total=args.num_steps, disable=rank != 0):
        lr = args.learning_rate * lr_at(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # 2. one optimizer step on a global batch: each rank takes its slice, in micro-batches
        global_batch = [train_examples[i] for i in schedule[step]]
        # normalise by the labelled tokens of the whole global batch (known on every rank without
        # communication, since every rank holds the data): the update is then exactly that of one big batch
        global_tokens = sum(sum(x != common.IGNORE_INDEX for x in e["labels"][1:]) for e in global_batch)
        mine = global_batch[rank * per_rank: (rank + 1) * per_rank]
        step_loss = torch.zeros((), device=device)
        for k in range(args.grad_accum_steps):
            micro = common.collate_sft(mine[k * args.per_device_batch_size: (k + 1) * args.per_device_batch_size], pad_id)
            micro = {key: v.to(device) for key, v in micro.items()}
            # DDP all-reduces once per step; FSDP reduce-scatters every micro-batch, so gradients stay sharded
            sync = k == args.grad_accum_steps - 1 or args.world_size == 1 or args.fsdp
            with contextlib.nullcontext() if sync else train_model.no_sync():
                nll, _ = labelled_nll(train_model, micro, args.bf16)  # sft_loss × the micro-batch's labelled tokens
                # DDP averages gradients over ranks, hence the world_size factor
                (nll / global_tokens * args.world_size).backward()
            step_loss += nll.detach()
        if args.world_size > 1:
            dist.all_reduce(step_loss)
        # the global gradient norm (clipped if --max-grad-norm > 0); checked on every rank before the update
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm or math.inf)
        if not (math.isfinite(step_loss.item()) and math.isfinite(grad_norm.item())):
            raise FloatingPointError(f"non-finite loss or gradient at step {step}, before the update: "
                                     "lower --learning-rate, or check the data")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # 3. log: the token-weighted mean loss over every step since the last log, not one step's
        log_loss += step_loss.item()
        log_tokens += global_tokens
        tokens_seen += sum(len(e["input_ids"]) for e in global_batch)
        global_step = (step + 1) * args.batch_size  # samples seen
        if writer and ((step + 1) % 10 == 0 or step + 1 == args.num_steps):
            writer.add_scalar("train/loss", log_loss / log_tokens, global_step)
            writer.add_scalar("train/learning_rate", lr, global_step)
            writer.add_scalar("charts/tokens_per_sec", tokens_seen / (time.time() - start), global_step)
            log_loss, log_tokens = 0.0, 0
        if args.checkpoint_every and (step + 1) % args.checkpoint_every == 0:
            save_checkpoint(os.path.join(args.output_dir, "resume", f"step_{step + 1:07d}"), model, optimizer,
                            {"step": step + 1, "world_size": args.world_size, "num_steps": args.num_steps, "seed": args.seed}, rank)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.num_steps:
            eval_loss = evaluate(model, eval_examples, pad_id, args, device, rank)
            if writer:
                writer.add_scalar("eval/loss", eval_loss, global_step)
                msg = f"step {step + 1}: eval/loss {eval_loss:.4f}"
                if toy_ref_nll is not None:
                    writer.add_scalar("eval/excess_nll_over_ref", eval_loss - toy_ref_nll, global_step)
                    msg += f", P_ref {toy_ref_nll:.4f}, excess {eval_loss - toy_ref_nll:.4f} nats/token"
                tqdm.write(msg)
            if sample_prompts:
                with gathered(model):  # under FSDP every rank gathers the weights, rank 0 samples
                    if writer:
                        samples = sample_completions(model, tokenizer, sample_prompts, args, device, args.seed + step)
                        writer.add_text("eval/samples", "\n\n".join(f"**{p}** → {c}" for p, c in samples), global_step)

    # 4. save model, tokenizer and the arguments for the next stages
    peaks = peak_memory(device, args.world_size)  # of training: loading and saving not counted
    save_model(model, tokenizer, args.output_dir, args, rank)
    if rank == 0:
        result = {"eval_loss": eval_loss}
        if toy_ref_nll is not None:
            result.update(ref_nll=toy_ref_nll, excess_nll=eval_loss - toy_ref_nll)
        with open(os.path.join(args.output_dir, "training_args.json"), "w") as f:
            json.dump({"args": vars(args), "result": result, "peak_memory_gib": peaks}, f, indent=2, default=str)
        print(f"saved to {args.output_dir}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
        print(f"peak memory per rank (GiB): {peaks}")
        writer.close()
    if dist.is_initialized():  # every rank waits for rank 0's save, then all leave together
        dist.barrier()
        del train_model  # DDP's reducer holds the process group: freed now, not during interpreter teardown
        dist.destroy_process_group()
