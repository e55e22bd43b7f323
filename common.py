"""Tokenization and batching shared by sft.py, reward_model.py, ppo.py and dpo.py.

Only data handling lives here; every algorithm (model loading, losses, the training loop) is in
its own script. The conventions every script relies on:

* a completion ends with exactly one EOS, and the loss mask covers exactly its tokens and that EOS;
* PAD is never EOS (a tokenizer without PAD, or whose PAD is EOS, gets a new PAD token), and masks
  are always built from lengths, never by comparing ids with the pad id;
* labels use -100 (the ignore index of PyTorch's cross-entropy), never the pad id;
* training batches are right-padded, generation batches left-padded;
* nothing is cut silently: over-long examples are dropped or truncated, counted and reported.
"""

import os

import numpy as np
import torch

IGNORE_INDEX = -100
"""label of positions that carry no loss (prompt, padding): PyTorch's cross-entropy default"""
ADDED_PAD_TOKEN = "<|pad|>"
COLUMNS = {
    "sft": [("prompt", "completion"), ("messages",)],
    "preference": [("prompt", "chosen", "rejected")],
    "prompt": [("prompt",), ("messages",)],
}
"""accepted column sets for each kind of dataset (any one of them)"""
DATA_FILE_TYPES = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


# ---- loading ------------------------------------------------------------------------------------
def check_columns(ds, kind, name):
    """Fail early, naming what was found and what is expected, if `ds` lacks the columns of `kind`."""
    for cols in COLUMNS[kind]:
        if all(c in ds.column_names for c in cols):
            return cols
    expected = " or ".join("(" + ", ".join(c) + ")" for c in COLUMNS[kind])
    raise ValueError(f"dataset {name!r} has columns {ds.column_names}, but {kind} data needs {expected}; "
                     f"rename the columns (Dataset.rename_column) or pass another --dataset-name")


def load_splits(name, kind, train_split="train", eval_split="test", seed=0, eval_fraction=0.05):
    """(train, eval) `datasets.Dataset`s of `kind` ("sft", "preference" or "prompt") from:
    "toy" (the embedded task, see toy_task.py), a local .json/.jsonl/.parquet/.csv file or a folder
    of them, or a Hugging Face Hub id. Without an `eval_split`, a seeded `eval_fraction` of the
    training split is held out (and said so)."""
    if name == "toy":
        import toy_task

        return (toy_task.make_dataset(kind, "train", seed=seed), toy_task.make_dataset(kind, "eval", seed=seed))
    import datasets

    if os.path.isfile(name):
        ext = os.path.splitext(name)[1].lower()
        if ext not in DATA_FILE_TYPES:
            raise ValueError(f"{name}: unknown data file type {ext!r}; use one of {sorted(DATA_FILE_TYPES)}")
        dd = datasets.load_dataset(DATA_FILE_TYPES[ext], data_files={train_split: name})
    else:  # a local folder (split names taken from file names, as on the Hub) or a Hub id
        dd = datasets.load_dataset(name)
    if train_split not in dd:
        raise ValueError(f"dataset {name!r} has splits {list(dd)}, no {train_split!r}; pass --dataset-train-split")
    train = dd[train_split]
    check_columns(train, kind, name)
    if eval_split in dd:
        evals = dd[eval_split]
    else:
        if len(train) < 2:
            raise ValueError(f"dataset {name!r} has {len(train)} example(s) and no {eval_split!r} split to evaluate on")
        parts = train.train_test_split(test_size=max(1, round(eval_fraction * len(train))), seed=seed)
        train, evals = parts["train"], parts["test"]
        print(f"dataset {name!r} has no split {eval_split!r}: holding out {len(evals)} training examples for eval")
    check_columns(evals, kind, name)
    return train, evals


def load_tokenizer(name):
    """AutoTokenizer with an EOS and a PAD distinct from it. A tokenizer without PAD (GPT-2, Pythia)
    or whose PAD is its EOS (many chat models) gets a new PAD token; call `resize_embeddings` on
    every model used with it. PAD's embedding is never trained on or predicted (labels -100)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name)
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer of {name!r} has no EOS token, so completions cannot be ended; "
                         f"set one (tokenizer.eos_token = ...) and save_pretrained it, then pass that folder")
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        tok.add_special_tokens({"pad_token": ADDED_PAD_TOKEN})
    assert tok.pad_token_id != tok.eos_token_id
    return tok


def resize_embeddings(model, tokenizer):
    """Make room for a PAD token `load_tokenizer` added, and record PAD/EOS in the model's configs."""
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id


# ---- rendering conversations to text -------------------------------------------------------------
def _content(messages):
    """The text of a response given as a string or as messages (its last assistant turn)."""
    if isinstance(messages, str):
        return messages
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError(f"a response given as messages must end with an assistant turn, got {messages!r}")
    return messages[-1]["content"]


def _prompt_text(tokenizer, prompt):
    """(text, templated): a string prompt as is, a list of messages through the chat template."""
    if isinstance(prompt, str):
        return prompt, False
    if prompt and prompt[-1].get("role") == "assistant":
        prompt = prompt[:-1]
    if tokenizer.chat_template is None:
        raise ValueError("conversational data needs a tokenizer with a chat template (tokenizer.chat_template)")
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False), True


def to_text(tokenizer, example, kind):
    """An example of any accepted column set -> (prompt text, templated, responses): `responses` is
    [completion] for sft, [chosen, rejected] for preference, [] for prompt."""
    if "messages" in example and "prompt" not in example:
        msgs = example["messages"]
        if kind == "sft":
            completion = _content(msgs)  # checks that the conversation ends with the assistant's turn
            text, templated = _prompt_text(tokenizer, msgs[:-1])
            return text, templated, [completion]
        text, templated = _prompt_text(tokenizer, msgs)
        return text, templated, []
    text, templated = _prompt_text(tokenizer, example["prompt"])
    cols = {"sft": ["completion"], "preference": ["chosen", "rejected"], "prompt": []}[kind]
    return text, templated, [_content(example[c]) for c in cols]


# ---- tokenization --------------------------------------------------------------------------------
def encode_prompts(tokenizer, texts, templated):
    """Prompt ids for a list of texts. Plain text gets the tokenizer's special tokens (a BOS, for
    Llama); a chat template already wrote them. A trailing EOS some tokenizers add is removed: it
    would end the text before the completion starts."""
    ids = tokenizer(list(texts), add_special_tokens=not templated)["input_ids"] if texts else []
    eos = tokenizer.eos_token_id
    return [_strip_eos(x, eos) for x in ids]


def encode_responses(tokenizer, texts):
    """Response ids ending with exactly one EOS, whether or not the text already ended with it."""
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []
    eos = tokenizer.eos_token_id
    return [_strip_eos(x, eos) + [eos] for x in ids]


def _strip_eos(ids, eos):
    while ids and ids[-1] == eos:
        ids = ids[:-1]
    return ids


def encode_dataset(tokenizer, ds, kind):
    """Render every example to text and tokenize in batches (fast tokenizers are much quicker on
    lists). Returns prompt ids and, per response column, response ids."""
    rendered = [to_text(tokenizer, ex, kind) for ex in ds.to_list()]
    if len({templated for _, templated, _ in rendered}) > 1:
        raise ValueError("mix of plain-text and conversational prompts in one dataset")
    templated = bool(rendered) and rendered[0][1]
    prompts = encode_prompts(tokenizer, [p for p, _, _ in rendered], templated)
    n_resp = len(rendered[0][2]) if rendered else 0
    responses = [encode_responses(tokenizer, [r[k] for _, _, r in rendered]) for k in range(n_resp)]
    return prompts, responses


def tokenize_sft(tokenizer, ds, max_length, train_on_prompt=False):
    """SFT examples -> (list of {"input_ids", "labels"}, stats). labels are the input ids on the
    completion and its EOS (and the prompt if `train_on_prompt`), -100 elsewhere. An example over
    `max_length` tokens has its completion truncated on the right (so it loses its EOS: the model
    is not taught to stop there); one whose prompt alone leaves no room is dropped. Both counted."""
    out, truncated, dropped = [], 0, 0
    prompts, (completions,) = encode_dataset(tokenizer, ds, "sft")
    for p, c in zip(prompts, completions):
        if len(p) >= max_length:
            dropped += 1
            continue
        if len(p) + len(c) > max_length:
            c, truncated = c[: max_length - len(p)], truncated + 1
        labels = (p if train_on_prompt else [IGNORE_INDEX] * len(p)) + c
        out.append({"input_ids": p + c, "labels": labels})
    if not out:
        raise ValueError(f"every example is longer than max_length={max_length} tokens; raise --max-length")
    return out, {"truncated": truncated, "dropped": dropped, "total": len(ds)}


def tokenize_preferences(tokenizer, ds, max_length):
    """Preference pairs -> (list of {"prompt", "chosen", "rejected"} id lists, stats). Each response
    ends with one EOS. Pairs whose prompt + longer response exceed `max_length`, and pairs whose
    chosen equals rejected (no preference to learn), are dropped and counted."""
    out, too_long, ties = [], 0, 0
    prompts, (chosen, rejected) = encode_dataset(tokenizer, ds, "preference")
    for p, c, r in zip(prompts, chosen, rejected):
        if c == r:
            ties += 1
        elif len(p) + max(len(c), len(r)) > max_length:
            too_long += 1
        else:
            out.append({"prompt": p, "chosen": c, "rejected": r})
    if not out:
        raise ValueError(f"no usable pair: {too_long} over max_length={max_length} tokens, {ties} with "
                         f"chosen == rejected; raise --max-length or check the data")
    return out, {"dropped_too_long": too_long, "dropped_ties": ties, "total": len(ds)}


def tokenize_prompts(tokenizer, ds, max_prompt_length):
    """Prompt-only data -> (list of prompt id lists, stats); prompts over the limit dropped and counted."""
    prompts, _ = encode_dataset(tokenizer, ds, "prompt")
    out = [p for p in prompts if 0 < len(p) <= max_prompt_length]
    if not out:
        raise ValueError(f"every prompt is empty or over max_prompt_length={max_prompt_length} tokens")
    return out, {"dropped_too_long": len(prompts) - len(out), "total": len(ds)}


def report(what, stats):
    """Print how many examples were cut or dropped, if any: truncation is never silent."""
    lost = {k: v for k, v in stats.items() if k != "total" and v}
    if lost:
        print(f"{what}: of {stats['total']} examples, " + ", ".join(f"{k} {v}" for k, v in lost.items()))


# ---- batching ------------------------------------------------------------------------------------
def pad(seqs, value, side="right"):
    """List of B id lists -> LongTensor (B, max length), padded with `value` on `side`."""
    L = max(len(s) for s in seqs)
    out = torch.full((len(seqs), L), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            if side == "right":
                out[i, : len(s)] = torch.tensor(s)
            else:
                out[i, L - len(s):] = torch.tensor(s)
    return out


def attention_mask(seqs, side="right"):
    """(B, L) 1 on real tokens, 0 on padding, from the lengths alone (never from the pad id)."""
    L = max(len(s) for s in seqs)
    lengths = torch.tensor([len(s) for s in seqs])[:, None]
    pos = torch.arange(L)[None, :]
    return (pos < lengths if side == "right" else pos >= L - lengths).long()


def collate_sft(examples, pad_id):
    """Right-padded training batch: input_ids (B, L), attention_mask (B, L), labels (B, L) with -100
    on padding."""
    ids = [e["input_ids"] for e in examples]
    return {"input_ids": pad(ids, pad_id), "attention_mask": attention_mask(ids),
            "labels": pad([e["labels"] for e in examples], IGNORE_INDEX)}


def collate_prompts(prompts, pad_id):
    """Left-padded generation batch, so that every row's next token is generated at the same slot."""
    return {"input_ids": pad(prompts, pad_id, "left"), "attention_mask": attention_mask(prompts, "left")}


def batch_schedule(num_examples, batch_size, num_steps, seed):
    """Indices of `num_steps` global batches of `batch_size` examples: a seeded shuffle per epoch,
    the incomplete tail of each epoch dropped. The same on every rank; each rank takes its slice."""
    if batch_size > num_examples:
        raise ValueError(f"batch size {batch_size} is larger than the dataset ({num_examples} examples)")
    per_epoch = num_examples // batch_size
    rng = np.random.default_rng(seed)
    perm, batches = None, []
    for step in range(num_steps):
        if step % per_epoch == 0:
            perm = rng.permutation(num_examples)
        k = step % per_epoch
        batches.append(perm[k * batch_size: (k + 1) * batch_size])
    return batches
