"""Offline stand-ins for Hub models and datasets: tiny real architectures and a BPE tokenizer
trained on the fly, saved in the Hub's formats (save_pretrained, JSONL)."""

import contextlib
import io
import json
import os
import runpy
import socket
import subprocess
import sys

import numpy as np
import pytest

os.environ.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")  # offline, and before transformers loads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLOURS = ["red", "green", "blue", "a deep shade of purple", "yellow", "orange", "black", "white"]
CONVERSATIONS = [  # two assistant turns each: every one must carry loss
    [
        {"role": "user", "content": f"Name a colour number {i}."},
        {"role": "assistant", "content": c},
        {"role": "user", "content": "And another one?"},
        {"role": "assistant", "content": COLOURS[(i + 3) % 8]},
    ]
    for i, c in enumerate(COLOURS * 4)
]
# Offline stand-ins of three chat-template families. In each, an assistant turn ends with a token that
# is not the tokenizer's EOS, as in the real models' instruct templates with their base tokenizers.
FAMILIES = {
    "chatml": {  # Qwen2.5, SmolLM2: <|im_end|> ends a turn; the EOS is another token; no BOS in the template
        "bos": "<s>",
        "eos": "</s>",
        "end_of_turn": "<|im_end|>",
        "extra": ["<|im_start|>"],
        "template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    },
    "llama3": {  # Llama 3: <|eot_id|> ends a turn, <|end_of_text|> is the EOS; the model declares both as stop ids
        "bos": "<|begin_of_text|>",
        "eos": "<|end_of_text|>",
        "end_of_turn": "<|eot_id|>",
        "extra": ["<|start_header_id|>", "<|end_header_id|>"],
        "stop_ids_declared": True,
        "template": "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}",
    },
    "gemma": {  # Gemma: <end_of_turn> then a newline; the assistant is called "model"; EOS <eos>; has a PAD
        "bos": "<bos>",
        "eos": "<eos>",
        "end_of_turn": "<end_of_turn>",
        "extra": ["<start_of_turn>", "<pad>"],
        "pad": "<pad>",
        "stop_ids_declared": True,
        "template": "{{ bos_token }}{% for m in messages %}<start_of_turn>"
        "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}",
    },
}

# Templates that only the fast tokenization tests use (the script tests and `chat_models` run over FAMILIES).
# Qwen3 writes an empty think block before the content of the assistant turns after the last user message:
# the last turn renders differently from the same turn followed by more. TRL's training templates mark the
# assistant spans with {% generation %}: here around the content (the Qwen3 one) or the content and <|im_end|>.
_LAST_USER = (
    "{% set ns = namespace(last_user=-1) %}{% for m in messages %}{% if m['role'] == 'user' %}"
    "{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}"
)
_QWEN3_TURN = (
    "<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' and loop.index0 > ns.last_user %}"
    "<think>\n\n</think>\n\n{% endif %}"
)
_GENERATION_PROMPT = "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
ALL_FAMILIES = dict(
    FAMILIES,
    qwen3=dict(
        FAMILIES["chatml"],
        think="<think>\n\n</think>\n\n",
        template=_LAST_USER
        + "{% for m in messages %}"
        + _QWEN3_TURN
        + "{{ m['content'] }}<|im_end|>\n{% endfor %}"
        + _GENERATION_PROMPT,
    ),
    qwen3_generation=dict(
        FAMILIES["chatml"],
        think="<think>\n\n</think>\n\n",
        template=_LAST_USER
        + "{% for m in messages %}"
        + _QWEN3_TURN
        + "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{% endgeneration %}"
        "{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}" + _GENERATION_PROMPT,
    ),
    chatml_generation=dict(
        FAMILIES["chatml"],
        template="{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}"
        "{% else %}{{ m['content'] }}<|im_end|>{% endif %}{{ '\\n' }}{% endfor %}" + _GENERATION_PROMPT,
    ),
)


# The exact special-token layouts of three chat models people post-train (their tokenizer_config.json and
# generation_config.json): the tokenizer's EOS is the end-of-turn; PAD, where there is one, is an end id that the
# generation config declares; the special tokens keep the real models' order (not their ids).
_QWEN = {
    "specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    "bos": None,
    "eos": "<|im_end|>",
    "pad": "<|endoftext|>",
    "end_of_turn": "<|im_end|>",
    "generation_eos": ["<|im_end|>", "<|endoftext|>"],  # eos_token_id: [151645, 151643]
    "generation_pad": "<|endoftext|>",  # pad_token_id: 151643
}
_QWEN25_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
LAYOUTS = {
    "qwen2.5-instruct": dict(
        _QWEN,
        template="{% if messages[0]['role'] != 'system' %}<|im_start|>system\n" + _QWEN25_SYSTEM + "<|im_end|>\n"
        "{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        + _GENERATION_PROMPT,
    ),
    "qwen3": dict(  # the think block before the last assistant turn after the last user message (loop.last)
        _QWEN,
        added=["<think>", "</think>"],  # added tokens that are not special
        think="<think>\n\n</think>\n\n",
        template=_LAST_USER + "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' and loop.index0 > ns.last_user and loop.last %}<think>\n\n</think>\n\n"
        "{% endif %}{{ m['content'] }}<|im_end|>\n{% endfor %}" + _GENERATION_PROMPT,
    ),
    "llama3.1-instruct": {  # a system header with dates in every conversation; three declared stop ids; no PAD
        "specials": ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|eom_id|>"]
        + ["<|start_header_id|>", "<|end_header_id|>"],
        "bos": "<|begin_of_text|>",
        "eos": "<|eot_id|>",
        "end_of_turn": "<|eot_id|>",
        "generation_eos": ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"],  # [128001, 128008, 128009]
        "template": "{{ bos_token }}<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: "
        "December 2023\nToday Date: 26 Jul 2024\n\n{% if messages[0]['role'] == 'system' %}"
        "{{ messages[0]['content'] | trim }}{% endif %}<|eot_id|>{% for m in messages %}{% if m['role'] != 'system' %}"
        "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}",
    },
}
ALL_FAMILIES |= LAYOUTS


def make_chat_tokenizer(family="chatml", pad_token=None):
    """A byte-level BPE tokenizer (GPT-2 / Llama 3 style) trained on the fly, with the family's BOS (added
    to plain text, if it has one), EOS, end-of-turn and chat template. PAD: the family's own (Gemma, Qwen), else
    `pad_token` (None: no PAD at all, as GPT-2 and Pythia ship). Special tokens get ids 0, 1, 2, ... in the
    family's order (the stand-in families: BOS, EOS, end-of-turn)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    f = ALL_FAMILIES[family]
    specials = f.get("specials") or [f["bos"], f["eos"], f["end_of_turn"]] + f["extra"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = [m["content"] for conv in CONVERSATIONS for m in conv] + [
        "user assistant model system the plot was dull"
    ] * 3
    tok.train_from_iterator(corpus, trainer)
    if f["bos"]:
        tok.post_processor = processors.TemplateProcessing(single=f"{f['bos']} $A", special_tokens=[(f["bos"], 0)])
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=f["bos"], eos_token=f["eos"], pad_token=f.get("pad", pad_token)
    )
    out.add_tokens(f.get("added", []))
    out.chat_template = f["template"]
    return out


def make_bpe_tokenizer(pad_token=None):
    """The ChatML-family tokenizer: BOS <s>, EOS </s>, turns ended by <|im_end|>."""
    return make_chat_tokenizer("chatml", pad_token)


def make_llama(vocab_size, path=None, eos_token_id=1):
    """A tiny random Llama; `eos_token_id` (an int or a list) is what its config and generation config declare."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=0,
        eos_token_id=eos_token_id,
        pad_token_id=None,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = eos_token_id
    if path:
        model.save_pretrained(path)
    return model


def save_chat_model(path, family):
    """A local folder like a Hub chat model of `family`: Llama 3 and Gemma declare [EOS, end-of-turn] as stop ids;
    the real layouts (LAYOUTS) their own end ids and PAD, in config.json and generation_config.json."""
    f, tok = ALL_FAMILIES[family], make_chat_tokenizer(family)
    tok.save_pretrained(path)
    ids = [tok.convert_tokens_to_ids(t) for t in f.get("generation_eos", [])] or (
        [1, 2] if f.get("stop_ids_declared") else 1
    )
    model = make_llama(len(tok), eos_token_id=ids)
    if f.get("generation_pad"):
        model.config.pad_token_id = model.generation_config.pad_token_id = tok.convert_tokens_to_ids(
            f["generation_pad"]
        )
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def hub_model(tmp_path_factory):
    """A local folder like a Hub causal LM whose tokenizer has no PAD token (ChatML family)."""
    return save_chat_model(str(tmp_path_factory.mktemp("hub_llama")), "chatml")


@pytest.fixture(scope="session")
def chat_models(tmp_path_factory):
    """{family: folder} of a tiny chat model per template family."""
    return {f: save_chat_model(str(tmp_path_factory.mktemp(f"chat_{f}")), f) for f in FAMILIES}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="session")
def chat_jsonl(tmp_path_factory):
    """A local JSONL file in the conversational format (a `messages` column, two assistant turns each)."""
    return write_jsonl(tmp_path_factory.mktemp("chat_data") / "chat.jsonl", [{"messages": c} for c in CONVERSATIONS])


@pytest.fixture(scope="session")
def chat_data(tmp_path_factory):
    """Hub-style folders (train.jsonl, test.jsonl) of conversational data, in TRL's formats:
    sft (messages), preference (prompt, chosen, rejected as message lists) and prompt (prompt messages)."""
    root = tmp_path_factory.mktemp("chat_folders")
    prefs = [
        {"prompt": c[:3], "chosen": [c[3]], "rejected": [{"role": "assistant", "content": "a deep shade of purple"}]}
        for c in CONVERSATIONS
        if c[3]["content"] != "a deep shade of purple"
    ]
    out = {}
    for kind, rows in (
        ("sft", [{"messages": c} for c in CONVERSATIONS]),
        ("preference", prefs),
        ("prompt", [{"prompt": c[:3]} for c in CONVERSATIONS]),
    ):
        (root / kind).mkdir()
        write_jsonl(root / kind / "train.jsonl", rows[4:])
        write_jsonl(root / kind / "test.jsonl", rows[:4])
        out[kind] = str(root / kind)
    return out


@pytest.fixture(scope="session")
def toy_base(tmp_path_factory):
    """A folder with the toy task's tokenizer and randomly initialised Llama, saved like a Hub model."""
    import toy_task

    return toy_task.save_base_model(str(tmp_path_factory.mktemp("toy_base")))


def markov_llama(path, noise=0.0, seed=0):
    """A Llama with no transformer layers: logits depend on the current token only, set to the toy
    chain's log-probabilities (plus `noise`·N(0, 1) per entry): a Markov policy whose exact KL to
    P_ref and expected gold reward toy_task computes. Returns the policy's (V, V+1) log-transitions."""
    import math

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import toy_task

    toy_task.save_base_model(path)  # tokenizer: PAD, EOS, UNK, then the words
    task, V = toy_task.TASK, len(toy_task.WORDS)
    H, D = V + 3, V + 4  # vocabulary; hidden size (even, for RoPE's validation; the extra unit stays 0)
    rng = np.random.default_rng(seed)
    log_trans = np.log(task.trans) + noise * rng.normal(size=task.trans.shape)
    log_trans -= np.log(np.exp(log_trans).sum(1, keepdims=True))
    config = LlamaConfig(
        vocab_size=H,
        hidden_size=D,
        intermediate_size=4,
        num_hidden_layers=0,
        num_attention_heads=1,
        num_key_value_heads=1,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
        rms_norm_eps=1e-6,
    )
    model = LlamaForCausalLM(config)
    logits = np.full((H, H), -30.0)  # rows: next token; columns: current token; PAD and UNK never likely
    logits[3:, 3:] = log_trans[:, :V].T
    logits[1, 3:] = log_trans[:, V]  # EOS
    scale = 1 / math.sqrt(1 / D + 1e-6)  # RMSNorm turns the one-hot embedding into scale × one-hot
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(H, D))
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight.copy_(torch.tensor(np.pad(logits / scale, ((0, 0), (0, 1))), dtype=torch.float32))
    model.save_pretrained(path)
    return log_trans


def toy_reward_model(path, seed=0):
    """The model in `path` with a seeded random scalar head, in eval mode: a stand-in reward or value model."""
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=1).eval()


def assert_same_weights(dir_a, dir_b, start_dir):
    """The models saved in two folders are equal up to float32 rounding, and training moved them away from
    `start_dir`'s. Rounding (another reduction order) perturbs each update by a small fraction of it, and each
    step rounds the weight to its last bit: the runs may differ by 2e-3 of the farthest any weight moved, plus
    16 ulps of the weight (docs/tests.md, "How tolerances are chosen")."""
    import torch
    from safetensors.torch import load_file

    a, b = load_file(os.path.join(dir_a, "model.safetensors")), load_file(os.path.join(dir_b, "model.safetensors"))
    start = load_file(os.path.join(start_dir, "model.safetensors"))
    assert a.keys() == b.keys()
    moved = [k for k in a if k in start and a[k].shape == start[k].shape and not torch.equal(a[k], start[k])]
    assert len(moved) > len(a) // 2  # training moved the weights
    atol = 2e-3 * max((a[k] - start[k]).abs().max().item() for k in moved)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=16 * torch.finfo(torch.float32).eps, atol=atol)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def result_of(run_dir):
    """The `result` a script wrote to training_args.json in its output folder."""
    return read_json(os.path.join(run_dir, "training_args.json"))["result"]


def toy_data_file(path, kind, n, seed=0):
    """n toy examples of `kind` in a JSONL file (a local dataset without an eval split)."""
    import toy_task

    return write_jsonl(path, toy_task.make_dataset(kind, "train", num_examples=n, seed=seed).to_list())


def run_script(args, torchrun=0):
    """Run a script of the project through its real command line; returns stdout, fails on error. Alone it runs in
    this process (as `python script.py args` would, from the project root: runpy, sys.argv), which spares the
    seconds of importing torch and transformers again; with `torchrun` N processes under torch.distributed.run."""
    if torchrun:
        with socket.socket() as free:  # a free port: other jobs on the machine may be running torchrun too
            free.bind(("127.0.0.1", 0))
            port = free.getsockname()[1]
        launch = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={torchrun}",
            f"--master_port={port}",
        ]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
        proc = subprocess.run(
            launch + args, check=False, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env
        )
        assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        return proc.stdout
    out, argv, cwd = io.StringIO(), sys.argv, os.getcwd()
    sys.argv = list(args)
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(os.path.join(ROOT, args[0]), run_name="__main__")
    except SystemExit as e:  # a script's `raise SystemExit` after its work: exit code 0
        if e.code not in (None, 0):
            raise
    finally:
        sys.argv = argv
        os.chdir(cwd)
    return out.getvalue()


def calls_of(function, args):
    """Run a script as run_script does, recording each call of the function `function` (or of several, named
    with spaces between) that the script itself defines: (the arguments of every call, {name: value} and the
    function's name as "function", in order; stdout). What a script passes to a tested function, for the tests
    of how it is wired."""
    script, seen, names = os.path.join(ROOT, args[0]), [], function.split()

    def profile(frame, event, arg):
        if event == "call" and frame.f_code.co_name in names and frame.f_code.co_filename == script:
            seen.append({"function": frame.f_code.co_name, **frame.f_locals})

    sys.setprofile(profile)
    try:
        out = run_script(args)
    finally:
        sys.setprofile(None)
    return seen, out


def script_error(args):
    """The message of the error a script's command line stops with (run as run_script does)."""
    with pytest.raises((SystemExit, ValueError, FloatingPointError)) as e:
        run_script(args)
    return str(e.value)
