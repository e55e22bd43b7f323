"""The peer's side of the benchmark: TRL's trainers on the same model folder, data files and batch shapes as
our scripts, in TRL's own environment (see setup_trl.sh; never a requirement of this project):
    PY benchmark/trl_side.py {sft,reward,dpo,ppo,grpo,rloo} MODEL DATA --batch-size B --max-length L [--iterations N]
        [--lora-r R]
sft/reward/dpo: one epoch over DATA/train.jsonl (TRL 1.16); ppo: N iterations of 256 episodes from DATA's
prompts, 4 minibatches, 4 epochs, 24 response tokens (TRL 1.12, the last release with PPOTrainer); grpo/rloo
(TRL 1.16): N iterations of 64 prompts answered 4 times each, 4 minibatches, 4 epochs, 24 response tokens, the
reward model MODEL; grpo --reward-fn: a verifiable task (real_models.py), see the flag."""

import argparse
import importlib
import os
import sys
import tempfile

import numpy as np

os.environ["HF_HUB_OFFLINE"], os.environ["WANDB_DISABLED"] = "1", "true"
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

p = argparse.ArgumentParser()
p.add_argument("mode", choices=["sft", "reward", "dpo", "ppo", "grpo", "rloo"])
p.add_argument("model")
p.add_argument("data")
p.add_argument("--batch-size", type=int, default=64)
p.add_argument("--max-length", type=int, default=64)
p.add_argument("--learning-rate", type=float, default=1e-4)
p.add_argument("--beta", type=float, default=0.1)
p.add_argument("--iterations", type=int, default=10)
p.add_argument("--rollout-batch-size", type=int, default=64)
p.add_argument("--lora-r", type=int, default=0, help="dpo: peft's LoRA on every linear layer, alpha 32, dropout 0")
p.add_argument("--per-device-batch-size", type=int, help="sft/reward/dpo: micro-batch (the rest accumulated)")
p.add_argument("--max-steps", type=int, default=-1, help="reward/dpo: optimizer steps (default one epoch)")
p.add_argument("--eval-every", type=int, default=0, help="reward/dpo: steps between evaluations on DATA/test.jsonl")
p.add_argument("--order-seed", type=int, help="reward/dpo: train in the order our scripts draw with --seed this")
p.add_argument(
    "--reward-fn",
    help="grpo: this project's MODULE:FUNCTION (rewards:exact_answer) as the reward, not MODEL's reward model;"
    " N generations of --batch-size responses (4 per prompt, 32 tokens), 4 epochs of micro-batch steps, β --beta,"
    " loss_type grpo, constant lr, the model saved to --output-dir every --save-every generations; TRL shuffles each"
    " generation's responses once and keeps that split for its 4 epochs, where grpo.py reshuffles its groups per epoch",
)
p.add_argument("--save-every", type=int, default=2)
p.add_argument("--output-dir", default=tempfile.mkdtemp())
a = p.parse_args()
tok = AutoTokenizer.from_pretrained(a.model)
common = {
    "output_dir": a.output_dir,
    "report_to": [],
    "save_strategy": "no",
    "use_cpu": True,
    "bf16": False,
    "dataloader_num_workers": 0,
    "disable_tqdm": True,
    "logging_steps": 10,
    "learning_rate": a.learning_rate,
    "gradient_checkpointing": False,
    "seed": 1,
}
train = load_dataset("json", data_files=os.path.join(a.data, "train.jsonl"), split="train")
if a.order_seed is not None:  # common.batch_schedule's first epoch, read in order
    train = train.select(np.random.default_rng(a.order_seed).permutation(len(train)))
    common["train_sampling_strategy"] = "sequential"
if a.eval_every:  # evaluated at the start, every N steps and at the end (rewards/accuracies, margins)
    test = load_dataset("json", data_files=os.path.join(a.data, "test.jsonl"), split="train")
    common |= {"eval_strategy": "steps", "eval_steps": a.eval_every, "eval_on_start": True}
if a.max_steps > 0:
    common["max_steps"] = a.max_steps
micro = a.per_device_batch_size or a.batch_size
if micro != a.batch_size:
    common["gradient_accumulation_steps"] = a.batch_size // micro
common["per_device_eval_batch_size"] = micro
if a.mode == "sft":
    from trl import SFTConfig, SFTTrainer  # prompt/completion rows: loss on the completion only (TRL's default)

    args = SFTConfig(
        per_device_train_batch_size=micro,
        num_train_epochs=1,
        max_length=a.max_length,
        packing=False,
        lr_scheduler_type="cosine",
        **common,
    )
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(a.model), args=args, train_dataset=train, processing_class=tok
    )
elif a.mode == "dpo":
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(
        per_device_train_batch_size=micro, num_train_epochs=1, beta=a.beta, max_length=a.max_length, **common
    )
    peft_config = None
    if a.lora_r:  # as dpo.py --lora-r: every linear layer of the decoder, the reference the adapters off
        from peft import LoraConfig

        peft_config = LoraConfig(r=a.lora_r, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(a.model),
        args=args,
        train_dataset=train,
        eval_dataset=test if a.eval_every else None,
        processing_class=tok,
        peft_config=peft_config,
    )
elif a.mode == "reward":
    from trl import RewardConfig, RewardTrainer

    args = RewardConfig(per_device_train_batch_size=micro, num_train_epochs=1, max_length=a.max_length, **common)
    trainer = RewardTrainer(
        model=AutoModelForSequenceClassification.from_pretrained(a.model, num_labels=1),
        args=args,
        train_dataset=train,
        eval_dataset=test if a.eval_every else None,
        processing_class=tok,
    )
elif a.mode == "grpo" and a.reward_fn:  # as real_models.py's grpo.py: one optimizer step per micro-batch
    from trl import GRPOConfig, GRPOTrainer

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # rewards.py
    module, name = a.reward_fn.split(":")
    steps = 4 * (a.batch_size // micro)  # per generation: 4 epochs of its micro-batches
    common.pop("gradient_accumulation_steps", None)
    common |= {"save_strategy": "steps", "save_steps": steps * a.save_every, "save_only_model": True}
    args = GRPOConfig(
        per_device_train_batch_size=micro,
        steps_per_generation=a.batch_size // micro,
        num_generations=4,
        num_iterations=4,
        max_completion_length=32,
        temperature=1.0,
        beta=a.beta,
        loss_type="grpo",
        lr_scheduler_type="constant",
        shuffle_dataset=a.order_seed is None,
        max_steps=steps * a.iterations,
        **(common | {"logging_steps": steps}),
    )
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(a.model),
        reward_funcs=getattr(importlib.import_module(module), name),
        args=args,
        train_dataset=train,
        processing_class=tok,
    )
elif a.mode in ("grpo", "rloo"):
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    Config, Trainer = (GRPOConfig, GRPOTrainer) if a.mode == "grpo" else (RLOOConfig, RLOOTrainer)
    # a generation of 256 responses (64 prompts x 4), reused for 4 epochs of 4 minibatches of 64: 16 steps each
    args = Config(
        per_device_train_batch_size=64,
        steps_per_generation=4,
        num_generations=4,
        num_iterations=4,
        max_completion_length=24,
        temperature=1.0,
        beta=0.5,
        max_steps=16 * a.iterations,
        **common,
    )
    rm = AutoModelForSequenceClassification.from_pretrained(a.model, num_labels=1)
    trainer = Trainer(
        model=AutoModelForCausalLM.from_pretrained(a.model),
        reward_funcs=rm,
        args=args,
        train_dataset=train.select(range(64 * a.iterations)),
        processing_class=tok,
        reward_processing_classes=tok,
    )
else:
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    tok.padding_side = "left"
    train = train.select(range(256 * a.iterations)).map(
        lambda ex: {"input_ids": tok(ex["prompt"]).input_ids}, remove_columns=["prompt"]
    )
    # TRL 1.12's batch is per_device_train_batch_size × gradient_accumulation_steps (64 × 1 gave 40 iterations of
    # 64 episodes, minibatches of 16); micro-batches are per_device_train_batch_size rows of each minibatch
    # (ppo_trainer.py's micro-batch loop): 256 makes one micro-batch, the minibatch of 64, as ours
    args = PPOConfig(
        per_device_train_batch_size=256,
        gradient_accumulation_steps=1,
        num_mini_batches=4,
        num_ppo_epochs=4,
        total_episodes=256 * a.iterations,
        response_length=24,
        stop_token="eos",
        temperature=1.0,
        num_sample_generations=0,
        local_rollout_forward_batch_size=a.rollout_batch_size,
        kl_coef=0.5,
        missing_eos_penalty=1.0,
        **common,
    )
    load = lambda cls, **kw: cls.from_pretrained(a.model, **kw)
    trainer = PPOTrainer(
        args=args,
        processing_class=tok,
        model=load(AutoModelForCausalLM),
        ref_model=load(AutoModelForCausalLM),
        reward_model=load(AutoModelForSequenceClassification, num_labels=1),
        value_model=load(AutoModelForSequenceClassification, num_labels=1),
        train_dataset=train,
    )
trainer.train()
