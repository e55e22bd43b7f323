"""Held-out accuracy of chat models on a verifiable task: greedy answers to every test prompt, scored by
rewards.exact_answer (any model folder: ours, TRL's checkpoints, the start model).

    python benchmark/accuracy.py runs/data/arithmetic MODEL [MODEL ...]   # prints one line per model
"""

import sys

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, ".")
import common
import rewards

BATCH, NEW_TOKENS = 64, 32


@torch.no_grad()
def accuracy(model_dir, data):
    """(share of test prompts answered exactly, the answers) of greedy completions of up to NEW_TOKENS tokens."""
    tok = common.load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    common.fit_model(model, tok)
    ds = common.load_splits(data, "prompt")[1]
    prompts, kept, _ = common.tokenize_prompts(tok, ds, 512)
    texts = []
    for i in range(0, len(prompts), BATCH):
        batch = common.collate_prompts(prompts[i : i + BATCH], tok.pad_token_id)
        out = model.generate(
            **batch,
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=common.stop_token_ids(tok, model),
        )
        texts += tok.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    scores = rewards.exact_answer(None, texts, answer=ds.select(kept)["answer"])
    return sum(scores) / len(scores), texts


if __name__ == "__main__":
    data = sys.argv[1]
    for model_dir in sys.argv[2:]:
        acc, texts = accuracy(model_dir, data)
        print(f"{model_dir}: accuracy {acc:.3f} on {len(texts)} prompts; e.g. {texts[:3]}")
