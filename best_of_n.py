"""Expert iteration's data (AlpacaFarm; Dubois et al. 2023): of max(--best-of-n) samples of the
reference policy for each of the first --num-samples training prompts, the one the reward model
scores highest (a cut one only where all are) as a (prompt, completion) row for sft.py.

    python best_of_n.py --output runs/data/expert_iteration.jsonl --best-of-n 16 --num-samples 4000
"""

import json
import os
from dataclasses import dataclass

import numpy as np
import tyro

import common
import evaluate


@dataclass
class Args(evaluate.Sampling):
    output: str = os.path.join("runs", "data", "expert_iteration.jsonl")
    """the .jsonl of (prompt, completion) rows to write"""


if __name__ == "__main__":
    args = tyro.cli(Args)
    device = evaluate.start(args)
    tok, ref_model, reward_model = evaluate.load_models(args, device, [])
    stops, N = common.stop_token_ids(tok, ref_model), max(args.best_of_n)

    ds = common.load_splits(args.dataset_name, "prompt", seed=args.seed)[0]
    ds = ds.select(range(min(args.num_samples, len(ds))))
    lengths = [len(p) for p in common.encode_dataset(tok, ds, "prompt")[0]]
    max_prompt = args.max_length - args.response_length  # longer ones dropped, as by evaluate.py
    ds = ds.select([i for i, n in enumerate(lengths) if n <= max_prompt])
    queries = common.tokenize_prompts(tok, ds, max_prompt)[0]
    samples = [q for q in queries for _ in range(N)]
    responses = evaluate.sample(ref_model, samples, tok, args, device)
    scores = evaluate.reward_scores(reward_model, samples, responses, tok, args, device)
    scores = scores - 1e9 * np.array([not r or r[-1] not in stops for r in responses])  # cut ones last
    best = [responses[i * N + int(np.argmax(scores[i * N : (i + 1) * N]))] for i in range(len(queries))]
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as f:
        for row, q, b in zip(ds, queries, best):  # the text after the prompt's, decoded together
            text = tok.decode(q + b, skip_special_tokens=True)
            text = text[len(tok.decode(q, skip_special_tokens=True)) :]
            prompt = common.prompt_and_responses(row, "prompt")[0]  # a string, or messages
            if isinstance(prompt, list):  # a conversation's prompt gets an assistant message
                text = [{"role": "assistant", "content": text.strip()}]
            f.write(json.dumps({"prompt": prompt, "completion": text}) + "\n")
    dropped = f"{len(lengths) - len(ds)} over the length limit dropped"
    print(f"wrote the best of {N} samples for {len(best)} prompts ({dropped}) to {args.output}")
