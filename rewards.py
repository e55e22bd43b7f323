"""Reward functions for grpo.py and ppo.py (--reward-fn rewards:NAME): verifiable rewards (RLVR; Lambert et al.
2024, Tülu 3), checked by a program instead of scored by a reward model.

The calling convention is TRL's: f(prompts, completions, **columns) -> list[float | None], one value per sample.
prompts and completions are strings, or message lists for conversational data (a completion is then
[{"role": "assistant", "content": ...}]); every other column of the dataset's rows is passed by name, as a list
(e.g. `answer`); None means the function does not apply to that sample.

    python grpo.py --model-name MODEL --dataset-name gsm8k.jsonl --reward-fn rewards:exact_answer

grpo.py and ppo.py import it: `load_reward_fns` and `reward_fn_values` at the end load and call these.
"""

import importlib
import inspect
import math
import numbers
import re
from fractions import Fraction

import torch

import common

MINUS = r"(?:(?<!\w)-)?"
"""a minus sign, where no digit or letter comes right before it (in 10-15 or a-7 the hyphen is no minus)"""
NUMBER = re.compile(MINUS + r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?|" + MINUS + r"\.\d+")
"""an integer, a decimal, a number with thousands separators (1,000) or a fraction (3/4); negative after a minus"""
LATEX_NOISE = r"\\text\{[^{}]*\}|\\[$%,!;]|\{,\}|[$%]"
"""what a number may carry in LaTeX that is not its value: units in \\text{}, $ and % signs, thin spaces, {,}"""
FORMAT = r"<think>.*?</think>\s*<answer>.*?</answer>"
"""format_match's pattern: DeepSeek-R1's reasoning format (Guo et al. 2025); edit it for yours"""


def text_of(completion):
    """The text of a completion: the string, or the content of the last message."""
    return completion if isinstance(completion, str) else completion[-1]["content"]


def last_boxed(text):
    """The content of the last \\boxed{...} (braces nested inside it kept), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None  # unclosed


def as_number(text):
    """The value of a number as written (1,000; −3; 0.50; 3/4; \\frac{3}{4}; LaTeX's \\$18, 18\\%, 1{,}000 or
    72 \\text{ clips}) as an exact Fraction, or None."""
    text = re.sub(LATEX_NOISE, "", text.replace("−", "-")).strip()
    text = re.sub(r"\\d?frac\{([^{}]*)\}\{([^{}]*)\}", r"\1/\2", text)
    if not re.fullmatch(NUMBER, text):
        return None
    try:
        return Fraction(text.replace(",", "").replace(" ", ""))
    except ZeroDivisionError:  # 1/0
        return None


def extract_answer(text):
    """A completion's final answer: the content of its last \\boxed{...}, else its last number; None if neither."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    numbers = NUMBER.findall(text.replace("−", "-"))  # a Unicode minus (U+2212) is a minus
    return numbers[-1] if numbers else None


def same_answer(given, reference):
    """Equal as numbers where both are numbers (0.50 = 0.5 = 1/2), else equal as text, whitespace ignored."""
    a, b = as_number(given), as_number(reference)
    if a is not None and b is not None:
        return a == b
    return "".join(given.split()) == "".join(reference.split())


def exact_answer(prompts, completions, answer, **columns):
    """1 if a completion's final answer (`extract_answer`) equals the reference, else 0 (no answer at all: 0). The
    reference is GSM8K-style: the text after "####" in the `answer` column, or the whole column."""
    out = []
    for completion, ref in zip(completions, answer):
        given = extract_answer(text_of(completion))
        out.append(float(given is not None and same_answer(given, str(ref).split("####")[-1].strip())))
    return out


def format_match(prompts, completions, **columns):
    """1 if the whole completion (stripped) matches FORMAT, with . matching newlines too, else 0."""
    return [float(re.fullmatch(FORMAT, text_of(c).strip(), re.DOTALL) is not None) for c in completions]


def math_verify(prompts, completions, answer, **columns):
    """1 if Hugging Face's math-verify finds the completion's answer equal to the reference (LaTeX, sets,
    intervals, symbolic equality), else 0; the reference as exact_answer takes it."""
    try:
        from math_verify import parse, verify
    except ImportError:
        raise SystemExit("rewards:math_verify needs the math-verify package: pip install math-verify==0.9.0") from None
    refs = [parse("$" + str(ref).split("####")[-1].strip() + "$") for ref in answer]
    return [float(bool(ref) and verify(ref, parse(text_of(c)))) for c, ref in zip(completions, refs)]


# ---- the calling convention, as grpo.py and ppo.py use it ----
def load_reward_fns(specs, columns):
    """The --reward-fn functions (MODULE:FUNCTION); a missing one or argument stops the run here."""
    fns = []
    for spec in specs:
        module, _, name = spec.partition(":")
        try:
            fns.append(getattr(importlib.import_module(module), name))
            inspect.signature(fns[-1]).bind([], [], **{c: [] for c in columns})
        except (ImportError, AttributeError, TypeError) as e:
            error = f"{type(e).__name__}: {e} (the data's columns: {columns})"
            raise SystemExit(f"--reward-fn {spec}: {error}") from None
    if len({s.partition(":")[2] for s in specs}) < len(specs):  # each logged as rewards/{its name}
        raise SystemExit(f"--reward-fn {' '.join(specs)}: two functions of one name; rename one")
    return fns


def reward_fn_values(fn, rows, texts):
    """(N,) values of fn(prompts, completions, **columns) for N texts answering dataset rows, NaN for
    None. Stops, naming the sample, if fn raises or returns a wrong count, NaN or inf."""
    prompts = [common.prompt_and_responses(row, "prompt")[0] for row in rows]
    chat = [isinstance(p, list) for p in prompts]  # a conversational prompt gets a message list
    completions = [[{"role": "assistant", "content": t}] if c else t for c, t in zip(chat, texts)]
    columns = {k: [row[k] for row in rows] for k in rows[0] if k not in ("prompt", "messages")}
    name = f"--reward-fn {fn.__module__}:{fn.__name__}"

    def sample(i):
        return f"sample {i} ({prompts[i]!r} -> {completions[i]!r})"

    try:
        values = fn(prompts, completions, **columns)
    except Exception:  # find the sample: the first that fails alone
        for i in range(len(rows)):
            one = slice(i, i + 1)
            try:
                fn(prompts[one], completions[one], **{k: v[one] for k, v in columns.items()})
            except Exception as e:
                raise ValueError(f"{name} raised {e!r} on {sample(i)}") from e
        raise
    if isinstance(values, str) or not hasattr(values, "__len__") or len(values) != len(rows):
        raise ValueError(f"{name} returned {str(values)[:80]} for {len(rows)} samples: a list of one value each")
    for i, v in enumerate(values):
        if v is not None and not (isinstance(v, numbers.Real) and math.isfinite(v)):
            raise ValueError(f"{name} returned {v!r} for {sample(i)}: a finite number, or None where it does not apply")
    return torch.tensor([math.nan if v is None else float(v) for v in values])
