"""grpo.py: group advantages, loss aggregation, the clipped loss and the KL estimators' gradients by hand;
the script through its command line (toy task with the gold reward; DDP and FSDP against one process; resume)."""

import math
import shutil

import pytest
import torch
import transformers
from conftest import assert_same_weights, calls_of, markov_llama, result_of, run_script, toy_reward_model, write_jsonl
from safetensors.torch import load_file

import toy_task
from grpo import group_advantages, grpo_policy_loss, k3, overlong_penalty, token_weights


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0])  # two groups of 4; the second all alike
    centred = [-2.0, -1.0, 0.0, 3.0]
    std = math.sqrt((4 + 1 + 0 + 9) / 3)  # the group's sample standard deviation
    torch.testing.assert_close(
        group_advantages(rewards, 4, "grpo"), torch.tensor([c / (std + 1e-4) for c in centred] + [0.0] * 4)
    )
    torch.testing.assert_close(group_advantages(rewards, 4, "dr_grpo"), torch.tensor(centred + [0.0] * 4))
    # RLOO: each reward minus the mean of the other three, written out
    loo = [
        r - (sum(rewards[g * 4 : g * 4 + 4].tolist()) - r) / 3
        for g in (0, 1)
        for r in rewards[g * 4 : g * 4 + 4].tolist()
    ]
    torch.testing.assert_close(group_advantages(rewards, 4, "rloo"), torch.tensor(loo))
    assert loo[0] == pytest.approx(1 - 11 / 3)


def test_token_weights_by_hand():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]]).bool()  # responses of 2, 1 and 3 tokens
    want = {
        "sequence_mean": [[1 / 6, 1 / 6, 0], [1 / 3, 0, 0], [1 / 9, 1 / 9, 1 / 9]],  # 1/(|y| N), N = 3
        "token_mean": [[1 / 6, 1 / 6, 0], [1 / 6, 0, 0], [1 / 6, 1 / 6, 1 / 6]],  # 1/6 tokens
        "constant": [[1 / 12, 1 / 12, 0], [1 / 12, 0, 0], [1 / 12, 1 / 12, 1 / 12]],  # 1/(N · 4), responses ≤ 4
    }
    for how, w in want.items():
        torch.testing.assert_close(token_weights(mask, how, 3, 6, 4), torch.tensor(w))
    for how, w in want.items():  # split into micro-batches with the minibatch's counts: the minibatch's weights
        parts = torch.cat([token_weights(m, how, 3, 6, 4) for m in (mask[:2], mask[2:])])
        torch.testing.assert_close(parts, torch.tensor(w))
    for how in want:  # --mask-truncated with every response cut: no token, weights 0 (not 0 / 0)
        assert token_weights(torch.zeros(2, 3, dtype=torch.bool), how, 2, torch.tensor(0.0), 4).count_nonzero() == 0


@pytest.mark.parametrize(
    "adv,ratio,want,clipped",
    [(1.0, 1.1, -1.1, 0.0), (1.0, 1.5, -1.2, 1.0), (1.0, 0.5, -0.5, 0.0), (-1.0, 1.5, 1.5, 0.0), (-1.0, 0.5, 0.8, 1.0)],
)
def test_policy_loss_clipping_regimes_and_weights(adv, ratio, want, clipped):
    """One valid token of weight 0.5 and a padding slot: the loss is 0.5 × PPO's clipped surrogate, worked by
    hand per regime (ε = 0.2), the gradient 0.5 × −A·ρ where unclipped, 0 where the clip binds."""
    old = torch.tensor([[-2.0, -1.0]])
    logprobs = torch.tensor([[-2.0 + math.log(ratio), 123.0]], requires_grad=True)
    loss, stats = grpo_policy_loss(logprobs, old, torch.tensor([adv]), torch.tensor([[0.5, 0.0]]), 0.2, 0.2)
    assert loss.item() == pytest.approx(0.5 * want, rel=1e-5) and stats["surrogate"].item() == pytest.approx(
        want, rel=1e-5
    )
    assert stats["clipfrac"].item() == clipped and stats["ratio"].item() == pytest.approx(ratio, rel=1e-5)
    loss.backward()
    assert logprobs.grad[0, 0].item() == pytest.approx(0.0 if clipped else -0.5 * adv * ratio, rel=1e-5, abs=1e-7)
    assert logprobs.grad[0, 1].item() == 0.0


def test_which_kl_each_penalty_follows():
    """On a categorical π_θ = softmax(θ) over 6 outcomes (one-token responses), exact expectations by enumeration:
    k3 in the loss, differentiated on samples of π, has the expected gradient of KL(π_ref ‖ π), not of KL(π ‖
    π_ref); k1 in the reward (the score-function gradient, as grpo.py's and ppo.py's default) has that of
    KL(π ‖ π_ref). Autograd gives both KLs' gradients from their closed forms."""
    torch.manual_seed(0)
    theta = torch.randn(6, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(6, dtype=torch.float64).log_softmax(0)

    def kl(p_log, q_log):
        return (p_log.exp() * (p_log - q_log)).sum()

    forward = torch.autograd.grad(kl(theta.log_softmax(0), ref), theta)[0]  # ∇KL(π ‖ π_ref)
    reverse = torch.autograd.grad(kl(ref, theta.log_softmax(0)), theta)[0]  # ∇KL(π_ref ‖ π)
    logp = theta.log_softmax(0)
    p = logp.exp().detach()
    k3_grad = torch.autograd.grad((p * k3(logp, ref)).sum(), theta)[0]  # E_π[∇ k3(y)]: y ~ π, fixed
    torch.testing.assert_close(k3_grad, reverse)
    assert (k3_grad - forward).abs().max() > 0.05
    logp = theta.log_softmax(0)
    k1 = (logp - ref).detach()  # k1 as a reward −β·k1: the score-function gradient E_π[∇log π(y) · −k1(y)]
    k1_grad = torch.autograd.grad((p * logp * -k1).sum(), theta)[0]
    torch.testing.assert_close(k1_grad, -forward)


@pytest.fixture(scope="module")
def toy_rm(toy_base, tmp_path_factory):
    """A folder with the toy tokenizer and a random reward model (reward_bias 0.25)."""
    import common

    path = str(tmp_path_factory.mktemp("toy_rm"))
    rm = toy_reward_model(toy_base, seed=0)
    rm.config.reward_bias = 0.25
    rm.save_pretrained(path)
    common.load_tokenizer(toy_base).save_pretrained(path)
    return path


def test_smoke_toy_gold_reward_rloo_k3(tmp_path, toy_base):
    """On the toy task with the exact gold reward (no reward model), RLOO's advantages, k3 in the loss, Dr. GRPO's
    constant normaliser: the first minibatch has ratio 1, the statistics are finite."""
    out = tmp_path / "grpo"
    run_script(
        f"grpo.py --model-name {toy_base} --reward-fn toy_task:gold_reward --advantage rloo --kl-penalty k3_loss "
        f"--loss-aggregation constant --batch-size 32 --group-size 4 --num-minibatches 2 --num-epochs 0.0013 "
        f"--save-every 1 --output-dir {out}".split()
    )
    result = result_of(out)
    assert result["policy/first_minibatch_ratio"] == pytest.approx(1.0, abs=1e-6)
    for k in ("objective/scores", "toy/gold_reward", "toy/kl_to_ref", "loss/policy", "policy/k3"):
        assert math.isfinite(result[k]), k
    assert result["objective/scores"] == pytest.approx(result["toy/gold_reward"])  # the score is the gold reward
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["episode_0000032", "episode_0000064"]


def test_ddp_fsdp_and_resume_match_single_process(tmp_path, toy_base, toy_rm):
    """A reward model and a reward function together: 2 processes take the same steps as 1 (groups stay on one
    rank; sampling seeded per generate call of the global batch; each rank scores its own samples; the losses'
    weights count the whole minibatch; batch_std's std is of the whole batch, every rank's rewards), with DDP and
    with FSDP; a DDP run resumed after iteration 1 ends bit-identical."""
    data = tmp_path / "prompts"
    data.mkdir()
    write_jsonl(
        data / "train.jsonl",
        [{"prompt": p} for p in toy_task.make_dataset("prompt", "train", num_examples=8)["prompt"]],
    )
    write_jsonl(data / "test.jsonl", [{"prompt": "the plot"}])
    flags = (
        f"grpo.py --model-name {toy_base} --reward-model-name {toy_rm} --dataset-name {data} --batch-size 8 "
        "--group-size 2 --num-minibatches 1 --num-ppo-epochs 2 --num-epochs 2 --max-length 64 --response-length 24 "
        "--learning-rate 3e-3 --kl-coef 0.5 --loss-aggregation token_mean"  # token counts summed over ranks
        " --reward-fn toy_task:gold_reward --reward-weights 0.5 1"  # each rank scores its own samples
        " --advantage batch_std"  # the std's sums all-reduced over ranks
    ).split()
    run_script(flags + ["--per-device-batch-size", "4", "--output-dir", str(tmp_path / "one")])  # 2 micro-batches
    run_script(flags + ["--checkpoint-every", "1", "--output-dir", str(tmp_path / "two")], torchrun=2)
    run_script(flags + ["--fsdp", "--output-dir", str(tmp_path / "fsdp")], torchrun=2)
    for run in ("two", "fsdp"):
        assert_same_weights(str(tmp_path / "one"), str(tmp_path / run), toy_base)
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "two" / "resume" / "step_0000001", resumed / "resume" / "step_0000001")
    assert "at step 1" in run_script(flags + ["--resume", "--output-dir", str(resumed)], torchrun=2)
    straight, again = (
        load_file(str(tmp_path / "two" / "model.safetensors")),
        load_file(str(resumed / "model.safetensors")),
    )
    assert all(torch.equal(straight[k], again[k]) for k in straight)


def test_prompt_once_per_group_takes_the_concatenated_steps(tmp_path, toy_base):
    """The update's fast path, each prompt once for its G responses (default), and the plain one (--no-share-prompt)
    take the same steps: 2 iterations of 4 epochs × 2 minibatches of 2 micro-batches, whole groups shuffled, k3 to a
    reference in the loss. A micro-batch that would split a group, --gradient-checkpointing or a hybrid model (LFM2)
    turns the fast path off, saying why; policy_logits then gets group size 1, and the hybrid trains."""
    flags = (
        f"grpo.py --model-name {toy_base} --reward-fn toy_task:gold_reward --kl-coef 0.5 --kl-penalty k3_loss "
        "--batch-size 32 --group-size 4 --num-minibatches 2 --num-epochs 0.0013 --learning-rate 3e-3"
    ).split()
    shared = tmp_path / "shared"
    calls, out = calls_of("policy_logits", flags + ["--per-device-batch-size", "8", "--output-dir", str(shared)])
    assert "each prompt once for its 4 responses" in out and {c["group_size"] for c in calls} == {4}
    calls, plain = calls_of(
        "policy_logits", flags + ["--per-device-batch-size", "8", "--no-share-prompt", "--output-dir", str(tmp_path)]
    )
    assert "each prompt once" not in plain and {c["group_size"] for c in calls} == {1}
    assert_same_weights(str(shared), str(tmp_path), toy_base)
    hybrid = toy_task.save_base_model(str(tmp_path / "lfm2"))  # the toy tokenizer, then LFM2 over it: a short
    config = transformers.Lfm2Config(  # convolution layer, then an attention one
        vocab_size=75, hidden_size=32, intermediate_size=64, num_hidden_layers=2, full_attn_idxs=[1], pad_token_id=0
    )
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(hybrid)
    short = flags + ["--num-ppo-epochs", "1", "--num-epochs", "0.0007", "--output-dir", str(tmp_path)]
    for extra, why in [
        (["--per-device-batch-size", "2"], "micro-batches of 2 split groups of 4"),
        (["--per-device-batch-size", "8", "--gradient-checkpointing"], "--gradient-checkpointing"),
        (["--per-device-batch-size", "8", "--model-name", hybrid], "its recurrent layers"),
    ]:
        calls, out = calls_of("policy_logits", short + extra)
        assert f"--share-prompt is off: {why}" in out and {c["group_size"] for c in calls} == {1}


def test_clip_higher_by_hand():
    """DAPO's clip-higher: with ε_low 0.2 and ε_high 0.28, a ratio of 1.25 on a positive advantage is inside the clip
    (surrogate −1.25, gradient −ρ), where the symmetric ±0.2 clips it to 1.2 (gradient 0); the lower side is
    unchanged: a ratio of 0.75 on a negative advantage is clipped at 0.8 either way."""
    for adv, ratio, high, want, grad in [(1.0, 1.25, 0.28, -1.25, -1.25), (1.0, 1.25, 0.2, -1.2, 0.0)]:
        logprobs = torch.tensor([[math.log(ratio)]], requires_grad=True)
        loss, stats = grpo_policy_loss(logprobs, torch.zeros(1, 1), torch.tensor([adv]), torch.ones(1, 1), 0.2, high)
        loss.backward()
        assert loss.item() == pytest.approx(want) and logprobs.grad.item() == pytest.approx(grad, abs=1e-7)
    logprobs = torch.tensor([[math.log(0.75)]], requires_grad=True)
    loss, stats = grpo_policy_loss(logprobs, torch.zeros(1, 1), torch.tensor([-1.0]), torch.ones(1, 1), 0.2, 0.28)
    assert loss.item() == pytest.approx(0.8) and stats["clipfrac"].item() == 1.0  # max(0.75, 0.8)


def test_sequence_level_ratio_by_hand():
    """GSPO: one ratio per response, the geometric mean of its token ratios, s = (1.1 · 1.3)^(1/2) = 1.19583 for the
    first response (inside ±0.2), 1.5 for the second (clipped); each of its tokens carries −A·s. With each
    response's token mean (weights 1/2 per token, one response each) the loss is −s, and each token's gradient is
    −A·s/|y| = −0.59791; the clipped response's is 0. Padding (the 123) plays no part."""
    old = torch.zeros(2, 3)
    logprobs = torch.tensor([[math.log(1.1), math.log(1.3), 123.0], [math.log(1.5)] * 2 + [123.0]], requires_grad=True)
    weights = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0]])
    loss, stats = grpo_policy_loss(logprobs, old, torch.tensor([1.0, 1.0]), weights, 0.2, 0.2, "sequence")
    s = math.sqrt(1.1 * 1.3)
    assert loss.item() == pytest.approx(-s - 1.2, rel=1e-6)
    assert stats["ratio"].item() == pytest.approx((2 * s + 2 * 1.5) / 4, rel=1e-6)  # the mean over valid tokens
    loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-s / 2, -s / 2, 0.0], [0.0, 0.0, 0.0]]))


def test_batch_std_advantages_by_hand_and_across_ranks():
    """(r − group mean) / (the batch's sample std + 1e-4): the std of all 8 rewards, not each group's; split over
    two ranks, the all-reduced sums give the same std."""
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0])
    mean = sum(rewards.tolist()) / 8  # 4
    std = math.sqrt(sum((x - mean) ** 2 for x in rewards.tolist()) / 7)  # (9 + 4 + 1 + 4 + 1 + 1 + 1 + 1) / 7
    want = torch.tensor([-2.0, -1.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0]) / (std + 1e-4)
    torch.testing.assert_close(group_advantages(rewards, 4, "batch_std"), want)

    def other_rank(stats):  # the second rank's sums: Σr, Σr², n
        stats += torch.tensor([20.0, 100.0, 4.0])

    torch.testing.assert_close(group_advantages(rewards[:4], 4, "batch_std", other_rank), want[:4])


def test_overlong_penalty_by_hand():
    """DAPO's soft penalty, cap 24, buffer 4: none up to 20 tokens, then −(n − 20)/4, −1 at the cap."""
    lengths = torch.tensor([10.0, 20.0, 21.0, 23.0, 24.0])
    torch.testing.assert_close(overlong_penalty(lengths, 24, 4), torch.tensor([0.0, 0.0, -0.25, -0.75, -1.0]))


def never_ending_policy(path):
    """P_ref as a layer-free Llama (conftest.markov_llama) whose EOS logit is −30 whatever the token: every response
    runs to the cap, cut without an end token."""
    from transformers import AutoModelForCausalLM

    markov_llama(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    scale = 1 / math.sqrt(1 / model.config.hidden_size + model.config.rms_norm_eps)  # RMSNorm of a one-hot
    with torch.no_grad():
        model.lm_head.weight[1] = -30 / scale  # EOS is id 1
    model.save_pretrained(path)
    return path


def test_mask_truncated_and_no_reference_at_beta_0(tmp_path):
    """β = 0 loads the policy alone (no reference, no reward model with only a reward function) and logs no KL.
    With every response cut, --mask-truncated leaves no token in the loss: the policy is exactly where it started,
    while without it the same run moves it."""
    policy = never_ending_policy(str(tmp_path / "policy"))
    data = tmp_path / "prompts.jsonl"
    write_jsonl(data, toy_task.make_dataset("prompt", "train", num_examples=16).to_list())
    flags = (
        f"grpo.py --model-name {policy} --dataset-name {data} --reward-fn toy_task:gold_reward --kl-coef 0 "
        "--batch-size 8 --num-epochs 1 --max-length 64 --response-length 4 --learning-rate 1e-2"
    ).split()
    loads, out = calls_of("load", flags + ["--mask-truncated", "--output-dir", str(tmp_path / "masked")])
    assert [(c["name"], c["trained"]) for c in loads] == [(policy, True)] and "no reference" in out
    result = result_of(tmp_path / "masked")
    assert result["charts/eos_rate"] == 0 and "objective/kl" not in result and "policy/k3" not in result
    start, masked = load_file(f"{policy}/model.safetensors"), load_file(str(tmp_path / "masked" / "model.safetensors"))
    assert all(torch.equal(start[k], masked[k]) for k in start)
    run_script(flags + ["--output-dir", str(tmp_path / "unmasked")])
    unmasked = load_file(str(tmp_path / "unmasked" / "model.safetensors"))
    assert not torch.equal(start["lm_head.weight"], unmasked["lm_head.weight"])


def test_mask_truncated_token_mean_counts_only_the_responses_that_ended(tmp_path):
    """--mask-truncated with token_mean, on P_ref with responses capped at 4 tokens: some end, some are cut. A cut
    response carries no loss (an all-0 row of the loss mask: as many as 1 − eos_rate of the 8 responses), and each
    minibatch's normaliser is the number of its loss tokens, counted here by hand as the 1s of the loss masks
    (2 minibatches of 4, one micro-batch each), not of every valid token: the weights of a minibatch sum to 1."""
    policy = str(tmp_path / "policy")
    markov_llama(policy)
    data = tmp_path / "prompts.jsonl"
    write_jsonl(data, toy_task.make_dataset("prompt", "train", num_examples=16).to_list())
    calls, _ = calls_of(
        "token_weights",
        f"grpo.py --model-name {policy} --dataset-name {data} --reward-fn toy_task:gold_reward --kl-coef 0 "
        "--batch-size 8 --group-size 2 --num-minibatches 2 --num-ppo-epochs 1 --num-epochs 1 --max-length 64 "
        f"--response-length 4 --mask-truncated --loss-aggregation token_mean --output-dir {tmp_path / 'out'}".split(),
    )
    eos_rate = result_of(tmp_path / "out")["charts/eos_rate"]
    assert 0 < eos_rate < 1 and len(calls) == 2  # some cut, some ended; one call per minibatch
    masks = [c["mask"] for c in calls]
    assert sum(int((m.sum(1) == 0).sum()) for m in masks) == round((1 - eos_rate) * 8)
    for c in calls:
        assert c["aggregation"] == "token_mean" and c["num_tokens"] == c["mask"].sum() > 0
