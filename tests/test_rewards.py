"""rewards.py: the built-in verifiable rewards on tricky cases worked out by hand; the --reward-fn machinery of
grpo.py and ppo.py through their command lines."""

import math
import sys

import pytest

import rewards

GSM8K = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nShe sold 48+24 = <<48+24=72>>72 clips.\n#### 72"


@pytest.mark.parametrize(
    "completion,reference,want",
    [
        ("48 in April and 24 in May, so 72 in all.", GSM8K, 1.0),  # the text after ####, the last number
        ("72 clips? No: 48 + 24 = 73", GSM8K, 0.0),  # the last number counts, not the first
        ("She earned 1,000 dollars.", "#### 1000", 1.0),  # thousands separators
        ("$1,234.50 in total", "1234.5", 1.0),  # a currency sign, a trailing zero, the whole column as reference
        ("The answer is -3.", "#### -3", 1.0),
        ("The answer is 3.", "#### -3", 0.0),
        ("x = 5-3=2", "2", 1.0),  # "-3" is a number of its own, but the last one is 2
        ("0.50", "0.5", 1.0),  # numbers, not strings
        ("42.0", "42", 1.0),
        ("3/4 of it", "0.75", 1.0),  # a fraction
        ("so \\boxed{\\frac{3}{4}}", "3/4", 1.0),  # \frac inside \boxed
        ("maybe 5, finally \\boxed{7}; check: 5", "7", 1.0),  # the last \boxed beats the last number
        ("maybe 5, finally \\boxed{7}; check: 5", "5", 0.0),
        ("\\boxed{1} then \\boxed{\\frac{1}{2}}", "0.5", 1.0),  # the last \boxed, nested braces kept
        ("\\boxed{New York}", "New  York", 1.0),  # not numbers: text, whitespace ignored
        ("\\boxed{x+1}", "x + 1", 1.0),
        ("I do not know.", "#### 4", 0.0),  # no answer at all
        ("", "0", 0.0),
        ("1/0", "1/0", 1.0),  # not a number (division by zero): compared as text
        ("unclosed \\boxed{12", "12", 1.0),  # an unclosed \boxed is no box: its last number
        ("The answer is −3.", "#### -3", 1.0),  # a Unicode minus sign (U+2212)
        ("\\boxed{\\$18}", "18", 1.0),  # LaTeX around the number: a dollar, a percent, {,} as a separator, units
        ("\\boxed{18\\%}", "18", 1.0),
        ("\\boxed{1{,}000}", "#### 1000", 1.0),
        ("\\boxed{72 \\text{ clips}}", GSM8K, 1.0),
        ("\\boxed{\\text{none}}", "0", 0.0),  # no number in the box: no answer
        ("the range is 10-15", "15", 1.0),  # a hyphen after a digit is no minus: 15, not -15
        ("the range is 10-15", "-15", 0.0),
        ("pages a-7", "7", 1.0),  # nor after a letter
        ("so x=-3", "-3", 1.0),  # after "=" it is a minus, as after a space ("= -3") or at the start
        ("so x = -3", "-3", 1.0),
        ("-3", "-3", 1.0),
        ("\\boxed{-3}", "-3", 1.0),
    ],
)
def test_exact_answer_by_hand(completion, reference, want):
    assert rewards.exact_answer(["q"], [completion], answer=[reference]) == [want]


def test_exact_answer_takes_conversational_completions_and_other_columns():
    completions = [[{"role": "assistant", "content": "It is \\boxed{12}."}], [{"role": "assistant", "content": "13"}]]
    prompts = [[{"role": "user", "content": "7 + 5?"}]] * 2
    assert rewards.exact_answer(prompts, completions, answer=["#### 12", "12"], level=[1, 2]) == [1.0, 0.0]


def test_format_match_by_hand():
    completions = [
        "<think>7 + 5\nis 12</think>\n<answer>12</answer>",  # newlines inside and between
        "  <think>a</think><answer>b</answer>\n",  # surrounding whitespace is stripped
        "<think>a</think>",  # no answer block
        "<think>a</think><answer>b</answer> and more",  # text after the format
        "<answer>b</answer><think>a</think>",  # the wrong order
    ]
    assert rewards.format_match(["q"] * 5, completions) == [1.0, 1.0, 0.0, 0.0, 0.0]


def test_math_verify_without_the_package_is_a_one_line_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)  # as if it were not installed
    with pytest.raises(SystemExit, match="pip install math-verify"):
        rewards.math_verify(["q"], ["\\boxed{1}"], answer=["1"])


def test_math_verify_when_installed():
    pytest.importorskip("math_verify")
    got = rewards.math_verify(["q"] * 3, ["$\\frac{1}{2}$", "so \\boxed{0.5}", "\\boxed{2}"], answer=["#### 1/2"] * 3)
    assert got == [1.0, 1.0, 0.0]


# ---- the --reward-fn machinery of grpo.py and ppo.py, with the functions below (this module is importable) ----
def answer_is_word_count(prompts, completions, answer, **columns):
    """1 where the row's `answer` column is its prompt's number of words: the columns reach the function aligned."""
    return [float(a == len(p.split())) for p, a in zip(prompts, answer)]


def none_for_odd(prompts, completions, **columns):
    """1 for a prompt of an even number of words; None (does not apply) for an odd one."""
    return [None if len(p.split()) % 2 else 1.0 for p in prompts]


def raises_on_odd(prompts, completions, **columns):
    return [1 / (len(p.split()) % 2 - 1) for p in prompts]  # 1 / 0 for an odd number of words


def one_value(prompts, completions, **columns):
    return [0.0]


def a_number(prompts, completions, **columns):
    return 1.0


def text(prompts, completions, **columns):
    return ["1"] * len(prompts)


def nan_for_odd(prompts, completions, **columns):
    return [math.nan if len(p.split()) % 2 else 0.0 for p in prompts]


def never(prompts, completions, **columns):
    return [None] * len(prompts)


@pytest.fixture(scope="module")
def counted(tmp_path_factory):
    """(P_ref as a layer-free Llama, a folder of 16 toy prompts whose `answer` is their number of words)."""
    from conftest import markov_llama, write_jsonl

    import toy_task

    root = tmp_path_factory.mktemp("counted")
    markov_llama(str(root / "policy"))
    (root / "data").mkdir()
    for split, name, n in (("train", "train", 16), ("eval", "test", 4)):
        prompts = toy_task.make_dataset("prompt", split, num_examples=n)["prompt"]
        write_jsonl(root / "data" / f"{name}.jsonl", [{"prompt": p, "answer": len(p.split())} for p in prompts])
    return str(root / "policy"), str(root / "data")


def flags(script, policy, data, out, *fns):
    """One iteration over all 16 prompts (GRPO: twice each), reward functions only."""
    batch = "--batch-size 32 --group-size 2 --num-epochs 2" if script == "grpo.py" else "--batch-size 16 --num-epochs 1"
    fn_flags = [x for fn in fns for x in ("--reward-fn", fn)]
    return (
        f"{script} --model-name {policy} --dataset-name {data} {batch} --max-length 64 "
        f"--response-length 8 --num-minibatches 1 --output-dir {out}".split()
        + fn_flags
    )


@pytest.mark.parametrize("script", ["grpo.py", "ppo.py"])
def test_reward_fns_get_their_rows_and_are_weighted(script, counted, tmp_path):
    """Two functions, weights 1 and 2, no reward model: each gets every sample's row (its `answer` aligned), each is
    logged as its mean over the samples it applies to, and the score is their weighted sum (None adding nothing):
    1 + 2 for a prompt of an even number of words, 1 for an odd one."""
    from conftest import result_of, run_script

    import toy_task

    policy, data = counted
    words = [len(p.split()) for p in toy_task.make_dataset("prompt", "train", num_examples=16)["prompt"]]
    out = run_script(
        flags(script, policy, data, tmp_path, "test_rewards:answer_is_word_count", "test_rewards:none_for_odd")
        + ["--reward-weights", "1", "2"]
    )
    assert "1.0 × answer_is_word_count, 2.0 × none_for_odd" in out and "reward model" not in out.split("models:")[-1]
    result = result_of(tmp_path)
    assert result["rewards/answer_is_word_count"] == 1.0 and result["rewards/none_for_odd"] == 1.0
    assert result["objective/scores"] == pytest.approx(sum(1 + 2 * (n % 2 == 0) for n in words) / 16)
    assert result["policy/first_minibatch_ratio"] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize(
    "fn,error",
    [
        (
            "raises_on_odd",
            r"--reward-fn test_rewards:raises_on_odd raised ZeroDivisionError.* on sample \d+ \('[\w ]+' ->",
        ),
        ("one_value", r"--reward-fn test_rewards:one_value returned \[0.0\] for {n} samples: a list of one value each"),
        ("a_number", r"--reward-fn test_rewards:a_number returned 1.0 for {n} samples: a list of one value each"),
        ("nan_for_odd", r"--reward-fn test_rewards:nan_for_odd returned nan for sample \d+ \('[\w ]+' ->"),
        ("text", r"--reward-fn test_rewards:text returned '1' for sample 0 .*: a finite number, or None"),
        ("never", r"no reward applies to sample 0 .*: each returned None"),
    ],
)
@pytest.mark.parametrize("script", ["grpo.py", "ppo.py"])
def test_a_bad_reward_fn_stops_before_any_update(script, fn, error, counted, tmp_path):
    """A function that raises, returns the wrong number of values, NaN, or None for every sample stops the run at
    the first iteration's scoring, before any update, naming the function and the sample; in both scripts, whose
    batches (flags above) are 32 samples (16 prompts twice) and 16."""
    from conftest import run_script

    policy, data = counted
    n = 32 if script == "grpo.py" else 16
    with pytest.raises((ValueError, FloatingPointError), match=error.format(n=n)):
        run_script(flags(script, policy, data, tmp_path, f"test_rewards:{fn}"))
    assert not (tmp_path / "model.safetensors").exists()


def test_reward_fns_that_cannot_run_stop_before_any_model_loads(counted, tmp_path):
    """A missing module or function, or a function whose argument the data lacks (exact_answer needs `answer`),
    stops the run at once, naming the flag."""
    from conftest import script_error, toy_data_file

    policy, data = counted
    no_answer = toy_data_file(tmp_path / "prompts.jsonl", "prompt", 8)
    for spec, data_path, want in [
        ("nope:fn", data, "--reward-fn nope:fn: ModuleNotFoundError"),
        ("rewards:nope", data, "--reward-fn rewards:nope: AttributeError"),
        ("rewards:exact_answer", no_answer, "TypeError: missing a required argument: 'answer'"),
        ("test_rewards:never,test_rewards:never", data, "two functions of one name"),  # both rewards/never
    ]:
        assert want in script_error(flags("grpo.py", policy, data_path, tmp_path, *spec.split(",")))


def always_one(prompts, completions, **columns):
    return [1.0] * len(prompts)


def test_reward_weights_name_the_reward_model_first(counted, tmp_path):
    """A reward model and a function together: --reward-weights go to the reward model first, then the functions in
    their order. Weights 0.5 and 2, the function 1 everywhere: each score is 0.5 × the reward model's + 2, so their
    mean is 0.5 × rewards/reward_model + 2 (the weights the other way round: 0.5 + 2 × it, another number unless the
    reward model's mean is 1)."""
    from conftest import result_of, run_script, toy_reward_model

    import common

    policy, data = counted
    rm = str(tmp_path / "rm")
    toy_reward_model(policy).save_pretrained(rm)
    common.load_tokenizer(policy).save_pretrained(rm)
    run_script(
        flags("grpo.py", policy, data, tmp_path / "out", "test_rewards:always_one")
        + ["--reward-model-name", rm, "--reward-weights", "0.5", "2"]
    )
    result = result_of(tmp_path / "out")
    assert result["rewards/always_one"] == 1.0 and abs(result["rewards/reward_model"] - 1) > 0.01
    assert result["objective/scores"] == pytest.approx(0.5 * result["rewards/reward_model"] + 2, rel=1e-5)


def is_conversational(prompts, completions, **columns):
    """1 where the prompt is a message list ending in the user's turn and the completion is
    [{"role": "assistant", "content": text}] (TRL's convention for conversational data), else 0."""
    return [
        float(
            isinstance(p, list)
            and p[-1]["role"] == "user"
            and isinstance(c, list)
            and [set(m) for m in c] == [{"role", "content"}]
            and c[0]["role"] == "assistant"
            and isinstance(c[0]["content"], str)
        )
        for p, c in zip(prompts, completions)
    ]


def test_conversational_rows_reach_reward_fns_as_message_lists(hub_model, chat_data, tmp_path):
    """On conversational prompts (message lists), a reward function gets the prompts as message lists and each
    completion as a list of one assistant message: is_conversational is 1 on every sample."""
    from conftest import result_of, run_script

    run_script(
        f"grpo.py --model-name {hub_model} --dataset-name {chat_data['prompt']} --batch-size 8 --group-size 2 "
        "--num-epochs 0.3 --num-minibatches 1 --max-length 128 --response-length 8 --kl-coef 0 "
        f"--reward-fn test_rewards:is_conversational --output-dir {tmp_path}".split()
    )
    assert result_of(tmp_path)["rewards/is_conversational"] == 1.0
