"""GSM8K (Cobbe et al. 2021) as grpo.py's prompt data: conversational prompts and the `answer` column, whose text
after "####" rewards.exact_answer checks. From the public repository's files (nothing is downloaded here):

    git clone https://github.com/openai/grade-school-math /tmp/gsm8k   # or any copy of its data folder
    python benchmark/make_gsm8k.py /tmp/gsm8k/grade_school_math/data runs/data/gsm8k
    python grpo.py --model-name MODEL --dataset-name runs/data/gsm8k --reward-fn rewards:exact_answer
"""

import json
import os
import sys

INSTRUCTION = "\nReason step by step, then give the final answer as \\boxed{N}."
"""appended to each question: the answer rewards.exact_answer reads first"""

if __name__ == "__main__":
    source, out = sys.argv[1:3]
    os.makedirs(out, exist_ok=True)
    for split in ("train", "test"):
        with open(os.path.join(source, f"{split}.jsonl")) as f, open(os.path.join(out, f"{split}.jsonl"), "w") as g:
            for line in f:
                row = json.loads(line)
                prompt = [{"role": "user", "content": row["question"] + INSTRUCTION}]
                g.write(json.dumps({"prompt": prompt, "answer": row["answer"]}) + "\n")
    print(f"wrote {out}/train.jsonl and test.jsonl")
