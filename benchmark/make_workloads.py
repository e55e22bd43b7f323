"""Inputs of the side-by-side benchmark, written once and read by both sides (our scripts and TRL):
    python benchmark/make_workloads.py OUT      (from the project root, with the project's environment)

OUT/toy/model             the toy task's base model (word-level tokenizer, tiny Llama), saved like a Hub model
OUT/toy/{sft,pairs,prompts}/{train,test}.jsonl   the toy task's data (prompt/completion, prompt/chosen/rejected, prompt)
OUT/smol/model            a random-init model with SmolLM2-135M's architecture (Llama, hidden 576, 30 layers, 9 heads,
                          3 key/value heads, vocabulary 49,152, tied embeddings): per token it costs what the real
                          model costs; its tokenizer is word-level over 49,149 words, so a word is one token
OUT/smol/{sft,pairs}/{train,test}.jsonl  chat-shaped data: prompts of ~150 tokens, responses of ~50 (64 and 32 rows)
"""

import json
import os
import random
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import toy_task


def write_jsonl(folder, split, rows):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{split}.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def smol_model(path, seed=0):
    """SmolLM2-135M's architecture with random weights and a word-level tokenizer of its vocabulary size."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<pad>", "</s>", "<unk>"] + [f"w{i}" for i in range(49152 - 3)]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=2048,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return words[3:]


def chat_shaped(words, n, seed, prompt_len=(130, 170), response_len=(35, 65)):
    """n rows of prompt (~150 words) and two responses (~50 words each), word = token."""
    rng = random.Random(seed)
    text = lambda k: " ".join(rng.choice(words) for _ in range(k))
    return [
        {
            "prompt": text(rng.randint(*prompt_len)),
            "chosen": " " + text(rng.randint(*response_len)),
            "rejected": " " + text(rng.randint(*response_len)),
        }
        for _ in range(n)
    ]


if __name__ == "__main__":
    out = sys.argv[1]
    toy_task.save_base_model(os.path.join(out, "toy", "model"), seed=0)
    for kind, folder in (("sft", "sft"), ("preference", "pairs"), ("prompt", "prompts")):
        for split, n in (("train", 5120), ("test", 64)):
            ds = toy_task.make_dataset(kind, "train" if split == "train" else "eval", num_examples=n, seed=0)
            write_jsonl(os.path.join(out, "toy", folder), split, ds.to_list())
    words = smol_model(os.path.join(out, "smol", "model"))
    for split, n, seed in (("train", 64, 0), ("test", 8, 1)):
        rows = chat_shaped(words, n, seed)
        write_jsonl(os.path.join(out, "smol", "pairs"), split, rows[: n // 2])  # DPO: 32 pairs, 4 steps of 8
        write_jsonl(
            os.path.join(out, "smol", "sft"), split, [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows]
        )
    print(out)
