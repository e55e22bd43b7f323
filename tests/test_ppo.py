"""ppo.py: GAE, the clipped losses, whitening, KL shaping, EOS truncation and the adaptive KL
controller against hand-worked numbers; the rollout's alignment against unpadded forward passes;
and the script through its command line (first minibatch: ratio 1, approx-KL 0)."""

import math
import os
import shutil

import pytest
import torch
from conftest import (
    assert_same_weights,
    markov_llama,
    read_json,
    run_script,
    script_error,
    toy_reward_model,
    write_jsonl,
)
from safetensors.torch import load_file

import common
import toy_task
from ppo import (
    Experience,
    adaptive_kl_coef,
    compute_gae,
    kl_shaped_rewards,
    logprobs_and_entropy,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    ptx_loss,
    truncate_after_eos,
)

NAN = float("nan")
# AdamW's first steps as plain gradient descent (a step of 0.3 × the gradient; tests/test_wiring.py)
SGD_LIKE = ["--adam-eps", "1000", "--learning-rate", "300", "--max-grad-norm", "0"]


def test_gae_by_hand():
    # one row of 3 valid tokens and a padded slot; gamma 0.9, lambda 0.8 (gamma * lambda = 0.72)
    # t=2 (terminal): delta = 1.0 - 0.3 = 0.7,                A = 0.7
    # t=1: delta = -0.2 + 0.9 * 0.3 - 0.4 = -0.33,             A = -0.33 + 0.72 * 0.7 = 0.174
    # t=0: delta = 0.1 + 0.9 * 0.4 - 0.5 = -0.04,              A = -0.04 + 0.72 * 0.174 = 0.08528
    rewards = torch.tensor([[0.1, -0.2, 1.0, 5.0]])
    values = torch.tensor([[0.5, 0.4, 0.3, 7.0]])
    mask = torch.tensor([[True, True, True, False]])
    adv, ret = compute_gae(rewards, values, mask, gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv, torch.tensor([[0.08528, 0.174, 0.7, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.58528, 0.574, 1.0, 0.0]]))


def test_gae_with_gamma_lambda_one_is_reward_to_go_minus_value():
    torch.manual_seed(0)
    rewards, values = torch.randn(5, 7), torch.randn(5, 7)
    lengths = torch.tensor([7, 1, 4, 3, 6])
    mask = torch.arange(7)[None, :] < lengths[:, None]
    adv, ret = compute_gae(rewards, values, mask, gamma=1.0, lam=1.0)
    for b in range(5):
        n = lengths[b]
        to_go = torch.tensor([rewards[b, t:n].sum() for t in range(n)])  # a second formulation: plain sums
        torch.testing.assert_close(ret[b, :n], to_go)
        torch.testing.assert_close(adv[b, :n], to_go - values[b, :n])
        assert (adv[b, n:] == 0).all() and (ret[b, n:] == 0).all()


def test_gae_ignores_garbage_after_the_last_valid_token():
    torch.manual_seed(1)
    rewards, values = torch.randn(3, 6), torch.randn(3, 6)
    mask = torch.arange(6)[None, :] < torch.tensor([[2], [6], [4]])
    clean = compute_gae(rewards, values, mask)
    rewards2, values2 = rewards.clone(), values.clone()
    rewards2[~mask], values2[~mask] = 1e6, NAN
    dirty = compute_gae(rewards2, values2, mask)
    for a, b in zip(clean, dirty):
        torch.testing.assert_close(a, b)


# one token per case, eps = 0.2; loss = max(-A * rho, -A * clip(rho, 0.8, 1.2))
@pytest.mark.parametrize(
    "adv,ratio,want,clipped",
    [
        (1.0, 1.1, -1.1, 0.0),  # inside the range
        (1.0, 1.5, -1.2, 1.0),  # A > 0, ratio above: the clip binds, no incentive to go further
        (1.0, 0.5, -0.5, 0.0),  # A > 0, ratio below: the unclipped term is the pessimistic one
        (-1.0, 1.5, 1.5, 0.0),  # A < 0, ratio above: unclipped, the mistake is fully penalised
        (-1.0, 0.5, 0.8, 1.0),  # A < 0, ratio below: the clip binds
    ],
)
def test_policy_loss_clipping_regimes(adv, ratio, want, clipped):
    old = torch.tensor([[-2.0, -1.0]])
    logprobs = torch.tensor([[-2.0 + math.log(ratio), 123.0]], requires_grad=True)  # second slot is padding
    mask = torch.tensor([[True, False]])
    loss, stats = ppo_policy_loss(logprobs, old, torch.tensor([[adv, NAN]]), mask, 0.2)
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert stats["clipfrac"].item() == clipped
    assert stats["ratio"].item() == pytest.approx(ratio, rel=1e-5)
    assert stats["approxkl"].item() == pytest.approx(0.5 * math.log(ratio) ** 2, rel=1e-5)
    loss.backward()
    # d/dlogp of -A * rho is -A * rho where unclipped; 0 where the clip binds; padding gets nothing
    assert logprobs.grad[0, 0].item() == pytest.approx(0.0 if clipped else -adv * ratio, rel=1e-5, abs=1e-7)
    assert logprobs.grad[0, 1].item() == 0.0


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32, torch.long])
def test_policy_loss_is_a_mean_over_valid_tokens(dtype):
    """Masks are accepted as bool or 0/1 numbers, as masked_mean accepts them."""
    logprobs = torch.zeros(2, 3)
    adv = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]]).to(dtype)
    loss, stats = ppo_policy_loss(logprobs, logprobs, adv, mask, 0.2)
    assert loss.item() == pytest.approx(-(1 + 2 + 3 + 4) / 4)  # ratio 1 everywhere
    assert stats["ratio"].item() == 1.0 and stats["approxkl"].item() == 0.0 and stats["clipfrac"].item() == 0.0
    vloss, _ = ppo_value_loss(torch.ones(2, 3), torch.ones(2, 3), adv, mask, 0.2)
    assert vloss.item() == pytest.approx(0.5 * (0 + 1 + 4 + 9) / 4)  # ½ mean (V − R)², V = 1


@pytest.mark.parametrize(
    "v,v_old,ret,want,clipped",
    [
        (1.0, 0.5, 2.0, 0.5 * 1.69, 1.0),  # clipped prediction 0.7 is further from 2: (0.7 - 2)^2 = 1.69
        (0.6, 0.5, 2.0, 0.5 * 1.96, 0.0),  # inside the clip range: both terms (0.6 - 2)^2
        (1.0, 0.5, 0.0, 0.5 * 1.0, 0.0),  # outside, but the unclipped error (1) is the larger
    ],
)
def test_value_loss_by_hand(v, v_old, ret, want, clipped):
    mask = torch.tensor([[True, False]])
    loss, stats = ppo_value_loss(
        torch.tensor([[v, 9.0]]), torch.tensor([[v_old, NAN]]), torch.tensor([[ret, 3.0]]), mask, 0.2
    )
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert stats["clipfrac"].item() == clipped


def test_masked_whiten_by_hand():
    x = torch.tensor([[1.0, 2.0, NAN], [3.0, 1e9, 1e9]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    # valid values 1, 2, 3: mean 2, population variance 2/3
    s = math.sqrt(2 / 3 + 1e-8)
    torch.testing.assert_close(masked_whiten(x, mask), torch.tensor([[-1 / s, 0.0, 0.0], [1 / s, 0.0, 0.0]]))
    torch.testing.assert_close(
        masked_whiten(x, mask, shift_mean=False), torch.tensor([[2 - 1 / s, 2.0, 0.0], [2 + 1 / s, 0.0, 0.0]])
    )


def test_kl_shaping_places_the_score_on_the_last_real_token():
    # row 0 ends with EOS at index 2; row 1 was cut at the cap without EOS
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    logprobs = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [-1.0, -1.0, -1.0, -1.0]])
    ref = torch.tensor([[-2.0, -1.0, -0.5, -9.0], [-1.0, -1.0, -1.0, -1.0]])
    scores, has_eos = torch.tensor([2.0, 3.0]), torch.tensor([True, False])
    rewards, kl, final = kl_shaped_rewards(scores, logprobs, ref, mask, has_eos, kl_coef=0.1, missing_eos_penalty=1.0)
    # k1 = log pi - log pi_ref: row 0: 1, -1, 0 (padding 0); row 1: 0 everywhere
    torch.testing.assert_close(kl, torch.tensor([[1.0, -1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.1, 0.1, 2.0, 0.0], [0.0, 0.0, 0.0, 3.0 - 1.0]]))
    torch.testing.assert_close(final, torch.tensor([2.0, 2.0]))


def test_k1_penalty_has_the_gradient_of_the_kl_and_k3_would_not():
    """On a categorical π_θ = softmax(θ) over 6 outcomes (one-token responses), the expected score-function
    gradient of the per-token reward, E_π[∇log π(y) · reward(y)], computed exactly by enumeration, must be
    −β ∇KL(π ‖ π_ref), which autograd gives from the closed-form KL. k3 as a reward would give the gradient
    of KL(π ‖ π_ref) − KL(π_ref ‖ π) instead."""
    torch.manual_seed(0)
    theta = torch.randn(6, dtype=torch.float64, requires_grad=True)
    ref_logp = torch.randn(6, dtype=torch.float64).log_softmax(0)
    beta = 0.3

    def exact_kl(p_log, q_log):
        return (p_log.exp() * (p_log - q_log)).sum()

    logp = theta.log_softmax(0)
    one = torch.ones(6, 1, dtype=torch.bool)
    rewards, _, _ = kl_shaped_rewards(
        torch.zeros(6, dtype=torch.float64), logp.detach()[:, None], ref_logp[:, None], one, one[:, 0], kl_coef=beta
    )
    surrogate = (logp.exp().detach() * logp * rewards[:, 0]).sum()  # E_π[log π(y)] weighted by the fixed rewards
    (score_grad,) = torch.autograd.grad(surrogate, theta)
    (kl_grad,) = torch.autograd.grad(exact_kl(theta.log_softmax(0), ref_logp), theta)
    torch.testing.assert_close(score_grad, -beta * kl_grad)
    # the same computation with k3 = (r − 1) − log r, r = π_ref/π, as the per-token penalty
    logp = theta.log_softmax(0)
    log_r = ref_logp - logp.detach()
    k3_surrogate = (logp.exp().detach() * logp * -beta * (torch.expm1(log_r) - log_r)).sum()
    (k3_grad,) = torch.autograd.grad(k3_surrogate, theta)
    (reverse_grad,) = torch.autograd.grad(exact_kl(ref_logp, theta.log_softmax(0)), theta)
    torch.testing.assert_close(k3_grad, -beta * (kl_grad - reverse_grad))
    assert (k3_grad + beta * kl_grad).abs().max() > 0.05  # k3 would not optimise the KL-regularised objective


def test_truncation_after_the_first_eos():
    eos, pad = 1, 0
    responses = torch.tensor([[5, 1, 7, 1], [5, 6, 7, 8], [1, 9, 9, 9]])
    out, mask, has_eos = truncate_after_eos(responses, eos, pad)
    assert out.tolist() == [[5, 1, 0, 0], [5, 6, 7, 8], [1, 0, 0, 0]]
    assert mask.int().tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert has_eos.tolist() == [True, False, True]


def test_ptx_loss_by_hand():
    """PPO-ptx's NLL: a mean over the labelled tokens only (position t predicts token t + 1), and their count."""
    ignore = common.IGNORE_INDEX
    labels = torch.tensor([[ignore, ignore, 2, 0], [ignore, 1, ignore, ignore]])  # targets 2, 0 | 1
    probs = torch.tensor([[0.1, 0.2, 0.7], [0.5, 0.25, 0.25], [0.2, 0.6, 0.2]])
    loss, n = ptx_loss(probs.log(), labels)
    assert n == 3 and loss.item() == pytest.approx(-(math.log(0.7) + math.log(0.5) + math.log(0.6)) / 3)


def test_experience_rows_index_every_field():
    """A minibatch of the rollout: every tensor field at the same rows; a field that is None stays None."""
    full = {k: torch.arange(8).view(4, 2) * (i + 1) for i, k in enumerate(("queries", "query_mask", "responses"))}
    full |= {"mask": torch.ones(4, 2, dtype=torch.bool), "has_eos": torch.tensor([True, False, True, True])}
    batch = Experience(**full, logprobs=torch.randn(4, 2), entropy=torch.rand(4, 2), scores=torch.randn(4))
    rows = torch.tensor([2, 0])
    micro = batch[rows]
    assert micro.ref_logprobs is None and micro.values is None and micro.advantages is None
    for name in ("queries", "responses", "has_eos", "logprobs", "scores"):
        assert torch.equal(getattr(micro, name), getattr(batch, name)[rows])


def test_adaptive_kl_controller_drives_the_kl_to_its_target():
    """Closed loop, as in training: with a policy whose KL falls as 2/β, the controller must move β to
    0.5 (KL 4, the target) from either side, with steps of at most 0.2·n/horizon."""
    for beta in (0.1, 3.0):
        for _ in range(600):
            new = adaptive_kl_coef(beta, 2 / beta, 4.0, 10000, 1000)
            assert abs(new / beta - 1) <= 0.2 * 1000 / 10000 + 1e-12
            beta = new
        assert beta == pytest.approx(0.5, rel=1e-3)


@pytest.fixture(scope="module")
def toy_models(toy_base):
    """The toy tokenizer with a random policy and reward model, saved as folders."""
    tok = common.load_tokenizer(toy_base)
    rm = toy_reward_model(toy_base, seed=0)
    rm.config.reward_bias = 0.25
    return tok, rm, toy_base


def test_missing_reward_model_is_a_clear_error(toy_models):
    _, _, path = toy_models
    message = script_error(
        ["ppo.py", "--model-name", path, "--reward-model-name", os.path.join("runs", "models", "nope")]
    )
    assert "run `python reward_model.py` first" in message


def test_smoke_toy_first_minibatch_invariant(tmp_path, toy_models):
    tok, rm, path = toy_models
    rm_path = str(tmp_path / "rm")
    rm.save_pretrained(rm_path)
    tok.save_pretrained(rm_path)
    out_dir = tmp_path / "ppo"
    run_script(
        [
            "ppo.py",
            "--model-name",
            path,
            "--reward-model-name",
            rm_path,
            "--batch-size",
            "16",
            "--per-device-batch-size",
            "4",
            "--num-minibatches",
            "2",
            "--num-ppo-epochs",
            "2",
            "--num-epochs",
            "0.00064",
            "--save-every",
            "1",
            "--kl-coef",
            "0.2",
            "--temperature",
            "0.7",
            "--target-kl",
            "1.0",
            "--ptx-coef",
            "0.1",
            "--ent-coef",
            "0.01",
            "--output-dir",
            str(out_dir),
        ]
    )
    result = read_json(out_dir / "training_args.json")["result"]
    # logged each iteration; 1 only if the update computes log π at the rollout's temperature (0.7) too
    assert result["policy/first_minibatch_ratio"] == pytest.approx(1.0, abs=1e-6)
    # the adaptive controller moved β by at most ±0.2 · 16 / 10000 per iteration (it was logged before the last update)
    assert result["objective/kl_coef"] != 0.2 and abs(result["objective/kl_coef"] / 0.2 - 1) <= 0.2 * 16 / 10000 + 1e-9
    for k in [
        "objective/scores",
        "objective/kl",
        "loss/policy",
        "loss/value",
        "loss/ptx",
        "val/explained_variance",
        "toy/gold_reward",
        "toy/kl_to_ref",
    ]:
        assert math.isfinite(result[k]), k
    assert 0 <= result["charts/eos_rate"] <= 1 and 1 <= result["charts/response_length"] <= 24
    assert sorted(os.listdir(out_dir / "checkpoints")) == ["episode_0000016", "episode_0000032"]


def test_ddp_fsdp_and_resume_match_single_process(tmp_path, toy_models):
    """2 processes × 4 episodes (the default per-device size) take the same PPO steps as 1 process with 8 (2
    micro-batches of 4, and one of 8), with DDP and with FSDP (all four models sharded, generation on gathered
    weights): sampling is seeded per chunk of the global batch, advantages are whitened over all ranks, losses are
    means over the valid tokens of the whole minibatch, PPO-ptx's over the labelled tokens of its whole SFT batch.
    The DDP run, resumed after iteration 1 (its later checkpoint removed), ends bit-identical: optimizer, random
    numbers (minibatch shuffling), adaptive β and the PPO-ptx position."""
    tok, rm, path = toy_models
    rm_path = str(tmp_path / "rm")
    rm.save_pretrained(rm_path)
    tok.save_pretrained(rm_path)
    data = tmp_path / "prompts"
    data.mkdir()
    write_jsonl(
        data / "train.jsonl",
        [{"prompt": p} for p in toy_task.make_dataset("prompt", "train", num_examples=16)["prompt"]],
    )
    write_jsonl(
        data / "test.jsonl", [{"prompt": p} for p in toy_task.make_dataset("prompt", "eval", num_examples=4)["prompt"]]
    )
    demos = write_jsonl(tmp_path / "demos.jsonl", toy_task.make_dataset("sft", "train", num_examples=32).to_list())
    flags = (
        f"ppo.py --model-name {path} --reward-model-name {rm_path} --dataset-name {data} --batch-size 8"
        f" --num-minibatches 1 --num-ppo-epochs 2 --num-epochs 1 --max-length 64 --response-length 24"
        f" --learning-rate 3e-3 --kl-coef 0.5 --target-kl 0.5 --kl-horizon 100 --ptx-coef 0.1"
        f" --ptx-dataset-name {demos} --reward-fn toy_task:gold_reward --reward-weights 1 0.5"
    ).split()
    run_script(flags + ["--per-device-batch-size", "4", "--output-dir", str(tmp_path / "one")])  # 2 micro-batches
    one_micro = ["--per-device-batch-size", "8", "--generation-batch-size", "4"]  # the same samples
    run_script(flags + one_micro + ["--output-dir", str(tmp_path / "one_micro")])
    assert_same_weights(str(tmp_path / "one"), str(tmp_path / "one_micro"), path)
    run_script(flags + ["--checkpoint-every", "1", "--output-dir", str(tmp_path / "two")], torchrun=2)  # 4 per rank
    run_script(flags + ["--fsdp", "--output-dir", str(tmp_path / "fsdp")], torchrun=2)
    for run in ("two", "fsdp"):
        assert_same_weights(str(tmp_path / "one"), str(tmp_path / run), path)
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "two" / "resume" / "step_0000001", resumed / "resume" / "step_0000001")
    out = run_script(flags + ["--resume", "--output-dir", str(resumed)], torchrun=2)
    assert "at step 1" in out
    straight, again = (
        load_file(str(tmp_path / "two" / "model.safetensors")),
        load_file(str(resumed / "model.safetensors")),
    )
    for k in straight:
        assert torch.equal(straight[k], again[k]), k
    kl_coefs = [read_json(p / "training_args.json")["result"]["objective/kl_coef"] for p in (tmp_path / "two", resumed)]
    assert kl_coefs[0] == kl_coefs[1] != 0.5  # β adapted, and the resumed run carried it on


def test_llama3_style_conversations(tmp_path, chat_models, chat_data):
    """PPO on conversational prompts with a Llama-3-style model that declares [EOS, <|eot_id|>] as stop ids."""
    path = chat_models["llama3"]
    rm_path = str(tmp_path / "rm")
    toy_reward_model(path).save_pretrained(rm_path)
    common.load_tokenizer(path).save_pretrained(rm_path)
    out_dir = tmp_path / "ppo"
    out = run_script(
        [
            "ppo.py",
            "--model-name",
            path,
            "--reward-model-name",
            rm_path,
            "--dataset-name",
            chat_data["prompt"],
            "--batch-size",
            "8",
            "--per-device-batch-size",
            "4",
            "--num-minibatches",
            "2",
            "--num-epochs",
            "0.3",
            "--max-length",
            "64",
            "--response-length",
            "8",
            "--learning-rate",
            "1e-3",
            "--output-dir",
            str(out_dir),
        ]
    )
    assert "ratio 1.000000" in out
    result = read_json(out_dir / "training_args.json")["result"]
    assert abs(result["policy/first_minibatch_ratio"] - 1) < 1e-6
    assert math.isfinite(result["loss/policy"]) and 1 <= result["charts/response_length"] <= 8


def test_chunked_logprobs_and_entropy_equal_the_full_softmax():
    """In chunks of 3 rows, recomputed in backward: log π and entropy of softmax(logits / T) with PAD (id 0)
    excluded equal the plain formulas, gradients included; the entropy has a gradient only when asked."""
    torch.manual_seed(0)
    logits = torch.randn(10, 7, requires_grad=True)
    tokens = torch.randint(1, 7, (10,))
    plain = (logits / 0.7).masked_fill(torch.arange(7) == 0, -float("inf")).log_softmax(-1)  # (10, 7)
    want_lp = plain[torch.arange(10), tokens]
    want_ent = -(plain.exp() * plain.nan_to_num(neginf=0.0)).sum(-1)
    lp, ent = logprobs_and_entropy(logits, tokens, 0.7, pad_id=0, chunk_size=3)
    torch.testing.assert_close(lp, want_lp.detach())
    torch.testing.assert_close(ent, want_ent.detach())
    assert lp.requires_grad and not ent.requires_grad
    w = torch.randn(10)
    (g_want,) = torch.autograd.grad((want_lp * w + want_ent).sum(), logits)
    lp, ent = logprobs_and_entropy(logits, tokens, 0.7, pad_id=0, entropy_grad=True, chunk_size=3)
    (g_got,) = torch.autograd.grad((lp * w + ent).sum(), logits)
    torch.testing.assert_close(g_got, g_want)


def next_token_entropies(path):
    """The exact entropy of a layer-free Llama's next-token distribution after each word (PAD excluded, as sampled):
    its logits depend on the current token alone (conftest.markov_llama)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.arange(3, model.config.vocab_size)[:, None]).logits[:, 0]  # after PAD, EOS, UNK
    logp = logits.double().index_fill(1, torch.tensor([0]), -math.inf).log_softmax(-1)
    return -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(-1)


def test_the_entropy_bonus_raises_the_entropy(tmp_path):
    """One gradient-descent step (SGD_LIKE) on the same rollout with and without an entropy bonus: the bonus adds
    +0.3 · ent_coef · ∇H to the step, which to first order raises the entropy after every word the samples visit
    (a layer-free Llama: each word's next-token distribution has weights of its own), so the mean entropy over the
    words ends higher. The reward model's head is 0 and its reward_bias 0.5: every response scores exactly −0.5."""
    from transformers import AutoModelForSequenceClassification

    policy, rm = str(tmp_path / "policy"), str(tmp_path / "rm")
    markov_llama(policy)
    zero = AutoModelForSequenceClassification.from_pretrained(policy, num_labels=1)
    with torch.no_grad():
        zero.score.weight.zero_()
    zero.config.reward_bias = 0.5
    zero.save_pretrained(rm)
    common.load_tokenizer(policy).save_pretrained(rm)
    data = tmp_path / "prompts"
    data.mkdir()
    for split in ("train", "test"):
        write_jsonl(data / f"{split}.jsonl", toy_task.make_dataset("prompt", "train", num_examples=32).to_list())
    entropies = []
    for ent_coef in (0, 0.1):
        out = tmp_path / str(ent_coef)
        run_script(
            f"ppo.py --model-name {policy} --reward-model-name {rm} --dataset-name {data} --batch-size 32 "
            f"--num-epochs 1 --num-minibatches 1 --num-ppo-epochs 1 --max-length 64 --response-length 6 "
            f"--ent-coef {ent_coef} --output-dir {out}".split()
            + SGD_LIKE
        )
        assert read_json(out / "training_args.json")["result"]["objective/scores"] == -0.5  # 0 − reward_bias
        entropies.append(next_token_entropies(str(out)))
    assert entropies[1].mean() > entropies[0].mean() + 0.01
