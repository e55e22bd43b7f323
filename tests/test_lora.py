"""LoRA in every trainer (--lora-r): the adapters start the model unchanged, the reference is the policy with its
adapters off (exactly a frozen copy), only the adapters and the stated heads train, the merged weights are the
adapter model's, and every script runs, resumes and hands its model on through the command line."""

import math
import os
import shutil
import time
from types import SimpleNamespace

import pytest
import torch
from conftest import read_json, result_of, run_script, script_error, toy_data_file
from safetensors.torch import load_file
from test_dpo import tensorboard_scalars
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import common
import dpo
import toy_task

LORA = SimpleNamespace(lora_r=8, lora_alpha=32.0, lora_dropout=0.0, lora_target_modules=["all-linear"])
LORA.fsdp = LORA.gradient_checkpointing = False


def pairs(tok):
    """Four toy preference pairs, tokenized as dpo.py does."""
    ds = toy_task.make_dataset("preference", "eval", num_examples=4)
    return common.tokenize_preferences(tok, ds, 64)[0]


def randomise_adapters(model, seed=0):
    """Every LoRA B matrix drawn at random (it starts at 0): the adapters then change the model."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)


def test_adapters_start_the_model_unchanged_and_dpo_at_ln2(toy_base):
    """B = 0: the adapter model's log-probabilities are the full model's exactly, so DPO's loss is ln 2."""
    tok = common.load_tokenizer(toy_base)
    batch = dpo.collate_shared_prompts(pairs(tok), tok.pad_token_id)
    full = dpo.pair_logprobs(AutoModelForCausalLM.from_pretrained(toy_base), batch)[:2]
    lora = dpo.with_lora(AutoModelForCausalLM.from_pretrained(toy_base), LORA)
    adapted = dpo.pair_logprobs(lora, batch)[:2]
    assert all(torch.equal(a, b) for a, b in zip(full, adapted))
    losses, _, _ = dpo.dpo_loss(*adapted, *dpo.pair_logprobs(dpo.AdaptersOff(lora), batch)[:2], beta=0.1)
    torch.testing.assert_close(losses, torch.full((4,), math.log(2)))


@pytest.mark.parametrize("alpha", [32.0, 8.0])
def test_an_adapted_layer_adds_alpha_over_r_times_ba(alpha, toy_base):
    """An adapted linear layer computes x (W + (α / r) B A)ᵀ (Hu et al. 2021, eq. 3), by hand at two α."""
    lora = dpo.with_lora(
        AutoModelForCausalLM.from_pretrained(toy_base), SimpleNamespace(**{**vars(LORA), "lora_alpha": alpha})
    )
    randomise_adapters(lora)
    layer = next(m for m in lora.modules() if hasattr(m, "lora_A") and "default" in m.lora_A)
    W, A, B = layer.base_layer.weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(3, W.shape[1])
    want = x @ (W + alpha / LORA.lora_r * B @ A).T
    torch.testing.assert_close(layer(x), want, rtol=0, atol=1e-5 * want.abs().max().item())


def test_adapters_off_is_exactly_a_frozen_copy(toy_base):
    """The reference for free: with its adapters off, the LoRA model computes what a separately loaded frozen copy
    does, bit for bit, after its adapters moved, in train mode and with LoRA dropout (which then never runs); and
    no gradient reaches any parameter through it."""
    tok = common.load_tokenizer(toy_base)
    batch = dpo.collate_concatenated(pairs(tok), tok.pad_token_id)
    frozen = AutoModelForCausalLM.from_pretrained(toy_base).eval()
    lora = dpo.with_lora(
        AutoModelForCausalLM.from_pretrained(toy_base), SimpleNamespace(**{**vars(LORA), "lora_dropout": 0.5})
    )
    randomise_adapters(lora)
    lora.train()
    reference = dpo.AdaptersOff(lora)
    with torch.no_grad():
        want = dpo.pair_logprobs(frozen, batch)[:2]
    got = dpo.pair_logprobs(reference, batch)[:2]
    assert all(torch.equal(a, b) for a, b in zip(want, got)) and not got[0].requires_grad
    adapted = dpo.pair_logprobs(lora, batch)[0]
    assert (adapted - want[0]).abs().max() > 0.1  # the adapters do change the policy
    assert list(reference.parameters()) == []  # its parameters are the policy's, never its own


def test_only_adapters_and_heads_train_and_merged_weights_are_the_adapter_models(tmp_path, toy_base):
    """SFT and a reward model with --lora-r 8 through the command line: the adapters hold LoRA matrices only (and the
    reward model's head, trained in full); every weight outside the adapted layers is exactly the start's; the
    merged model gives the adapter model's logits and rewards."""
    from peft import PeftModel

    sft, rm = tmp_path / "sft", tmp_path / "rm"
    flags = ["--batch-size", "16", "--max-length", "64", "--lora-r", "8"]
    sft_data = toy_data_file(tmp_path / "sft.jsonl", "sft", 64)
    run_script(["sft.py", "--model-name", toy_base, "--dataset-name", sft_data, "--output-dir", str(sft), *flags])
    pair_data = toy_data_file(tmp_path / "pairs.jsonl", "preference", 64)
    run_script(
        ["reward_model.py", "--model-name", str(sft), "--dataset-name", pair_data, "--output-dir", str(rm), *flags]
    )
    adapters = load_file(str(sft / "adapter" / "adapter_model.safetensors"))
    assert adapters and all("lora_A" in k or "lora_B" in k for k in adapters)
    rm_adapters = load_file(str(rm / "adapter" / "adapter_model.safetensors"))
    assert [k for k in rm_adapters if "lora" not in k] == ["base_model.model.score.weight"]
    start, merged = load_file(f"{toy_base}/model.safetensors"), load_file(str(sft / "model.safetensors"))
    adapted = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    for k in start:
        assert torch.equal(start[k], merged[k]) != any(a in k for a in adapted), k  # only the adapted ones moved
    ids = torch.tensor([toy_task.make_tokenizer()("the plot was great and the acting")["input_ids"]])
    with torch.no_grad():
        for cls, folder, base in ((AutoModelForCausalLM, sft, toy_base), (AutoModelForSequenceClassification, rm, sft)):
            kwargs = {"num_labels": 1} if cls is AutoModelForSequenceClassification else {}
            plain = cls.from_pretrained(str(folder), **kwargs).eval()(input_ids=ids).logits
            model = cls.from_pretrained(str(base), **kwargs)
            common.fit_model(model, common.load_tokenizer(str(folder)))
            with_adapters = PeftModel.from_pretrained(model, str(folder / "adapter")).eval()(input_ids=ids).logits
            torch.testing.assert_close(plain, with_adapters, rtol=0, atol=1e-5 * with_adapters.abs().max().item())


def test_every_trainer_through_its_command_line(tmp_path, toy_base):
    """The chain with --lora-r 8: DPO at ln 2 to start, PPO and GRPO at ratio 1 at their first minibatch and a KL
    to their reference (the policy with its adapters off, not on) once they moved, the start-up lines say so; DPO's
    implicit rewards, against the reference computed during training, move away from 0; a DPO run resumed from a
    checkpoint ends bit-identical (adapters and AdamW moments); every script's learning rate defaults to 10×."""
    flags = ["--batch-size", "16", "--max-length", "64", "--lora-r", "8"]
    data = {k: toy_data_file(tmp_path / f"{k}.jsonl", k, 40) for k in ("sft", "preference", "prompt")}
    sft, rm = str(tmp_path / "sft"), str(tmp_path / "rm")
    run_script(["sft.py", "--model-name", toy_base, "--dataset-name", data["sft"], "--output-dir", sft, *flags])
    run_script(
        ["reward_model.py", "--model-name", sft, "--dataset-name", data["preference"], "--output-dir", rm, *flags]
    )
    dpo_flags = ["dpo.py", "--model-name", sft, "--dataset-name", data["preference"], *flags, "--checkpoint-every", "1"]
    exp = f"test_lora_dpo_{os.getpid()}_{int(time.time())}"
    out = run_script(dpo_flags + ["--output-dir", str(tmp_path / "dpo"), "--exp-name", exp])
    assert "eval/loss 0.6931" in out and "the reference the policy with its adapters off" in out
    # the reference computed during training (no --precompute-ref-logprobs): once the policy moved (after step 1),
    # the implicit rewards β(log π − log π_ref) are not 0, beyond β × float32 rounding of the log-probabilities (48
    # eps of their magnitude, as in test_dpo.py); with the policy as its own reference they would be exactly 0
    logged, beta = tensorboard_scalars(exp), read_json(tmp_path / "dpo" / "training_args.json")["args"]["beta"]
    logprobs = logged["train/logprobs/chosen"] + logged["train/logprobs/rejected"]
    tol = beta * 48 * torch.finfo(torch.float32).eps * max(abs(x) for x in logprobs)
    assert max(abs(x) for x in logged["train/rewards/chosen"] + logged["train/rewards/rejected"]) > tol
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "dpo" / "resume" / "step_0000001", resumed / "resume" / "step_0000001")
    assert "at step 1" in run_script(dpo_flags + ["--resume", "--output-dir", str(resumed)])
    straight, again = (load_file(str(p / "adapter" / "adapter_model.safetensors")) for p in (tmp_path / "dpo", resumed))
    assert all(torch.equal(straight[k], again[k]) for k in straight)
    rl = ["--model-name", sft, "--reward-model-name", rm, "--dataset-name", data["prompt"], "--response-length", "8"]
    for script in ("ppo.py", "grpo.py"):  # two iterations: the second's KL is to a reference the policy has left
        out = run_script([script, *rl, "--num-epochs", "1", "--output-dir", str(tmp_path / script), *flags])
        result = result_of(tmp_path / script)
        assert "adapters off" in out and result["policy/first_minibatch_ratio"] == pytest.approx(1.0, abs=1e-6)
        assert abs(result["objective/kl"]) > 1e-4
    # LoRA's default learning rate is 10× the script's own: on local data files (not the toy task) every script's
    # default is the pretrained LMs' 3e-6 (Args and __main__ of each), so 3e-5 in all five
    for run in (sft, rm, tmp_path / "dpo", tmp_path / "ppo.py", tmp_path / "grpo.py"):
        assert read_json(os.path.join(run, "training_args.json"))["args"]["learning_rate"] == pytest.approx(3e-5), run


def test_lora_refusals_and_adapter_folders(tmp_path, toy_base):
    """--lora-r with --fsdp is refused in one line naming both; an adapter folder, or a run saved with
    --no-lora-merge, passed as the next stage's model stops in one line; the learning rate's default is 10×."""
    for script in ("sft.py", "reward_model.py", "dpo.py", "ppo.py", "grpo.py"):  # before any model loads
        assert "--lora-r with --fsdp" in script_error([script, "--lora-r", "8", "--fsdp"])
    data = toy_data_file(tmp_path / "sft.jsonl", "sft", 32)
    flags = [
        "sft.py",
        "--model-name",
        toy_base,
        "--dataset-name",
        data,
        "--batch-size",
        "16",
        "--lora-r",
        "4",
        "--max-length",
        "64",
    ]
    run_script(flags + ["--no-lora-merge", "--output-dir", str(tmp_path / "sft")])
    assert result_of(tmp_path / "sft") and not (tmp_path / "sft" / "model.safetensors").exists()
    for folder in (tmp_path / "sft", tmp_path / "sft" / "adapter"):
        assert "holds LoRA adapters but no model" in script_error(["dpo.py", "--model-name", str(folder)])
    assert read_json(tmp_path / "sft" / "training_args.json")["args"]["learning_rate"] == pytest.approx(
        3e-5
    )  # 10 × 3e-6


def test_a_tied_head_is_refused_and_an_untied_one_merges_exactly(toy_base):
    """The toy model ties its LM head to its embeddings: merging an lm_head adapter would change the embeddings
    too, so targeting it is refused in one line. Untied, the merged model gives the adapter model's logits."""
    tied = AutoModelForCausalLM.from_pretrained(toy_base)
    lm_head = SimpleNamespace(**{**vars(LORA), "lora_target_modules": ["q_proj", "lm_head"]})
    with pytest.raises(SystemExit, match="lm_head: the model ties its embeddings"):
        dpo.with_lora(tied, lm_head)
    untied = AutoModelForCausalLM.from_pretrained(toy_base, tie_word_embeddings=False)
    model = dpo.with_lora(untied, lm_head)
    randomise_adapters(model)
    ids = torch.tensor([toy_task.make_tokenizer()("the plot was great")["input_ids"]])
    with torch.no_grad():
        want = model.eval()(input_ids=ids).logits
        got = model.merge_and_unload()(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=300 * 1.2e-7 * want.abs().max().item())


def test_sampling_through_adapters_ignores_the_checkpoints_generation_config(toy_base):
    """common.generate swaps a blank generation config into the model that generates: inside a LoRA model (peft)
    too, so a checkpoint's no_repeat_ngram_size does not reach its samples (B = 0: they are the plain model's)."""
    from transformers import GenerationConfig

    tok = common.load_tokenizer(toy_base)
    plain = AutoModelForCausalLM.from_pretrained(toy_base).eval()
    plain.generation_config = GenerationConfig()
    lora = dpo.with_lora(AutoModelForCausalLM.from_pretrained(toy_base), LORA).eval()
    lora.get_base_model().generation_config.no_repeat_ngram_size = 1  # would forbid every repeated word
    batch = common.collate_prompts([p["prompt"] for p in pairs(tok)] * 8, tok.pad_token_id)
    samples = []
    for model in (plain, lora):
        torch.manual_seed(0)
        samples.append(common.generate(model, batch["input_ids"], batch["attention_mask"], tok, 24))
    assert torch.equal(*samples)
