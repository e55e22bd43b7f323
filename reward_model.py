"""Reward model (Stiennon et al. 2020, §3.4): the SFT model with a scalar head, r(x, y) read at the
response's end token, maximising log σ(r(x, y_c) − r(x, y_r)); reference responses' mean reward is
stored as config.reward_bias. See docs/reward_model.md.

    python reward_model.py  # from runs/models/sft on the toy task's pairs, CPU, ~2.5 minutes
    torchrun --nproc_per_node 8 reward_model.py --dataset-name trl-lib/tldr-preference \
        --reference-dataset-name trl-lib/tldr --learning-rate 3e-6 --per-device-batch-size 8 \
        --max-length 640 --bf16
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

import numpy as np
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
    """Hub id or folder of the model to start from (sft.py's)"""
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
    """peak AdamW rate; default 1e-3 on toy, else 3e-6 (Huang et al. 2024); LoRA: 10×"""
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

    # ---- reward model ----
    center_rewards_coefficient: float = 0.0
    """weight of mean((r_chosen + r_rejected)²), keeping rewards near 0 (Eisenstein et al. 2023)"""
    reference_dataset_name: str | None = None
    """SFT data whose responses score 0 on average; default toy's, else the chosen responses"""
    num_reference_examples: int = 2000
    """reference responses averaged for that (the first of the dataset)"""

    # ---- derived after parsing, not flags ----
    world_size: tyro.conf.Suppress[int] = 1
    grad_accum_steps: tyro.conf.Suppress[int] = 1
    num_steps: tyro.conf.Suppress[int] = 0


def reward_loss(chosen_rewards, rejected_rewards, margin=None, center_rewards_coefficient=0.0):
    """Rewards (B,) of chosen and rejected responses, margin (B,) or None (Llama 2) -> the mean
    −log σ(r_c − r_r − m) + coef · mean (r_c + r_r)² (Eisenstein et al. 2023)."""
    diff = chosen_rewards - rejected_rewards - (0 if margin is None else margin)
    return -F.logsigmoid(diff).mean() + center_rewards_coefficient * ((chosen_rewards + rejected_rewards) ** 2).mean()


def rewards_at_eos(model, input_ids, attention_mask):
    """Rewards (N,) of right-padded sequences (N, L) at the last non-PAD token (the end token),
    minus config.reward_bias."""
    bias = getattr(getattr(model, "module", model).config, "reward_bias", 0.0)
    return model(input_ids=input_ids, attention_mask=attention_mask).logits.squeeze(-1).float() - bias


def collate_pairs(pairs, pad_id):
    """B pairs -> right-padded input_ids, attention_mask (2B, L): chosen rows, then rejected."""
    seqs = [p["prompt"] + p["chosen"] for p in pairs] + [p["prompt"] + p["rejected"] for p in pairs]
    return {"input_ids": common.pad(seqs, pad_id), "attention_mask": common.attention_mask(seqs)}


def lr_multiplier(step, num_steps, args):
    """LR at `step` (from 0) over the peak: linear warmup, then a decay to 0 at step `num_steps`."""
    warmup = int(args.warmup_ratio * num_steps)
    progress = (step - warmup) / max(1, num_steps - warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    decay = {"cosine": cosine, "linear": 1 - progress, "constant": 1.0}
    return (step + 1) / warmup if step < warmup else decay[args.lr_schedule]


@torch.no_grad()
def score(model, seqs, pad_id, args, device, rank):
    """Rewards (N,) of token-id sequences, in order; each rank scores a share, summed over ranks."""
    model.eval()
    out = torch.zeros(len(seqs), device=device)
    mine = list(range(rank, len(seqs), args.world_size))
    size = 2 * args.per_device_batch_size
    # as many forward passes on every rank (under FSDP each is a collective)
    for i in range(0, math.ceil(len(seqs) / args.world_size), size):
        idx = mine[i : i + size]
        batch = [seqs[j] for j in idx or [0]]  # a rank out of sequences keeps none
        ids, mask = common.pad(batch, pad_id).to(device), common.attention_mask(batch).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            out[idx] = rewards_at_eos(model, ids, mask)[: len(idx)]
    if dist.is_initialized():
        dist.all_reduce(out)
    model.train()
    return out.cpu()


def reward_metrics(rewards, num_pairs):
    """The logged statistics by name, sums over pairs, from rewards (2B,): B chosen, then B rejected."""
    chosen, rejected = rewards[:num_pairs], rewards[num_pairs:]
    return {
        "loss": reward_loss(chosen, rejected) * num_pairs,
        "accuracy": (chosen > rejected).float().sum(),
        "margin": (chosen - rejected).sum(),
        "reward_chosen": chosen.sum(),
        "reward_rejected": rejected.sum(),
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
    defaults = {"max_length": (64, 1024), "learning_rate": (1e-3, 3e-6)}
    for name, (toy, other) in defaults.items():  # the toy task's, else pretrained LMs'
        if getattr(args, name) is None:
            setattr(args, name, toy if on_toy else other)
    if args.lora_r and lr_default:  # LoRA wants ~10× the rate (Schulman et al. 2025; TRL #4207)
        args.learning_rate *= 10
    if on_toy and args.reference_dataset_name is None:
        args.reference_dataset_name = "toy"
    rank, device = setup(args)
    per_device = args.per_device_batch_size = args.per_device_batch_size or max(1, args.batch_size // args.world_size)
    args.grad_accum_steps, rest = divmod(args.batch_size, per_device * args.world_size)
    if rest or not args.grad_accum_steps:
        raise ValueError(f"--batch-size must be a multiple of --per-device-batch-size x {args.world_size} ranks")

    # 1. the SFT model with a scalar head, dropout off (it makes rewards noisy: Huang et al. 2024)
    from transformers import AutoConfig, AutoModelForSequenceClassification

    tokenizer = common.load_tokenizer(args.model_name, ": run `python sft.py` first, or pass --model-name")
    config = common.without_dropout(AutoConfig.from_pretrained(args.model_name, num_labels=1, reward_bias=0.0))
    model = AutoModelForSequenceClassification.from_pretrained(args.model_name, config=config, dtype=torch.float32)
    common.fit_model(model, tokenizer, args.max_length)
    # head ~ N(0, 1/√(d + 1)) (Stiennon et al.), drawn before sharding: rank 0's on every rank
    torch.nn.init.normal_(model.score.weight, std=1 / math.sqrt(model.config.hidden_size + 1))
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if args.lora_r:  # the adapters, and the head in full
        model = with_lora(model, args, head=True)
    model = train_model = to_device(model.train(), device, args)
    if args.world_size > 1 and not args.fsdp:
        train_model = torch.nn.parallel.DistributedDataParallel(model)

    # 2. data: prompt + chosen, prompt + rejected, each with its end token; ties, long pairs dropped
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
    eval_seqs = [p["prompt"] + p[k] for k in ("chosen", "rejected") for p in eval_pairs]

    def evaluate():
        """Held-out means of reward_metrics; the rewards (2P,)."""
        rewards = score(model, eval_seqs, pad_id, args, device, rank)
        sums = reward_metrics(rewards, len(eval_pairs))
        return {name: (value / len(eval_pairs)).item() for name, value in sums.items()}, rewards

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
        print(f"{run_name}: {len(train_pairs)} train / {len(eval_pairs)} eval pairs, {args.num_steps} steps")
        print(f"{args.world_size} rank(s) x {args.grad_accum_steps} micro-batch(es) of {per_device}")

    optimizer = torch.optim.AdamW(
        model.parameters(), args.learning_rate, eps=args.adam_eps, weight_decay=args.weight_decay
    )
    run = {"world_size": args.world_size, "num_steps": args.num_steps, "seed": args.seed}
    first_step = load_checkpoint(args.output_dir, model, optimizer, run)["step"] if args.resume else 0
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

        # 3. one optimizer step: each rank its slice of the global batch, in micro-batches; each
        # micro-batch's mean weighted by its share of the global batch: a mean over all its pairs
        global_batch = [train_pairs[i] for i in schedule[step]]
        rank_indices = schedule[step][rank * per_rank : (rank + 1) * per_rank]
        step_stats = {}
        for k in range(args.grad_accum_steps):
            idx = rank_indices[k * per_device : (k + 1) * per_device]
            batch = collate_pairs([train_pairs[i] for i in idx], pad_id)
            train_model.require_backward_grad_sync = k == args.grad_accum_steps - 1  # DDP: once a step
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                # (2b,): b chosen, then b rejected
                rewards = rewards_at_eos(train_model, **{key: v.to(device) for key, v in batch.items()})
            loss = reward_loss(
                rewards[: len(idx)], rewards[len(idx) :], center_rewards_coefficient=args.center_rewards_coefficient
            )
            (loss * len(idx) / args.batch_size * args.world_size).backward()  # × world_size: DDP averages
            accumulate(step_stats, reward_metrics(rewards.detach(), len(idx)))
        step_stats = all_reduce_sums(step_stats, device)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm or math.inf)
        if not math.isfinite(step_stats["loss"] + grad_norm.item()):  # the same on every rank
            raise FloatingPointError(f"non-finite loss or gradient at step {step}, not applied: lower --learning-rate")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # 4. log: pair-weighted means over all steps since the last log
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
            final, _ = evaluate()
            if writer:
                for name, value in final.items():
                    writer.add_scalar(f"eval/{name}", value, seen)
                tqdm.write(f"step {step + 1}: eval/accuracy {final['accuracy']:.4f}, eval/loss {final['loss']:.4f}")

    # 5. normalise: the reference responses' mean reward becomes config.reward_bias, so that they
    # score 0 (Stiennon et al. 2020); one over --max-length would be read mid-response: skipped
    if args.reference_dataset_name is not None:
        ref_ds = common.load_splits(args.reference_dataset_name, "sft", flag="--reference-dataset-name")[0]
        ref_ds = ref_ds.select(range(min(args.num_reference_examples, len(ref_ds))))
        no_limit = 10**9  # a --max-length no response reaches: each tokenized whole
        ref_seqs = [e["input_ids"] for e in common.tokenize_sft(tokenizer, ref_ds, no_limit)[0]]
        ref_seqs = [s for s in ref_seqs if len(s) <= args.max_length]
        skipped = len(ref_ds) - len(ref_seqs)
        what = f"{len(ref_seqs)} responses of {args.reference_dataset_name!r} ({skipped} too long or dropped)"
    else:
        ref_seqs = [p["prompt"] + p["chosen"] for p in train_pairs[: args.num_reference_examples]]
        what = f"the chosen responses of {len(ref_seqs)} training pairs (--reference-dataset-name for SFT data)"
    if not ref_seqs:
        raise ValueError(f"no reference response fits --max-length {args.max_length} with its end token; raise it")
    model.config.reward_bias = score(model, ref_seqs, pad_id, args, device, rank).mean().item()
    final, rewards = evaluate()  # accuracy and margin do not move
    final.update(reward_std=rewards.std().item(), reward_bias=model.config.reward_bias)
    if on_toy:  # how close to a perfect reward model; how well it follows the gold one on P_ref's samples
        import toy_task

        samples = toy_task.make_dataset("sft", "eval", seed=args.seed)
        seqs = [e["input_ids"] for e in common.tokenize_sft(tokenizer, samples, args.max_length)[0]]
        learned = score(model, seqs, pad_id, args, device, rank).numpy()
        gold = toy_task.gold_reward(samples["prompt"], samples["completion"])
        final["bayes_accuracy"] = toy_task.bayes_accuracy(eval_ds)
        final["gold_pearson"] = float(np.corrcoef(learned, gold)[0, 1])

    # 6. save the model (config.reward_bias in its config.json), tokenizer and results
    save_model(model, tokenizer, args.output_dir, rank, args, last=True)
    if rank == 0:
        print(f"reward normalisation: the mean reward of {what} is stored as config.reward_bias")
        for name, value in final.items():
            writer.add_scalar(f"eval/{name}", value, args.num_steps * args.batch_size)
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
