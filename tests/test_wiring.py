"""How the scripts wire their tested functions, through their command lines: the KL penalty's sign and direction,
every loss aggregation under accumulation and ranks, PPO's values aligned with the tokens they precede, expert
iteration's rule for cut responses, resuming from the final checkpoint, and evaluate.py's inputs.

Where a bug would only scale the loss (weights counted per micro-batch instead of per minibatch), AdamW would hide
it: its step does not depend on the gradient's scale. With --adam-eps far above every gradient entry, AdamW's
first step is lr / eps × the gradient (plain gradient descent), so such a bug changes the weights (SGD_LIKE)."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    assert_same_weights,
    calls_of,
    markov_llama,
    read_json,
    result_of,
    run_script,
    save_chat_model,
    toy_data_file,
    toy_reward_model,
    write_jsonl,
)

import common
import toy_task

SGD_LIKE = ["--adam-eps", "1000", "--learning-rate", "300", "--max-grad-norm", "0"]  # a step of 0.3 × the gradient


@pytest.fixture(scope="module")
def toy_rm(toy_base, tmp_path_factory):
    """The toy tokenizer and a random reward model (reward_bias 0.25), as a folder."""
    path = str(tmp_path_factory.mktemp("toy_rm"))
    rm = toy_reward_model(toy_base, seed=0)
    rm.config.reward_bias = 0.25
    rm.save_pretrained(path)
    common.load_tokenizer(toy_base).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Toy data files: 32 SFT examples, 32 pairs, and a folder of 64 training prompts."""
    root = tmp_path_factory.mktemp("wiring_data")
    prompts = root / "prompts"
    prompts.mkdir()
    write_jsonl(prompts / "train.jsonl", toy_task.make_dataset("prompt", "train", num_examples=64).to_list())
    write_jsonl(prompts / "test.jsonl", toy_task.make_dataset("prompt", "eval", num_examples=4).to_list())
    return {
        "sft": toy_data_file(root / "sft.jsonl", "sft", 32),
        "pairs": toy_data_file(root / "pairs.jsonl", "preference", 32),
        "prompts": str(prompts),
    }


# ---- resuming from the checkpoint of the final step ---------------------------------------------------
RUNS = {  # two steps each, a checkpoint after the second
    "sft.py": "--model-name toy --dataset-name {sft} --batch-size 8 --num-epochs 0.6",
    "reward_model.py": "--model-name {base} --dataset-name {pairs} --batch-size 8 --num-epochs 0.6 --max-length 64",
    "dpo.py": "--model-name {base} --dataset-name {pairs} --batch-size 8 --num-epochs 0.6 --max-length 64",
    "ppo.py": "--model-name {base} --reward-model-name {rm} --dataset-name {prompts} --batch-size 8 --num-epochs 0.25"
    " --num-minibatches 1 --max-length 64 --response-length 24",
    "grpo.py": "--model-name {base} --reward-model-name {rm} --dataset-name {prompts} --batch-size 8 --num-epochs 0.25"
    " --group-size 2 --num-minibatches 1 --max-length 64 --response-length 24",
}


@pytest.mark.parametrize("script", list(RUNS))
def test_resume_from_the_final_checkpoint(script, tmp_path, toy_base, toy_rm, data):
    """A run resumed from the checkpoint of its last step has nothing left to train: it saves the model and the
    same results, and exits 0."""
    flags = [script, *RUNS[script].format(base=toy_base, rm=toy_rm, **data).split(), "--checkpoint-every", "2"]
    run_script(flags + ["--output-dir", str(tmp_path / "straight")])
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "straight" / "resume" / "step_0000002", resumed / "resume" / "step_0000002")
    assert "at step 2" in run_script(flags + ["--resume", "--output-dir", str(resumed)])
    assert result_of(resumed) == pytest.approx(result_of(tmp_path / "straight"), rel=1e-6)
    assert (resumed / "model.safetensors").exists()


# ---- every loss aggregation: 1 micro-batch = 2 micro-batches = 2 ranks -------------------------------
@pytest.mark.parametrize("aggregation", ["sequence_mean", "token_mean", "constant"])
def test_grpo_aggregations_do_not_depend_on_micro_batches_or_ranks(aggregation, tmp_path, toy_base, toy_rm, data):
    """The same two iterations with one micro-batch of 8 responses, two of 4, and two ranks of 4: the weights of
    each aggregation count the whole minibatch, whatever splits it (gradient descent: a scale error shows)."""
    flags = (
        f"grpo.py --model-name {toy_base} --reward-model-name {toy_rm} --dataset-name {data['prompts']} "
        "--batch-size 8 --group-size 2 --num-minibatches 1 --num-ppo-epochs 2 --num-epochs 0.25 --max-length 64 "
        f"--response-length 24 --kl-coef 0.5 --generation-batch-size 4 --loss-aggregation {aggregation}"
    ).split() + SGD_LIKE
    run_script(flags + ["--per-device-batch-size", "8", "--output-dir", str(tmp_path / "one")])
    run_script(flags + ["--per-device-batch-size", "4", "--output-dir", str(tmp_path / "micro")])
    run_script(flags + ["--output-dir", str(tmp_path / "ranks")], torchrun=2)
    for run in ("micro", "ranks"):
        assert_same_weights(str(tmp_path / "one"), str(tmp_path / run), toy_base)


# ---- the KL penalty: its sign (a larger β, a smaller KL) and direction (k3's arguments) ---------------
@pytest.fixture(scope="module")
def markov_and_random_rm(tmp_path_factory):
    """(policy, reward model): P_ref as a layer-free Llama (conftest.markov_llama), and beside it a layer-free
    reward model whose score is a random weight of the last token: with 4-token responses, most are cut and scored
    by their fourth word, so the policy has something to chase."""
    from transformers import AutoModelForSequenceClassification

    root = tmp_path_factory.mktemp("markov")
    markov_llama(str(root / "policy"))
    rm = AutoModelForSequenceClassification.from_pretrained(str(root / "policy"), num_labels=1)
    torch.manual_seed(0)
    with torch.no_grad():
        rm.score.weight.normal_(0, math.sqrt(1 / rm.config.hidden_size + rm.config.rms_norm_eps))  # N(0, 1) scores
    rm.config.reward_bias = 0.0
    rm.save_pretrained(str(root / "rm"))
    common.load_tokenizer(str(root / "policy")).save_pretrained(str(root / "rm"))
    return str(root / "policy"), str(root / "rm")


@pytest.mark.parametrize(
    "script,extra",
    [("ppo.py", []), ("grpo.py", ["--kl-penalty", "k1_reward"]), ("grpo.py", ["--kl-penalty", "k3_loss"])],
)
def test_a_larger_kl_coefficient_gives_a_smaller_kl(script, extra, tmp_path, markov_and_random_rm, data):
    """Eight iterations from the same seed: the policy drifts from the reference with β ≈ 0 (to a KL of 5–12 nats
    over seeds 1–3) and stays within a quarter of that with β = 5; with the penalty's sign flipped (a bonus) it goes
    about twice as far as with β ≈ 0."""
    policy, rm = markov_and_random_rm
    kls = []
    for beta in (1e-3, 5):  # β = 1e-3: the KL is measured (β = 0 loads no reference), its pull negligible
        run_script(
            f"{script} --model-name {policy} --reward-model-name {rm} --dataset-name {data['prompts']} "
            f"--batch-size 64 --num-epochs 8 --max-length 64 --response-length 4 --missing-eos-penalty 0 "
            f"--learning-rate 3e-3 --kl-coef {beta} --output-dir {tmp_path / str(beta)}".split()
            + extra
        )
        kls.append(result_of(tmp_path / str(beta))["objective/kl"])
    assert kls[0] > 2 and kls[1] < kls[0] / 2, kls


def test_k3_gets_the_policy_then_the_reference(toy_base, tmp_path):
    """k3(logprobs, ref_logprobs) estimates KL(π ‖ π_ref) from the policy's differentiable log-probabilities and
    the reference's fixed ones; swapped, it would be KL(π_ref ‖ π)'s estimate (equal to second order, so no
    trained number tells them apart early)."""
    calls, _ = calls_of(
        "k3",
        f"grpo.py --model-name {toy_base} --reward-fn toy_task:gold_reward --kl-penalty k3_loss --batch-size 16 "
        f"--num-epochs 0.0004 --num-minibatches 1 --num-ppo-epochs 1 --output-dir {tmp_path}".split(),
    )
    assert calls and all(c["logprobs"].requires_grad and not c["ref_logprobs"].requires_grad for c in calls)


# ---- PPO's values: V before token t is read where token t − 1 is ----------------------------------------
def eos_detector(path):
    """A value and reward model with no transformer layers whose head is 1 at the EOS token and 0 at every other
    (the one-hot embeddings of conftest.markov_llama): it scores a response 1 if it ended, and its value before
    any response token is 0, since no token before one is an EOS."""
    from transformers import AutoModelForSequenceClassification

    rm = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    scale = 1 / math.sqrt(1 / rm.config.hidden_size + rm.config.rms_norm_eps)  # RMSNorm of a one-hot
    with torch.no_grad():
        rm.score.weight.zero_()
        rm.score.weight[0, 1] = 1 / scale  # EOS is id 1
    rm.config.reward_bias = 0.0
    return rm


def test_ppo_values_precede_their_tokens(tmp_path, data):
    """With the EOS detector as value model every rollout value is exactly 0, so the returns are explained not at
    all (explained variance 0). Read one position late, the value at an ended response's last token would be the
    detector at its EOS, 1."""
    policy = str(tmp_path / "policy")
    markov_llama(policy)
    eos_detector(policy).save_pretrained(str(tmp_path / "rm"))
    common.load_tokenizer(policy).save_pretrained(str(tmp_path / "rm"))
    run_script(
        f"ppo.py --model-name {policy} --reward-model-name {tmp_path / 'rm'} --dataset-name {data['prompts']} "
        f"--batch-size 16 --num-epochs 0.25 --num-minibatches 1 --max-length 64 --response-length 4 "
        f"--output-dir {tmp_path / 'ppo'}".split()
    )
    result = result_of(tmp_path / "ppo")
    assert 0 < result["charts/eos_rate"] < 1 and result["objective/scores"] == pytest.approx(result["charts/eos_rate"])
    assert result["val/explained_variance"] == 0.0


# ---- expert iteration's data: a response cut without an end token only when all n were ------------------
def test_best_of_n_prefers_responses_that_end(tmp_path, toy_base, toy_rm):
    """A random toy model ends about a quarter of its responses within 24 tokens, so among 8 samples all are cut
    for about 8% of the prompts. The written rows are cut (24 words, no end token) that rarely, not for the ~75%
    that a choice blind to the rule would give, nor nearly all that preferring cut ones would."""
    out = tmp_path / "best.jsonl"
    run_script(
        f"best_of_n.py --ref-policy {toy_base} --reward-model-name {toy_rm} --num-samples 200 --best-of-n 8 "
        f"--output {out}".split()
    )
    words = [len(json.loads(line)["completion"].split()) for line in out.read_text().splitlines()]
    assert len(words) == 200 and np.mean([n == 24 for n in words]) < 0.2


# ---- evaluate.py: runs whose folders share a name; conversations given as messages only ------------------
def test_checkpoints_of_runs_whose_folders_share_a_name(tmp_path):
    ref = str(tmp_path / "ref")
    markov_llama(ref)
    toy_reward_model(ref).save_pretrained(str(tmp_path / "rm"))
    common.load_tokenizer(ref).save_pretrained(str(tmp_path / "rm"))
    for seed in (1, 2):  # runs/seeds/1/ppo/checkpoints and runs/seeds/2/ppo/checkpoints
        for n, name in enumerate(("episode_0000064", "episode_0000128")):
            markov_llama(str(tmp_path / "seeds" / str(seed) / "ppo" / "checkpoints" / name), noise=0.1, seed=n)
    dirs = [str(tmp_path / "seeds" / s / "ppo" / "checkpoints") for s in ("1", "2")]
    run_script(
        f"evaluate.py --policies {ref} --ref-policy {ref} --reward-model-name {tmp_path / 'rm'} --num-samples 20 "
        f"--best-of-n 1 2 --output-dir {tmp_path / 'eval'} --checkpoints-dirs {' '.join(dirs)}".split()
    )
    checkpoints = read_json(tmp_path / "eval" / "results.json")["checkpoints"]
    assert sorted(checkpoints) == sorted(d[: -len("/checkpoints")] for d in dirs)
    assert all([r["episodes"] for r in rows] == [64, 128] for rows in checkpoints.values())


def test_evaluate_takes_conversations_given_as_messages(tmp_path, chat_data):
    """Prompt data with a `messages` column only, as the trainers take it: evaluated (with win rates against the
    conversations' last replies, when each ends with one), and expert iteration's rows written as
    conversational prompt/completion rows that sft.py reads."""
    model = save_chat_model(str(tmp_path / "model"), "chatml")
    toy_reward_model(model).save_pretrained(str(tmp_path / "rm"))
    common.load_tokenizer(model).save_pretrained(str(tmp_path / "rm"))
    rows = Path(chat_data["sft"], "train.jsonl").read_text().splitlines()
    convs = [json.loads(line)["messages"] for line in rows]
    for name, rows in (
        ("prompts", [{"messages": c[:3]} for c in convs]),
        ("replies", [{"messages": c} for c in convs]),
    ):
        (tmp_path / name).mkdir()
        for split in ("train", "test"):
            write_jsonl(tmp_path / name / f"{split}.jsonl", rows)
    flags = f"evaluate.py --ref-policy {model} --reward-model-name {tmp_path / 'rm'} --max-length 96 "
    flags += "--response-length 8 --num-samples 6 --best-of-n 1 2 "
    for name in ("prompts", "replies"):
        run_script(
            f"{flags} --policies {model} --judge {tmp_path / 'rm'} --dataset-name {tmp_path / name} "
            f"--output-dir {tmp_path / name}_eval".split()
        )
        (row,) = read_json(tmp_path / f"{name}_eval" / "results.json")["policies"]
        assert math.isfinite(row["kl_to_ref_policy"]) and ("win_rate" in row) == (name == "replies")
    out = tmp_path / "best.jsonl"
    flags = flags.replace("evaluate.py", "best_of_n.py")
    run_script(f"{flags} --dataset-name {tmp_path / 'prompts'} --output {out}".split())
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [c[:3] for c in convs[:6]]
    assert all(r["completion"][0]["role"] == "assistant" for r in rows)
    run_script(
        f"sft.py --model-name {model} --dataset-name {out} --batch-size 2 --max-length 96 "
        f"--output-dir {tmp_path / 'sft'}".split()
    )


# ---- the GRPO options and the reward functions' rows ------------------------------------------------------
def test_grpo_options_reach_their_functions(toy_base, tmp_path):
    """--cliprange and --cliprange-high, --importance-sampling-level, --advantage batch_std (its default token
    mean) reach the functions that implement them. DAPO's penalty with a buffer of L − 1 tokens (L =
    --response-length) costs each response (|y| − 1) / (L − 1), as |y| ≥ 1; so (β = 0, no missing-EOS penalty) the
    reward is the score less (mean |y| − 1) / (L − 1)."""
    calls, _ = calls_of(
        "grpo_policy_loss group_advantages token_weights",
        f"grpo.py --model-name {toy_base} --reward-fn toy_task:gold_reward --advantage batch_std --cliprange 0.1 "
        "--cliprange-high 0.3 --importance-sampling-level sequence --overlong-buffer 23 --missing-eos-penalty 0 "
        f"--kl-coef 0 --batch-size 16 --num-epochs 0.0004 --num-minibatches 1 --output-dir {tmp_path}".split(),
    )
    seen = {name: [c for c in calls if c["function"] == name] for name in ("grpo_policy_loss", "group_advantages")}
    assert {(c["clip_low"], c["clip_high"], c["level"]) for c in seen["grpo_policy_loss"]} == {(0.1, 0.3, "sequence")}
    assert [c["kind"] for c in seen["group_advantages"]] == ["batch_std"]
    assert {c["aggregation"] for c in calls if c["function"] == "token_weights"} == {"token_mean"}
    result = result_of(tmp_path)
    penalty = result["objective/rlhf_reward"] - result["objective/scores"]
    assert penalty == pytest.approx(-(result["charts/response_length"] - 1) / 23, rel=1e-5)


@pytest.mark.parametrize("script,rollout", [("ppo.py", "rollout"), ("grpo.py", "rollout")])
def test_reward_fns_get_the_rows_their_responses_answer(script, rollout, toy_base, tmp_path):
    """Each response is scored with its own prompt's row: the prompts of the rows passed to a reward function are,
    in order, those the rollout sampled from (GRPO: each repeated G times). (The toy task's gold reward cannot
    see a shuffle: it depends on the prompt only through a repeated first word.)"""
    calls, _ = calls_of(
        f"{rollout} score_responses",  # the rows it passes on to each reward function
        f"{script} --model-name {toy_base} --reward-fn toy_task:gold_reward --batch-size 16 --num-epochs 0.0004 "
        f"--num-minibatches 1 --num-ppo-epochs 1 --output-dir {tmp_path}".split(),
    )
    sampled, scored = (c for c in calls if c["function"] == rollout), (c for c in calls if c["function"] != rollout)
    tokenizer = common.load_tokenizer(toy_base)
    for s, r in zip(sampled, scored, strict=True):
        prompts = tokenizer.batch_decode(s["queries"], skip_special_tokens=True)
        assert len(prompts) == 16 and prompts == [row["prompt"] for row in r["rows"]]
