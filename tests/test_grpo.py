"""grpo.py: group advantages, loss aggregation, the clipped loss and the KL estimators' gradients by hand;
the script through its command line (toy task with the gold reward; DDP and FSDP against one process; resume)."""

import math
import shutil

import pytest
import torch
from conftest import assert_same_weights, result_of, run_script, toy_reward_model, write_jsonl
from safetensors.torch import load_file

import toy_task
from grpo import group_advantages, grpo_policy_loss, k3, token_weights


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


@pytest.mark.parametrize(
    "adv,ratio,want,clipped",
    [(1.0, 1.1, -1.1, 0.0), (1.0, 1.5, -1.2, 1.0), (1.0, 0.5, -0.5, 0.0), (-1.0, 1.5, 1.5, 0.0), (-1.0, 0.5, 0.8, 1.0)],
)
def test_policy_loss_clipping_regimes_and_weights(adv, ratio, want, clipped):
    """One valid token of weight 0.5 and a padding slot: the loss is 0.5 × PPO's clipped surrogate, worked by
    hand per regime (ε = 0.2), the gradient 0.5 × −A·ρ where unclipped, 0 where the clip binds."""
    old = torch.tensor([[-2.0, -1.0]])
    logprobs = torch.tensor([[-2.0 + math.log(ratio), 123.0]], requires_grad=True)
    loss, stats = grpo_policy_loss(logprobs, old, torch.tensor([adv]), torch.tensor([[0.5, 0.0]]), 0.2)
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
        f"grpo.py --model-name {toy_base} --gold-reward --advantage rloo --kl-penalty k3_loss "
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
    """2 processes take the same steps as 1 (groups stay on one rank; sampling seeded per generate call of the
    global batch; the losses' weights count the whole minibatch), with DDP and with FSDP; a DDP run resumed after
    iteration 1 ends bit-identical."""
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
