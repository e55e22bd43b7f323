"""Supervised fine-tuning (Ouyang et al. 2022, §3.5): next-token NLL of the completions and end
tokens, prompts masked; a mean over all completion tokens of the step. See docs/sft.md.

    python sft.py  # the toy task: a ~1M-parameter Llama from scratch, CPU, ~4 minutes
    torchrun --nproc_per_node 8 sft.py --model-name EleutherAI/pythia-1b-deduped \
        --dataset-name trl-lib/tldr --learning-rate 3e-6 --batch-size 128 \
        --per-device-batch-size 16 --max-length 600 --bf16 --track
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
    model_name: str = "toy"
    """Hub id or folder of a causal LM; toy: the toy task's tiny Llama, from scratch"""
    dataset_name: str = "toy"
    """toy, a .jsonl/.json/.parquet/.csv file/folder or Hub id: prompt, completion or messages"""
    dataset_train_split: str = "train"
    """split to train on"""
    dataset_eval_split: str = "test"
    """held-out split; without one, 5% of the training split"""
    max_length: int | None = None
    """tokens per example (prompt, completion, end token); default 64 on toy, else 1024"""
    truncation_mode: Literal["keep_start", "keep_end"] = "keep_start"
    """an example over --max-length loses its end (keep_start) or oldest tokens (keep_end)"""
    batch_size: int = 128
    """examples per optimizer step, summed over ranks and micro-batches"""
    per_device_batch_size: int | None = None
    """examples per forward pass on a device (the rest: accumulation); default batch / ranks"""
    num_epochs: float | None = None
    """passes over the training split; default 2 on toy (from scratch), else 1"""
    learning_rate: float | None = None
    """peak AdamW rate; default 3e-3 on toy, else 3e-6 (Huang et al. 2024); LoRA: 10×"""
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """decay after the warmup, to 0 one step after the last"""
    warmup_ratio: float = 0.05
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
    """optimizer steps between evaluations on the held-out split"""

    # ---- SFT ----
    train_on_prompt: bool = False
    """also put the loss on prompt tokens"""
    num_sample_completions: int = 4
    """held-out prompts whose sampled completions are logged at each evaluation"""
    max_new_tokens: int = 24
    """tokens sampled per logged completion"""

    # ---- derived after parsing, not flags ----
    world_size: tyro.conf.Suppress[int] = 1
    grad_accum_steps: tyro.conf.Suppress[int] = 1
    num_steps: tyro.conf.Suppress[int] = 0


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


def labelled_nll(model, batch, bf16=False):
    """(Σ −log p(label) over a collate_sft batch's labelled tokens, their number); the LM head
    runs only where a label is."""
    labels = batch["labels"][:, 1:]  # (B, L-1): position t predicts token t + 1
    keep = labels != common.IGNORE_INDEX
    with torch.autocast(labels.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            logits_to_keep=torch.nn.functional.pad(keep, (0, 1)),
        ).logits  # (R, V): R labelled tokens, row-major
    return -token_logprobs(logits, labels[keep]).sum(), keep.sum()


def lr_multiplier(step, num_steps, args):
    """LR at `step` (from 0) over the peak: linear warmup, then a decay to 0 at step `num_steps`."""
    warmup = int(args.warmup_ratio * num_steps)
    progress = (step - warmup) / max(1, num_steps - warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    decay = {"cosine": cosine, "linear": 1 - progress, "constant": 1.0}
    return (step + 1) / warmup if step < warmup else decay[args.lr_schedule]


@torch.no_grad()
def evaluate(model, examples, pad_id, args, device, rank):
    """Mean NLL per labelled token of every example; each rank a share, summed over ranks."""
    model.eval()
    sums = torch.zeros(2, device=device, dtype=torch.float64)  # NLL, tokens
    mine = examples[rank :: args.world_size]
    # as many forward passes on every rank (under FSDP each is a collective)
    for i in range(0, math.ceil(len(examples) / args.world_size), args.per_device_batch_size):
        micro = mine[i : i + args.per_device_batch_size] or examples[:1]  # counts none
        batch = {k: v.to(device) for k, v in common.collate_sft(micro, pad_id).items()}
        nll, n = labelled_nll(model, batch, args.bf16)
        if i < len(mine):
            sums += torch.stack([nll.double(), n.double()])
    if dist.is_initialized():
        dist.all_reduce(sums)
    model.train()
    return (sums[0] / sums[1]).item()


@torch.no_grad()
def sample_completions(model, tokenizer, prompts, args, device):
    """(prompt, completion) texts sampled at temperature 1, on every rank (FSDP: collectives)."""
    model.eval()
    batch = {k: v.to(device) for k, v in common.collate_prompts(prompts, tokenizer.pad_token_id).items()}
    out = common.generate(
        model, **batch, tokenizer=tokenizer, max_new_tokens=args.max_new_tokens, synced_gpus=args.fsdp
    )
    model.train()
    return list(zip(tokenizer.batch_decode(prompts), tokenizer.batch_decode(out, skip_special_tokens=True)))


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
    from_scratch = args.model_name == "toy"  # the toy task's Llama: toy defaults on any data
    lr_default = args.learning_rate is None
    defaults = {"max_length": (64, 1024), "num_epochs": (2.0, 1.0), "learning_rate": (3e-3, 3e-6)}
    for name, (toy, other) in defaults.items():  # the toy task's, else pretrained LMs'
        if getattr(args, name) is None:
            setattr(args, name, toy if on_toy or from_scratch else other)
    if args.lora_r and lr_default:  # LoRA wants ~10× the rate (Schulman et al. 2025; TRL #4207)
        args.learning_rate *= 10
    toy_longest = 30  # tokens of the longest toy example (6 + 24): P_ref's excess needs them whole
    if on_toy and args.max_length < toy_longest:
        raise ValueError(f"--max-length {args.max_length} cuts toy examples: use at least {toy_longest}")
    rank, device = setup(args)
    per_device = args.per_device_batch_size = args.per_device_batch_size or max(1, args.batch_size // args.world_size)
    args.grad_accum_steps, rest = divmod(args.batch_size, per_device * args.world_size)
    if rest or not args.grad_accum_steps:
        raise ValueError(f"--batch-size must be a multiple of --per-device-batch-size x {args.world_size} ranks")

    # 1. model and tokenizer (a PAD added where there is none or it is an end token)
    from transformers import AutoModelForCausalLM

    tokenizer = common.load_tokenizer(
        args.model_name, ": pass --model-name a Hub id, or a folder save_pretrained wrote"
    )
    if from_scratch:  # built in memory, the same on every rank
        import toy_task

        model = toy_task.make_base_model(args.seed)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model_name, dtype=torch.float32)
    common.fit_model(model, tokenizer, args.max_length)
    model.train()  # from_pretrained returns eval mode; SFT keeps the model's own dropout
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if args.lora_r:
        model = with_lora(model, args)
    model = train_model = to_device(model, device, args)
    if args.world_size > 1 and not args.fsdp:
        train_model = torch.nn.parallel.DistributedDataParallel(model)

    # 2. data: prompts masked, every cut counted; one seeded batch schedule
    train_ds, eval_ds = common.load_splits(
        args.dataset_name, "sft", args.dataset_train_split, args.dataset_eval_split, seed=args.seed
    )
    cut = (args.max_length, args.train_on_prompt, args.truncation_mode)
    train_examples, train_stats = common.tokenize_sft(tokenizer, train_ds, *cut)
    eval_examples, eval_stats = common.tokenize_sft(tokenizer, eval_ds, *cut)
    if rank == 0:
        common.report("train data", train_stats)
        common.report("eval data", eval_stats)
    args.num_steps = int(args.num_epochs * len(train_examples)) // args.batch_size
    if args.num_steps < 1:
        raise ValueError(f"{len(train_examples)} training examples make no step of --batch-size: raise --num-epochs")
    schedule = common.batch_schedule(len(train_examples), args.batch_size, args.num_steps, args.seed)
    lengths = [len(e["input_ids"]) for e in train_examples]  # micro-batches of like lengths: less padding
    schedule = [common.group_by_length(b, lengths, per_device, args.world_size) for b in schedule]
    pad_id = tokenizer.pad_token_id
    prompts = eval_ds.select(range(min(args.num_sample_completions, len(eval_ds))))
    prompts = common.encode_dataset(tokenizer, prompts, "sft")[0]
    ref_nll = None
    if on_toy:  # the exact −log P_ref per token of the held-out examples
        import toy_task

        ref_nll = -sum(toy_task.ref_logprob(p, c, None) for p, c in zip(eval_ds["prompt"], eval_ds["completion"]))
        ref_nll /= sum(len(c.split()) + 1 for c in eval_ds["completion"])  # words + EOS

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
        print(f"{run_name}: {len(train_examples)} train / {len(eval_examples)} eval, {args.num_steps} steps")
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
    log_loss, log_tokens = 0.0, 0
    for step in tqdm(range(first_step, args.num_steps), initial=first_step, total=args.num_steps, disable=rank != 0):
        torch.manual_seed(hash((args.seed, rank, step)))  # dropout's random numbers: resumable
        lr = args.learning_rate * lr_multiplier(step, args.num_steps, args)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # 3. one optimizer step: each rank its slice of the global batch, in micro-batches; each
        # micro-batch's NLL sum over the global batch's labelled tokens: a mean over them all
        global_batch = [train_examples[i] for i in schedule[step]]
        rank_indices = schedule[step][rank * per_rank : (rank + 1) * per_rank]
        labels = [e["labels"][1:] for e in global_batch]  # position t predicts token t + 1
        global_tokens = sum(len(y) - y.count(common.IGNORE_INDEX) for y in labels)
        step_loss = torch.zeros((), device=device)
        for k in range(args.grad_accum_steps):
            idx = rank_indices[k * per_device : (k + 1) * per_device]
            batch = common.collate_sft([train_examples[i] for i in idx], pad_id)
            train_model.require_backward_grad_sync = k == args.grad_accum_steps - 1  # DDP: once a step
            nll, _ = labelled_nll(train_model, {key: v.to(device) for key, v in batch.items()}, args.bf16)
            (nll / global_tokens * args.world_size).backward()  # × world_size: DDP averages over ranks
            step_loss += nll.detach()
        if dist.is_initialized():
            dist.all_reduce(step_loss)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm or math.inf)
        if not math.isfinite(step_loss.item() + grad_norm.item()):  # the same on every rank
            raise FloatingPointError(f"non-finite loss or gradient at step {step}, not applied: lower --learning-rate")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # 4. log: the token-weighted mean loss over all steps since the last log
        log_loss += step_loss.item()
        log_tokens += global_tokens
        tokens_seen += sum(len(e["input_ids"]) for e in global_batch)
        seen = (step + 1) * args.batch_size  # examples
        if writer and ((step + 1) % log_every == 0 or step + 1 == args.num_steps):
            writer.add_scalar("train/loss", log_loss / log_tokens, seen)
            writer.add_scalar("train/learning_rate", lr, seen)
            writer.add_scalar("charts/tokens_per_sec", tokens_seen / (time.time() - start), seen)
            log_loss, log_tokens = 0.0, 0
        if args.checkpoint_every and (step + 1) % args.checkpoint_every == 0:
            path = os.path.join(args.output_dir, "resume", f"step_{step + 1:07d}")
            save_checkpoint(path, model, optimizer, {"step": step + 1, "run": run}, rank)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.num_steps:
            eval_loss = evaluate(model, eval_examples, pad_id, args, device, rank)
            samples = sample_completions(model, tokenizer, prompts, args, device) if prompts else []
            if writer:
                writer.add_scalar("eval/loss", eval_loss, seen)
                writer.add_text("eval/samples", "\n\n".join(f"**{p}** → {c}" for p, c in samples), seen)
                message = f"step {step + 1}: eval/loss {eval_loss:.4f}"
                if ref_nll is not None:  # toy task: 0 is a perfect copy of P_ref
                    writer.add_scalar("eval/excess_nll_over_ref", eval_loss - ref_nll, seen)
                    message += f", excess over P_ref {eval_loss - ref_nll:.4f}"
                tqdm.write(message)

    if first_step == args.num_steps:  # resumed from the final checkpoint
        eval_loss = evaluate(model, eval_examples, pad_id, args, device, rank)

    # 5. save the model, its tokenizer and the results
    save_model(model, tokenizer, args.output_dir, rank, args, last=True)
    if rank == 0:
        result = {"eval_loss": eval_loss}
        if on_toy:
            result.update(ref_nll=ref_nll, excess_nll=eval_loss - ref_nll)
        with open(os.path.join(args.output_dir, "training_args.json"), "w") as f:
            json.dump({"args": vars(args), "result": result}, f, indent=2, default=str)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # bytes (Linux)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device)
        print(f"saved to {args.output_dir}: {result}; peak memory of rank 0: {peak / 2**30:.2f} GiB")
        writer.close()
    # every rank waits for rank 0's save; DDP's reducer freed before the process group
    if dist.is_initialized():
        dist.barrier()
        del train_model
        dist.destroy_process_group()
