"""The embedded default task: a synthetic film-review language with a hidden gold reward.

Our CartPole. A first-order Markov chain over ~70 review words plays the reference language
model P_ref; a gold reward that sums over the response's word-to-word transitions plays the
human. Because both are known exactly, everything an alignment method aims for can be computed
exactly instead of estimated:

* `ref_logprob(prompt, response)`: log P_ref(response | prompt), the response's words then EOS;
* `gold_reward(prompts, responses)`: r(x, y) = sum_t g(w_{t-1}, w_t), w_0 the last prompt word,
  g = sentiment(w_t) - REPEAT_PENALTY * [w_t == w_{t-1}], and g = 0 for EOS;
* `entropy_floor(prompts)`: the per-token cross-entropy a perfect SFT model reaches on P_ref samples;
* `optimal_frontier(prompts, betas)`: expected gold reward and KL(pi*_beta || P_ref) of the
  KL-regularised optimum pi*_beta(y|x) ∝ P_ref(y|x) exp(r(x,y)/beta) (DPO paper, eq. 4), the
  policy that PPO and DPO aim for, by backward dynamic programming over (position, last word).

A response has at most `max_response_tokens` tokens counting its EOS; one that reaches the cap
without EOS is cut there (its probability is that of its words alone). Prompts and responses
are strings of space-separated words (dataset responses start with a space, so that
prompt + response is the whole text).

    python toy_task.py      # samples, the entropy floor, Bayes accuracy, the optimal frontier
"""

import math
import os
import zlib
from dataclasses import dataclass

import numpy as np

MAX_RESPONSE_TOKENS = 24
"""default cap on response tokens, EOS included"""
REPEAT_PENALTY = 1.5
"""gold reward lost when a word repeats the word just before it"""
UNIFORM_FLOOR = 0.05
"""share of every transition row spread uniformly over all words and EOS: keeps every transition
probability >= 0.05/71, so KLs to P_ref stay finite and meaningful"""
PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
EVAL_PROMPT_SHARE = 5
"""one prompt in EVAL_PROMPT_SHARE (by a stable hash of its text) belongs to the eval split"""
DEFAULT_SIZES = {"sft": (50_000, 2_000), "preference": (30_000, 2_000), "prompt": (50_000, 1_000)}
"""(train, eval) examples of each toy dataset kind"""

# Word classes of the grammar. Sentiment: +1 for POSITIVE, -1 for NEGATIVE, 0 for the rest.
CLASSES = {
    "det": ["the", "this", "a", "its", "every"],
    "noun": [
        "film",
        "movie",
        "plot",
        "acting",
        "story",
        "script",
        "cast",
        "ending",
        "music",
        "director",
        "dialogue",
        "pacing",
        "camera",
        "characters",
        "soundtrack",
        "humour",
        "performances",
        "scenes",
        "visuals",
        "lead",
    ],
    "verb": ["was", "is", "felt", "seemed", "looked", "sounded", "became", "remained"],
    "adv": ["very", "quite", "rather", "really", "so", "too", "truly", "mostly", "simply", "oddly"],
    "pos": [
        "wonderful",
        "great",
        "brilliant",
        "superb",
        "moving",
        "charming",
        "funny",
        "beautiful",
        "clever",
        "gripping",
        "delightful",
        "stunning",
    ],
    "neg": [
        "dull",
        "boring",
        "awful",
        "terrible",
        "weak",
        "clumsy",
        "bland",
        "tedious",
        "predictable",
        "messy",
        "flat",
        "silly",
    ],
    "conj": ["and", "but", "while", "yet", "although"],
}
# Next-class probabilities given the current word's class ("eos" ends the response). They make
# text read like reviews: "the acting was wonderful but the plot dull".
GRAMMAR = {
    "start": {"det": 0.8, "noun": 0.1, "adv": 0.1},
    "det": {"noun": 0.8, "pos": 0.1, "neg": 0.1},
    "noun": {"verb": 0.65, "conj": 0.1, "pos": 0.05, "neg": 0.05, "eos": 0.15},
    "verb": {"adv": 0.3, "pos": 0.3, "neg": 0.3, "det": 0.1},
    "adv": {"pos": 0.45, "neg": 0.45, "adv": 0.1},
    "pos": {"conj": 0.35, "noun": 0.1, "eos": 0.55},
    "neg": {"conj": 0.35, "noun": 0.1, "eos": 0.55},
    "conj": {"det": 0.7, "adv": 0.1, "pos": 0.1, "neg": 0.1},
}
WORDS = [w for ws in CLASSES.values() for w in ws]
"""the vocabulary, special tokens excluded"""
SENTIMENT = {w: (1 if c == "pos" else -1 if c == "neg" else 0) for c, ws in CLASSES.items() for w in ws}


def _log_softmax_rows(x):
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


@dataclass
class ToyTask:
    """A Markov-chain language: `words` (V of them), `sentiment` (V,), `trans` (V, V+1) rows of
    P(next | word) whose last column is EOS, `start` (V,) the first prompt word's distribution."""

    words: list
    sentiment: np.ndarray
    trans: np.ndarray
    start: np.ndarray
    repeat_penalty: float = REPEAT_PENALTY

    def __post_init__(self):
        V = len(self.words)
        assert self.trans.shape == (V, V + 1) and np.allclose(self.trans.sum(1), 1), "rows must sum to 1"
        assert np.all(self.trans > 0), "every transition needs positive probability"
        self.index = {w: i for i, w in enumerate(self.words)}
        self.eos = V  # EOS is column V of `trans`
        # g[i, j]: gold reward of the transition word i -> next j (j = V is EOS and earns 0)
        self.g = np.zeros((V, V + 1))
        self.g[:, :V] = self.sentiment[None, :] - self.repeat_penalty * np.eye(V)
        self.log_trans = np.log(self.trans)

    # ---- strings <-> word ids -------------------------------------------------------------
    def ids(self, text):
        try:
            return [self.index[w] for w in text.split()]
        except KeyError as e:
            raise ValueError(f"{e.args[0]!r} is not a word of the toy task") from None

    def last_word(self, prompt):
        ids = self.ids(prompt)
        if not ids:
            raise ValueError("a toy prompt needs at least one word")
        return ids[-1]

    # ---- exact quantities -------------------------------------------------------------------
    def ref_logprob(self, prompt, response, max_response_tokens=MAX_RESPONSE_TOKENS):
        """log P_ref(response | prompt): its words, then EOS. A response of exactly
        `max_response_tokens` words was cut at the cap and has no EOS factor; with
        `max_response_tokens=None` there is no cap and EOS is always counted."""
        prev, ys = self.last_word(prompt), self.ids(response)
        if max_response_tokens is not None and len(ys) > max_response_tokens:
            raise ValueError(f"response has {len(ys)} words, over the cap of {max_response_tokens}")
        lp = 0.0
        for y in ys:
            lp += self.log_trans[prev, y]
            prev = y
        if max_response_tokens is None or len(ys) < max_response_tokens:
            lp += self.log_trans[prev, self.eos]
        return float(lp)

    def gold_reward(self, prompt, response):
        """r(x, y) = sum over the response's transitions of sentiment(w_t) - penalty * [w_t == w_{t-1}]."""
        prev, r = self.last_word(prompt), 0.0
        for y in self.ids(response):
            r += self.g[prev, y]
            prev = y
        return float(r)

    def _prompt_weights(self, prompts):
        """(V,) share of the prompts ending in each word: every exact quantity depends on the prompt
        only through its last word (the chain is first order)."""
        counts = np.bincount([self.last_word(p) for p in prompts], minlength=len(self.words))
        return counts / counts.sum()

    def _soft_values(self, beta, T):
        """Backward pass. logZ[t, w] = log sum over completions y from `t` tokens emitted with last
        word w of P_ref(y) exp(r(y)/beta); a response that has emitted T tokens is cut (logZ = 0).
        Returns logZ (T+1, V) and the optimal policy's log-probabilities logpi (T, V, V+1)."""
        V = len(self.words)
        logZ = np.zeros((T + 1, V))
        logpi = np.zeros((T, V, V + 1))
        for t in range(T - 1, -1, -1):
            cont = np.concatenate([logZ[t + 1], [0.0]])  # value after each next token; EOS ends it (log 1)
            scores = self.log_trans + self.g / beta + cont[None, :]  # (V, V+1)
            logpi[t] = _log_softmax_rows(scores)
            m = scores.max(1)
            logZ[t] = m + np.log(np.exp(scores - m[:, None]).sum(1))
        return logZ, logpi

    def _forward(self, logpi, weights):
        """Forward pass of the policy given by logpi (T, V, V+1) from the prompt-word distribution
        `weights`: expected total reward, KL to P_ref, entropy and token count (EOS included)."""
        T = logpi.shape[0]
        pi = np.exp(logpi)
        alive = weights.copy()  # (V,) probability of still generating, with this last word, at step t
        reward = kl = entropy = tokens = 0.0
        for t in range(T):
            tokens += alive.sum()
            reward += alive @ (pi[t] * self.g).sum(1)
            kl += alive @ (pi[t] * (logpi[t] - self.log_trans)).sum(1)
            entropy += alive @ -(pi[t] * logpi[t]).sum(1)
            alive = alive @ pi[t][:, : len(self.words)]
        return reward, kl, entropy, tokens

    def entropy_floor(self, prompts, max_response_tokens=MAX_RESPONSE_TOKENS):
        """Per-token cross-entropy (nats) a perfect model reaches on P_ref's responses to `prompts`:
        expected total response entropy / expected response tokens, EOS included. This is what a
        token-averaged SFT loss converges to."""
        T = max_response_tokens
        logpi = np.broadcast_to(self.log_trans, (T,) + self.log_trans.shape)
        _, _, entropy, tokens = self._forward(logpi, self._prompt_weights(prompts))
        return entropy / tokens

    def optimal_frontier(self, prompts, betas, max_response_tokens=MAX_RESPONSE_TOKENS):
        """[(beta, kl, reward)]: for each beta, the exact KL(pi*_beta || P_ref) and expected gold
        reward of pi*_beta(y|x) ∝ P_ref(y|x) exp(r(x,y)/beta), averaged over `prompts`. Sequence
        level: KL in nats per response. beta = inf gives P_ref itself (KL 0)."""
        w = self._prompt_weights(prompts)
        out = []
        for beta in betas:
            if math.isinf(beta):
                logpi = np.broadcast_to(self.log_trans, (max_response_tokens,) + self.log_trans.shape)
            else:
                _, logpi = self._soft_values(beta, max_response_tokens)
            reward, kl, _, _ = self._forward(logpi, w)
            out.append((beta, max(kl, 0.0), reward))
        return out

    # ---- sampling ---------------------------------------------------------------------------
    def _sample_next(self, rng, rows):
        """Sample one next token for each row of `rows` (n, K) of probabilities."""
        u = rng.random(len(rows))[:, None]
        return np.minimum((rows.cumsum(1) < u).sum(1), rows.shape[1] - 1)

    def sample_prompts(self, rng, n, split):
        """n prompts of 2-6 words drawn from the chain (EOS excluded), all from `split`."""
        assert split in ("train", "eval")
        V, out = len(self.words), []
        no_eos = self.trans[:, :V] / self.trans[:, :V].sum(1, keepdims=True)
        while len(out) < n:
            m = 2 * (n - len(out)) + 16
            lengths = rng.integers(2, 7, size=m)
            cur = self._sample_next(rng, np.broadcast_to(self.start, (m, V)))
            seqs = [cur]
            for _ in range(5):
                cur = self._sample_next(rng, no_eos[cur])
                seqs.append(cur)
            seqs = np.stack(seqs, 1)
            for row, L in zip(seqs, lengths):
                p = " ".join(self.words[i] for i in row[:L])
                if (zlib.crc32(p.encode()) % EVAL_PROMPT_SHARE == 0) == (split == "eval"):
                    out.append(p)
        return out[:n]

    def sample_responses(self, rng, prompts, max_response_tokens=MAX_RESPONSE_TOKENS):
        """One P_ref response per prompt: words until EOS, cut at `max_response_tokens` tokens."""
        n = len(prompts)
        cur = np.array([self.last_word(p) for p in prompts], dtype=np.int64)
        tokens = np.full((n, max_response_tokens), -1)  # word ids; -1 after the end
        alive = np.ones(n, bool)
        for t in range(max_response_tokens):
            nxt = self._sample_next(rng, self.trans[cur])
            alive &= nxt != self.eos
            tokens[alive, t] = nxt[alive]
            cur = np.where(alive, nxt, 0)
        return [" ".join(self.words[i] for i in row if i >= 0) for row in tokens]


def build_task(seed=0, concentration=0.5):
    """The default chain: grammar class transitions, Dirichlet(concentration) word preferences
    inside each class (different for every word), mixed with UNIFORM_FLOOR of uniform."""
    rng = np.random.default_rng(seed)
    V = len(WORDS)
    cls_of = {w: c for c, ws in CLASSES.items() for w in ws}

    def row(cls_probs):
        r = np.zeros(V + 1)
        for c, p in cls_probs.items():
            if c == "eos":
                r[V] += p
            else:
                idx = [WORDS.index(w) for w in CLASSES[c]]
                r[idx] += p * rng.dirichlet(np.full(len(idx), concentration))
        return (1 - UNIFORM_FLOOR) * r + UNIFORM_FLOOR / (V + 1)

    trans = np.stack([row(GRAMMAR[cls_of[w]]) for w in WORDS])
    start = row(GRAMMAR["start"])[:V]
    start = start / start.sum()
    return ToyTask(list(WORDS), np.array([SENTIMENT[w] for w in WORDS], float), trans, start)


TASK = build_task()
ref_logprob = TASK.ref_logprob


def gold_reward(prompts, completions, **columns):
    """The exact gold reward as a reward function (grpo.py, ppo.py: --reward-fn toy_task:gold_reward): a list of
    r(x, y) for the (prompt, completion) pairs, strings; a verifiable reward, with nothing learned."""
    return [TASK.gold_reward(p, c) for p, c in zip(prompts, completions)]


entropy_floor = TASK.entropy_floor
optimal_frontier = TASK.optimal_frontier


# ---- datasets -----------------------------------------------------------------------------------
def _split_seed(seed, split, kind):
    return [seed, ["train", "eval"].index(split), ["sft", "preference", "prompt"].index(kind)]


def make_dataset(kind, split="train", num_examples=None, seed=0, task=TASK):
    """A `datasets.Dataset` of the toy task. kind: "sft" (prompt, completion: P_ref samples),
    "preference" (prompt, chosen, rejected: two P_ref samples labelled by a Bradley-Terry annotator,
    P(a > b) = sigmoid(r_a - r_b)), or "prompt" (prompt). Train and eval prompts are disjoint."""
    import datasets  # imported here so the exact quantities need only numpy

    if kind not in DEFAULT_SIZES:
        raise ValueError(f"unknown toy dataset kind {kind!r}; expected one of {list(DEFAULT_SIZES)}")
    n = num_examples or DEFAULT_SIZES[kind][split == "eval"]
    rng = np.random.default_rng(_split_seed(seed, split, kind))
    prompts = task.sample_prompts(rng, n, split)
    if kind == "prompt":
        return datasets.Dataset.from_dict({"prompt": prompts})
    a = task.sample_responses(rng, prompts)
    # responses carry a leading space: prompt + response is the text (scripts tokenize it as one string)
    if kind == "sft":
        return datasets.Dataset.from_dict({"prompt": prompts, "completion": [" " + y for y in a]})
    b = task.sample_responses(rng, prompts)
    same = [i for i in range(n) if a[i] == b[i]]
    while same:  # a pair of identical responses carries no preference: redraw the second
        for i, y in zip(same, task.sample_responses(rng, [prompts[i] for i in same])):
            b[i] = y
        same = [i for i in same if a[i] == b[i]]
    ra = np.array([task.gold_reward(p, y) for p, y in zip(prompts, a)])
    rb = np.array([task.gold_reward(p, y) for p, y in zip(prompts, b)])
    a_wins = rng.random(n) < 1 / (1 + np.exp(-(ra - rb)))
    chosen = [x if w else y for x, y, w in zip(a, b, a_wins)]
    rejected = [y if w else x for x, y, w in zip(a, b, a_wins)]
    return datasets.Dataset.from_dict(
        {"prompt": prompts, "chosen": [" " + y for y in chosen], "rejected": [" " + y for y in rejected]}
    )


def bayes_accuracy(pairs, task=TASK):
    """Accuracy a perfect reward model reaches on these pairs against the Bradley-Terry annotator's
    labels, in expectation over its noise: mean of sigmoid(|r_chosen - r_rejected|)."""
    d = np.array(
        [
            task.gold_reward(p, c) - task.gold_reward(p, r)
            for p, c, r in zip(pairs["prompt"], pairs["chosen"], pairs["rejected"])
        ]
    )
    return float(np.mean(1 / (1 + np.exp(-np.abs(d)))))


# ---- tokenizer and model config, saved like a Hub model -----------------------------------------
MODEL_CONFIG = {
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 64,
    "tie_word_embeddings": True,
}
"""a ~0.9M-parameter Llama: big enough to learn the chain, small enough to train on a CPU in minutes"""


def make_tokenizer():
    """The toy task's word-level tokenizer: one token per word, PAD and EOS distinct, no BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate([PAD, EOS, UNK] + WORDS)}, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins word tokens with single spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK)


def make_base_model(seed=0):
    """A randomly initialised (torch seed `seed`) tiny Llama over `make_tokenizer`'s vocabulary, whose
    config and generation config declare its PAD (id 0) and EOS (id 1), and no BOS."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(
        LlamaConfig(vocab_size=len(WORDS) + 3, pad_token_id=0, eos_token_id=1, bos_token_id=None, **MODEL_CONFIG)
    )


def save_base_model(path, seed=0):
    """Write `make_tokenizer()` and `make_base_model(seed)` to `path` with `save_pretrained`, so that
    training loads them like any Hub model. Returns `path`."""
    os.makedirs(path, exist_ok=True)
    make_tokenizer().save_pretrained(path)
    make_base_model(seed).save_pretrained(path)
    return path


if __name__ == "__main__":
    rng = np.random.default_rng(0)
    prompts = TASK.sample_prompts(rng, 6, "train")
    print("P_ref samples (gold reward, log P_ref):")
    for p, y in zip(prompts, TASK.sample_responses(rng, prompts)):
        print(f"  [{p}] {y} <eos>   r={TASK.gold_reward(p, y):+.1f}  logp={ref_logprob(p, y):.2f}")
    sft = make_dataset("sft", "train")
    floor = entropy_floor(sft["prompt"])
    lengths = np.array([len(c.split()) for c in sft["completion"]])
    print(
        f"\nSFT train: {len(sft)} examples, mean response {lengths.mean():.2f} words, "
        f"{np.mean(lengths == MAX_RESPONSE_TOKENS):.2%} cut at the cap"
    )
    print(f"entropy floor of the SFT loss: {floor:.4f} nats/token")
    for split in ("train", "eval"):
        pairs = make_dataset("preference", split)
        print(f"preference {split}: {len(pairs)} pairs, Bayes-optimal accuracy {bayes_accuracy(pairs):.4f}")
    eval_prompts = make_dataset("prompt", "eval")["prompt"]
    print("\noptimal frontier on the eval prompts (pi*_beta ∝ P_ref exp(r / beta)):")
    print(f"{'beta':>8} {'KL (nats)':>10} {'gold reward':>12}")
    for beta, kl, r in optimal_frontier(eval_prompts, [math.inf, 4, 2, 1, 0.5, 0.25, 0.1, 0.05]):
        print(f"{beta:>8} {kl:>10.3f} {r:>12.3f}")
