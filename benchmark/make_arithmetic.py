"""A verifiable task a small chat model can partly solve: procedurally generated arithmetic questions, as
conversational prompts with an `answer` column (rewards.exact_answer's reference), in train.jsonl and test.jsonl.

    python benchmark/make_arithmetic.py runs/data/arithmetic [DIGITS]              # 2,000 train, 200 test
    python grpo.py --model-name SMOLLM2 --dataset-name runs/data/arithmetic --reward-fn rewards:exact_answer
"""

import json
import os
import random
import sys

TEMPLATE = "What is {a} {op} {b}? Reply with the number only."
"""the question; the model's last number is read as its answer"""


def arithmetic(n, seed, digits=2):
    """n rows {"prompt": [user turn], "answer": "N"}: a + b, a − b or a × b (the last with a one-digit b) of
    `digits`-digit numbers, drawn with `seed`."""
    rng, rows = random.Random(seed), []
    for _ in range(n):
        op = rng.choice("+-*")
        a = rng.randrange(10 ** (digits - 1), 10**digits)
        b = rng.randrange(2, 10) if op == "*" else rng.randrange(10 ** (digits - 1), 10**digits)
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        question = TEMPLATE.format(a=a, op=op, b=b)
        rows.append({"prompt": [{"role": "user", "content": question}], "answer": str(value)})
    return rows


if __name__ == "__main__":
    out, digits = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 2
    os.makedirs(out, exist_ok=True)
    for split, n, seed in (("train", 2000, 0), ("test", 200, 1)):
        with open(os.path.join(out, f"{split}.jsonl"), "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in arithmetic(n, seed, digits))
    print(f"wrote {out}/train.jsonl and test.jsonl")
