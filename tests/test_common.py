"""common.py: masks, padding, PAD handling, formats, errors and truncation, checked by hand."""

import copy
import json

import datasets
import pytest
import torch
from conftest import (
    ALL_FAMILIES,
    CONVERSATIONS,
    FAMILIES,
    LAYOUTS,
    make_bpe_tokenizer,
    make_chat_tokenizer,
    make_llama,
    save_chat_model,
)

import common
import toy_task


@pytest.fixture(scope="module")
def toy_tok():
    return common.load_tokenizer("toy")  # one token per word, no BOS


def word_ids(tok, text):
    return [tok.convert_tokens_to_ids(w) for w in text.split()]


def test_sft_mask_covers_completion_and_one_eos(toy_tok):
    ds = datasets.Dataset.from_dict({"prompt": ["the acting was", "a film"], "completion": [" wonderful", ""]})
    examples, stats = common.tokenize_sft(toy_tok, ds, max_length=64)
    eos = toy_tok.eos_token_id
    assert examples[0]["input_ids"] == word_ids(toy_tok, "the acting was wonderful") + [eos]
    assert examples[0]["labels"] == [-100, -100, -100] + word_ids(toy_tok, "wonderful") + [eos]
    assert examples[1]["labels"] == [-100, -100, eos]  # the empty response is just its EOS
    assert stats == {"truncated": 0, "dropped": 0, "start_token_added": 0, "prompt_not_prefix": 0, "total": 2}
    with_prompt, _ = common.tokenize_sft(toy_tok, ds, max_length=64, train_on_prompt=True)
    assert with_prompt[0]["labels"] == with_prompt[0]["input_ids"]
    # a completion that already ends with the EOS text still gets exactly one EOS
    ds2 = datasets.Dataset.from_dict({"prompt": ["a film"], "completion": [" dull <eos>"]})
    assert common.tokenize_sft(toy_tok, ds2, 64)[0][0]["labels"][-2:] == [toy_tok.convert_tokens_to_ids("dull"), eos]


def test_truncation_is_counted(toy_tok):
    ds = datasets.Dataset.from_dict(
        {
            "prompt": ["the plot", "the plot was very dull", "a"],
            "completion": [" was dull and the cast weak", "", " film"],
        }
    )
    examples, stats = common.tokenize_sft(toy_tok, ds, max_length=5)
    # 2 + 6 + 1 = 9 tokens -> completion cut to 3 tokens, no EOS; 5-word prompt leaves no room -> dropped
    assert stats == {"truncated": 1, "dropped": 1, "start_token_added": 0, "prompt_not_prefix": 0, "total": 3}
    assert examples[0]["input_ids"] == word_ids(toy_tok, "the plot was dull and")
    assert examples[0]["labels"] == [-100, -100] + word_ids(toy_tok, "was dull and")
    assert examples[1]["input_ids"] == word_ids(toy_tok, "a film") + [toy_tok.eos_token_id]
    with pytest.raises(ValueError, match="max-length"):
        common.tokenize_sft(toy_tok, ds.select([1]), max_length=5)
    # keep_end: the oldest prompt tokens go instead, the completion and its EOS stay (no BOS in this tokenizer)
    examples, stats = common.tokenize_sft(toy_tok, ds, max_length=5, truncation_mode="keep_end")
    assert stats == {"truncated": 2, "dropped": 0, "start_token_added": 0, "prompt_not_prefix": 0, "total": 3}
    assert examples[0]["input_ids"] == word_ids(toy_tok, "and the cast weak") + [toy_tok.eos_token_id]
    assert examples[1]["input_ids"] == word_ids(toy_tok, "plot was very dull") + [toy_tok.eos_token_id]  # 6 tokens -> 5
    assert examples[1]["labels"] == [-100, -100, -100, -100, toy_tok.eos_token_id]


def test_padding_left_and_right():
    seqs = [[5, 6, 7], [8]]
    assert common.pad(seqs, 0).tolist() == [[5, 6, 7], [8, 0, 0]]
    assert common.attention_mask(seqs).tolist() == [[1, 1, 1], [1, 0, 0]]
    assert common.pad(seqs, 0, "left").tolist() == [[5, 6, 7], [0, 0, 8]]
    assert common.attention_mask(seqs, "left").tolist() == [[1, 1, 1], [0, 0, 1]]
    batch = common.collate_sft([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], 0)
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]  # labels padded with -100, not the pad id
    p = common.collate_prompts(seqs, 0)
    assert p["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]


def test_tokenizer_without_pad_gets_one(tmp_path):
    tok = make_bpe_tokenizer(pad_token=None)
    tok.save_pretrained(tmp_path)
    model = make_llama(len(tok), str(tmp_path))
    loaded = common.load_tokenizer(str(tmp_path))
    assert loaded.pad_token == common.ADDED_PAD_TOKEN and loaded.pad_token_id not in (None, loaded.eos_token_id)
    twin = copy.deepcopy(model)  # a reference model loaded beside the policy, or the same model on another rank
    torch.manual_seed(1)
    common.fit_model(model, loaded)
    torch.manual_seed(2)
    common.fit_model(twin, loaded)
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == len(loaded) == len(tok) + 1
    assert model.config.pad_token_id == loaded.pad_token_id
    # the new row is the mean of the old rows whatever the random state, so both copies agree
    torch.testing.assert_close(emb[-1], emb[:-1].mean(0))
    torch.testing.assert_close(
        model.get_output_embeddings().weight[-1], model.get_output_embeddings().weight[:-1].mean(0)
    )
    assert torch.equal(emb, twin.get_input_embeddings().weight)


def test_pad_equal_to_eos_never_masks_the_real_eos(tmp_path):
    tok = make_bpe_tokenizer(pad_token="</s>")
    assert tok.pad_token_id == tok.eos_token_id
    tok.save_pretrained(tmp_path)
    make_llama(len(tok), str(tmp_path))
    loaded = common.load_tokenizer(str(tmp_path))
    assert loaded.pad_token_id != loaded.eos_token_id
    ds = datasets.Dataset.from_dict(
        {"prompt": ["Name a colour.", "Name"], "completion": [" red", " a deep shade of purple"]}
    )
    examples, _ = common.tokenize_sft(loaded, ds, 64)
    batch = common.collate_sft(examples, loaded.pad_token_id)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        assert batch["labels"][row, n - 1] == loaded.eos_token_id  # the real EOS is a label ...
        assert batch["attention_mask"][row, n - 1] == 1  # ... and attended to
        assert (batch["attention_mask"][row, n:] == 0).all() and (batch["labels"][row, n:] == -100).all()
    # the plain prompt got the BOS that the tokenizer adds; no EOS slipped into it
    assert examples[0]["input_ids"][0] == loaded.bos_token_id
    # a PAD that is the template's end-of-turn (not the EOS) would mask the real end of every reply too
    tok = make_bpe_tokenizer(pad_token="<|im_end|>")
    tok.save_pretrained(tmp_path / "eot_pad")
    make_llama(len(tok), str(tmp_path / "eot_pad"))
    loaded = common.load_tokenizer(str(tmp_path / "eot_pad"))
    assert loaded.pad_token == common.ADDED_PAD_TOKEN and common.end_of_turn_id(loaded) == tok.convert_tokens_to_ids(
        "<|im_end|>"
    )


def labelled_runs(labels):
    """The contiguous runs of labelled ids (one per assistant turn)."""
    runs, cur = [], []
    for x in labels + [-100]:
        if x == -100:
            runs, cur = runs + [cur] if cur else runs, []
        else:
            cur.append(x)
    return runs


@pytest.mark.parametrize("family", list(ALL_FAMILIES))
def test_conversations_are_the_templates_own_ids(family):
    """The ids are apply_chat_template's ids of the whole conversation (up to the last end-of-turn);
    labels cover exactly each assistant reply as rendered there (Qwen3: the last one after its empty
    think block, unless the {% generation %} markers leave the block out) and its end-of-turn, never a
    user turn; no EOS is added."""
    tok = make_chat_tokenizer(family)
    eot_text = ALL_FAMILIES[family]["end_of_turn"]
    think = "" if "{% generation %}" in ALL_FAMILIES[family]["template"] else ALL_FAMILIES[family].get("think", "")
    eot = tok.convert_tokens_to_ids(eot_text)
    assert common.end_of_turn_id(tok) == eot and (eot == tok.eos_token_id) == (family in LAYOUTS)
    convs = CONVERSATIONS[:4]
    examples, stats = common.tokenize_sft(tok, datasets.Dataset.from_list([{"messages": c} for c in convs]), 200)
    assert stats["prompt_not_prefix"] == 0
    for conv, ex in zip(convs, examples):
        whole = tok.apply_chat_template(conv, tokenize=True)["input_ids"]
        ids = ex["input_ids"]
        assert ids == whole[: len(ids)] and ids[-1] == eot
        assert tok.decode(whole[len(ids) :]).strip() == ""  # only the template's trailing newline is left out
        assert tok.eos_token_id not in ids or family in LAYOUTS
        replies = [conv[1]["content"] + eot_text, think + conv[3]["content"] + eot_text]
        assert [tok.decode(run) for run in labelled_runs(ex["labels"])] == replies
    # prompt/completion rows: only the completion's turn is taught, even with an assistant turn in the prompt
    pc = datasets.Dataset.from_list([{"prompt": c[:3], "completion": [c[3]]} for c in convs])
    for conv, ex in zip(convs, common.tokenize_sft(tok, pc, 200)[0]):
        assert ex["input_ids"] == examples[convs.index(conv)]["input_ids"]
        assert [tok.decode(r) for r in labelled_runs(ex["labels"])] == [think + conv[3]["content"] + eot_text]
    # --train-on-prompt keeps its meaning: every token
    assert common.tokenize_sft(tok, pc, 200, train_on_prompt=True)[0][0]["labels"] == examples[0]["input_ids"]


@pytest.mark.parametrize("family", list(ALL_FAMILIES))
def test_pairs_and_prompts_are_rendered_the_same_way(family):
    tok = make_chat_tokenizer(family)
    eot_text, think = ALL_FAMILIES[family]["end_of_turn"], ALL_FAMILIES[family].get("think", "")
    conv = CONVERSATIONS[5]
    rows = [
        {"prompt": conv[:3], "chosen": [conv[3]], "rejected": [{"role": "assistant", "content": "blue"}]},
        {"prompt": conv[:3], "chosen": conv[3]["content"], "rejected": "blue"},
    ]  # responses as strings
    pairs = [common.tokenize_preferences(tok, datasets.Dataset.from_list([row]), 200)[0][0] for row in rows]
    prompt = tok.apply_chat_template(conv[:3], add_generation_prompt=True, tokenize=True)["input_ids"]
    for pair in pairs:
        assert pair["prompt"] == prompt
        for key, msgs in (("chosen", conv[:4]), ("rejected", conv[:3] + rows[0]["rejected"])):
            whole = tok.apply_chat_template(msgs, tokenize=True)["input_ids"]
            assert pair["prompt"] + pair[key] == whole[: len(pair["prompt"]) + len(pair[key])]
        # a response is what the model generates after the generation prompt: Qwen3's think block included
        assert tok.decode(pair["chosen"]) == think + conv[3]["content"] + eot_text
        assert tok.decode(pair["rejected"]) == think + "blue" + eot_text
    # prompt-only data (PPO): the conversation up to the generation prompt, a trailing assistant turn dropped
    for row in ({"messages": conv[:4]}, {"prompt": conv[:3]}):
        assert common.tokenize_prompts(tok, datasets.Dataset.from_list([row]), 200)[0] == [prompt]


@pytest.mark.parametrize("family", list(ALL_FAMILIES))
def test_stop_ids_keep_every_declared_end_token(family, tmp_path):
    tok = common.load_tokenizer(save_chat_model(str(tmp_path), family))  # PAD added where missing
    eos, eot = tok.eos_token_id, common.end_of_turn_id(tok)
    assert common.stop_token_ids(tok) == list(dict.fromkeys([eos, eot]))  # the real layouts' EOS is the end-of-turn
    model = make_llama(len(tok) + 5, eos_token_id=[7, eos])  # a model declaring another stop id too
    common.fit_model(model, tok)
    assert sorted(model.generation_config.eos_token_id) == sorted({7, eos, eot})  # the list was kept, extended
    assert tok.pad_token_id not in model.generation_config.eos_token_id


def test_unlocatable_turns_are_counted_not_raised(capsys):
    """A template whose rendering of a conversation's start depends on its length: a system line for
    more than 2 messages. The rendering up to a turn's generation prompt is then no prefix of the whole
    where one has the line and the other not; that turn is found nowhere, counted, and carries no loss."""
    tok = make_chat_tokenizer("chatml")
    tok.chat_template = (
        "{% if messages|length > 2 %}<|im_start|>system\nlong<|im_end|>\n{% endif %}" + FAMILIES["chatml"]["template"]
    )
    four, two = CONVERSATIONS[0], CONVERSATIONS[1][:2]  # the first turn of `four` (1 message before it) is not found
    three = [{"role": "system", "content": "Be brief."}] + two  # its one turn (2 messages before it) is not found
    examples, stats = common.tokenize_sft(
        tok, datasets.Dataset.from_list([{"messages": c} for c in (four, three, two)]), 200
    )
    assert stats == {"truncated": 0, "dropped": 1, "unlocated_turns": 2, "prompt_not_prefix": 2, "total": 3}
    assert [[tok.decode(r) for r in labelled_runs(ex["labels"])] for ex in examples] == [
        [four[3]["content"] + "<|im_end|>"],
        [two[1]["content"] + "<|im_end|>"],
    ]
    assert (
        examples[0]["input_ids"] == tok.apply_chat_template(four, tokenize=True)["input_ids"][:-1]
    )  # all but the last "\n"
    common.report("train data", stats)
    assert "2 assistant turns were not found" in capsys.readouterr().out
    with pytest.raises(ValueError, match="chat template"):
        common.tokenize_sft(tok, datasets.Dataset.from_list([{"messages": three}]), 200)
    # replies rendered with a ">" only in conversations of more than 3 messages: the rendering up to the second
    # turn diverges at the first reply, whose span (holding the same text) must not be taken for the second's
    tok.chat_template = FAMILIES["chatml"]["template"].replace(
        "{{ m['content'] }}", "{{ '>' if messages|length > 3 and m['role'] == 'assistant' else '' }}{{ m['content'] }}"
    )
    yes = [{"role": "user", "content": "Red?"}, {"role": "assistant", "content": "yes"}] * 2
    [ex], stats = common.tokenize_sft(tok, datasets.Dataset.from_list([{"messages": yes}]), 200)
    assert [tok.decode(r) for r in labelled_runs(ex["labels"])] == [">yes<|im_end|>"] and stats["unlocated_turns"] == 1
    # a system line "long" only in conversations of more than 2 messages, and a first reply "long": the system
    # span holds the reply's text, yet it lies before the end of the turn's history, so it is never labelled
    tok.chat_template = (
        "{% if messages|length > 2 %}<|im_start|>system\nlong<|im_end|>\n{% endif %}" + FAMILIES["chatml"]["template"]
    )
    conv = [
        {"role": "user", "content": "Name one."},
        {"role": "assistant", "content": "long"},
        {"role": "user", "content": "And another?"},
        {"role": "assistant", "content": "short"},
    ]
    [ex], stats = common.tokenize_sft(tok, datasets.Dataset.from_list([{"messages": conv}]), 200)
    assert [tok.decode(r) for r in labelled_runs(ex["labels"])] == ["short<|im_end|>"] and stats["unlocated_turns"] == 1


def test_generation_markers_are_used():
    """Where the template marks assistant spans with {% generation %}, those are the labels (with the
    end-of-turn once, whether the markers hold it or not), even where locating the turn would differ:
    the Qwen3 variant marks the reply without its think block."""
    conv = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "red"}]
    for family, labelled in (
        ("qwen3_generation", "red<|im_end|>"),
        ("chatml_generation", "red<|im_end|>"),
        ("qwen3", "<think>\n\n</think>\n\nred<|im_end|>"),
    ):  # unmarked: the think block too
        tok = make_chat_tokenizer(family)
        [ex], _ = common.tokenize_sft(tok, datasets.Dataset.from_list([{"messages": conv}]), 200)
        assert (
            ex["input_ids"] == tok.apply_chat_template(conv, tokenize=True)["input_ids"][:-1]
        )  # all but the last "\n"
        assert [tok.decode(r) for r in labelled_runs(ex["labels"])] == [labelled]


def test_empty_prompts_get_a_start_token(toy_tok):
    """Without a BOS an empty prompt has no token, so nothing would predict the response's first token: it
    gets the EOS as a start token (counted) everywhere; with a BOS the prompt is that BOS."""
    eos = toy_tok.eos_token_id
    pairs = datasets.Dataset.from_dict(
        {"prompt": ["", "the plot"], "chosen": [" was great"] * 2, "rejected": [" was dull"] * 2}
    )
    out, stats = common.tokenize_preferences(toy_tok, pairs, 64)
    assert [p["prompt"] for p in out] == [[eos], word_ids(toy_tok, "the plot")] and stats["start_token_added"] == 1
    assert out[0]["chosen"] == word_ids(toy_tok, "was great") + [eos]
    sft = datasets.Dataset.from_dict({"prompt": ["", "a"], "completion": [" film"] * 2})
    out, stats = common.tokenize_sft(toy_tok, sft, 64)
    assert [e["input_ids"] for e in out] == [
        [eos, toy_tok.convert_tokens_to_ids("film"), eos],
        word_ids(toy_tok, "a film") + [eos],
    ]
    assert out[0]["labels"] == [-100, toy_tok.convert_tokens_to_ids("film"), eos] and stats["start_token_added"] == 1
    out, _, stats = common.tokenize_prompts(toy_tok, datasets.Dataset.from_dict({"prompt": ["", "a"]}), 64)
    assert out == [[eos], word_ids(toy_tok, "a")] and stats["dropped_too_long"] == 0
    bos_tok = make_bpe_tokenizer()
    [pair], stats = common.tokenize_preferences(
        bos_tok, datasets.Dataset.from_dict({"prompt": [""], "chosen": [" red"], "rejected": [" blue"]}), 64
    )
    assert pair["prompt"] == [0] and stats["start_token_added"] == 0  # the tokenizer's own BOS (id 0)


def test_plain_text_is_tokenized_as_one_string():
    """A SentencePiece-style tokenizer (Llama-2: Metaspace with a dummy prefix) gives a completion
    tokenized alone a spurious leading "▁"; tokenized with its prompt it gets the model's own ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    sp = Tokenizer(models.BPE(unk_token="<unk>"))
    sp.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    sp.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    sp.train_from_iterator(
        ["the plot was dull", "the plot thickens"] * 20,
        trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"]),
    )
    sp.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=sp, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>"
    )
    ds = datasets.Dataset.from_dict({"prompt": ["the plot", "the pl"], "completion": [" was dull", "ot thickens"]})
    examples, stats = common.tokenize_sft(tok, ds, 64)
    for ex, p, c in zip(examples, ds["prompt"], ds["completion"]):
        assert ex["input_ids"] == tok(p + c)["input_ids"] + [tok.eos_token_id]
    alone = tok("ot thickens", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(alone)[0] == "▁"  # what tokenizing the completion alone would have taught
    # "the pl" + "ot" merge into "▁plot": the prompt's own ids are not a prefix, so the split is at the common
    # prefix (<s> ▁the) and the example is counted
    assert tok.convert_ids_to_tokens([x for x in examples[1]["labels"] if x != -100]) == ["▁plot", "▁thickens", "</s>"]
    assert stats["prompt_not_prefix"] == 1 and tok.convert_ids_to_tokens(examples[0]["input_ids"][:3]) == [
        "<s>",
        "▁the",
        "▁plot",
    ]


def test_keep_end_keeps_the_bos_and_drops_the_oldest_prompt_tokens():
    tok = make_chat_tokenizer("llama3")
    conv = CONVERSATIONS[0]
    rows = [{"prompt": conv[:3], "chosen": [conv[3]], "rejected": "blue"}]
    [full], _ = common.tokenize_preferences(tok, datasets.Dataset.from_list(rows), 200)
    n = len(full["prompt"]) + max(len(full["chosen"]), len(full["rejected"]))
    with pytest.raises(ValueError, match="keep_end"):
        common.tokenize_preferences(tok, datasets.Dataset.from_list(rows), n - 3)
    [cut], stats = common.tokenize_preferences(tok, datasets.Dataset.from_list(rows), n - 3, truncation_mode="keep_end")
    assert stats["truncated_prompt"] == 1 and cut["chosen"] == full["chosen"]
    assert cut["prompt"] == full["prompt"][:1] + full["prompt"][4:] and cut["prompt"][0] == tok.bos_token_id
    prompts, _, stats = common.tokenize_prompts(tok, datasets.Dataset.from_list(rows), 10, truncation_mode="keep_end")
    assert prompts == [full["prompt"][:1] + full["prompt"][-9:]] and stats["truncated_prompt"] == 1


def test_missing_column_is_a_clear_error(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"question": "hi", "answer": "hello"}) + "\n")
    with pytest.raises(ValueError) as e:
        common.load_splits(str(path), "sft")
    assert "['question', 'answer']" in str(e.value) and "(prompt, completion) or (messages)" in str(e.value)
    with pytest.raises(ValueError, match=r"\(prompt, chosen, rejected\)"):
        common.load_splits(str(path), "preference")


def test_local_files_and_splits(tmp_path):
    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(40)]
    f = tmp_path / "one.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train, evals = common.load_splits(str(f), "sft")  # 5% held out
    assert len(train) == 38 and len(evals) == 2 and not set(train["prompt"]) & set(evals["prompt"])
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:30]))
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[30:]))
    train, evals = common.load_splits(str(folder), "sft")
    assert len(train) == 30 and evals["prompt"] == [f"p{i}" for i in range(30, 40)]


@pytest.mark.parametrize(
    "name,content", [("a.jsonl", ""), ("a.jsonl", "\n\n"), ("a.json", "[]"), ("a.csv", ""), ("a.parquet", None)]
)
def test_empty_data_file_is_a_clear_error(tmp_path, name, content):
    path = tmp_path / name
    if content is None:  # a parquet file with the columns and no row
        datasets.Dataset.from_dict({"prompt": [], "completion": []}).to_parquet(str(path))
    else:
        path.write_text(content)
    with pytest.raises(ValueError, match=f"--reference-dataset-name {path} holds no rows"):
        common.load_splits(str(path), "sft", flag="--reference-dataset-name")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / ("train" + path.suffix)).write_bytes(path.read_bytes())
    with pytest.raises(ValueError, match="--dataset-name .*folder holds no rows"):
        common.load_splits(str(tmp_path / "folder"), "sft")


def test_model_paths_that_hold_no_model_fail_in_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hint = ": run `python sft.py` first, or pass --model-name"
    for name in ("/nonexistent/model", "runs/models/sft", "./model", "~/model"):  # none can be a Hub id
        with pytest.raises(SystemExit, match=f"^no model at {name}: run"):
            common.load_tokenizer(name, hint)
    for name in ("gpt2", "Qwen/Qwen3-0.6B"):  # Hub ids pass the check
        common.check_model_path(name)
    (tmp_path / "empty").mkdir()
    make_bpe_tokenizer().save_pretrained(tmp_path / "tokenizer_only")
    make_llama(10, str(tmp_path / "model_only"))
    for name in ("empty", "tokenizer_only", "model_only"):
        with pytest.raises(
            SystemExit, match=f"^{name} holds no Hugging Face model and tokenizer.*save_pretrained wrote"
        ):
            common.load_tokenizer(name)
    # the folder save_chat_model writes, as save_pretrained does, loads
    assert common.load_tokenizer(save_chat_model(str(tmp_path / "model"), "chatml")).eos_token == "</s>"


def test_preferences_drop_ties_and_long_pairs(toy_tok):
    ds = datasets.Dataset.from_dict(
        {
            "prompt": ["the plot", "the plot", "a", "a"],
            "chosen": [" was great", " was dull", " film was very very great", " film"],
            "rejected": [" was dull", " was dull", " film", " film was very very great"],
        }
    )
    pairs, stats = common.tokenize_preferences(toy_tok, ds, max_length=5)
    assert stats == {
        "dropped_too_long": 2,  # the chosen response too long, or the rejected one
        "dropped_ties": 1,
        "start_token_added": 0,
        "truncated_prompt": 0,
        "prompt_not_prefix": 0,
        "total": 4,
    }
    assert pairs[0]["chosen"] == word_ids(toy_tok, "was great") + [toy_tok.eos_token_id]


def test_batch_schedule():
    batches = common.batch_schedule(10, 4, 5, seed=0)
    assert [len(b) for b in batches] == [4] * 5
    # two full batches per epoch (the tail of 2 dropped); each epoch's batches never repeat an example
    for epoch in (batches[0:2], batches[2:4]):
        flat = torch.tensor(list(epoch[0]) + list(epoch[1]))
        assert len(set(flat.tolist())) == 8
    assert common.batch_schedule(10, 4, 5, seed=0)[3].tolist() == batches[3].tolist()
    with pytest.raises(ValueError, match="larger than the dataset"):
        common.batch_schedule(3, 4, 1, 0)


def test_group_by_length_keeps_the_batch_and_balances_ranks():
    lengths = [7, 1, 5, 3, 8, 2, 6, 4]  # example i has length lengths[i]
    batch = [0, 1, 2, 3, 4, 5, 6, 7]
    # 2 ranks x 2 micro-batches of 2: sorted by length 1,2 | 3,4 | 5,6 | 7,8; micro-batches 0 and 2 to rank 0
    got = common.group_by_length(batch, lengths, micro_batch_size=2, world_size=2)
    assert [lengths[i] for i in got] == [1, 2, 5, 6, 3, 4, 7, 8]
    assert sorted(got) == batch
    # one rank: just sorted; micro-batches as large as the batch: the same examples
    assert [lengths[i] for i in common.group_by_length(batch, lengths, 4, 1)] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert sorted(common.group_by_length([3, 5, 0], lengths, 3, 1)) == [0, 3, 5]


def test_sampling_is_plain_softmax_whatever_the_generation_config(monkeypatch):
    """common.generate draws each token from exactly softmax(logits / T) with PAD excluded (the distribution PPO
    trains on): the probabilities handed to torch.multinomial are checked against the model's logits, with a
    checkpoint generation_config asking for top-k, min-p, repetition penalties, banned words (transformers 5
    fills every unset field from it), which the model keeps."""
    tok, model = common.load_tokenizer("toy"), toy_task.make_base_model(0).eval()
    model.generation_config.update(
        no_repeat_ngram_size=1,
        min_p=0.2,
        typical_p=0.5,
        bad_words_ids=[[5]],
        min_length=20,
        top_k=5,
        top_p=0.5,
        repetition_penalty=2.0,
        epsilon_cutoff=0.01,
    )
    batch = common.collate_prompts(common.encode_prompts(tok, ["the plot", "a film was", "the cast"], False), 0)
    drawn, multinomial = [], torch.multinomial
    monkeypatch.setattr(torch, "multinomial", lambda probs, *a, **k: drawn.append(probs) or multinomial(probs, *a, **k))
    out = common.generate(model, batch["input_ids"], batch["attention_mask"], tok, 3, temperature=0.7)
    assert model.generation_config.top_k == 5 and len(drawn) == out.shape[1] == 3
    ids = torch.cat([batch["input_ids"], out], 1)
    with torch.no_grad():
        logits = model(
            input_ids=ids, attention_mask=torch.cat([batch["attention_mask"], torch.ones_like(out)], 1)
        ).logits
    for t, probs in enumerate(drawn):  # step t samples the token at column P + t from the logits at P + t − 1
        want = (logits[:, batch["input_ids"].shape[1] - 1 + t] / 0.7).softmax(-1)
        want[:, tok.pad_token_id] = 0
        torch.testing.assert_close(probs, want / want.sum(-1, keepdim=True), atol=1e-5, rtol=1e-4)
