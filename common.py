"""Tokenization and batching shared by sft.py, reward_model.py, ppo.py and dpo.py.

Only data handling lives here; every algorithm (model loading, losses, the training loop) is in
its own script. The conventions every script relies on:

* the ids a script trains on are those of the whole text: a conversation rendered by the chat
  template as one piece, a plain prompt and its completion tokenized as one string;
* a reply ends with one end token: the chat template's end-of-turn for conversations (which need
  not be the tokenizer's EOS), the tokenizer's EOS for plain text, and the loss mask covers the
  reply's tokens and that end token; generation stops at any end token (`stop_token_ids`);
* PAD is never an end token (a tokenizer without PAD, or whose PAD is EOS, gets a new PAD token),
  and masks are always built from lengths, never by comparing ids with the pad id;
* labels use -100 (the ignore index of PyTorch's cross-entropy), never the pad id;
* training batches are right-padded, generation batches left-padded;
* nothing is cut silently: over-long examples are dropped or truncated, counted and reported.
"""

import contextlib
import inspect
import os
import re

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
    raise ValueError(
        f"dataset {name!r} has columns {ds.column_names}, but {kind} data needs {expected}; "
        f"rename the columns (Dataset.rename_column) or pass another --dataset-name"
    )


def load_splits(name, kind, train_split="train", eval_split="test", seed=0, flag="--dataset-name"):
    """(train, eval) `datasets.Dataset`s of `kind` ("sft", "preference" or "prompt") from: "toy" (the embedded
    task, see toy_task.py), a local .json/.jsonl/.parquet/.csv file or a folder of them, or a Hub id. Without an
    `eval_split`, a seeded 5% of the training split is held out (and said so). `flag` names the data in errors."""
    if name == "toy":
        import toy_task

        return toy_task.make_dataset(kind, "train", seed=seed), toy_task.make_dataset(kind, "eval", seed=seed)
    import datasets

    ext = os.path.splitext(name)[1].lower()
    if os.path.isfile(name) and ext not in DATA_FILE_TYPES:
        raise ValueError(f"{flag} {name}: unknown data file type {ext!r}; use one of {sorted(DATA_FILE_TYPES)}")
    empty = ValueError(f"{flag} {name} holds no rows (an empty data file); fill it or pass other data")
    if os.path.isfile(name) and os.path.getsize(name) == 0:
        raise empty
    try:  # a file; or a local folder (split names taken from file names, as on the Hub) or a Hub id
        files = {"data_files": {train_split: name}} if os.path.isfile(name) else {}
        dd = datasets.load_dataset(DATA_FILE_TYPES[ext] if files else name, **files)
    except (StopIteration, ValueError, datasets.exceptions.DatasetGenerationError) as e:  # what empty files give
        raise ValueError(f"{flag} {name} holds no rows that can be read ({type(e).__name__}: {e})") from None
    if train_split not in dd:
        raise ValueError(f"{flag} {name} has splits {list(dd)}, no {train_split!r}; pass --dataset-train-split")
    train = dd[train_split]
    if len(train) == 0:
        raise empty
    check_columns(train, kind, name)
    if eval_split in dd:
        evals = dd[eval_split]
    else:
        if len(train) < 2:
            raise ValueError(f"{flag} {name} has {len(train)} example(s) and no {eval_split!r} split to evaluate on")
        parts = train.train_test_split(test_size=max(1, round(0.05 * len(train))), seed=seed)
        train, evals = parts["train"], parts["test"]
        print(f"{flag} {name} has no split {eval_split!r}: holding out {len(evals)} training examples for eval")
    check_columns(evals, kind, name)
    return train, evals


def check_model_path(name, hint=""):
    """End the run in one line if `name` can hold no model: not a folder and not a Hub id ("name" or
    "org/name"), or a folder without save_pretrained's config and tokenizer files. `hint` is appended."""
    if not os.path.isdir(name):
        if name.startswith(("/", ".", "~")) or name.count("/") > 1:
            raise SystemExit(f"no model at {name}" + hint)
    elif any(os.path.isfile(os.path.join(d, "adapter_config.json")) for d in (name, os.path.join(name, "adapter"))):
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise SystemExit(
                f"{name} holds LoRA adapters but no model (an adapter folder, or a run with --no-lora-merge): pass "
                "the folder of a merged model, which --lora-merge saves" + hint
            )
    elif not os.path.isfile(os.path.join(name, "config.json")) or not any(
        os.path.isfile(os.path.join(name, f)) for f in ("tokenizer.json", "tokenizer_config.json")
    ):
        raise SystemExit(
            f"{name} holds no Hugging Face model and tokenizer (config.json, tokenizer.json or "
            f"tokenizer_config.json); pass the folder that save_pretrained wrote" + hint
        )


def load_tokenizer(name, hint=""):
    """The tokenizer of `name` ("toy": toy_task's; else a folder save_pretrained wrote or a Hub id, see
    `check_model_path`), with an EOS and a PAD distinct from every end token. A tokenizer without PAD
    (GPT-2, Pythia), or whose PAD is its EOS, its chat template's end-of-turn or an end id the model's
    generation_config.json declares (Qwen2.5 and Qwen3: PAD <|endoftext|>, also an end id), gets a new PAD
    token; call `fit_model` on every model used with it. PAD's embedding is never trained on or predicted."""
    from transformers import AutoTokenizer, GenerationConfig

    declared = []
    if name == "toy":
        import toy_task

        tok = toy_task.make_tokenizer()
    else:
        check_model_path(name, hint)
        tok = AutoTokenizer.from_pretrained(name)
        with contextlib.suppress(OSError):  # OSError: the folder has no generation_config.json
            declared = GenerationConfig.from_pretrained(name).eos_token_id
    if tok.eos_token_id is None:
        raise ValueError(
            f"tokenizer of {name!r} has no EOS token, so completions cannot be ended; "
            f"set one (tokenizer.eos_token = ...) and save_pretrained it, then pass that folder"
        )
    ends = [tok.eos_token_id, end_of_turn_id(tok)] + (declared if isinstance(declared, list) else [declared])
    if tok.pad_token_id is None or tok.pad_token_id in ends:
        tok.add_special_tokens({"pad_token": ADDED_PAD_TOKEN})
    assert tok.pad_token_id not in ends
    return tok


def without_dropout(config):
    """`config` with every dropout-like probability set to 0 (dropout, pdrop, OPT's layerdrop, MoE router jitter):
    a frozen reference, a reward model and PPO's policy must compute the same in train mode as in eval mode."""
    for key, value in config.to_dict().items():
        if isinstance(value, float) and any(k in key for k in ("dropout", "pdrop", "layerdrop", "jitter")):
            setattr(config, key, 0.0)
    return config


def fit_model(model, tokenizer, max_length=None):
    """Fit a loaded model to the tokenizer: room for a PAD token `load_tokenizer` added, PAD and every end
    token recorded in its configs (a generation config that declares several end ids, as Llama-3.1 and
    Gemma do, keeps them all). Stops early if `max_length` exceeds its positions, or if a causal LM cannot
    compute logits at chosen positions only."""
    positions = getattr(model.config, "max_position_embeddings", None)
    if max_length and positions and max_length > positions:
        raise SystemExit(f"--max-length {max_length} exceeds the {positions} positions of this model; lower it")
    if model.can_generate() and "logits_to_keep" not in inspect.signature(model.forward).parameters:
        raise SystemExit(
            f"{type(model).__name__}'s forward takes no logits_to_keep, which the scripts use to compute "
            "logits only where a token is predicted; use a causal LM class that has it (transformers 5)"
        )
    old_rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > old_rows:
        # new rows = the mean of the old ones, not a random draw (transformers' default): then every rank
        # (FSDP keeps the last rank's draw of them), and a policy and the reference loaded beside it, agree
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            for layer in {model.get_input_embeddings(), model.get_output_embeddings()} - {None}:
                layer.weight[old_rows:] = layer.weight[:old_rows].mean(0)
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        stops = stop_token_ids(tokenizer, model)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = stops[0] if len(stops) == 1 else stops


def end_of_turn_id(tokenizer):
    """The token the chat template writes right after an assistant reply (ChatML `<|im_end|>`,
    Llama-3 `<|eot_id|>`, Gemma `<end_of_turn>`, Mistral `</s>`), found by rendering a probe
    conversation; None for a tokenizer without a chat template. It is what a model trained on
    conversations learns to end a reply with, and need not be the tokenizer's EOS."""
    if tokenizer.chat_template is None:
        return None
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "PROBE_REPLY"}]
    text = tokenizer.apply_chat_template(probe, tokenize=False)
    if "PROBE_REPLY" not in text:
        raise ValueError(
            "the chat template does not render an assistant reply's content; check tokenizer.chat_template"
        )
    special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    after = tokenizer(text[text.rindex("PROBE_REPLY") + len("PROBE_REPLY") :], add_special_tokens=False)["input_ids"]
    for i in after:
        if i in special:
            return i
    raise ValueError(
        f"the chat template ends an assistant reply with {text[text.rindex('PROBE_REPLY') + 11 :]!r}, "
        "which holds no special token: a model could not learn where its reply ends. Use a template "
        "that closes each turn with a special token (such as the tokenizer's EOS)"
    )


def stop_token_ids(tokenizer, model=None):
    """Every id that ends a response: the tokenizer's EOS, the chat template's end-of-turn, and the
    ids `model.generation_config.eos_token_id` declares (an int or a list). Generation stops at any
    of them, responses are cut after the first, and the reward is read there."""
    ids = [tokenizer.eos_token_id, end_of_turn_id(tokenizer)]
    declared = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += declared if isinstance(declared, (list, tuple)) else [declared]
    ids = list(dict.fromkeys(i for i in ids if i is not None))
    if tokenizer.pad_token_id in ids:
        raise ValueError(
            f"PAD (id {tokenizer.pad_token_id}) is also an end token of {type(model).__name__}'s generation_config; "
            "load the tokenizer from the folder of the model it is used with (common.load_tokenizer)"
        )
    return ids


def generate(model, input_ids, attention_mask, tokenizer, max_new_tokens, temperature=1.0, synced_gpus=False):
    """New ids (B, <= max_new_tokens) sampled from exactly softmax(logits / temperature) with PAD excluded,
    stopping at any end token (`stop_token_ids`): the distribution whose log-probabilities PPO trains on and
    evaluate.py measures. transformers 5 fills every setting a GenerationConfig leaves unset from the
    checkpoint's own generation_config (no_repeat_ngram_size, min_p, bad_words_ids, ...), so a blank one
    stands in for it during the call."""
    from transformers import GenerationConfig

    pad = tokenizer.pad_token_id
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=True,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        suppress_tokens=[pad],
        pad_token_id=pad,
        eos_token_id=stop_token_ids(tokenizer, model),
    )
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a LoRA model's (peft) is inside
    own, inner.generation_config = inner.generation_config, GenerationConfig()
    try:
        out = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, generation_config=config, synced_gpus=synced_gpus
        )
    finally:
        inner.generation_config = own
    return out[:, input_ids.shape[1] :]


# ---- rendering and tokenizing examples ----------------------------------------------------------
def is_conversational(example):
    """True if the example is given as messages (a `messages` column, or a prompt that is a list)."""
    return "messages" in example and "prompt" not in example or isinstance(example.get("prompt"), list)


def _render(tokenizer, messages, generation_prompt):
    if tokenizer.chat_template is None:
        raise ValueError("conversational data needs a tokenizer with a chat template (tokenizer.chat_template)")
    return tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)


def _as_messages(response):
    """A response given as a string becomes one assistant turn; a message list is used as it is."""
    return [{"role": "assistant", "content": response}] if isinstance(response, str) else list(response)


def _as_text(response):
    """A response in plain-text data: the string, or the content of a one-turn assistant message list."""
    if isinstance(response, str):
        return response
    if not response or response[-1].get("role") != "assistant":
        raise ValueError(f"a response given as messages must end with an assistant turn, got {response!r}")
    return response[-1]["content"]


def _ids(tokenizer, texts, templated):
    """Token ids of each text. Plain text gets the tokenizer's special tokens (a BOS, for Llama) minus
    any trailing EOS it adds; a chat template has written its special tokens already."""
    if not texts:
        return []
    ids = tokenizer(list(texts), add_special_tokens=not templated)["input_ids"]
    return ids if templated else [_strip_eos(x, tokenizer.eos_token_id) for x in ids]


def _strip_eos(ids, eos):
    while ids and ids[-1] == eos:
        ids = ids[:-1]
    return ids


def _common_prefix(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _through_last(ids, token, start, what):
    """ids cut after the last `token` at or after `start`: a reply ends with the template's end-of-turn,
    and whatever formatting the template writes after it (a newline) is not part of the reply."""
    for j in range(len(ids) - 1, start - 1, -1):
        if ids[j] == token:
            return ids[: j + 1]
    raise ValueError(f"{what}: the chat template rendered an assistant reply without its end-of-turn token")


def prompt_and_responses(example, kind):
    """(prompt, responses) of one example: prompt a string or messages, responses a list of strings
    or message lists ([completion] for sft, [chosen, rejected] for preference, [] for prompt)."""
    if "messages" in example and "prompt" not in example:
        msgs = list(example["messages"])
        if kind == "sft":
            if not msgs or msgs[-1].get("role") != "assistant":
                raise ValueError(f"an SFT conversation must end with an assistant turn, got {msgs!r}")
            return msgs[:-1], [msgs[-1:]]
        while msgs and msgs[-1].get("role") == "assistant":  # prompts: what the model is to answer
            msgs = msgs[:-1]
        return msgs, []
    cols = {"sft": ["completion"], "preference": ["chosen", "rejected"], "prompt": []}[kind]
    return example["prompt"], [example[c] for c in cols]


def encode_dataset(tokenizer, ds, kind):
    """Prompt ids and response ids of every example, each response tokenized *together with* its
    prompt and split at the boundary, so that the ids are exactly those of the whole text:
    * conversations: prompt + response rendered by the chat template as one conversation; the
      prompt is the template's rendering up to the generation prompt, the response runs to the
      template's end-of-turn (trailing template formatting dropped): all the model generates after
      the generation prompt, a Qwen3 think block included. No EOS is appended.
    * plain text: prompt + response tokenized as one string (append it as is: a leading space, as
      TL;DR's completions have, is the data's job), then one EOS. SentencePiece tokenizers then
      give no spurious "▁" to the response, and merges across the boundary are the model's own.
    The boundary is the longest common prefix of the prompt's own ids and every response's joint
    ids; examples where the prompt's ids are not a prefix are counted (`prompt_not_prefix`), and so are
    plain prompts given a start token (`start_token_added`).
    Returns (prompts, responses, stats): responses[k][i] is the k-th response column of example i."""
    rows = ds.to_list()
    split = [prompt_and_responses(r, kind) for r in rows]
    templated = {is_conversational(r) for r in rows}
    if len(templated) > 1:
        raise ValueError("mix of plain-text and conversational prompts in one dataset")
    templated = templated.pop() if templated else False
    n_resp = len(split[0][1]) if split else 0
    eos = tokenizer.eos_token_id
    starts = []
    if templated:
        eot = end_of_turn_id(tokenizer)
        prompts = _ids(tokenizer, [_render(tokenizer, p, True) for p, _ in split], True)
        joint = [
            _ids(tokenizer, [_render(tokenizer, list(p) + _as_messages(rs[k]), False) for p, rs in split], True)
            for k in range(n_resp)
        ]
    else:  # a prompt with no token (a tokenizer that adds no BOS) gets one, the BOS or else the EOS: something
        # must predict the response's first token (DPO's concatenated and prompt-once passes then agree too)
        raw = _ids(tokenizer, [p for p, _ in split], False)
        starts = [[] if p else [eos if tokenizer.bos_token_id is None else tokenizer.bos_token_id] for p in raw]
        prompts = [s + p for s, p in zip(starts, raw)]
        texts = [[p + _as_text(rs[k]) for p, rs in split] for k in range(n_resp)]
        joint = [[s + x + [eos] for s, x in zip(starts, _ids(tokenizer, t, False))] for t in texts]
    out_prompts, out_responses, not_prefix = [], [[] for _ in range(n_resp)], 0
    for i, p in enumerate(prompts):
        b = min([len(p)] + [_common_prefix(p, joint[k][i]) for k in range(n_resp)])
        not_prefix += b < len(p)
        out_prompts.append(p[:b])
        for k in range(n_resp):
            full = _through_last(joint[k][i], eot, b, f"example {i}") if templated else joint[k][i]
            out_responses[k].append(full[b:])
    return out_prompts, out_responses, {"prompt_not_prefix": not_prefix, "start_token_added": sum(map(bool, starts))}


def encode_prompts(tokenizer, texts, templated):
    """Prompt ids for a list of plain texts (templated=False) or already rendered chat texts."""
    return _ids(tokenizer, texts, templated)


def _keep_end(ids, n, bos):
    """The newest `n` tokens of `ids`, keeping a leading BOS (TRL's keep_end drops the oldest tokens)."""
    if len(ids) <= n:
        return ids
    if bos is not None and ids and ids[0] == bos and n >= 2:
        return ids[:1] + ids[len(ids) - n + 1 :]
    return ids[len(ids) - n :]


def _generation_spans(tokenizer, convs, eot):
    """Per conversation, the [start, end) of each span the chat template marks with {% generation %}
    in its rendering, extended by the end-of-turn token right after it where the markers leave it out."""
    out = tokenizer.apply_chat_template(convs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    spans = []
    for ids, mask in zip(out["input_ids"], out["assistant_masks"]):
        ends = [j + 1 for j in range(len(mask)) if mask[j] and (j + 1 == len(mask) or not mask[j + 1])]
        starts = [j for j in range(len(mask)) if mask[j] and (j == 0 or not mask[j - 1])]
        spans.append([(s, e + (e < len(ids) and ids[e] == eot)) for s, e in zip(starts, ends)])
    return spans


def _sft_conversations(tokenizer, rows):
    """(examples [(input ids, labels)], stats) of conversational SFT rows. The ids are the chat template's
    rendering of the whole conversation; labels cover every assistant turn (of a `messages` row; of the
    completion in a prompt/completion row) as it appears in that rendering, with its end-of-turn:
    * a template with {% generation %} markers: the spans they mark (when one per assistant turn);
    * otherwise: from where the rendering up to the turn's generation prompt stops being a prefix, to
      the first end-of-turn. So a last turn the template renders differently (Qwen3's empty think
      block) is labelled as it is rendered: what the model generates after the generation prompt.
    A turn not found there carries no loss and is counted (`unlocated_turns`): no end-of-turn after it, or a
    start before the end of the conversation's history as rendered without the turn (so a system, user or
    tool token is never labelled). The sequence ends with the last labelled end-of-turn."""
    eot, convs, turns = end_of_turn_id(tokenizer), [], []
    for r in rows:
        if "messages" in r and "prompt" not in r:
            msgs, first = list(r["messages"]), 0
        else:
            msgs, first = list(r["prompt"]) + _as_messages(r["completion"]), len(r["prompt"])
        if not msgs or msgs[-1].get("role") != "assistant":
            raise ValueError(f"an SFT conversation must end with an assistant turn, got {msgs!r}")
        convs.append(msgs)
        turns.append([k for k in range(first, len(msgs)) if msgs[k].get("role") == "assistant"])
    fulls = _ids(tokenizer, [_render(tokenizer, m, False) for m in convs], True)
    history = [
        (m[:k], g) for m, ks in zip(convs, turns) for k in ks for g in (True, False)
    ]  # with, without gen. prompt
    befores = iter(_ids(tokenizer, [_render(tokenizer, h, g) if h else "" for h, g in history], True))
    marked = re.search(r"\{%-?\s*generation\s*-?%\}", tokenizer.get_chat_template())
    marks = _generation_spans(tokenizer, convs, eot) if marked else [[]] * len(convs)
    out, stats = [], {"unlocated_turns": 0, "prompt_not_prefix": 0}
    for msgs, ks, full, spans in zip(convs, turns, fulls, marks):
        assistant = [k for k, m in enumerate(msgs) if m.get("role") == "assistant"]
        spans = dict(zip(assistant, spans)) if len(spans) == len(assistant) else {}
        labels, end, not_prefix = [IGNORE_INDEX] * len(full), 0, False
        for k in ks:
            before, past = next(befores), next(befores)  # the history with and without the generation prompt
            if k in spans:
                s, e = spans[k]
            else:
                s = _common_prefix(before, full)
                not_prefix |= s < len(before)
                e = next((j + 1 for j in range(s, len(full)) if full[j] == eot), None)
            if e is None or s < max(end, len(past)) or _common_prefix(past, full) < len(past):
                stats["unlocated_turns"] += 1
                continue
            labels[s:e], end = full[s:e], e
        stats["prompt_not_prefix"] += not_prefix
        out.append((full[:end], labels[:end]))  # empty if no turn was found: tokenize_sft drops it
    return out, stats


def tokenize_sft(tokenizer, ds, max_length, train_on_prompt=False, truncation_mode="keep_start"):
    """SFT examples -> (list of {"input_ids", "labels"}, stats). labels are the input ids where the
    model is taught (the completion and its end token, every assistant turn of a conversation; with
    `train_on_prompt` every token), -100 elsewhere. An example over `max_length` tokens is cut:
    keep_start drops its end (the completion loses its end token: the model is not taught to stop
    there), keep_end drops its oldest tokens after the BOS (long chat histories). An example left
    with no labelled token is dropped. Both counted."""
    if truncation_mode not in ("keep_start", "keep_end"):
        raise ValueError(f"truncation_mode for SFT is keep_start or keep_end, not {truncation_mode!r}")
    if len(ds) and is_conversational(ds[0]):
        examples, stats = _sft_conversations(tokenizer, ds.to_list())
    else:
        prompts, (completions,), enc = encode_dataset(tokenizer, ds, "sft")
        examples = [(p + c, [IGNORE_INDEX] * len(p) + c) for p, c in zip(prompts, completions)]
        stats = enc
    out, stats, bos = [], {"truncated": 0, "dropped": 0, **stats, "total": len(ds)}, tokenizer.bos_token_id
    for ids, labels in examples:
        if train_on_prompt:
            labels = list(ids)
        cut = len(ids) > max_length
        if cut and truncation_mode == "keep_start":
            ids, labels = ids[:max_length], labels[:max_length]
        elif cut:  # keep_end: the newest tokens, after a leading BOS
            head = int(bos is not None and ids[0] == bos)
            ids, labels = (
                ids[:head] + ids[len(ids) - max_length + head :],
                labels[:head] + labels[len(labels) - max_length + head :],
            )
        if all(x == IGNORE_INDEX for x in labels[1:]):  # the first token is never predicted
            stats["dropped"] += 1
            continue
        stats["truncated"] += cut
        out.append({"input_ids": ids, "labels": labels})
    if not out:
        unlocated = stats.get("unlocated_turns")
        raise ValueError(
            f"no example has a completion token within max_length={max_length} tokens; raise --max-length"
            + (
                f" ({unlocated} assistant turns were not found in the chat template's rendering: check it)"
                if unlocated
                else ""
            )
        )
    return out, stats


def tokenize_preferences(tokenizer, ds, max_length, truncation_mode="drop"):
    """Preference pairs -> (list of {"prompt", "chosen", "rejected"} id lists, stats). Each response
    ends with its end token (see `encode_dataset`). A pair whose prompt + longer response exceeds
    `max_length` is dropped, or with truncation_mode="keep_end" its prompt loses its oldest tokens
    (after the BOS) to fit; a pair whose responses alone do not fit is dropped either way. Pairs
    whose chosen equals rejected (no preference to learn), or whose prompt has no token, are dropped.
    All counted."""
    if truncation_mode not in ("drop", "keep_end"):
        raise ValueError(f"truncation_mode for preference pairs is drop or keep_end, not {truncation_mode!r}")
    out, too_long, ties, cut = [], 0, 0, 0
    prompts, (chosen, rejected), enc = encode_dataset(tokenizer, ds, "preference")
    for p, c, r in zip(prompts, chosen, rejected):
        room = max_length - max(len(c), len(r))  # tokens left for the prompt
        if c == r:
            ties += 1
        elif len(p) > room and (truncation_mode == "drop" or room < 1):
            too_long += 1
        else:
            cut += len(p) > room
            out.append({"prompt": _keep_end(p, room, tokenizer.bos_token_id), "chosen": c, "rejected": r})
    if not out:
        raise ValueError(
            f"no usable pair: {too_long} over max_length={max_length} tokens, {ties} with "
            f"chosen == rejected; raise --max-length, try --truncation-mode keep_end, or check the data"
        )
    return out, {
        "dropped_too_long": too_long,
        "dropped_ties": ties,
        "start_token_added": enc["start_token_added"],
        "truncated_prompt": cut,
        "prompt_not_prefix": enc["prompt_not_prefix"],
        "total": len(ds),
    }


def tokenize_prompts(tokenizer, ds, max_prompt_length, truncation_mode="drop"):
    """Prompt-only data -> (list of prompt id lists, the index in `ds` of each, stats); a conversation is rendered
    up to the template's generation prompt. Prompts over the limit are dropped, or with truncation_mode=
    "keep_end" lose their oldest tokens (after the BOS). Counted."""
    if truncation_mode not in ("drop", "keep_end"):
        raise ValueError(f"truncation_mode for prompts is drop or keep_end, not {truncation_mode!r}")
    prompts, _, _ = encode_dataset(tokenizer, ds, "prompt")
    out, kept, too_long, cut = [], [], 0, 0
    for i, p in enumerate(prompts):
        if len(p) > max_prompt_length and truncation_mode == "drop":
            too_long += 1
            continue
        cut += len(p) > max_prompt_length
        out.append(_keep_end(p, max_prompt_length, tokenizer.bos_token_id))
        kept.append(i)
    if not out:
        raise ValueError(
            f"every prompt is over max_prompt_length={max_prompt_length} tokens; "
            "raise --max-length or try --truncation-mode keep_end"
        )
    return out, kept, {"dropped_too_long": too_long, "truncated_prompt": cut, "total": len(ds)}


def report(what, stats):
    """Print how many examples were cut or dropped, if any: truncation is never silent. Also warn
    when prompts were not a token prefix of prompt + response (the split then sits at their longest
    common prefix: the first response token may carry a piece of the prompt's last word)."""
    lost = {k: v for k, v in stats.items() if k not in ("total", "prompt_not_prefix", "unlocated_turns") and v}
    if lost:
        print(f"{what}: of {stats['total']} examples, " + ", ".join(f"{k} {v}" for k, v in lost.items()))
    if stats.get("unlocated_turns"):
        print(
            f"warning: {what}: {stats['unlocated_turns']} assistant turns were not found in the chat template's "
            "rendering of their conversation and carry no loss; check tokenizer.chat_template"
        )
    if stats.get("prompt_not_prefix"):
        print(
            f"warning: {what}: in {stats['prompt_not_prefix']} of {stats['total']} examples the prompt's tokens are "
            "not a prefix of prompt + response's (a token merges across the boundary); split at the common prefix"
        )


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
                out[i, L - len(s) :] = torch.tensor(s)
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
    return {
        "input_ids": pad(ids, pad_id),
        "attention_mask": attention_mask(ids),
        "labels": pad([e["labels"] for e in examples], IGNORE_INDEX),
    }


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
        batches.append(perm[k * batch_size : (k + 1) * batch_size])
    return batches


def group_by_length(batch, lengths, micro_batch_size, world_size):
    """Reorder one global batch (example indices) so that each micro-batch holds examples of similar
    length, hence less padding: sorted by length, cut into micro-batches, micro-batch j going to rank
    j % world_size, so every rank gets a like mix of short and long ones (rank r then takes its slice
    [r · B / world_size, (r + 1) · B / world_size) as before). The batch's examples, and so its loss, a
    mean over all of them, are unchanged; only the order of summation differs."""
    order = sorted(batch, key=lambda i: lengths[i])
    micro = [order[i : i + micro_batch_size] for i in range(0, len(order), micro_batch_size)]
    return [i for rank in range(world_size) for mb in micro[rank::world_size] for i in mb]
