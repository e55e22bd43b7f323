"""A model-family matrix: the scripts' log-probabilities, rewards and values against independent
computations (each sequence alone in a batch of one, without padding, mask or position ids, through the
plain full softmax), for a tiny random float32 model of each family people post-train, built offline
from its transformers config class.

Per family: SFT's response-only NLL (sft.labelled_nll); DPO's prompt-once and concatenated log-probabilities
(dpo.pair_logprobs), values and gradients; the reward read at the end token (reward_model.rewards_at_eos,
ppo.token_scores); a PPO rollout whose rows equal their sequences alone and whose first update
recomputation has ratio 1. Sliding windows are shorter than the sequences, so that they bind (tested), and
weights are drawn 10× wider than the families' default (initializer_range 0.2): at 0.02 attention is so
flat that a wrong position changes a sequence's log-probability by ~1e-4, below float32 noise on a sum."""

import functools
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import common
import dpo
import grpo
import ppo
import reward_model
import sft

V, PAD, EOS = 75, 0, 1  # the toy tokenizer (common.load_tokenizer of toy_task.save_base_model): size, PAD, EOS
WINDOW = 8  # every sliding window: shorter than the test sequences (up to 48 tokens)
_SMALL = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "attention_dropout": 0.0,
}
_ROPE = {"rope_type": "default", "rope_theta": 10000.0}

# family -> (config class, keyword arguments); all also get the vocabulary, PAD, EOS and initializer_range 0.2
FAMILIES = {
    "gpt2": (
        "GPT2Config",
        {
            "n_positions": 64,
            "n_embd": 32,
            "n_layer": 2,
            "n_head": 2,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "summary_first_dropout": 0.0,
        },
    ),  # learned absolute positions
    "pythia": (
        "GPTNeoXConfig",
        {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 128,
            "use_parallel_residual": True,
            "hidden_dropout": 0.0,
            "attention_dropout": 0.0,
            "classifier_dropout": 0.0,
            "rope_parameters": dict(_ROPE, partial_rotary_factor=0.25),
        },
    ),  # partial rotary
    "opt": (
        "OPTConfig",
        {
            "hidden_size": 32,
            "ffn_dim": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "word_embed_proj_dim": 32,
            "max_position_embeddings": 64,
            "dropout": 0.0,
            "attention_dropout": 0.0,
            "layerdrop": 0.0,
        },
    ),  # learned, offset 2
    "llama": ("LlamaConfig", _SMALL),
    # dynamic NTK RoPE: real positions stay within max_position_embeddings (48 tokens at most); a padding slot
    # numbered on from its prompt would not, and would rescale the frequencies of the whole batch
    "llama-dynamic-rope": (
        "LlamaConfig",
        dict(_SMALL, max_position_embeddings=48, rope_parameters=dict(_ROPE, rope_type="dynamic", factor=2.0)),
    ),
    "mistral": ("MistralConfig", dict(_SMALL, sliding_window=WINDOW)),
    "qwen2": ("Qwen2Config", _SMALL),
    "qwen3": ("Qwen3Config", dict(_SMALL, head_dim=8)),  # q/k norm
    "gemma2": (
        "Gemma2Config",
        dict(
            _SMALL,
            head_dim=8,
            query_pre_attn_scalar=8,
            sliding_window=WINDOW,  # eager attention,
            layer_types=["sliding_attention", "full_attention"],
        ),
    ),  # soft-capped scores and logits
    "gemma3": (
        "Gemma3TextConfig",
        dict(
            _SMALL,
            head_dim=8,
            query_pre_attn_scalar=8,
            sliding_window=WINDOW,
            final_logit_softcapping=5.0,
            layer_types=["sliding_attention", "full_attention"],
        ),
    ),
    "phi3": (
        "Phi3Config",
        dict(_SMALL, resid_pdrop=0.0, embd_pdrop=0.0, sliding_window=WINDOW),
    ),  # Phi-3-mini: 2047 of 4096
    "phi2": (
        "PhiConfig",
        dict(_SMALL, resid_pdrop=0.0, embd_pdrop=0.0, rope_parameters=dict(_ROPE, partial_rotary_factor=0.5)),
    ),
    "stablelm": (
        "StableLmConfig",
        dict(_SMALL, hidden_dropout=0.0, rope_parameters=dict(_ROPE, partial_rotary_factor=0.25)),
    ),
    "falcon": (
        "FalconConfig",
        {
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 128,
            "hidden_dropout": 0.0,
            "attention_dropout": 0.0,
        },
    ),  # multi-query, parallel attention, RoPE
    "olmo2": ("Olmo2Config", _SMALL),  # q/k norm over all heads, norms after the blocks
    "granite": (
        "GraniteConfig",
        dict(_SMALL, embedding_multiplier=2.0, logits_scaling=4.0, residual_multiplier=0.5, attention_multiplier=0.2),
    ),
    "cohere": ("CohereConfig", dict(_SMALL, use_qk_norm=True, logit_scale=0.5)),
    "smollm3": ("SmolLM3Config", dict(_SMALL, no_rope_layer_interval=2)),  # every second layer without RoPE
    "mixtral": ("MixtralConfig", dict(_SMALL, num_local_experts=4, num_experts_per_tok=2, router_jitter_noise=0.0)),
    "qwen2-moe": (
        "Qwen2MoeConfig",
        dict(
            _SMALL, moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2
        ),
    ),
    "phimoe": (
        "PhimoeConfig",
        dict(_SMALL, num_local_experts=4, num_experts_per_tok=2, router_jitter_noise=0.0, input_jitter_noise=0.0),
    ),  # Phi-3.5-MoE (whose router_jitter_noise is 0.01)
}
NO_SEQUENCE_CLASSIFICATION = {  # no reward or value model of these families (their PPO test uses Llama's)
    "granite": "transformers 5 has no GraniteForSequenceClassification",
    "cohere": "transformers 5 has no CohereForSequenceClassification",
}
WINDOWED = [f for f, (_, kw) in FAMILIES.items() if kw.get("sliding_window")]
FAMILY_IDS = list(FAMILIES)


def make_config(family, **overrides):
    cls, kwargs = FAMILIES[family]
    init = {"init_std": 0.2} if cls == "OPTConfig" else {"initializer_range": 0.2}
    kwargs = {**kwargs, **init, **overrides}
    return getattr(transformers, cls)(vocab_size=V, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None, **kwargs)


def make_model(config, kind="lm", seed=0):
    """A random float32 model in eval mode: the causal LM ("lm") or the one-output sequence classifier ("rm")."""
    torch.manual_seed(seed)
    if kind == "lm":
        model = AutoModelForCausalLM.from_config(config)
    else:
        config.num_labels = 1
        model = AutoModelForSequenceClassification.from_config(config)
    assert model.dtype == torch.float32
    return model.eval()


@functools.cache
def build(family, kind="lm", seed=0):
    """make_model of the family's config, built once for the whole module."""
    return make_model(make_config(family), kind, seed)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is faster, and far faster on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok(toy_base):
    tokenizer = common.load_tokenizer(toy_base)
    assert len(tokenizer) == V and tokenizer.pad_token_id == PAD and tokenizer.eos_token_id == EOS
    return tokenizer


def grads(model, scalar):
    """d scalar / d every parameter, without touching .grad."""
    return torch.autograd.grad(scalar, list(model.parameters()), materialize_grads=True)


# Tolerances (docs/tests.md, "How tolerances are chosen"). Two formulations of one float32 number differ by
# rounding, which another summation order (CPU, BLAS build, thread count) changes: a float32 sum of n terms errs
# by up to about n · eps times the terms' magnitude, which the largest value compared stands for. So each check
# allows |got − want| ≤ n · eps · max|want|, n the float32 terms behind a value, counted generously. Beside
# each n, in units of eps · max|want|: the largest error seen (every family, CPU capability, 1 or 2 threads) and
# the smallest that a bug makes (a position off by one, attention to padding, a value read one token late).
EPS = torch.finfo(torch.float32).eps  # 1.19e-7
# a token's log-probability, reward or value: the sums it goes through (2 layers of 32-unit projections,
# attention over up to 48 positions, a 64-unit MLP; then 75 logits or a 32-unit head); seen 12, bug ≥ 1e5
TOKEN_TERMS = 300
# a sequence's log-probability: the sum of up to 48 token log-probabilities, all ≤ 0, so that max|want| is
# the terms' own magnitude; seen 2.3, a wrong position ≥ 5000 (0.15 nats of 190, Granite)
SEQUENCE_TERMS = 48
# a weight's gradient: a sum over every position of the batch (up to 520) on top of a token's sums; seen 16,
# a wrong position ≥ 1e6
GRAD_TERMS = 1000


def assert_close(got, want, what, terms, scale=None):
    """|got − want| ≤ terms · eps · scale elementwise, scale max|want| unless given."""
    scale = want.abs().max().item() if scale is None else scale
    torch.testing.assert_close(got, want, atol=terms * EPS * scale, rtol=0, msg=lambda m: f"{what}: {m}")


def assert_grads_close(model, got, want, what):
    """Every parameter's gradient, on the scale of the whole gradient (its largest element over all parameters,
    not each parameter's own): a gradient that is 0 by symmetry (OPT's key bias: softmax ignores a shift of all
    scores) is rounding noise left from terms as large as the other parameters' gradients."""
    scale = max(w.abs().max().item() for w in want)
    for (name, _), g, w in zip(model.named_parameters(), got, want):
        assert_close(g, w, f"{what}: gradient of {name}", GRAD_TERMS, scale)


def alone_logps(model, ids, temperature=1.0, no_pad=False):
    """log p(ids[t + 1] | ids[: t + 1]) for every t < len(ids) − 1, from the sequence alone (a batch of one,
    no padding, no attention mask, default positions) and the full softmax over the vocabulary; `no_pad`
    excludes PAD from it (as PPO's sampling does). Returns (len(ids) − 1,)."""
    logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float() / temperature
    if no_pad:
        logits[:, PAD] = -float("inf")
    return logits.log_softmax(-1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]


def head_and_backbone(rm):
    """The scalar head and the backbone of a sequence classifier, the head found by structure (the one child
    module that is not the base model), not by the name the scripts use."""
    heads = [m for m in rm.children() if m is not rm.base_model]
    assert len(heads) == 1 and isinstance(heads[0], torch.nn.Linear) and heads[0].out_features == 1, heads
    return heads[0], rm.base_model


def alone_head(rm, ids, positions):
    """The head on the backbone's hidden states of `ids` alone, at `positions` (a slice or an index)."""
    head, backbone = head_and_backbone(rm)
    return head(backbone(input_ids=torch.tensor([ids])).last_hidden_state[0, positions])[..., 0]


def words(rng, n):
    return rng.integers(3, V, n).tolist()  # never PAD, EOS or UNK


_rng = np.random.default_rng(0)
# SFT: prompts (masked) and completions of different lengths, so rows are padded by different amounts
SFT_EXAMPLES = [
    {"input_ids": p + c, "labels": [common.IGNORE_INDEX] * len(p) + c}
    for p, c in (
        (words(_rng, 20), words(_rng, 9) + [EOS]),
        (words(_rng, 2), words(_rng, 24) + [EOS]),
        (words(_rng, 9), [EOS]),
    )
]
# DPO: a long prompt with short responses beside a short prompt with long ones (the bug report's case: at
# GPT-2's 64 positions, padding slots numbered on from a 44-token prompt run past them), a one-token
# response, a one-token prompt: prompts left-padded and responses right-padded in the prompt-once batch
PAIRS = [
    {"prompt": words(_rng, 44), "chosen": words(_rng, 3) + [EOS], "rejected": words(_rng, 2) + [EOS]},
    {"prompt": words(_rng, 3), "chosen": words(_rng, 43) + [EOS], "rejected": words(_rng, 19) + [EOS]},
    {"prompt": words(_rng, 12), "chosen": [EOS], "rejected": words(_rng, 8) + [EOS]},
    {"prompt": words(_rng, 1), "chosen": words(_rng, 1) + [EOS], "rejected": words(_rng, 5) + [EOS]},
]
assert max(len(p["prompt"]) + len(p[k]) for p in PAIRS for k in ("chosen", "rejected")) == 48
# reward: sequences ending with EOS (one is EOS alone)
RM_SEQS = [words(_rng, 29) + [EOS], words(_rng, 4) + [EOS], [EOS], words(_rng, 17) + [EOS]]
# PPO: prompts of different lengths, left-padded
QUERIES = [words(_rng, n) for n in (1, 4, 9, 15, 22, 3)]
# GRPO: groups of 2 responses (one ending, one cut; right-padded) to prompts of 1, 9 and 22 tokens (left-padded)
GROUP_PROMPTS = [p for n in (1, 9, 22) for p in [words(_rng, n)] * 2]
GROUP_RESPONSES = [words(_rng, n) + end for n, end in ((4, [EOS]), (7, []), (0, [EOS]), (12, []), (19, [EOS]), (2, []))]


# ---- 1. SFT: response-only log-probabilities ---------------------------------------------------------
@pytest.mark.parametrize("family", FAMILY_IDS)
def test_sft_labelled_nll_equals_the_full_softmax(family):
    model = build(family)
    batch = common.collate_sft(SFT_EXAMPLES, PAD)  # right-padded, prompts masked
    nll, count = sft.labelled_nll(model, batch)
    want, want_count = 0.0, 0
    for e in SFT_EXAMPLES:
        labelled = torch.tensor(e["labels"][1:]) != common.IGNORE_INDEX
        want = want - alone_logps(model, e["input_ids"])[labelled].sum()
        want_count += int(labelled.sum())
    assert count.item() == want_count
    assert_close(nll, want, f"{family}: labelled_nll", SEQUENCE_TERMS)
    assert_grads_close(model, grads(model, nll), grads(model, want), f"{family}: labelled_nll")


# ---- 2. DPO: the prompt once, concatenated, one by one -----------------------------------------------
def one_by_one(model, pairs):
    """(chosen (B,), rejected (B,)): each prompt + response alone, its response tokens' log-probabilities summed."""
    return [
        torch.stack([alone_logps(model, p["prompt"] + p[k])[len(p["prompt"]) - 1 :].sum() for p in pairs])
        for k in ("chosen", "rejected")
    ]


def weighted(chosen, rejected):
    """A scalar of all 2B log-probabilities, each with its own weight, whose gradients are compared."""
    both = torch.cat([chosen, rejected])
    return (torch.linspace(0.5, 1.5, len(both)) * both).sum()


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_dpo_prompt_once_and_concatenated_equal_one_by_one(family):
    model = build(family)
    want = one_by_one(model, PAIRS)
    want_grads = grads(model, weighted(*want))
    counts = [len(p["chosen"]) for p in PAIRS]
    shared_batch = dpo.collate_shared_prompts(PAIRS, PAD)
    assert (shared_batch["prompt_mask"] == 0).any() and (shared_batch["response_mask"] == 0).any()
    for layout, batch in (("concatenated", dpo.collate_concatenated(PAIRS, PAD)), ("prompt-once", shared_batch)):
        chosen, rejected, n = dpo.pair_logprobs(model, batch)
        assert n.tolist() == counts
        assert_close(chosen, want[0], f"{family}: {layout} chosen", SEQUENCE_TERMS)
        assert_close(rejected, want[1], f"{family}: {layout} rejected", SEQUENCE_TERMS)
        assert_grads_close(model, grads(model, weighted(chosen, rejected)), want_grads, f"{family}: {layout}")


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_dpo_prompt_once_through_lora_adapters(family):
    """The same through a LoRA model (dpo.py --lora-r) whose adapters were moved (B at random): prompt-once and
    concatenated log-probabilities equal each sequence alone, and so do the adapters' gradients (the only ones)."""
    args = SimpleNamespace(lora_r=4, lora_alpha=8.0, lora_dropout=0.0, lora_target_modules=["all-linear"])
    model = dpo.with_lora(
        make_model(make_config(family)), SimpleNamespace(**vars(args), fsdp=False, gradient_checkpointing=False)
    )
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(
        any(k in n for k in ("lora_A", "lora_B")) for n, p in model.named_parameters() if p.requires_grad
    )
    want = one_by_one(model, PAIRS)
    want_grads = torch.autograd.grad(weighted(*want), trained)
    scale = max(g.abs().max() for g in want_grads)
    for layout, batch in (
        ("concatenated", dpo.collate_concatenated(PAIRS, PAD)),
        ("prompt-once", dpo.collate_shared_prompts(PAIRS, PAD)),
    ):
        chosen, rejected, _ = dpo.pair_logprobs(model, batch)
        assert_close(chosen, want[0], f"{family}: LoRA {layout} chosen", SEQUENCE_TERMS)
        assert_close(rejected, want[1], f"{family}: LoRA {layout} rejected", SEQUENCE_TERMS)
        for g, w in zip(torch.autograd.grad(weighted(chosen, rejected), trained), want_grads):
            assert_close(g, w, f"{family}: LoRA {layout} adapter gradient", GRAD_TERMS, scale)


def test_dynamic_rope_past_its_range_depends_on_the_batch():
    """Not a property of the scripts but of dynamic NTK RoPE (transformers' dynamic_rope_update): once a batch's
    largest position id reaches max_position_embeddings, the frequencies of *every* row are rescaled for that
    batch's longest sequence, and kept (max_seq_len_cached) until a batch shorter than max_position_embeddings
    comes. A row's log-probability then depends on its batch-mates and on earlier calls: the concatenated batch
    differs from each sequence alone, and a fresh model's prompt-once pass (prompt scaled for 44 positions,
    responses for 48) from a fresh model's concatenated pass. Within range (llama-dynamic-rope above) all agree."""
    config = make_config("llama-dynamic-rope", max_position_embeddings=32)  # real sequences of up to 48 tokens
    with torch.no_grad():
        alone = torch.cat(one_by_one(make_model(config), PAIRS))
        concat = torch.cat(dpo.pair_logprobs(make_model(config), dpo.collate_concatenated(PAIRS, PAD))[:2])
        shared = torch.cat(dpo.pair_logprobs(make_model(config), dpo.collate_shared_prompts(PAIRS, PAD))[:2])
    assert (concat - alone).abs().max() > 1e-2
    assert (shared - concat).abs().max() > 1e-2
    # so dpo.py turns prompt sharing off by its stated rule past the range, and only there
    args = SimpleNamespace(gradient_checkpointing=False, max_length=48)
    assert "dynamic RoPE rescales past 32 positions" in dpo.prompt_sharing_off(config, args)
    assert dpo.prompt_sharing_off(make_config("llama-dynamic-rope"), args) is None  # 48 positions: within range
    assert dpo.prompt_sharing_off(make_config("mistral"), args) is None
    args.gradient_checkpointing = True
    assert "--gradient-checkpointing" in dpo.prompt_sharing_off(make_config("llama"), args)


# hybrid families: a recurrent layer (gated delta rule, Mamba, short convolution) beside an attention one
HYBRIDS = {
    "Qwen3NextConfig": {"linear_num_key_heads": 2, "linear_num_value_heads": 4, "num_experts": 0},
    "JambaConfig": {"attn_layer_period": 2, "attn_layer_offset": 1, "num_experts": 1, "mamba_d_state": 4},
    "Lfm2Config": {"full_attn_idxs": [1]},
}


@pytest.mark.parametrize("cls", HYBRIDS)
def test_prompt_sharing_is_off_for_recurrent_layers(cls):
    """A recurrent layer caches a state that transformers' cache cannot repeat per response (its layers lack
    batch_repeat_interleave): dpo.py and grpo.py concatenate prompt and response there, saying why, and share the
    prompt for every family of the matrix."""
    args = SimpleNamespace(gradient_checkpointing=False, max_length=48)
    config = getattr(transformers, cls)(**_SMALL, **HYBRIDS[cls])
    for script in (dpo, grpo):
        assert "recurrent layers" in script.prompt_sharing_off(config, args)
        if cls == "Lfm2Config":  # once
            assert all(script.prompt_sharing_off(make_config(family), args) is None for family in FAMILIES)


@pytest.mark.parametrize("family", WINDOWED)
def test_the_sliding_window_binds(family):
    """The windowed families' test sequences are longer than their window: the same weights with a window
    wider than every sequence give other log-probabilities (and the same ones within the window)."""
    seq = PAIRS[1]["prompt"] + PAIRS[1]["chosen"]  # 47 tokens
    wide = make_model(make_config(family, sliding_window=1000))
    with torch.no_grad():
        narrow_logps, wide_logps = alone_logps(build(family), seq), alone_logps(wide, seq)
    assert_close(narrow_logps[: WINDOW - 1], wide_logps[: WINDOW - 1], f"{family}: within the window", TOKEN_TERMS)
    assert (narrow_logps - wide_logps).abs().max() > 1e-2


# ---- 3. the reward read at the end token -------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILY_IDS)
def test_reward_is_read_at_the_end_token(family):
    if family in NO_SEQUENCE_CLASSIFICATION:
        pytest.skip(NO_SEQUENCE_CLASSIFICATION[family])
    rm = build(family, "rm", seed=1)
    assert rm.config.pad_token_id == PAD
    with torch.no_grad():
        want = torch.stack([alone_head(rm, s, -1) for s in RM_SEQS])  # the head at the EOS of each sequence alone
        ids, mask = common.pad(RM_SEQS, PAD), common.attention_mask(RM_SEQS)
        assert (mask == 0).any()
        assert_close(reward_model.rewards_at_eos(rm, ids, mask), want, f"{family}: rewards_at_eos", TOKEN_TERMS)
        for side in ("right", "left"):  # PPO scores left-padded prompts + right-padded responses
            ids, mask = common.pad(RM_SEQS, PAD, side), common.attention_mask(RM_SEQS, side)
            scores = ppo.token_scores(rm, ids, mask, (mask.cumsum(1) - 1).clamp(min=0))  # (B, L)
            last = mask.sum(1) - 1 if side == "right" else torch.full((len(RM_SEQS),), mask.shape[1] - 1)
            got = scores[torch.arange(len(RM_SEQS)), last]
            assert_close(got, want, f"{family}: token_scores, {side} padding", TOKEN_TERMS)


# ---- 4. PPO: the rollout against sequences alone; ratio 1 at the first update ------------------------
def set_eos_rate(model, p=0.15, temperature=0.7):
    """Make the model give EOS probability `p` at every position when sampled at `temperature` with PAD
    suppressed (its EOS logit set from the others, in a forward hook that every pass of the model goes
    through: batched or alone, in generate or not), so that responses end at different lengths in every family."""

    def hook(module, inputs, out):
        x = out.logits  # (..., V)
        eos = temperature * (torch.logsumexp(x[..., EOS + 1 :] / temperature, -1) + math.log(p / (1 - p)))
        out.logits = torch.cat([x[..., :EOS], eos[..., None], x[..., EOS + 1 :]], -1)
        return out

    model.register_forward_hook(hook)
    return model


@functools.cache
def ppo_models(family):
    """(policy, reference, reward model, value model), each with its own seed; a family without a sequence
    classifier gets Llama's reward and value models (same tokenizer)."""
    rm_family = "llama" if family in NO_SEQUENCE_CLASSIFICATION else family
    return (
        set_eos_rate(build(family, seed=10)),
        set_eos_rate(build(family, seed=11)),
        build(rm_family, "rm", seed=12),
        build(rm_family, "rm", seed=13),
    )


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_ppo_rollout_matches_sequences_alone_and_first_ratio_is_one(family, tok):
    policy, ref, rm, value = ppo_models(family)
    agent = ppo.PolicyAndValue(policy, value)
    n = len(QUERIES)
    args = ppo.Args(generation_batch_size=n, rollout_forward_batch_size=n, response_length=12, temperature=0.7)
    values_of = lambda **inputs: ppo.token_scores(value, **inputs)
    r = ppo.rollout(policy, ref, rm, QUERIES, tok, args, torch.device("cpu"), seed=0, value_fn=values_of)
    mask, Lq = r.mask, r.queries.shape[1]
    assert (r.query_mask == 0).any() and (~mask).any()  # left-padded prompts; right-padded responses
    want = {"logprobs": [], "ref_logprobs": [], "values": [], "scores": []}
    with torch.no_grad():  # every row against its sequence alone
        for q, row, row_mask in zip(QUERIES, r.responses, mask):
            resp = row[row_mask].tolist()
            seq = q + resp
            assert PAD not in resp
            for model, key in ((policy, "logprobs"), (ref, "ref_logprobs")):
                want[key].append(alone_logps(model, seq, args.temperature, no_pad=True)[len(q) - 1 :])
            want["values"].append(alone_head(value, seq, slice(len(q) - 1, -1)))
            want["scores"].append(alone_head(rm, seq, -1)[None])
    for key, rows in want.items():  # every row at once: (valid tokens,) in mask's row-major order, or (B,)
        got = getattr(r, key) if key == "scores" else getattr(r, key)[mask]
        assert_close(got, torch.cat(rows), f"{family}: rollout {key}", TOKEN_TERMS)
    # the update's recomputation, as ppo.py's update does it: train mode, with gradients
    agent.train()
    try:
        logits, values, _ = agent(**ppo.model_inputs(r.queries, r.query_mask, r.responses, mask))
        logprobs, _ = ppo.logprobs_and_entropy(logits, r.responses[mask], args.temperature, PAD)
    finally:
        agent.eval()
    assert logprobs.requires_grad
    # ratio 1: log π of the update equals the rollout's (the log-ratio is 0) up to rounding
    assert_close(logprobs.detach(), r.logprobs[mask], f"{family}: first minibatch log-ratio", TOKEN_TERMS)
    assert_close(values.detach()[:, Lq - 1 : -1][mask], r.values[mask], f"{family}: the update's values", TOKEN_TERMS)


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_grpo_prompt_once_per_group_equals_one_by_one(family):
    """grpo.policy_logits, the update's pass: with G = 2 (each prompt once, its last position predicting the first
    response token, both responses on its cache; a one-token prompt among them) and G = 1 (concatenated), every
    valid token's log-probability equals its sequence alone, and so do the gradients."""
    model = build(family)
    batch = common.collate_prompts(GROUP_PROMPTS, PAD)
    responses = common.pad(GROUP_RESPONSES, PAD)  # (B, T)
    mask = torch.arange(responses.shape[1]) < torch.tensor([len(r) for r in GROUP_RESPONSES])[:, None]
    alone = [alone_logps(model, q + r)[len(q) - 1 :] for q, r in zip(GROUP_PROMPTS, GROUP_RESPONSES)]
    want = torch.cat(alone)
    weights = torch.linspace(0.5, 1.5, len(want))
    want_grads = grads(model, (weights * want).sum())
    for G in (1, 2):
        logits = grpo.policy_logits(model, batch["input_ids"], batch["attention_mask"], responses, mask, G)
        got = logits.float().log_softmax(-1).gather(1, responses[mask][:, None])[:, 0]
        assert_close(got, want, f"{family}: G = {G}", TOKEN_TERMS)
        assert_grads_close(model, grads(model, (weights * got).sum()), want_grads, f"{family}: G = {G}")


# ---- 5. dropout-like config keys -----------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILY_IDS)
def test_without_dropout_makes_train_mode_equal_eval_mode(family):
    """PPO's ratio 1 at the first minibatch (rollout in eval mode, update in train mode) and DPO's π = π_ref need a
    train-mode forward equal to the eval-mode one. Every float config key named like a source of noise (drop,
    noise, jitter) is set to 0.5: the train-mode forward is then random (the test can fail), and after
    common.without_dropout, which the scripts apply, two train-mode passes and an eval-mode one agree."""
    config = make_config(family)
    noisy = [
        k
        for k, v in config.to_dict().items()
        if isinstance(v, float) and any(s in k for s in ("drop", "noise", "jitter"))
    ]
    for k in noisy:
        setattr(config, k, 0.5)
    ids = torch.tensor([PAIRS[1]["prompt"] + PAIRS[1]["chosen"]])

    def spread():
        """The largest difference between two train-mode passes and an eval-mode one."""
        model = make_model(config).train()
        with torch.no_grad():
            a, b, c = model(input_ids=ids).logits, model(input_ids=ids).logits, model.eval()(input_ids=ids).logits
        return max((a - b).abs().max(), (a - c).abs().max()).item()

    assert not noisy or spread() > 1e-3
    common.without_dropout(config)
    assert spread() == 0, f"{family}: train mode differs from eval mode after zeroing {noisy}"


# ---- 6. every script through its command line on GPT-2 (learned positions, dropout in its config) ----------
def test_every_script_runs_on_gpt2(tmp_path, toy_base):
    """One step of each script on GPT-2 (32 positions, dropout 0.1 in its config) from sft.py onwards: the reward
    model; PPO, whose first minibatch has ratio 1 (the dropout zeroed); DPO on pairs of a long prompt and a short
    response beside a short prompt and a long response (padding given in-range positions), each prompt run
    once, and with --gradient-checkpointing (sharing turned off by its rule) the same step concatenated."""
    from conftest import assert_same_weights, result_of, run_script, toy_data_file, write_jsonl

    base = str(tmp_path / "gpt2")
    config = transformers.GPT2Config(
        vocab_size=V,
        n_positions=32,
        n_embd=32,
        n_layer=2,
        n_head=2,
        pad_token_id=PAD,
        eos_token_id=EOS,
        bos_token_id=None,
    )
    make_model(config).save_pretrained(base)
    common.load_tokenizer(toy_base).save_pretrained(base)
    data = {k: toy_data_file(tmp_path / f"{k}.jsonl", k, 48) for k in ("sft", "preference", "prompt")}
    (tmp_path / "pairs").mkdir()
    long = "the plot was very dull and the acting was quite weak but the music was simply wonderful and the"
    pairs = [
        {"prompt": long, "chosen": " cast", "rejected": " film"},
        {"prompt": "the", "chosen": " " + long.replace("the", "a"), "rejected": " film was dull"},
    ]
    write_jsonl(tmp_path / "pairs" / "train.jsonl", pairs * 8)
    write_jsonl(tmp_path / "pairs" / "test.jsonl", pairs)
    sft_dir, rm_dir = str(tmp_path / "sft"), str(tmp_path / "rm")
    short = ["--num-epochs", "0.2", "--max-length", "32", "--batch-size", "8"]
    run_script(["sft.py", "--model-name", base, "--dataset-name", data["sft"], "--output-dir", sft_dir, *short])
    rm = ["reward_model.py", "--model-name", sft_dir, "--dataset-name", data["preference"], "--output-dir", rm_dir]
    run_script(rm + short)
    ppo = ["ppo.py", "--model-name", sft_dir, "--reward-model-name", rm_dir, "--dataset-name", data["prompt"]]
    run_script(
        ppo + ["--num-minibatches", "1", "--response-length", "24", "--output-dir", str(tmp_path / "ppo"), *short]
    )
    assert result_of(tmp_path / "ppo")["policy/first_minibatch_ratio"] == pytest.approx(1.0, abs=1e-6)
    dpo = [
        "dpo.py",
        "--model-name",
        sft_dir,
        "--dataset-name",
        str(tmp_path / "pairs"),
        "--learning-rate",
        "1e-3",
        "--batch-size",
        "16",
        "--max-length",
        "32",
    ]
    assert "each prompt run once" in run_script(dpo + ["--output-dir", str(tmp_path / "shared")])
    out = run_script(dpo + ["--gradient-checkpointing", "--output-dir", str(tmp_path / "concatenated")])
    assert "--share-prompt is off: --gradient-checkpointing" in out
    assert_same_weights(str(tmp_path / "shared"), str(tmp_path / "concatenated"), sft_dir)
