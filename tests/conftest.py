"""Offline stand-ins for Hub models and datasets: tiny real architectures and a BPE tokenizer
trained on the fly, saved in the Hub's formats (save_pretrained, JSONL)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
CONVERSATIONS = [
    [{"role": "user", "content": f"Name a colour number {i}."}, {"role": "assistant", "content": c}]
    for i, c in enumerate(["red", "green", "blue", "a deep shade of purple", "yellow", "orange", "black", "white"] * 4)
]


def make_bpe_tokenizer(pad_token=None):
    """A byte-level BPE tokenizer (GPT-2 / Llama 3 style) with BOS <s>, EOS </s>, a chat template and
    the given PAD (None: no PAD at all, as GPT-2 and Pythia ship)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [m["content"] for conv in CONVERSATIONS for m in conv] + ["<|user|> <|assistant|> the plot was dull"] * 3
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token=pad_token)
    out.chat_template = CHAT_TEMPLATE
    return out


def make_llama(vocab_size, path=None):
    from transformers import LlamaConfig, LlamaForCausalLM
    import torch

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=0, eos_token_id=1, pad_token_id=None)
    model = LlamaForCausalLM(config)
    if path:
        model.save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def hub_model(tmp_path_factory):
    """A local folder like a Hub causal LM whose tokenizer has no PAD token."""
    path = str(tmp_path_factory.mktemp("hub_llama"))
    tok = make_bpe_tokenizer()
    tok.save_pretrained(path)
    make_llama(len(tok), path)
    return path


@pytest.fixture(scope="session")
def chat_jsonl(tmp_path_factory):
    """A local JSONL file in the conversational format (a `messages` column)."""
    path = tmp_path_factory.mktemp("chat_data") / "chat.jsonl"
    with open(path, "w") as f:
        for conv in CONVERSATIONS:
            f.write(json.dumps({"messages": conv}) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def toy_base(tmp_path_factory):
    """A folder with the toy task's tokenizer and randomly initialised Llama, saved like a Hub model."""
    import toy_task

    return toy_task.save_base_model(str(tmp_path_factory.mktemp("toy_base")))


def toy_reward_model(path, seed=0):
    """The model in `path` with a seeded random scalar head, in eval mode: a stand-in reward or value model."""
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=1).eval()


def run_script(args, timeout=300, torchrun=0):
    """Run a script of the project through its real command line; returns stdout, fails on error."""
    cmd = [sys.executable] + (["-m", "torch.distributed.run", f"--nproc_per_node={torchrun}", "--master_port=29533"]
                              if torchrun else []) + args
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if torchrun:
        env["OMP_NUM_THREADS"] = "1"  # one thread per process on a 2-core machine
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout
