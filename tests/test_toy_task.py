"""The toy task's exact quantities against brute-force enumeration and hand computation."""

import itertools
import math

import numpy as np
import pytest

import toy_task
from toy_task import ToyTask

# A miniature language: 3 words, explicit transition rows (last column EOS), cap of 3 tokens.
MINI_WORDS = ["good", "bad", "the"]
MINI_TRANS = np.array(
    [
        [0.1, 0.2, 0.3, 0.4],  # after "good"
        [0.3, 0.1, 0.2, 0.4],  # after "bad"
        [0.4, 0.3, 0.2, 0.1],  # after "the"
    ]
)
CAP = 3


@pytest.fixture
def mini():
    return ToyTask(MINI_WORDS, np.array([1.0, -1.0, 0.0]), MINI_TRANS, np.array([0.2, 0.2, 0.6]))


def all_responses(cap=CAP):
    """Every response under the cap: k < cap words then EOS, or exactly cap words (cut)."""
    for k in range(cap + 1):
        for ws in itertools.product(MINI_WORDS, repeat=k):
            yield " ".join(ws)


def brute_force(task, prompt, beta):
    """Expected gold reward and KL(pi* || P_ref) of pi* ∝ P_ref exp(r / beta) by enumeration."""
    ys = list(all_responses())
    logp = np.array([task.ref_logprob(prompt, y, max_response_tokens=CAP) for y in ys])
    r = np.array([task.gold_reward(prompt, y) for y in ys])
    logq = logp + r / beta
    logq -= np.logaddexp.reduce(logq)
    q = np.exp(logq)
    return float(q @ r), float(q @ (logq - logp))


def test_hand_values(mini):
    # "the good" ends in "good": good->good (+1 - 1.5), good->good (+1 - 1.5), good->bad (-1)
    assert mini.gold_reward("the good", "good good bad") == pytest.approx(-2.0)
    assert mini.gold_reward("bad", "") == 0.0
    assert mini.gold_reward("bad", "the good") == pytest.approx(0 + 1)
    # P(good|the) P(EOS|good) = 0.4 * 0.4
    assert mini.ref_logprob("the", "good", max_response_tokens=CAP) == pytest.approx(math.log(0.4 * 0.4))
    assert mini.ref_logprob("good", "", max_response_tokens=CAP) == pytest.approx(math.log(0.4))
    # three words reach the cap of 3 tokens: cut, no EOS factor. P(bad|the) P(the|bad) P(the|the)
    assert mini.ref_logprob("the", "bad the the", max_response_tokens=CAP) == pytest.approx(math.log(0.3 * 0.2 * 0.2))
    # without a cap the EOS after "the" counts too
    assert mini.ref_logprob("the", "bad the the", max_response_tokens=None) == pytest.approx(
        math.log(0.3 * 0.2 * 0.2 * 0.1)
    )
    with pytest.raises(ValueError, match="not a word"):
        mini.gold_reward("the", "excellent")
    with pytest.raises(ValueError, match="over the cap"):
        mini.ref_logprob("the", "the the the the", max_response_tokens=CAP)


@pytest.mark.parametrize("prompt", ["good", "the bad", "the"])
def test_ref_probabilities_sum_to_one(mini, prompt):
    total = sum(math.exp(mini.ref_logprob(prompt, y, max_response_tokens=CAP)) for y in all_responses())
    assert total == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("beta", [0.3, 1.0, 5.0])
def test_frontier_matches_enumeration(mini, beta):
    prompts = ["the", "the good", "bad the", "good"]  # last words: the x2, good x2
    want_r = np.mean([brute_force(mini, p, beta)[0] for p in prompts])
    want_kl = np.mean([brute_force(mini, p, beta)[1] for p in prompts])
    [(b, kl, r)] = mini.optimal_frontier(prompts, [beta], max_response_tokens=CAP)
    assert b == beta
    assert r == pytest.approx(want_r, abs=1e-10)
    assert kl == pytest.approx(want_kl, abs=1e-10)


def test_frontier_limits(mini):
    prompts = ["the", "bad"]
    ref_reward = np.mean(
        [
            sum(
                math.exp(mini.ref_logprob(p, y, max_response_tokens=CAP)) * mini.gold_reward(p, y)
                for y in all_responses()
            )
            for p in prompts
        ]
    )
    (_, kl_inf, r_inf), (_, kl_big, r_big), (_, _kl_small, r_small) = mini.optimal_frontier(
        prompts, [math.inf, 1e6, 0.01], max_response_tokens=CAP
    )
    assert kl_inf == 0 and r_inf == pytest.approx(ref_reward, abs=1e-12)
    assert kl_big < 1e-9 and r_big == pytest.approx(ref_reward, abs=1e-5)
    # beta -> 0: the best response with certainty. From "the" or "bad", "good bad good" is cut at the cap
    # and earns 1 - 1 + 1 = 1 (repeats are penalised); nothing scores higher in 3 tokens
    best = max(mini.gold_reward("the", y) for y in all_responses())
    assert r_small == pytest.approx(best, abs=1e-6)


def test_entropy_floor_matches_enumeration(mini):
    prompts = ["the", "good bad", "bad"]
    ent = tokens = 0.0
    for p in prompts:
        for y in all_responses():
            lp = mini.ref_logprob(p, y, max_response_tokens=CAP)
            n = len(y.split()) + (len(y.split()) < CAP)  # words, plus EOS unless cut
            ent -= math.exp(lp) * lp
            tokens += math.exp(lp) * n
    assert mini.entropy_floor(prompts, max_response_tokens=CAP) == pytest.approx(ent / tokens, abs=1e-12)


def test_default_task_shape():
    t = toy_task.TASK
    assert 50 <= len(toy_task.WORDS) <= 100
    assert (t.sentiment > 0).sum() >= 8 and (t.sentiment < 0).sum() >= 8
    assert t.trans.min() >= toy_task.UNIFORM_FLOOR / (len(toy_task.WORDS) + 1) - 1e-12
    assert np.allclose(t.trans.sum(1), 1)


def test_samples_follow_ref():
    """Sampled responses' frequencies match exp(ref_logprob) (a sampler check, 4-sigma tolerance)."""
    rng = np.random.default_rng(0)
    n = 20000
    ys = toy_task.TASK.sample_responses(rng, ["the acting was wonderful"] * n)
    for y in ["", max(set(ys), key=ys.count)]:  # the empty response and the most frequent one
        p = math.exp(toy_task.ref_logprob("the acting was wonderful", y))
        freq = ys.count(y) / n
        assert abs(freq - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-4, (y, freq, p)
    assert max(len(y.split()) for y in ys) <= toy_task.MAX_RESPONSE_TOKENS


def test_datasets_deterministic_disjoint_and_labelled():
    sft_a = toy_task.make_dataset("sft", "train", num_examples=300, seed=3)
    sft_b = toy_task.make_dataset("sft", "train", num_examples=300, seed=3)
    assert sft_a["completion"] == sft_b["completion"] and sft_a.column_names == ["prompt", "completion"]
    train = set(toy_task.make_dataset("prompt", "train", num_examples=3000)["prompt"])
    evals = set(toy_task.make_dataset("prompt", "eval", num_examples=1000)["prompt"])
    assert not train & evals
    pairs = toy_task.make_dataset("preference", "eval", num_examples=4000, seed=1)
    assert all(c != r for c, r in zip(pairs["chosen"], pairs["rejected"]))
    d = np.array(toy_task.gold_reward(pairs["prompt"], pairs["chosen"])) - toy_task.gold_reward(
        pairs["prompt"], pairs["rejected"]
    )
    # Bradley-Terry labels: among pairs with different rewards, the better response is chosen with
    # probability sigmoid(|d|); the empirical rate must match the Bayes accuracy computed from the rewards
    differ = d != 0
    want = np.mean(1 / (1 + np.exp(-np.abs(d[differ]))))
    got = np.mean(d[differ] > 0)
    assert abs(got - want) < 4 * math.sqrt(want * (1 - want) / differ.sum())
    acc = toy_task.bayes_accuracy(pairs)
    assert acc == pytest.approx(np.mean(1 / (1 + np.exp(-np.abs(d)))))
    assert 0.6 < acc < 0.9


def test_saved_base_model_loads_like_a_hub_model(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    toy_task.save_base_model(str(tmp_path))
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert tok.pad_token_id is not None and tok.eos_token_id is not None and tok.pad_token_id != tok.eos_token_id
    text = "the acting was wonderful but the plot dull"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 8 and tok.unk_token_id not in ids and tok.decode(ids) == text
    assert 0.5e6 < sum(p.numel() for p in model.parameters()) < 2e6


def test_in_memory_base_model_and_tokenizer_are_the_saved_ones(tmp_path):
    """What sft.py builds in memory for --model-name toy is what save_base_model writes for that seed."""
    import torch
    from transformers import AutoModelForCausalLM

    import common

    toy_task.save_base_model(str(tmp_path), seed=3)
    saved, model = AutoModelForCausalLM.from_pretrained(str(tmp_path)), toy_task.make_base_model(3)
    a, b = saved.state_dict(), model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(toy_task.make_base_model(4).lm_head.weight, b["lm_head.weight"])  # the seed matters
    disk, toy = common.load_tokenizer(str(tmp_path)), common.load_tokenizer("toy")
    assert toy.get_vocab() == disk.get_vocab() and len(toy) == len(toy_task.WORDS) + 3
    assert (
        (toy.pad_token_id, toy.eos_token_id, toy.bos_token_id)
        == (disk.pad_token_id, disk.eos_token_id, None)
        == (0, 1, None)
    )
    for m in (saved, model):
        assert (m.generation_config.pad_token_id, m.generation_config.eos_token_id) == (0, 1)
