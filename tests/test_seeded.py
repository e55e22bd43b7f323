"""grpo.py's wiring that its own tests leave open: the sign of the missing-end penalty, through training."""

import math

import pytest
import torch
from conftest import markov_llama, run_script, write_jsonl

import common
import toy_task


@pytest.fixture(scope="module")
def markov_and_zero_rm(tmp_path_factory):
    """(policy, reward model, prompts): P_ref as a layer-free Llama (conftest.markov_llama), a reward model that
    scores every response 0, and a folder of 32 training prompts."""
    from transformers import AutoModelForSequenceClassification

    root = tmp_path_factory.mktemp("seeded")
    policy, rm, prompts = root / "policy", root / "rm", root / "prompts"
    markov_llama(str(policy))
    zero = AutoModelForSequenceClassification.from_pretrained(str(policy), num_labels=1)
    with torch.no_grad():
        zero.score.weight.zero_()
    zero.config.reward_bias = 0.0
    zero.save_pretrained(str(rm))
    common.load_tokenizer(str(policy)).save_pretrained(str(rm))
    texts = toy_task.make_dataset("prompt", "train", num_examples=32)["prompt"]
    prompts.mkdir()
    for split in ("train", "test"):
        write_jsonl(prompts / f"{split}.jsonl", [{"prompt": p} for p in texts])
    return str(policy), str(rm), str(prompts)


def end_probabilities(path):
    """P(EOS | word) of a layer-free Llama after each word (PAD excluded, as sampled): its logits depend on the
    current token alone."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.arange(3, model.config.vocab_size)[:, None]).logits[:, 0]  # after PAD, EOS, UNK
    return logits.double().index_fill(1, torch.tensor([0]), -math.inf).softmax(-1)[:, 1]  # EOS is id 1


def test_the_missing_eos_penalty_teaches_the_policy_to_end(tmp_path, markov_and_zero_rm):
    """Every response scores 0 and there is no KL penalty, so the only reward is −1 for a response cut at
    --response-length without an end token: the responses that ended get the positive advantages, and one iteration
    raises the end token's probability after the words the samples visit (a bonus instead would lower it)."""
    policy, rm, prompts = markov_and_zero_rm
    run_script(
        f"grpo.py --model-name {policy} --reward-model-name {rm} --dataset-name {prompts} --batch-size 64 "
        f"--group-size 4 --num-epochs 2 --max-length 64 --response-length 3 --kl-coef 0 "
        f"--missing-eos-penalty 1 --learning-rate 3e-3 --output-dir {tmp_path / 'grpo'}".split()
    )
    before, after = end_probabilities(policy), end_probabilities(str(tmp_path / "grpo"))
    assert after.mean() > before.mean() + 0.01
