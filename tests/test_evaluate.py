"""evaluate.py: best-of-n's estimator and KL formula against enumeration, the frontier interpolation
and optimality ratio by hand, and the sampled KL and gold reward of a policy against their exact
values, using Llamas with no layers whose logits are a Markov chain (P_ref itself or a perturbed
copy), for which toy_task's dynamic programming gives the exact answer."""

import itertools
import json
import math
import shutil

import datasets
import numpy as np
import pytest
import torch
from conftest import markov_llama, read_json, run_script, toy_reward_model

import common
import toy_task
from benchmark.seeds import mean_sd, seed_record
from evaluate import (
    Args,
    best_of_n_expectation,
    best_of_n_kl,
    frontier_reward_at,
    optimality_ratio,
    ratio_with_se,
    response_logprobs,
    sample,
    snis_optimum,
    wins,
)


def test_best_of_n_expectation_against_enumerating_subsets():
    rng = np.random.default_rng(0)
    scores, values = rng.normal(size=7), rng.normal(size=7)
    for n in range(1, 8):
        subsets = list(itertools.combinations(range(7), n))
        want = np.mean([values[max(s, key=lambda i: scores[i])] for s in subsets])
        assert best_of_n_expectation(scores, values, n) == pytest.approx(want, rel=1e-12)
    assert best_of_n_expectation(scores, values, 1) == pytest.approx(values.mean())  # n = 1 is the reference
    assert best_of_n_expectation(scores, values, 7) == values[scores.argmax()]


def test_best_of_n_kl_formula():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)
    # exact KL of best-of-n over M equally likely outcomes with distinct rewards: the i-th best-ranked
    # outcome is chosen with probability (i/M)^n − ((i−1)/M)^n; the formula is its M → ∞ limit
    M = 20000
    for n in (2, 4, 16, 64):
        i = np.arange(1, M + 1)
        p = (i / M) ** n - ((i - 1) / M) ** n
        exact = float(np.sum(p[p > 0] * np.log(p[p > 0] * M)))
        assert exact == pytest.approx(best_of_n_kl(n), abs=2e-3)
        assert exact <= best_of_n_kl(n) + 1e-9


def test_frontier_interpolation_and_optimality_ratio():
    frontier = [(0.0, -0.5), (1.0, 1.5), (3.0, 2.5)]
    assert frontier_reward_at(0.5, frontier) == pytest.approx(0.5)
    assert frontier_reward_at(2.0, frontier) == pytest.approx(2.0)
    assert frontier_reward_at(9.0, frontier) == pytest.approx(2.5)  # flat beyond the grid
    # (R − R_ref) / (R*(KL) − R_ref) = (1.5 + 0.5) / (2.0 + 0.5)
    assert optimality_ratio(1.5, 2.0, -0.5, frontier) == pytest.approx(0.8)
    assert optimality_ratio(1.5, 1.0, -0.5, frontier) == pytest.approx(1.0)


def test_snis_optimum_by_hand():
    # one prompt, two samples with rewards 0 and 1, β = 1: weights 1 and e
    kl, reward, ess = snis_optimum(np.array([[0.0, 1.0]]), [math.inf, 1.0])
    w = np.array([1, math.e]) / (1 + math.e)
    assert reward[0].tolist() == pytest.approx([0.5, math.e / (1 + math.e)])
    assert kl[0, 1] == pytest.approx(float((w * np.log(2 * w)).sum())) and kl[0, 0] == 0
    # the same KL from its definition: E*[r]/β − log E_0[exp(r/β)]
    assert kl[0, 1] == pytest.approx(math.e / (1 + math.e) - math.log((1 + math.e) / 2))
    assert ess[0].tolist() == pytest.approx([2.0, 1 / (w**2).sum()])


def test_snis_optimum_matches_the_exact_frontier(markov_models):
    """With a layer-free Llama whose logits are P_ref as the sampling policy, the importance-sampled
    optimum relative to it is the exact frontier relative to P_ref (toy_task's dynamic programming):
    within 4 standard errors at β = 2 (effective sample size ~90 of 128); at β = 1 (~35 of 128) it
    is biased low, as self-normalised importance sampling is with few effective samples."""
    from transformers import AutoModelForCausalLM

    ref_path, _, _ = markov_models
    tok = common.load_tokenizer(ref_path)
    model = AutoModelForCausalLM.from_pretrained(ref_path).eval()
    prompts = toy_task.make_dataset("prompt", "eval")["prompt"][:150]
    N = 128
    queries = common.encode_prompts(tok, [p for p in prompts for _ in range(N)], templated=False)
    torch.manual_seed(0)
    args = Args(per_device_batch_size=2000, max_length=64, response_length=toy_task.MAX_RESPONSE_TOKENS)
    texts = tok.batch_decode(sample(model, queries, tok, args, torch.device("cpu")), skip_special_tokens=True)
    gold = np.array(toy_task.gold_reward([p for p in prompts for _ in range(N)], texts)).reshape(-1, N)
    kl, reward, ess = snis_optimum(gold, [2.0, 1.0])
    (_, kl2, r2), (_, kl1, r1) = toy_task.optimal_frontier(prompts, [2.0, 1.0])
    se = lambda x: x.std(ddof=1) / math.sqrt(len(x))
    assert kl[:, 0].mean() == pytest.approx(kl2, abs=4 * se(kl[:, 0])) and reward[:, 0].mean() == pytest.approx(
        r2, abs=4 * se(reward[:, 0])
    )
    assert ess[:, 0].mean() > 0.5 * N > ess[:, 1].mean()
    assert kl[:, 1].mean() < kl1 and reward[:, 1].mean() < r1 + 2 * se(reward[:, 1])


def test_ratio_standard_error_against_the_delta_method():
    """On the frontier R*(k) = 2k with R_ref = 0 and every KL 1, the ratio is mean(gold) / 2, whose standard
    error is std(gold) / (2√P); the bootstrap must agree. Below min_kl the ratio is not reported."""
    rng = np.random.default_rng(0)
    gold = rng.normal(1.5, 0.5, size=400)
    frontier_kl, frontier_r = np.array([0.0, 1.0, 3.0]), np.array([0.0, 2.0, 6.0])
    ratio, se = ratio_with_se(gold, np.ones(400), 0.0, frontier_kl, frontier_r, rng, num_bootstrap=2000)
    assert ratio == pytest.approx(gold.mean() / 2)
    assert se == pytest.approx(gold.std(ddof=1) / (2 * math.sqrt(400)), rel=0.1)
    assert ratio_with_se(gold, np.full(400, 0.01), 0.0, frontier_kl, frontier_r, rng) == (None, None)
    assert ratio_with_se(gold, np.full(400, 5.0), 0.0, frontier_kl, frontier_r, rng) == (
        None,
        None,
    )  # beyond the frontier


def test_seed_records_and_their_mean_and_sd():
    """Each seed's record takes PPO's and DPO's numbers from their own rows (KL to SFT = the KL to the reference
    policy), and the summary is the mean and the sample standard deviation (n − 1) over the seeds."""

    def row(name, gold, kl_ref):
        return {
            "policy": name,
            "gold_reward": gold,
            "gold_reward_se": 0.1,
            "kl_to_ref_policy": kl_ref,
            "kl_to_p_ref": kl_ref + 0.3,
            "optimality_ratio_vs_sft": gold / 2,
            "optimality_ratio_vs_p_ref": gold / 3,
            "optimum_vs_sft_ess": 20.0,
            "optimum_vs_sft_check": 0.9,
        }

    records = []
    for seed, g in ((1, 1.0), (2, 2.0), (3, 6.0)):
        ev = {"policies": [row("sft", 0.0, 0.0), row("ppo", g, 0.8), row("dpo", -g, 0.5), row("rloo", 3 * g, 0.7)]}
        ev["policies"] += [row("grpo", 4 * g, 0.6), row("expert_iteration", 5 * g, 0.4)]
        records.append(
            seed_record(
                seed, {"excess_nll": 0.01 * seed}, {"accuracy": 0.7, "bayes_accuracy": 0.75, "gold_pearson": 0.6}, ev
            )
        )
    assert (
        records[1]["ppo_gold_reward"] == 2.0
        and records[1]["dpo_gold_reward"] == -2.0
        and records[1]["ppo_gold_reward_se"] == 0.1
    )
    assert (
        records[1]["ppo_kl_to_sft"] == 0.8
        and records[1]["dpo_kl_to_sft"] == 0.5
        and records[1]["sft_kl_to_p_ref"] == 0.3
    )
    assert records[2]["ppo_optimality_ratio_vs_sft"] == 3.0 and records[2]["dpo_optimality_ratio_vs_p_ref"] == -2.0
    assert records[2]["ppo_optimality_ratio_vs_sft_corrected"] == pytest.approx(3.0 * 0.9)
    assert (
        records[0]["grpo_gold_reward"],
        records[0]["rloo_kl_to_sft"],
        records[0]["expert_iteration_kl_to_p_ref"],
    ) == (
        4.0,
        0.7,
        0.7,
    )
    assert records[1]["expert_iteration_optimality_ratio_vs_sft_corrected"] == pytest.approx(5.0 * 0.9)
    assert mean_sd(records, "ppo_gold_reward") == pytest.approx(
        (3.0, math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 2))
    )
    assert mean_sd(records, "sft_excess_nll") == pytest.approx((0.02, 0.01))
    # a policy closer to SFT than --min-kl-for-ratio has no ratio and no check (evaluate leaves them out): the
    # record holds None there, the mean over seeds is nan, the rest is unaffected
    near = row("dpo", 0.01, 0.01)
    for k in ("optimality_ratio_vs_sft", "optimality_ratio_vs_p_ref", "optimum_vs_sft_check"):
        del near[k]
    records.append(
        seed_record(
            4,
            {"excess_nll": 0.04},
            {"accuracy": 0.7, "bayes_accuracy": 0.75, "gold_pearson": 0.6},
            {"policies": [row("sft", 0.0, 0.0), row("ppo", 1.0, 0.8), near]},
        )
    )
    assert (
        records[3]["dpo_optimality_ratio_vs_sft"] is None
        and records[3]["dpo_optimality_ratio_vs_sft_corrected"] is None
    )
    assert math.isnan(mean_sd(records, "dpo_optimality_ratio_vs_sft")[0]) and records[3]["dpo_gold_reward"] == 0.01


def test_wins_count_ties_half():
    assert wins([1, 2, 3], [2, 2, 2]).tolist() == [0.0, 0.5, 1.0]
    assert wins([5, 5], [1, 1]).mean() == 1.0


@pytest.fixture(scope="module")
def markov_models(tmp_path_factory):
    ref_path, pol_path = str(tmp_path_factory.mktemp("markov_ref")), str(tmp_path_factory.mktemp("markov_pol"))
    markov_llama(ref_path)
    return ref_path, pol_path, markov_llama(pol_path, noise=0.7)


def test_sampled_kl_and_gold_match_the_exact_values(markov_models):
    from transformers import AutoModelForCausalLM

    ref_path, pol_path, pol_log_trans = markov_models
    tok = common.load_tokenizer(ref_path)
    args = Args(per_device_batch_size=500, max_length=64, response_length=toy_task.MAX_RESPONSE_TOKENS)
    prompts = toy_task.make_dataset("prompt", "eval")["prompt"][:1000]
    queries = common.encode_prompts(tok, prompts, templated=False)
    task = toy_task.TASK
    torch.manual_seed(0)
    for path, log_trans in ((ref_path, np.log(task.trans)), (pol_path, pol_log_trans)):
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        responses = sample(model, queries, tok, args, torch.device("cpu"))
        logp, entropy = response_logprobs(model, queries, responses, tok, args, torch.device("cpu"))
        texts = tok.batch_decode(responses, skip_special_tokens=True)
        kl = np.array([lp - task.ref_logprob(p, t) for p, t, lp in zip(prompts, texts, logp)])
        gold = np.array([task.gold_reward(p, t) for p, t in zip(prompts, texts)])
        T = toy_task.MAX_RESPONSE_TOKENS
        exact_gold, exact_kl, _, _ = task._forward(
            np.broadcast_to(log_trans, (T,) + log_trans.shape), task._prompt_weights(prompts)
        )
        if path == ref_path:  # the model is P_ref: log π = log P_ref for every single sample
            assert np.abs(kl).max() < 1e-3
        else:
            assert exact_kl > 1.0 and kl.mean() == pytest.approx(exact_kl, abs=4 * float(kl.std()) / math.sqrt(len(kl)))
        assert gold.mean() == pytest.approx(exact_gold, abs=4 * float(gold.std()) / math.sqrt(len(gold)))
        # per-token entropy of a Markov policy: at each step the entropy of the row of the word before
        for i in range(5):
            words = [prompts[i].split()[-1]] + texts[i].split()
            rows = [log_trans[task.index[w]] for w in words[: len(responses[i])]]
            assert entropy[i] == pytest.approx(np.mean([-(np.exp(r) * r).sum() for r in rows]), abs=1e-3)


def test_smoke(tmp_path, markov_models):
    ref_path, pol_path, pol_log_trans = markov_models
    rm_path = str(tmp_path / "rm")
    toy_task.save_base_model(rm_path)
    toy_reward_model(rm_path).save_pretrained(rm_path)
    ckpts = tmp_path / "ckpts"
    for name in ("episode_1", "episode_2"):
        markov_llama(str(ckpts / name), noise=0.3)
    same = str(tmp_path / "same")  # the reference again, loaded separately: its KL goes through a second model
    shutil.copytree(ref_path, same)
    out_dir = tmp_path / "eval"
    run_script(
        f"evaluate.py --policies {ref_path} {pol_path} {same} --ref-policy {ref_path} --reward-model-name {rm_path} "
        f"--num-samples 600 --best-of-n 1 2 4 16 --checkpoints-dirs {ckpts} --output-dir {out_dir}".split()
    )
    results = read_json(out_dir / "results.json")
    ref_row, pol_row, same_row = results["policies"]
    # the reference policy is P_ref itself, so two independent routes to each sample's KL must agree: the
    # models' log-probabilities (kl_to_ref_policy) and toy_task's exact log P_ref (kl_to_p_ref)
    (checkpoints,) = results["checkpoints"].values()
    for row in results["policies"] + checkpoints:
        assert row["kl_to_ref_policy"] == pytest.approx(row["kl_to_p_ref"], abs=1e-3)
    assert abs(same_row["kl_to_ref_policy"]) < 1e-5  # a separately loaded copy of the reference: KL 0
    # and the perturbed policy's sampled KL is near its exact value (dynamic programming over the chain)
    T = toy_task.MAX_RESPONSE_TOKENS
    prompts = toy_task.make_dataset("sft", "eval", seed=1)["prompt"][:600]
    _, exact_kl, _, _ = toy_task.TASK._forward(
        np.broadcast_to(pol_log_trans, (T,) + pol_log_trans.shape), toy_task.TASK._prompt_weights(prompts)
    )
    assert pol_row["kl_to_ref_policy"] == pytest.approx(exact_kl, rel=0.15)
    assert 0 <= pol_row["win_rate"] <= 1 and 0.4 < ref_row["win_rate"] < 0.6  # P_ref against P_ref samples
    # best-of-1 is the reference itself: its gold reward is P_ref's exact one; a gold selector only gains with n
    frontier_ref_gold = results["frontier"][0][1]
    gold_bon = [r["gold_reward"] for r in results["best_of_n_gold"]]
    assert gold_bon[0] == pytest.approx(frontier_ref_gold, abs=0.25) and gold_bon[0] < gold_bon[1] < gold_bon[2]
    # every row on the same prompts, with standard errors; no ratio for the reference itself (KL 0)
    for row in results["policies"] + results["best_of_n"]:
        assert row["gold_reward_se"] > 0 and row["score_se"] > 0
    assert ref_row["optimality_ratio_vs_sft"] is None and pol_row["optimality_ratio_vs_sft_se"] > 0
    # the estimator's check (the same importance sampling from 16 exact P_ref samples against the exact frontier)
    # falls short of the exact optimum's gain, never far beyond it; none where there is no ratio
    assert 0.5 < pol_row["optimum_vs_sft_check"] < 1.05 and "optimum_vs_sft_check" not in ref_row
    # the reference policy is P_ref here, so its importance-sampled optimum at small KL (β = 20, large
    # effective sample size) is the exact frontier's
    beta, kl, r, ess = results["frontier_vs_ref_policy"][1]
    assert beta == 20 and ess > 12 and r == pytest.approx(frontier_reward_at(kl, results["frontier"]), abs=0.1)
    assert [r["episodes"] for r in checkpoints] == [1, 2]
    for f in ("results.md", "frontier.png", "checkpoints.png"):
        assert (out_dir / f).stat().st_size > 0


def test_best_of_n_data_for_expert_iteration(tmp_path, markov_models):
    """best_of_n.py: one row per training prompt (prompt, completion: the text after the prompt), each the
    reward model's best of 8 reference samples, so that its mean score beats the reference's own samples."""
    ref_path, _, _ = markov_models
    rm_path = str(tmp_path / "rm")
    toy_task.save_base_model(rm_path)
    toy_reward_model(rm_path).save_pretrained(rm_path)
    data = tmp_path / "data" / "best.jsonl"  # a folder that is not there yet
    flags = f"best_of_n.py --ref-policy {ref_path} --reward-model-name {rm_path} --num-samples 200"
    run_script(f"{flags} --best-of-n 8 --output {data}".split())
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == toy_task.make_dataset("prompt", "train", seed=1)["prompt"][:200]
    assert all(r["completion"] == "" or r["completion"].startswith(" ") for r in rows)  # "": only the EOS
    from transformers import AutoModelForSequenceClassification

    tok = common.load_tokenizer(rm_path)
    rm = AutoModelForSequenceClassification.from_pretrained(rm_path).eval()
    common.fit_model(rm, tok)

    def mean_score(path):
        ds = datasets.Dataset.from_list([json.loads(line) for line in path.read_text().splitlines()])
        seqs = [e["input_ids"] for e in common.tokenize_sft(tok, ds, 64)[0]]
        with torch.no_grad():
            return rm(
                input_ids=common.pad(seqs, tok.pad_token_id), attention_mask=common.attention_mask(seqs)
            ).logits.mean()

    run_script(f"{flags} --best-of-n 1 --output {tmp_path / 'one.jsonl'}".split())
    assert mean_score(data) > mean_score(tmp_path / "one.jsonl") + 0.05
    prompts = tmp_path / "prompts"  # an over-long prompt is dropped with its row, never paired with another's reply
    prompts.mkdir()
    for split in ("train", "test"):
        rows = [
            {"prompt": "the plot"},
            {"prompt": " ".join(["the acting was wonderful"] * 12)},
            {"prompt": "the acting"},
        ]
        (prompts / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    short = tmp_path / "short.jsonl"
    flags += f" --dataset-name {prompts} --max-length 30 --response-length 8 --best-of-n 2 --output {short}"
    run_script(flags.split())
    assert [json.loads(line)["prompt"] for line in short.read_text().splitlines()] == ["the plot", "the acting"]


def end_token_judge(path):
    """A reward model with no transformer layers (the one-hot embeddings of conftest.markov_llama) whose head is 1 at
    the EOS and 0 at every other token: it scores a response 1 if it ended with the end token, 0 if it was cut."""
    from transformers import AutoModelForSequenceClassification

    judge = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    scale = 1 / math.sqrt(1 / judge.config.hidden_size + judge.config.rms_norm_eps)  # RMSNorm of a one-hot
    with torch.no_grad():
        judge.score.weight.zero_()
        judge.score.weight[0, 1] = 1 / scale  # EOS is id 1
    judge.config.reward_bias = 0.0
    return judge.eval()


def test_win_rate_is_the_policys_against_the_references(tmp_path, markov_models):
    """Judged by end_token_judge, every reference response (a toy completion and its EOS) scores 1; a policy's
    response capped at 3 tokens scores 1 if it ended, 0 if it was cut, so it wins no comparison and ties every one
    where it ended: its win rate is exactly half its end-token rate (the other way round it would be 1 − that)."""
    ref_path, _, _ = markov_models
    judge = str(tmp_path / "judge")
    end_token_judge(ref_path).save_pretrained(judge)
    common.load_tokenizer(ref_path).save_pretrained(judge)
    run_script(
        f"evaluate.py --policies {ref_path} --ref-policy {ref_path} --reward-model-name {judge} --judge {judge} "
        f"--num-samples 40 --best-of-n 1 --response-length 3 --output-dir {tmp_path / 'eval'}".split()
    )
    (row,) = read_json(tmp_path / "eval" / "results.json")["policies"]
    assert 0 < row["eos_rate"] < 1 and row["score"] == pytest.approx(row["eos_rate"], abs=1e-6)
    assert row["win_rate"] == pytest.approx(row["eos_rate"] / 2, abs=1e-9)
