"""The special-token layouts of Qwen2.5-Instruct, Qwen3 and Llama 3.1-Instruct (conftest.LAYOUTS: EOS = the
end-of-turn; Qwen's PAD <|endoftext|> also an end id of its generation_config; Llama 3.1's three stop ids): each
loads, never stops at PAD, stops at every declared end id, is scored at its end-of-turn, and trains through
sft.py, dpo.py and grpo.py on the command line."""

import math

import datasets
import pytest
import torch
from conftest import CONVERSATIONS, LAYOUTS, read_json, result_of, run_script, save_chat_model, toy_reward_model
from transformers import AutoModelForCausalLM

import common
import reward_model


@pytest.fixture(scope="module")
def layout_models(tmp_path_factory):
    return {f: save_chat_model(str(tmp_path_factory.mktemp(f)), f) for f in LAYOUTS}


def force_next(model, token):
    """Every forward pass of `model` makes `token` all but certain next (a hook on its logits)."""

    def hook(module, inputs, out):
        out.logits[..., token] += 1e4
        return out

    return model.register_forward_hook(hook)


@pytest.mark.parametrize("family", list(LAYOUTS))
def test_layout_loads_and_stops_at_every_declared_end_id(family, layout_models):
    path = layout_models[family]
    tok = common.load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    common.fit_model(model, tok)  # the PAD the layout ships is an end id there: load_tokenizer gave a new one
    declared = [tok.convert_tokens_to_ids(t) for t in LAYOUTS[family]["generation_eos"]]
    stops = common.stop_token_ids(tok, model)
    assert set(declared) <= set(stops) and tok.pad_token_id not in stops
    assert tok.pad_token == common.ADDED_PAD_TOKEN  # Qwen's own PAD is an end id, Llama 3.1 has none
    prompt = tok.apply_chat_template(CONVERSATIONS[0][:1], add_generation_prompt=True, tokenize=True)["input_ids"]
    ids, mask = torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.long)
    for stop in declared:  # forced to say a declared end id first, generation ends right there
        hook = force_next(model, stop)
        assert common.generate(model, ids, mask, tok, max_new_tokens=5)[0].tolist() == [stop]
        hook.remove()
    hook = force_next(model, tok.pad_token_id)  # PAD is never sampled, however likely
    out = common.generate(model, ids, mask, tok, max_new_tokens=5)[0].tolist()
    hook.remove()
    assert tok.pad_token_id not in out and len(out) == 5


@pytest.mark.parametrize("family", list(LAYOUTS))
def test_the_reward_is_read_at_the_end_of_turn(family, layout_models):
    path = layout_models[family]
    tok = common.load_tokenizer(path)
    rm = toy_reward_model(path)
    common.fit_model(rm, tok)
    rows = [
        {"prompt": c[:3], "chosen": [c[3]], "rejected": [{"role": "assistant", "content": "blue"}]}
        for c in CONVERSATIONS[:3]
    ]
    pairs, _ = common.tokenize_preferences(tok, datasets.Dataset.from_list(rows), 200)
    eot = tok.convert_tokens_to_ids(LAYOUTS[family]["end_of_turn"])
    seqs = [p["prompt"] + p[k] for p in pairs for k in ("chosen", "rejected")]
    assert all(s[-1] == eot for s in seqs)
    with torch.no_grad():
        got = reward_model.rewards_at_eos(rm, common.pad(seqs, tok.pad_token_id), common.attention_mask(seqs))
        alone = torch.stack([rm(input_ids=torch.tensor([s])).logits[0, 0] for s in seqs])  # no padding at all
    torch.testing.assert_close(got, alone, rtol=1e-4, atol=1e-4 * alone.abs().max().item())


@pytest.mark.parametrize("family", list(LAYOUTS))
def test_conversations_train_through_sft_dpo_and_grpo(family, layout_models, chat_data, tmp_path):
    """SFT teaches the replies and their end-of-turn (the trained model ends a reply with it); DPO starts at ln 2
    and learns the preference; GRPO samples, stops and updates with ratio 1 at its first minibatch."""
    path, eot = layout_models[family], LAYOUTS[family]["end_of_turn"]
    small = ["--batch-size", "8", "--per-device-batch-size", "8", "--max-length", "128"]
    sft_dir = str(tmp_path / "sft")
    out = run_script(
        ["sft.py", "--model-name", path, "--dataset-name", chat_data["sft"], "--num-epochs", "10", "--eval-every"]
        + ["100", "--learning-rate", "3e-3", "--warmup-ratio", "0", "--output-dir", sft_dir, *small]
    )
    assert "not found" not in out  # every assistant turn was located and labelled
    tok = common.load_tokenizer(sft_dir)
    model = AutoModelForCausalLM.from_pretrained(sft_dir).eval()
    reply = [{"role": "user", "content": "Name a colour number 2."}, {"role": "assistant", "content": "blue"}]
    ids = tok.apply_chat_template(reply, tokenize=True)["input_ids"]
    end = len(ids) - 1 - ids[::-1].index(tok.convert_tokens_to_ids(eot))  # the reply's end-of-turn
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids[:end]])).logits[0, -1]
    assert logits.argmax().item() == tok.convert_tokens_to_ids(eot)

    out = run_script(
        ["dpo.py", "--model-name", sft_dir, "--dataset-name", chat_data["preference"], "--num-epochs", "4"]
        + ["--learning-rate", "1e-3", "--beta", "0.5", "--output-dir", str(tmp_path / "dpo"), *small]
    )
    assert "eval/loss 0.6931" in out and result_of(tmp_path / "dpo")["rewards/margins"] > 0

    rm_dir = str(tmp_path / "rm")
    toy_reward_model(sft_dir).save_pretrained(rm_dir)
    tok.save_pretrained(rm_dir)
    run_script(
        ["grpo.py", "--model-name", sft_dir, "--reward-model-name", rm_dir, "--dataset-name", chat_data["prompt"]]
        + ["--group-size", "4", "--num-minibatches", "2", "--num-epochs", "0.6", "--response-length", "8"]
        + ["--learning-rate", "1e-3", "--output-dir", str(tmp_path / "grpo"), *small, "--per-device-batch-size", "4"]
    )
    result = result_of(tmp_path / "grpo")
    assert result["policy/first_minibatch_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert math.isfinite(result["loss/policy"]) and 1 <= result["charts/response_length"] <= 8
    assert read_json(tmp_path / "grpo" / "training_args.json")["args"]["max_length"] == 128
