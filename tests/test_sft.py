"""sft.py: the loss against hand computation; the script through its command line (toy task, offline
Hub-format model and chat data, DDP and FSDP against a single process, resume, failing ranks)."""

import json
import math
import os
import re
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, markov_llama, read_json, result_of, run_script, script_error, toy_data_file
from safetensors.torch import load_file

import common
import toy_task
from sft import labelled_nll

# AdamW's first steps as plain gradient descent (a step of 0.3 × the gradient; tests/test_wiring.py): an error
# that only scales the loss changes the weights
SGD_LIKE = ["--adam-eps", "1000", "--learning-rate", "300", "--max-grad-norm", "0"]


class FixedLogits(torch.nn.Module):
    """A stand-in causal LM with given logits (B, L, V), position t predicting token t + 1."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, attention_mask, logits_to_keep):
        return SimpleNamespace(logits=self.logits[logits_to_keep])


def sft_loss(logits, labels):
    """labelled_nll's mean NLL per labelled token, for a batch of given logits and labels (-100: no loss)."""
    batch = {"input_ids": torch.zeros_like(labels), "attention_mask": torch.ones_like(labels), "labels": labels}
    total, n = labelled_nll(FixedLogits(logits), batch)
    return total / n


def test_uniform_logits_give_log_vocab():
    logits = torch.zeros(2, 5, 7)
    labels = torch.tensor([[-100, 1, 2, 3, 4], [-100, -100, 6, 0, -100]])
    assert sft_loss(logits, labels).item() == pytest.approx(math.log(7))


def test_perfect_prediction_gives_zero_and_shift():
    # position t predicts the label at t + 1: put a huge logit on labels[t + 1] at position t
    labels = torch.tensor([[-100, 3, 1, 4]])
    logits = torch.zeros(1, 4, 5)
    for t in range(3):
        logits[0, t, labels[0, t + 1]] = 100.0
    assert sft_loss(logits, labels).item() == pytest.approx(0.0, abs=1e-6)
    # the same logits judged against unshifted labels would be badly wrong: the shift matters
    logits_unshifted = torch.zeros(1, 4, 5)
    for t in range(1, 4):
        logits_unshifted[0, t, labels[0, t]] = 100.0
    assert sft_loss(logits_unshifted, labels).item() > 10


def test_ignored_positions_and_token_level_mean():
    # vocabulary of 2; logit 0 vs log(3): p(token 1) = 3/4, p(token 0) = 1/4 everywhere
    logits = torch.zeros(2, 4, 2)
    logits[..., 1] = math.log(3)
    # row 0 has three labelled tokens (1, 1, 0), row 1 one (1); the rest ignored, whatever sits there
    labels = torch.tensor([[-100, 1, 1, 0], [-100, 1, -100, -100]])
    nll = [-math.log(0.75), -math.log(0.75), -math.log(0.25), -math.log(0.75)]
    assert sft_loss(logits, labels).item() == pytest.approx(sum(nll) / 4)  # mean over the 4 tokens ...
    per_seq = (sum(nll[:3]) / 3 + nll[3]) / 2
    assert abs(sft_loss(logits, labels).item() - per_seq) > 0.05  # ... not the mean of per-sequence means
    labels_garbage = labels.clone()
    logits2 = logits.clone()
    logits2[1, 2:, :] = torch.randn(2, 2) * 50  # predictions for ignored positions change nothing
    assert sft_loss(logits2, labels_garbage).item() == pytest.approx(sum(nll) / 4)


def test_smoke_toy(tmp_path):
    out = run_script(
        [
            "sft.py",
            "--num-epochs",
            "0.03",
            "--batch-size",
            "64",
            "--per-device-batch-size",
            "64",
            "--eval-every",
            "10",
            "--output-dir",
            str(tmp_path),
        ]
    )
    result = read_json(tmp_path / "training_args.json")["result"]
    # 23 steps from random init take the held-out loss well below uniform guessing (ln 73 = 4.29)
    assert result["eval_loss"] < 4.0 and result["excess_nll"] > 0.5
    assert "excess" in out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert AutoTokenizer.from_pretrained(str(tmp_path)).pad_token == toy_task.PAD


def test_a_model_that_is_p_ref_has_zero_excess(tmp_path):
    """End to end, independently of how the script computes it: a layer-free Llama whose logits are
    P_ref's transitions, left unchanged (learning rate 0), is exactly P_ref, so its held-out loss must
    equal the exact −log P_ref per token (tokenization, masks, shift and token counts all agree)."""
    markov_llama(str(tmp_path / "pref"))
    run_script(
        [
            "sft.py",
            "--model-name",
            str(tmp_path / "pref"),
            "--learning-rate",
            "0",
            "--num-epochs",
            "0.0013",
            "--batch-size",
            "64",
            "--per-device-batch-size",
            "64",
            "--num-sample-completions",
            "0",
            "--output-dir",
            str(tmp_path / "out"),
        ]
    )
    result = read_json(tmp_path / "out" / "training_args.json")["result"]
    assert abs(result["excess_nll"]) < 1e-4 and result["eval_loss"] > 2.4  # ~2.54 nats: a real loss, not 0


def test_hub_format_model_and_chat_data(tmp_path, hub_model, chat_jsonl):
    run_script(
        [
            "sft.py",
            "--model-name",
            hub_model,
            "--dataset-name",
            chat_jsonl,
            "--batch-size",
            "8",
            "--per-device-batch-size",
            "4",
            "--num-epochs",
            "1",
            "--eval-every",
            "2",
            "--max-length",
            "64",
            "--learning-rate",
            "1e-3",
            "--max-new-tokens",
            "4",
            "--output-dir",
            str(tmp_path),
        ]
    )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    # the tokenizer had no PAD: it got one, distinct from EOS, and the model's embeddings grew to fit it
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    # the saved generation config stops at the template's end-of-turn as well as at the EOS
    assert sorted(model.generation_config.eos_token_id) == sorted(
        [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
    )
    assert math.isfinite(read_json(tmp_path / "training_args.json")["result"]["eval_loss"])


def test_gemma_style_conversations_and_keep_end(tmp_path, chat_models, chat_data):
    """Conversational SFT with a Gemma-style template (<end_of_turn> ends a turn, EOS is <eos>): the
    model learns to end replies with <end_of_turn>; long histories are cut from the left and reported."""
    out = run_script(
        [
            "sft.py",
            "--model-name",
            chat_models["gemma"],
            "--dataset-name",
            chat_data["sft"],
            "--batch-size",
            "8",
            "--per-device-batch-size",
            "8",
            "--num-epochs",
            "10",
            "--eval-every",
            "100",
            "--max-length",
            "30",
            "--truncation-mode",
            "keep_end",
            "--learning-rate",
            "3e-3",
            "--warmup-ratio",
            "0",
            "--max-new-tokens",
            "6",
            "--output-dir",
            str(tmp_path),
        ]
    )
    assert re.search(r"train data: of 28 examples, truncated 28", out)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "And another one?"}],
        add_generation_prompt=True,
        tokenize=True,
        return_tensors="pt",
    )["input_ids"]
    with torch.no_grad():
        next_ids = model(
            input_ids=torch.cat([prompt, torch.tensor([tok(["black"], add_special_tokens=False)["input_ids"][0]])], 1)
        ).logits[0, -1]
    # after a colour, the trained model's most likely next token ends the turn, and it is not the EOS
    assert next_ids.argmax().item() == tok.convert_tokens_to_ids("<end_of_turn>") != tok.eos_token_id


def test_ddp_fsdp_and_resume_match_single_process(tmp_path):
    """2 CPU processes under torchrun (4 examples each) take the same steps as 1 process with one
    batch of 8, with DDP and with FSDP: the loss is a token-level mean over the global batch, however it
    is split. By gradient descent (SGD_LIKE), so that a loss that is only scaled (DDP's average over ranks left
    uncompensated) shows. The FSDP run, stopped after step 2 (its later checkpoint removed) and resumed, ends with
    bit-identical weights."""
    data = toy_data_file(tmp_path / "data.jsonl", "sft", 48)
    # the default model: the toy Llama from scratch, built in memory by every rank (no --per-device-batch-size:
    # by default batch / ranks)
    flags = [
        "sft.py",
        "--dataset-name",
        data,
        "--batch-size",
        "8",
        "--num-epochs",
        "1",
        "--eval-every",
        "3",
        "--warmup-ratio",
        "0",
        "--num-sample-completions",
        "2",
        *SGD_LIKE,
    ]
    run_script(flags + ["--output-dir", str(tmp_path / "one")])
    run_script(flags + ["--output-dir", str(tmp_path / "two")], torchrun=2)
    out = run_script(flags + ["--fsdp", "--checkpoint-every", "2", "--output-dir", str(tmp_path / "fsdp")], torchrun=2)
    assert "2 rank(s) x 1 micro-batch(es) of 4" in out
    one = load_file(str(tmp_path / "one" / "model.safetensors"))
    start = toy_task.make_base_model(seed=1).state_dict()
    # rounding (another reduction order) perturbs each update by a small fraction of it, and each step rounds the
    # weight to its last bit: the runs may differ by 2e-3 of the farthest any weight moved (seen: 4e-5) plus 16
    # ulps of the weight (docs/tests.md, "How tolerances are chosen")
    atol, rtol = 2e-3 * max((one[k] - start[k]).abs().max().item() for k in one), 16 * torch.finfo(torch.float32).eps
    for run in ("two", "fsdp"):
        other = load_file(str(tmp_path / run / "model.safetensors"))
        assert sorted(other) == sorted(one)  # the tied head saved once, as save_pretrained does
        for k in one:
            assert not torch.equal(one[k], start[k]) or "norm" in k  # training moved the weights
            torch.testing.assert_close(one[k], other[k], rtol=rtol, atol=atol)
        r1, r2 = result_of(tmp_path / "one"), result_of(tmp_path / run)
        assert abs(r1["eval_loss"] - r2["eval_loss"]) < 2e-3 and r1["eval_loss"] == pytest.approx(
            r2["eval_loss"], rel=1e-5
        )
    assert read_json(tmp_path / "fsdp" / "config.json")["architectures"] == ["LlamaForCausalLM"]

    # resume: a copy of the run's output with only the step-2 checkpoint, as if it had died before step 4
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "fsdp" / "resume" / "step_0000002", resumed / "resume" / "step_0000002")
    out = run_script(flags + ["--fsdp", "--resume", "--output-dir", str(resumed)], torchrun=2)
    assert f"resumed from {resumed / 'resume' / 'step_0000002'} at step 2" in out
    straight, again = (
        load_file(str(tmp_path / "fsdp" / "model.safetensors")),
        load_file(str(resumed / "model.safetensors")),
    )
    for k in straight:
        assert torch.equal(straight[k], again[k]), k


FAULTS = {  # sitecustomize.py modules that break rank 1 of a torchrun job from outside the script
    "raise": """
import os
if os.environ.get("RANK") == "1":
    import torch

    def step(self, *args, **kwargs):
        raise RuntimeError("injected failure on rank 1")

    torch.optim.AdamW.step = step
""",
    "nan": """
import os
import torch

calls, logsumexp, step = [0], torch.Tensor.logsumexp, torch.optim.AdamW.step

# the loss's log-sum-exp runs twice per micro-batch (forward, and recomputed in backward), one micro-batch
# per step here: from the fifth call, step 2's forward, rank 1's loss is NaN
def nan_from_fifth_call(self, *args, **kwargs):
    calls[0] += 1
    out = logsumexp(self, *args, **kwargs)
    return out * float("nan") if calls[0] >= 5 and os.environ.get("RANK") == "1" else out

def checked_step(self, *args, **kwargs):
    if any(not torch.isfinite(p.grad).all() for g in self.param_groups for p in g["params"] if p.grad is not None):
        raise AssertionError("the optimizer stepped on non-finite gradients")
    return step(self, *args, **kwargs)

torch.Tensor.logsumexp, torch.optim.AdamW.step = nan_from_fifth_call, checked_step
""",
}


def run_with_fault(tmp_path, fault, extra):
    """sft.py on 2 ranks with a fault injected into rank 1; returns (process, seconds)."""
    import time

    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(FAULTS[fault])
    base = toy_task.save_base_model(str(tmp_path / "base"))
    data = tmp_path / "data.jsonl"
    data.write_text(
        "".join(json.dumps(r) + "\n" for r in toy_task.make_dataset("sft", "train", num_examples=48).to_list())
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port=29534",
        "sft.py",
        "--model-name",
        base,
        "--dataset-name",
        str(data),
        "--batch-size",
        "8",
        "--per-device-batch-size",
        "4",
        "--eval-every",
        "100",
        "--max-length",
        "64",
        "--num-sample-completions",
        "0",
        "--output-dir",
        str(tmp_path / "out"),
    ] + extra
    env = dict(os.environ, PYTHONPATH=str(inject), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    start = time.time()
    proc = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    return proc, time.time() - start


def test_one_failing_rank_stops_every_rank_promptly(tmp_path):
    """Rank 1 raises at its first optimizer step under FSDP while rank 0 goes on to its next collective:
    the job ends with rank 1's error within seconds, not at a collective's timeout (30 minutes for gloo)."""
    proc, seconds = run_with_fault(tmp_path, "raise", ["--fsdp"])
    assert proc.returncode != 0 and "injected failure on rank 1" in proc.stderr
    assert seconds < 90
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_nan_loss_stops_every_rank_before_the_update(tmp_path):
    """Rank 1's loss turns NaN at step 2 (DDP): both ranks raise before the optimizer step (the injected
    optimizer would fail on a non-finite gradient), with a message that says what to do."""
    proc, _ = run_with_fault(tmp_path, "nan", [])
    assert proc.returncode != 0
    assert proc.stderr.count("FloatingPointError: non-finite loss or gradient at step 2, not applied") == 2
    assert "stepped on non-finite" not in proc.stderr


def test_fsdp_needs_torchrun():
    assert "--fsdp runs under torchrun" in script_error(["sft.py", "--fsdp"])


def test_checkpoint_round_trip_and_resume_errors(tmp_path):
    """In one process: save_checkpoint then load_checkpoint restores the weights and AdamW moments exactly; an
    incomplete checkpoint is skipped; another run's checkpoint, or none at all, is a clear error."""
    from sft import load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    for _ in range(2):
        model(torch.randn(5, 4)).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {k: v.clone() for k, v in optimizer.state[model.weight].items()}
    run = {"world_size": 1, "num_steps": 5, "seed": 1}
    with pytest.raises(SystemExit, match="no complete checkpoint"):
        load_checkpoint(str(tmp_path), model, optimizer, run)
    save_checkpoint(str(tmp_path / "resume" / "step_0000002"), model, optimizer, {"step": 2, "run": run}, 0)
    (tmp_path / "resume" / "step_0000004").mkdir()  # died while writing: no trainer_state.json
    for p in model.parameters():  # the run goes on (and the process dies)
        p.data.add_(1.0)
    optimizer.state[model.weight]["exp_avg"].add_(1.0)
    assert load_checkpoint(str(tmp_path), model, optimizer, run)["step"] == 2
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    for k, v in optimizer.state[model.weight].items():
        assert torch.equal(v, moments[k]), k
    with pytest.raises(SystemExit, match="step_0000002 is from a run of .*'world_size': 1.*, not .*'world_size': 2"):
        load_checkpoint(str(tmp_path), model, optimizer, {**run, "world_size": 2})


def test_resume_is_bit_identical_with_dropout_and_samples(tmp_path):
    """GPT-2 with dropout, a checkpoint at a step that also samples completions: every step draws its dropout
    masks from (seed, rank, step), so the resumed run's are those of the straight run."""
    from transformers import GPT2Config, GPT2LMHeadModel

    base = toy_task.save_base_model(str(tmp_path / "base"))
    tok = common.load_tokenizer(base)
    torch.manual_seed(0)
    GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tok),
            n_positions=64,
            n_embd=32,
            n_layer=2,
            n_head=2,
            resid_pdrop=0.1,
            embd_pdrop=0.1,
            attn_pdrop=0.1,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            bos_token_id=None,
        )
    ).save_pretrained(tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    data = toy_data_file(tmp_path / "data.jsonl", "sft", 48)
    flags = [
        "sft.py",
        "--model-name",
        str(tmp_path / "gpt2"),
        "--dataset-name",
        data,
        "--batch-size",
        "8",
        "--learning-rate",
        "3e-3",
        "--eval-every",
        "2",
        "--num-sample-completions",
        "2",
        "--max-length",
        "64",
    ]
    run_script(flags + ["--checkpoint-every", "2", "--output-dir", str(tmp_path / "straight")])
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "straight" / "resume" / "step_0000002", resumed / "resume" / "step_0000002")
    run_script(flags + ["--resume", "--output-dir", str(resumed)])
    straight, again = (
        load_file(str(tmp_path / "straight" / "model.safetensors")),
        load_file(str(resumed / "model.safetensors")),
    )
    for k in straight:
        assert torch.equal(straight[k], again[k]), k


def test_toy_max_length_too_short_is_a_clear_error(tmp_path):
    message = script_error(["sft.py", "--max-length", "3", "--output-dir", str(tmp_path)])
    assert "--max-length 3 cuts toy examples" in message and "use at least 30" in message
