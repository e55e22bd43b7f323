"""common.py: masks, padding, PAD handling, formats, errors and truncation, checked by hand."""

import json

import datasets
import pytest
import torch

import common
import toy_task
from conftest import make_bpe_tokenizer, make_llama


@pytest.fixture(scope="module")
def toy_tok(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("toy_base"))
    toy_task.save_base_model(path)
    return common.load_tokenizer(path)


def word_ids(tok, text):
    return [tok.convert_tokens_to_ids(w) for w in text.split()]


def test_sft_mask_covers_completion_and_one_eos(toy_tok):
    ds = datasets.Dataset.from_dict({"prompt": ["the acting was", "a film"], "completion": ["wonderful", ""]})
    examples, stats = common.tokenize_sft(toy_tok, ds, max_length=64)
    eos = toy_tok.eos_token_id
    assert examples[0]["input_ids"] == word_ids(toy_tok, "the acting was wonderful") + [eos]
    assert examples[0]["labels"] == [-100, -100, -100] + word_ids(toy_tok, "wonderful") + [eos]
    assert examples[1]["labels"] == [-100, -100, eos]  # the empty response is just its EOS
    assert stats == {"truncated": 0, "dropped": 0, "total": 2}
    with_prompt, _ = common.tokenize_sft(toy_tok, ds, max_length=64, train_on_prompt=True)
    assert with_prompt[0]["labels"] == with_prompt[0]["input_ids"]
    # a completion that already ends with the EOS text still gets exactly one EOS
    ds2 = datasets.Dataset.from_dict({"prompt": ["a film"], "completion": ["dull <eos>"]})
    assert common.tokenize_sft(toy_tok, ds2, 64)[0][0]["labels"][-2:] == [toy_tok.convert_tokens_to_ids("dull"), eos]


def test_truncation_is_counted(toy_tok):
    ds = datasets.Dataset.from_dict({"prompt": ["the plot", "the plot was very dull", "a"],
                                     "completion": ["was dull and the cast weak", "", "film"]})
    examples, stats = common.tokenize_sft(toy_tok, ds, max_length=5)
    # 2 + 6 + 1 = 9 tokens -> completion cut to 3 tokens, no EOS; 5-word prompt leaves no room -> dropped
    assert stats == {"truncated": 1, "dropped": 1, "total": 3}
    assert examples[0]["input_ids"] == word_ids(toy_tok, "the plot was dull and")
    assert examples[0]["labels"] == [-100, -100] + word_ids(toy_tok, "was dull and")
    assert examples[1]["input_ids"] == word_ids(toy_tok, "a film") + [toy_tok.eos_token_id]
    with pytest.raises(ValueError, match="max-length"):
        common.tokenize_sft(toy_tok, ds.select([1]), max_length=5)


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
    loaded = common.load_tokenizer(str(tmp_path))
    assert loaded.pad_token == common.ADDED_PAD_TOKEN and loaded.pad_token_id not in (None, loaded.eos_token_id)
    model = make_llama(len(tok))
    common.resize_embeddings(model, loaded)
    assert model.get_input_embeddings().weight.shape[0] == len(loaded) == len(tok) + 1
    assert model.config.pad_token_id == loaded.pad_token_id


def test_pad_equal_to_eos_never_masks_the_real_eos(tmp_path):
    tok = make_bpe_tokenizer(pad_token="</s>")
    assert tok.pad_token_id == tok.eos_token_id
    tok.save_pretrained(tmp_path)
    loaded = common.load_tokenizer(str(tmp_path))
    assert loaded.pad_token_id != loaded.eos_token_id
    ds = datasets.Dataset.from_dict({"prompt": ["Name a colour.", "Name"], "completion": [" red", " a deep shade of purple"]})
    examples, _ = common.tokenize_sft(loaded, ds, 64)
    batch = common.collate_sft(examples, loaded.pad_token_id)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        assert batch["labels"][row, n - 1] == loaded.eos_token_id  # the real EOS is a label ...
        assert batch["attention_mask"][row, n - 1] == 1  # ... and attended to
        assert (batch["attention_mask"][row, n:] == 0).all() and (batch["labels"][row, n:] == -100).all()
    # the plain prompt got the BOS that the tokenizer adds; no EOS slipped into it
    assert examples[0]["input_ids"][0] == loaded.bos_token_id


def test_chat_format(tmp_path):
    tok = make_bpe_tokenizer()
    msgs = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "red"}]
    ds = datasets.Dataset.from_list([{"messages": msgs}])
    [ex], _ = common.tokenize_sft(tok, ds, 64)
    prompt_text = "<|user|>\nName a colour.</s>\n<|assistant|>\n"
    want_prompt = tok(prompt_text, add_special_tokens=False)["input_ids"]  # the template wrote the specials
    want_completion = tok("red", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ex["input_ids"] == want_prompt + want_completion
    assert ex["labels"] == [-100] * len(want_prompt) + want_completion
    # preference data with message lists
    pref = datasets.Dataset.from_list([{"prompt": msgs[:1], "chosen": [msgs[1]],
                                        "rejected": [{"role": "assistant", "content": "blue"}]}])
    [pair], _ = common.tokenize_preferences(tok, pref, 64)
    assert pair["prompt"] == want_prompt and pair["chosen"] == want_completion
    bad = datasets.Dataset.from_list([{"messages": msgs[:1]}])
    with pytest.raises(ValueError, match="assistant"):
        common.tokenize_sft(tok, bad, 64)


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
    train, evals = common.load_splits(str(f), "sft", eval_fraction=0.1)
    assert len(train) == 36 and len(evals) == 4 and not set(train["prompt"]) & set(evals["prompt"])
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:30]))
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[30:]))
    train, evals = common.load_splits(str(folder), "sft")
    assert len(train) == 30 and evals["prompt"] == [f"p{i}" for i in range(30, 40)]


def test_preferences_drop_ties_and_long_pairs(toy_tok):
    ds = datasets.Dataset.from_dict({"prompt": ["the plot", "the plot", "a"],
                                     "chosen": ["was great", "was dull", "film was very very great"],
                                     "rejected": ["was dull", "was dull", "film"]})
    pairs, stats = common.tokenize_preferences(toy_tok, ds, max_length=5)
    assert stats == {"dropped_too_long": 1, "dropped_ties": 1, "total": 3}
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
