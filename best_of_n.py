"""Expert iteration's data (AlpacaFarm; Dubois et al. 2023): for each of the first --num-samples
training prompts, max(--best-of-n) samples of the reference policy, and the one the reward model
scores highest (one cut without an end token only where all were) written as a (prompt, completion)
row for sft.py --dataset-name.

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
    args = evaluate.checked(tyro.cli(Args))
    device = evaluate.seeded_device(args)

    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    tokenizer = evaluate.load_tokenizer(args.ref_policy, [args.reward_model_name])
    ref_model = evaluate.load_model(AutoModelForCausalLM, args.ref_policy, tokenizer, device)
    scorer = AutoModelForSequenceClassification
    reward_model = evaluate.load_model(scorer, args.reward_model_name, tokenizer, device)
    stops, N = common.stop_token_ids(tokenizer, ref_model), max(args.best_of_n)

    ds = common.load_splits(args.dataset_name, "prompt", seed=args.seed)[0]
    ds = ds.select(range(min(args.num_samples, len(ds))))
    lengths = [len(p) for p in common.encode_dataset(tokenizer, ds, "prompt")[0]]
    max_prompt = args.max_length - args.response_length  # as evaluate.py: longer prompts are dropped
    ds = ds.select([i for i, n in enumerate(lengths) if n <= max_prompt])
    queries = common.tokenize_prompts(tokenizer, ds, max_prompt)[0]  # (len(ds),)
    samples = [q for q in queries for _ in range(N)]
    responses = evaluate.sample(ref_model, samples, tokenizer, args, device)
    scores = evaluate.reward_scores(reward_model, samples, responses, tokenizer, args, device)
    cut = np.array([not r or r[-1] not in stops for r in responses])
    scores = np.asarray(scores) - 1e9 * cut  # a cut response only where all N are
    best = [responses[i * N + int(np.argmax(scores[i * N : (i + 1) * N]))] for i in range(len(queries))]
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as f:
        for row, q, b in zip(ds, queries, best):  # the text after the prompt's, decoded together
            text = tokenizer.decode(q + b, skip_special_tokens=True)
            text = text[len(tokenizer.decode(q, skip_special_tokens=True)) :]
            prompt = common.prompt_and_responses(row, "prompt")[0]  # a string, or messages
            completion = text
            if isinstance(prompt, list):  # a conversation's prompt gets an assistant message
                completion = [{"role": "assistant", "content": text.strip()}]
            f.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")
    dropped = f"{len(lengths) - len(ds)} over the length limit dropped"
    print(f"wrote the best of {N} samples for {len(best)} prompts ({dropped}) to {args.output}")
