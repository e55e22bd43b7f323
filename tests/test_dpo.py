"""dpo.py: every loss type by hand, the DPO gradient, sequence log-probabilities against a loop,
and the script through its command line."""

import json
import math
import os
import shutil
import time

import pytest
import torch
from conftest import ROOT, assert_same_weights, read_json, result_of, run_script, script_error, toy_data_file
from safetensors.torch import load_file

import toy_task
from dpo import collate_concatenated, collate_shared_prompts, dpo_loss, pair_logprobs, token_logprobs

# AdamW's first steps as plain gradient descent (a step of 0.3 × the gradient; tests/test_wiring.py): an error
# that only scales the loss changes the weights
SGD_LIKE = ["--adam-eps", "1000", "--learning-rate", "300", "--max-grad-norm", "0"]


def log_sigmoid(x):
    return -math.log1p(math.exp(-x))


def test_initialisation_gives_ln2_and_zero_rewards():
    pc, pr = torch.tensor([-3.0, -10.0, -0.5]), torch.tensor([-4.0, -1.0, -7.0])
    losses, rc, rr = dpo_loss(pc, pr, pc.clone(), pr.clone(), beta=0.1)
    torch.testing.assert_close(losses, torch.full((3,), math.log(2)))
    assert rc.abs().max() == 0 and rr.abs().max() == 0


# policy chosen/rejected -1, -3; reference -2, -2.5; beta 0.5: h = (-1 + 2) - (-3 + 2.5) = 1.5, beta*h = 0.75
ARGS = (torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.5]), 0.5)


@pytest.mark.parametrize(
    "loss_type,eps,want",
    [
        ("sigmoid", 0.0, -log_sigmoid(0.75)),
        ("sigmoid", 0.1, -0.9 * log_sigmoid(0.75) - 0.1 * log_sigmoid(-0.75)),
        ("ipo", 0.0, (1.5 - 1 / (2 * 0.5)) ** 2),
        ("hinge", 0.0, 1 - 0.75),
        ("robust", 0.1, (-0.9 * log_sigmoid(0.75) + 0.1 * log_sigmoid(-0.75)) / 0.8),
    ],
)
def test_losses_by_hand(loss_type, eps, want):
    losses, rc, rr = dpo_loss(*ARGS, loss_type=loss_type, label_smoothing=eps)
    assert losses.item() == pytest.approx(want, rel=1e-6)
    assert rc.item() == pytest.approx(0.5 * (-1 + 2)) and rr.item() == pytest.approx(0.5 * (-3 + 2.5))


def test_hinge_is_zero_past_the_margin():
    losses, _, _ = dpo_loss(
        torch.tensor([0.0]),
        torch.tensor([-10.0]),
        torch.tensor([0.0]),
        torch.tensor([0.0]),
        beta=0.5,
        loss_type="hinge",
    )
    assert losses.item() == 0.0


def test_gradient_weighs_wrongly_ranked_pairs_more():
    """DPO paper §4: d loss / d log π(y_c) = -β σ(r̂_r - r̂_c), d loss / d log π(y_r) = +β σ(r̂_r - r̂_c)."""
    beta = 0.3
    pc = torch.tensor([-2.0, -5.0], requires_grad=True)
    pr = torch.tensor([-4.0, -1.0], requires_grad=True)
    ref_c, ref_r = torch.tensor([-3.0, -3.0]), torch.tensor([-3.0, -3.0])
    losses, _rc, _rr = dpo_loss(pc, pr, ref_c, ref_r, beta)
    losses.sum().backward()
    # implicit rewards: pair 0 r̂_c = 0.3, r̂_r = -0.3 (right); pair 1 r̂_c = -0.6, r̂_r = 0.6 (wrong)
    w = torch.sigmoid(torch.tensor([-0.3 - 0.3, 0.6 + 0.6]))
    torch.testing.assert_close(pc.grad, -beta * w)
    torch.testing.assert_close(pr.grad, beta * w)
    assert pc.grad[1].abs() > pc.grad[0].abs()


def tiny_gqa_llama():
    """A random 2-layer Llama with grouped-query attention (4 heads, 2 key/value heads), float32, its weights drawn
    10× wider than the default (as in test_families.py): at 0.02 a wrong position moves these log-probabilities by
    only ~1e-3, at 0.2 by ~1."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=50,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            initializer_range=0.2,
        )
    ).eval()


# prompts of 1–6 tokens (left padding in the prompt-once batch) and responses of 1–5 (right padding)
PAIRS = [
    {"prompt": [5, 6, 7, 8, 9, 10], "chosen": [11, 1], "rejected": [12, 13, 14, 15, 1]},
    {"prompt": [4], "chosen": [1], "rejected": [2, 2, 1]},
    {"prompt": [20, 21, 22], "chosen": [23, 24, 25, 1], "rejected": [26, 1]},
]


def one_by_one(model, pairs):
    """The simplest formulation: each sequence alone (no padding at all), the full softmax at every
    position, summed over the response tokens. Returns (chosen (B,), rejected (B,))."""
    out = []
    for key in ("chosen", "rejected"):
        rows = []
        for p in pairs:
            ids = torch.tensor([p["prompt"] + p[key]])
            logp = model(input_ids=ids).logits[0].float().log_softmax(-1)  # (L, V)
            n = len(p["prompt"])
            rows.append(sum(logp[n + j - 1, tok] for j, tok in enumerate(p[key])))
        out.append(torch.stack(rows))
    return out


@pytest.mark.parametrize("average", [False, True])
def test_response_only_and_prompt_once_logps_equal_the_full_softmax(average):
    """pair_logprobs (LM head only at response tokens, chunked log-sum-exp), concatenated and prompt-once
    (KV cache), equal the one-by-one full-softmax log-probabilities, values and gradients, up to float32 rounding
    (docs/tests.md, "How tolerances are chosen": 48 · eps of the largest value, 1000 · eps of the largest gradient
    element, as in test_families.py; a response position off by one moves them by thousands of times that)."""
    model = tiny_gqa_llama()
    want_c, want_r = one_by_one(model, PAIRS)
    lengths = torch.tensor([[len(p[k]) for p in PAIRS] for k in ("chosen", "rejected")]).float()
    if average:
        want_c, want_r = want_c / lengths[0], want_r / lengths[1]
    (want_c - 2 * want_r).sum().backward()
    want_grads = [p.grad.clone() for p in model.parameters()]
    eps = torch.finfo(torch.float32).eps
    value_tol = [48 * eps * w.abs().max().item() for w in (want_c, want_r)]
    grad_tol = 1000 * eps * max(g.abs().max().item() for g in want_grads)
    for batch in (collate_concatenated(PAIRS, pad_id=0), collate_shared_prompts(PAIRS, pad_id=0)):
        model.zero_grad()
        chosen, rejected, n_chosen = pair_logprobs(model, batch, average=average)
        torch.testing.assert_close(chosen, want_c.detach(), atol=value_tol[0], rtol=0)
        torch.testing.assert_close(rejected, want_r.detach(), atol=value_tol[1], rtol=0)
        assert n_chosen.tolist() == [2, 1, 4]
        (chosen - 2 * rejected).sum().backward()  # gradients flow through the shared prompt's cache
        for p, g in zip(model.parameters(), want_grads):
            torch.testing.assert_close(p.grad, g, atol=grad_tol, rtol=0)


def test_token_logprobs_in_chunks():
    """Chunked (3 rows at a time, recomputed in backward) log-sum-exp equals log_softmax + gather, with
    gradients; bfloat16 logits are reduced in float32."""
    torch.manual_seed(0)
    logits = torch.randn(10, 7, requires_grad=True)
    targets = torch.randint(0, 7, (10,))
    want = logits.log_softmax(-1)[torch.arange(10), targets]
    got = token_logprobs(logits, targets, chunk_size=3)
    torch.testing.assert_close(got, want.detach())
    w = torch.randn(10)
    (g_want,) = torch.autograd.grad((want * w).sum(), logits)
    (g_got,) = torch.autograd.grad((token_logprobs(logits, targets, chunk_size=3) * w).sum(), logits)
    torch.testing.assert_close(g_got, g_want)
    half = token_logprobs(logits.detach().bfloat16(), targets, chunk_size=4)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, logits.detach().bfloat16().float().log_softmax(-1)[torch.arange(10), targets])


def test_smoke_toy(tmp_path):
    base = str(tmp_path / "base")
    toy_task.save_base_model(base)
    out = run_script(
        [
            "dpo.py",
            "--model-name",
            base,
            "--num-epochs",
            "0.02",
            "--eval-every",
            "5",
            "--output-dir",
            str(tmp_path / "dpo"),
        ]
    )
    assert "eval/loss 0.6931" in out  # ln 2 at initialisation
    assert "each prompt run once for both responses" in out  # the prompt-once path, not a silent fallback
    result = read_json(tmp_path / "dpo" / "training_args.json")["result"]
    for k in ["loss", "rewards/accuracies", "rewards/margins", "nll/chosen"]:
        assert math.isfinite(result[k])


def test_hub_format_fixture_variants(tmp_path, hub_model):
    prefs = tmp_path / "prefs"
    prefs.mkdir()
    rows = [
        {"prompt": f"Name a colour {i}.", "chosen": " red", "rejected": " a deep shade of purple"} for i in range(28)
    ]
    (prefs / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[4:]))
    (prefs / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    run_script(
        [
            "dpo.py",
            "--model-name",
            hub_model,
            "--dataset-name",
            str(prefs),
            "--batch-size",
            "8",
            "--per-device-batch-size",
            "4",
            "--num-epochs",
            "3",
            "--learning-rate",
            "1e-3",
            "--loss-type",
            "ipo",
            "--beta",
            "0.5",
            "--rpo-alpha",
            "0.5",
            "--precompute-ref-logprobs",
            "--max-length",
            "64",
            "--output-dir",
            str(tmp_path / "dpo"),
        ]
    )
    result = read_json(tmp_path / "dpo" / "training_args.json")["result"]
    assert result["rewards/accuracies"] == 1.0 and result["rewards/margins"] > 0


def test_ddp_fsdp_and_accumulation_match_single_process(tmp_path, chat_models, chat_data):
    """2 processes × 2 micro-batches of 2 pairs take the same steps as 1 process with batches of 8 (the
    loss is a mean over the pairs of the global batch however it is split), with DDP and with FSDP
    (policy and reference sharded), by gradient descent (SGD_LIKE), so that a loss averaged per micro-batch or
    per rank, which only scales the step, shows. ChatML conversations, and a tokenizer that gets a PAD added: the
    embeddings grow by a row, which must come out the same on every rank (FSDP broadcasts nothing)."""
    base = chat_models["chatml"]
    flags = [
        "dpo.py",
        "--model-name",
        base,
        "--dataset-name",
        chat_data["preference"],
        "--batch-size",
        "8",
        "--eval-every",
        "100",
        "--max-length",
        "64",
        "--beta",
        "1",
        "--rpo-alpha",
        "0.5",
        *SGD_LIKE,
    ]
    outs = [
        run_script(flags + ["--per-device-batch-size", "8", "--output-dir", str(tmp_path / "one")]),
        run_script(flags + ["--per-device-batch-size", "2", "--output-dir", str(tmp_path / "two")], torchrun=2),
        run_script(
            flags + ["--fsdp", "--output-dir", str(tmp_path / "fsdp")],
            torchrun=2,  # default: 4 pairs per rank
        ),
    ]
    assert all("each prompt run once for both responses" in out for out in outs)
    for run in ("two", "fsdp"):
        assert_same_weights(str(tmp_path / "one"), str(tmp_path / run), base)
        r1, r2 = result_of(tmp_path / "one"), result_of(tmp_path / run)
        assert abs(r1["loss"] - r2["loss"]) < 2e-3 and r1["loss"] == pytest.approx(r2["loss"], rel=1e-4)
    # the added PAD's input embedding gets no gradient (padding is masked), so it is still its initial value,
    # which must be the same on every rank of every run (FSDP keeps the last rank's, DDP broadcasts rank 0's)
    pad_rows = [
        load_file(str(tmp_path / run / "model.safetensors"))["model.embed_tokens.weight"][-1]
        for run in ("one", "two", "fsdp")
    ]
    assert torch.equal(pad_rows[0], pad_rows[1]) and torch.equal(pad_rows[0], pad_rows[2])


def test_chatml_conversations(tmp_path, chat_models, chat_data):
    """Conversational pairs with a ChatML template whose EOS is not <|im_end|>: the loss starts at ln 2
    and the policy learns the preference."""
    out = run_script(
        [
            "dpo.py",
            "--model-name",
            chat_models["chatml"],
            "--dataset-name",
            chat_data["preference"],
            "--batch-size",
            "8",
            "--per-device-batch-size",
            "8",
            "--num-epochs",
            "4",
            "--learning-rate",
            "1e-3",
            "--beta",
            "0.5",
            "--max-length",
            "64",
            "--output-dir",
            str(tmp_path / "dpo"),
        ]
    )
    assert "eval/loss 0.6931" in out
    assert read_json(tmp_path / "dpo" / "training_args.json")["result"]["rewards/margins"] > 0


def tensorboard_scalars(exp_name):
    """{tag: [values]} of the one TensorBoard run logged under runs/{exp_name}__*."""
    import glob

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (folder,) = glob.glob(os.path.join(ROOT, "runs", f"{exp_name}__*"))
    acc = EventAccumulator(folder)
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_rpo_logged_apart_and_no_initialisation_claim_on_resume(tmp_path):
    """With learning rate 0 the policy stays the reference, so the preference loss is ln 2 at every step:
    train/loss must be exactly that, and the implicit rewards β(log π − log π_ref) of both responses 0 (log π of
    each response against its own reference, not of the other response), RPO's NLL logged apart
    (train/nll/chosen); the reference model runs in eval mode. A resumed run does not claim to be at
    initialisation."""
    base = toy_task.save_base_model(str(tmp_path / "base"))
    data = toy_data_file(tmp_path / "pairs.jsonl", "preference", 48)
    exp = f"test_rpo_{os.getpid()}_{int(time.time())}"
    flags = [
        "dpo.py",
        "--model-name",
        base,
        "--dataset-name",
        data,
        "--batch-size",
        "8",
        "--learning-rate",
        "0",
        "--rpo-alpha",
        "1.0",
        "--checkpoint-every",
        "2",
        "--max-length",
        "64",
        "--exp-name",
        exp,
    ]
    run_script(flags + ["--output-dir", str(tmp_path / "dpo")])
    logged = tensorboard_scalars(exp)
    assert logged["train/loss"] == pytest.approx([math.log(2)] * len(logged["train/loss"]), abs=1e-6)
    assert min(logged["train/nll/chosen"]) > 1.0  # a random model's NLL per token: far from 0
    # float32 rounding of a sequence's log-probability: 48 eps of its magnitude (docs/tests.md, "How tolerances are
    # chosen"); the rewards of the wrong differences (chosen against rejected) are 0.1 or more
    logprobs = logged["train/logprobs/chosen"] + logged["train/logprobs/rejected"]
    tol = 48 * torch.finfo(torch.float32).eps * max(abs(x) for x in logprobs)
    for name in ("train/rewards/chosen", "train/rewards/rejected", "train/rewards/margins"):
        assert logged[name] == pytest.approx([0.0] * len(logged[name]), abs=tol), name
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "dpo" / "resume" / "step_0000002", resumed / "resume" / "step_0000002")
    out = run_script(flags + ["--resume", "--exp-name", exp + "_resumed", "--output-dir", str(resumed)])
    assert "resumed from" in out and "at initialisation" not in out


def test_reference_model_stays_in_eval_mode():
    """all_pair_logps runs the model in eval mode and gives it back in the mode it had: a frozen reference
    (dropout, MoE router jitter) must never be put in train mode."""
    from types import SimpleNamespace

    from dpo import all_pair_logprobs

    model = tiny_gqa_llama()
    args = SimpleNamespace(world_size=1, per_device_batch_size=2, share_prompt=True, bf16=False, loss_type="sigmoid")
    for mode in (False, True):
        model.train(mode)
        all_pair_logprobs(model, PAIRS, 0, args, torch.device("cpu"), 0)
        assert model.training is mode


def test_label_smoothing_only_where_it_applies():
    message = script_error(["dpo.py", "--loss-type", "ipo", "--label-smoothing", "0.1"])
    assert "--label-smoothing is a flip probability in [0, 0.5) for --loss-type sigmoid" in message
