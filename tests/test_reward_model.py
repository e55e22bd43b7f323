"""reward_model.py: the loss by hand, the reward read at EOS, the stored normalisation, bad input,
and the script through its command line."""

import json
import math
import os

import datasets
import pytest
import torch
from conftest import (
    assert_same_weights,
    calls_of,
    read_json,
    result_of,
    run_script,
    script_error,
    toy_data_file,
    toy_reward_model,
    write_jsonl,
)

import common
import toy_task
from reward_model import collate_pairs, reward_loss, rewards_at_eos


def log_sigmoid(x):
    return -math.log1p(math.exp(-x))


SMALL_RUN = ["--batch-size", "8", "--per-device-batch-size", "4", "--num-epochs", "2", "--learning-rate", "1e-3"]
SMALL_RUN += ["--max-length", "64"]  # the flags of the two small runs below


def test_reward_loss_by_hand():
    t = torch.tensor
    assert reward_loss(t([0.3, -2.0]), t([0.3, -2.0])).item() == pytest.approx(math.log(2))
    assert reward_loss(t([50.0]), t([0.0])).item() == pytest.approx(0.0, abs=1e-12)
    big = reward_loss(t([-1000.0]), t([0.0])).item()  # logsigmoid keeps it finite: -log σ(-1000) = 1000
    assert math.isfinite(big) and big == pytest.approx(1000.0)
    # mean over pairs: gaps 1 and -1
    want = -(log_sigmoid(1.0) + log_sigmoid(-1.0)) / 2
    assert reward_loss(t([1.0, 0.0]), t([0.0, 1.0])).item() == pytest.approx(want)
    # a margin of 1 turns a gap of 1 into a coin flip
    assert reward_loss(t([1.0]), t([0.0]), margin=t([1.0])).item() == pytest.approx(math.log(2))
    # centring: -log σ(0.5) + 0.01 * mean((1 + 0.5)^2, (-1 + 0)^2)
    got = reward_loss(t([1.0, -1.0]), t([0.5, 0.0]), center_rewards_coefficient=0.01).item()
    want = -(log_sigmoid(0.5) + log_sigmoid(-1.0)) / 2 + 0.01 * (1.5**2 + 1.0) / 2
    assert got == pytest.approx(want)


@pytest.fixture(scope="module")
def toy_rm(toy_base):
    tok = common.load_tokenizer(toy_base)
    model = toy_reward_model(toy_base)
    common.fit_model(model, tok)
    return model, tok


def test_reward_is_read_at_eos_whatever_the_padding(toy_rm):
    """rewards_at_eos of a right-padded batch equals, per row, the head applied by hand to the backbone's
    hidden state at the sequence's last token (its EOS), the sequence run alone, minus config.reward_bias;
    reading the padded rows at their last slot instead would give other numbers."""
    model, tok = toy_rm
    pairs, _ = common.tokenize_preferences(
        tok,
        datasets.Dataset.from_dict(
            {
                "prompt": ["the plot", "a film was very", "the cast"],
                "chosen": [" was dull", "", " and the acting felt wonderful but the music bland"],
                "rejected": [" was great", " dull", " felt"],
            }
        ),
        max_length=64,
    )
    batch = collate_pairs(pairs, tok.pad_token_id)  # (6, L): ragged, right-padded
    seqs = [p["prompt"] + p["chosen"] for p in pairs] + [p["prompt"] + p["rejected"] for p in pairs]
    assert all(s[-1] == tok.eos_token_id for s in seqs)  # the last real token is the EOS (even for "")
    model.config.reward_bias = 0.25
    with torch.no_grad():
        batched = rewards_at_eos(model, **batch)
        by_hand = [
            model.score(model.model(input_ids=torch.tensor([s])).last_hidden_state[0, -1]).item() - 0.25 for s in seqs
        ]
        hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        last_slot = model.score(hidden[:, -1]).squeeze(-1) - 0.25
    model.config.reward_bias = 0.0
    # float32 rounding: 1000 · eps of the largest reward (the sums of the toy Llama's 4 layers of 128 and 384 units;
    # seen: 5 · eps; docs/tests.md, "How tolerances are chosen"); the last slot is 300 times that away or more
    by_hand = torch.tensor(by_hand)
    tol = 1000 * torch.finfo(torch.float32).eps * by_hand.abs().max().item()
    torch.testing.assert_close(batched, by_hand, atol=tol, rtol=0)
    padded = batch["attention_mask"].sum(1) < batch["input_ids"].shape[1]
    assert padded.any() and ((last_slot - batched).abs()[padded] > 100 * tol).all()


def test_missing_sft_checkpoint_is_a_clear_error():
    message = script_error(["reward_model.py", "--model-name", os.path.join("runs", "models", "nope")])
    assert "run `python sft.py` first" in message


def test_smoke_toy_and_normalisation(tmp_path):
    base = str(tmp_path / "base")
    toy_task.save_base_model(base)
    out_dir = tmp_path / "rm"
    run_script(
        [
            "reward_model.py",
            "--model-name",
            base,
            "--num-epochs",
            "0.02",
            "--eval-every",
            "5",
            "--num-reference-examples",
            "300",
            "--output-dir",
            str(out_dir),
        ]
    )
    result = read_json(out_dir / "training_args.json")["result"]
    for k in ["accuracy", "bayes_accuracy", "gold_pearson", "reward_bias"]:
        assert math.isfinite(result[k])
    # reload the saved folder as anyone would and score *held-out* P_ref responses (other prompts, other
    # samples than the 300 training-split references the bias came from): they score 0 on average
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(str(out_dir)).eval()
    tok = AutoTokenizer.from_pretrained(str(out_dir))
    assert model.config.reward_bias == pytest.approx(result["reward_bias"])
    held_out = toy_task.make_dataset("sft", "eval", seed=7)
    examples, _ = common.tokenize_sft(tok, held_out, 64)
    with torch.no_grad():
        r = torch.cat(
            [
                rewards_at_eos(model, common.pad(b, tok.pad_token_id), common.attention_mask(b))
                for b in ([e["input_ids"] for e in examples[i : i + 250]] for i in range(0, len(examples), 250))
            ]
        )
    se = r.std().item() / math.sqrt(len(r))
    assert abs(r.mean().item()) < 4 * se
    assert abs(r.mean().item() + result["reward_bias"]) > 10 * se  # without the bias the test would fail


def test_ddp_fsdp_and_accumulation_match_single_process(tmp_path):
    """2 processes × 2 micro-batches of 2 pairs take the same steps as 1 process with batches of 8, with
    DDP and with FSDP; the normalising bias is the same."""
    base = toy_task.save_base_model(str(tmp_path / "base"))
    data = toy_data_file(tmp_path / "pairs.jsonl", "preference", 52)
    flags = [
        "reward_model.py",
        "--model-name",
        base,
        "--dataset-name",
        data,
        "--batch-size",
        "8",
        "--eval-every",
        "100",
        "--max-length",
        "64",
    ]
    run_script(flags + ["--per-device-batch-size", "8", "--output-dir", str(tmp_path / "one")])
    run_script(flags + ["--per-device-batch-size", "2", "--output-dir", str(tmp_path / "two")], torchrun=2)
    run_script(flags + ["--fsdp", "--output-dir", str(tmp_path / "fsdp")], torchrun=2)  # default: 4 per rank
    for run in ("two", "fsdp"):
        assert_same_weights(str(tmp_path / "one"), str(tmp_path / run), base)
        r1, r2 = result_of(tmp_path / "one"), result_of(tmp_path / run)
        assert r1["reward_bias"] == pytest.approx(r2["reward_bias"], rel=1e-4, abs=1e-6)
    assert read_json(tmp_path / "fsdp" / "config.json")["architectures"] == ["LlamaForSequenceClassification"]


def test_the_centring_coefficient_reaches_the_training_loss(tmp_path, toy_base):
    """--center-rewards-coefficient weighs the centring term of the loss the script trains on: every reward_loss call
    whose rewards carry a gradient gets it (the logged statistics' calls, without a gradient, plain Bradley–Terry)."""
    data = toy_data_file(tmp_path / "pairs.jsonl", "preference", 20)
    calls, _ = calls_of(
        "reward_loss",
        f"reward_model.py --model-name {toy_base} --dataset-name {data} --batch-size 8 --per-device-batch-size 4 "
        f"--num-epochs 0.5 --max-length 64 --center-rewards-coefficient 0.25 --output-dir {tmp_path / 'rm'}".split(),
    )
    trained = [c for c in calls if c["chosen_rewards"].requires_grad]
    assert len(trained) == 2 and all(c["center_rewards_coefficient"] == 0.25 for c in trained)
    assert all(c["center_rewards_coefficient"] == 0.0 for c in calls if not c["chosen_rewards"].requires_grad)


def test_llama3_style_conversations(tmp_path, chat_models, chat_data):
    """Conversational pairs with a Llama-3-style template; off the toy task the rewards are normalised on the
    training pairs' chosen responses, and the script says so. With --reference-dataset-name, a reference
    conversation over --max-length is skipped, also where the cut falls right after a user turn's <|eot_id|>
    (which ends a turn like the assistant's, so a cut there looks finished)."""
    model = chat_models["llama3"]
    out = run_script(
        [
            "reward_model.py",
            "--model-name",
            model,
            "--dataset-name",
            chat_data["preference"],
            *SMALL_RUN,
            "--output-dir",
            str(tmp_path / "rm"),
        ]
    )
    assert "reward normalisation: the mean reward of the chosen responses of" in out
    assert math.isfinite(read_json(tmp_path / "rm" / "training_args.json")["result"]["reward_bias"])

    tok = common.load_tokenizer(model)
    long = [
        {"role": "user", "content": "Name a colour number one. " * 8},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "And another one?"},
        {"role": "assistant", "content": "green " * 30},
    ]
    short = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "blue"}]
    ids = tok(tok.apply_chat_template(long, tokenize=False), add_special_tokens=False)["input_ids"]
    eots = [i for i, x in enumerate(ids) if x == tok.convert_tokens_to_ids("<|eot_id|>")]
    max_length = eots[2] + 1  # --max-length would cut the long conversation right after its second user turn
    (tmp_path / "refs").mkdir()
    write_jsonl(tmp_path / "refs" / "train.jsonl", [{"messages": long}] * 3 + [{"messages": short}] * 5)
    write_jsonl(tmp_path / "refs" / "test.jsonl", [{"messages": short}])
    out = run_script(
        [
            "reward_model.py",
            "--model-name",
            model,
            "--dataset-name",
            chat_data["preference"],
            "--reference-dataset-name",
            str(tmp_path / "refs"),
            "--batch-size",
            "8",
            "--per-device-batch-size",
            "8",
            "--num-epochs",
            "1",
            "--max-length",
            str(max_length),
            "--output-dir",
            str(tmp_path / "rm_refs"),
        ]
    )
    assert "train pairs:" not in out  # every training pair fits: only the references are cut
    assert "mean reward of 5 responses of" in out


def test_hub_format_fixture(tmp_path, hub_model, chat_jsonl):
    prefs = tmp_path / "prefs"  # a folder with train.jsonl and test.jsonl, as on the Hub
    prefs.mkdir()
    rows = [
        {"prompt": f"Name a colour {i}.", "chosen": " red", "rejected": " a deep shade of purple"} for i in range(28)
    ]
    rows.append({"prompt": "tie", "chosen": " red", "rejected": " red"})  # dropped and counted
    (prefs / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[4:]))
    (prefs / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    out = run_script(
        [
            "reward_model.py",
            "--model-name",
            hub_model,
            "--dataset-name",
            str(prefs),
            "--reference-dataset-name",
            chat_jsonl,
            *SMALL_RUN,
            "--output-dir",
            str(tmp_path / "rm"),
        ]
    )
    assert "dropped_ties 1" in out
    result = read_json(tmp_path / "rm" / "training_args.json")["result"]
    assert result["accuracy"] == 1.0  # one trivially learnable preference
