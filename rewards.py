"""Reward functions for grpo.py and ppo.py (--reward-fn rewards:NAME): verifiable rewards (RLVR; Lambert et al.
2024, Tülu 3), checked by a program instead of scored by a reward model. Copy this file along with the script.

The calling convention is TRL's: f(prompts, completions, **columns) -> list[float | None], one value per sample.
prompts and completions are strings, or message lists for conversational data (a completion is then
[{"role": "assistant", "content": ...}]); every other column of the dataset's rows is passed by name, as a list
(e.g. `answer`); None means the function does not apply to that sample.

    python grpo.py --model-name MODEL --dataset-name gsm8k.jsonl --reward-fn rewards:exact_answer
"""

import re
from fractions import Fraction

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
