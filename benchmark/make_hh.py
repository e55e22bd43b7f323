"""Anthropic's HH-RLHF (Bai et al. 2022) as preference data in TRL's conversational format: a prompt of
messages, then the chosen and the rejected assistant turn. From the public repository (nothing is downloaded
here; most of its files are Git LFS pointers, harmless-base/test.jsonl.gz is real data):

    git clone https://github.com/anthropics/hh-rlhf /tmp/hh-rlhf
    python benchmark/make_hh.py /tmp/hh-rlhf/harmless-base/test.jsonl.gz runs/data/hh [MAX_CHARS]

Keeps pairs whose two conversations share every turn but the last assistant turn, whose two last turns
differ, and whose prompt + longer response has at most MAX_CHARS characters (default 1,000, about 250
tokens, so that no side truncates); shuffles them with seed 0 and writes the first 256 to test.jsonl,
the rest to train.jsonl."""

import gzip
import json
import os
import random
import re
import sys

NUM_TEST = 256


def messages(text):
    """ "\\n\\nHuman: a\\n\\nAssistant: b ..." -> [{"role": "user", "content": "a"}, ...], or None if the turns
    do not alternate from a human turn to an assistant turn."""
    parts = re.split(r"\n\n(Human|Assistant): ", text)
    roles, contents = parts[1::2], [c.strip() for c in parts[2::2]]
    expected = ["Human", "Assistant"] * (len(roles) // 2)
    if parts[0].strip() or not roles or roles != expected or not all(contents):
        return None
    return [{"role": "user" if r == "Human" else "assistant", "content": c} for r, c in zip(roles, contents)]


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit("usage: python benchmark/make_hh.py HH_FILE.jsonl.gz OUT_FOLDER [MAX_CHARS]")
    source, out = sys.argv[1:3]
    max_chars = int(sys.argv[3]) if len(sys.argv) > 3 else 1000
    with open(source, "rb") as f:
        if f.read(7) == b"version":  # a Git LFS pointer, not the data
            raise SystemExit(f"{source} is a Git LFS pointer; use a file with the data (harmless-base/test.jsonl.gz)")
    rows, skipped = [], 0
    with gzip.open(source, "rt", encoding="utf-8") as f:
        for line in f:
            pair = json.loads(line)
            chosen, rejected = messages(pair["chosen"]), messages(pair["rejected"])
            if chosen is None or rejected is None or chosen[:-1] != rejected[:-1] or chosen[-1] == rejected[-1]:
                skipped += 1
                continue
            size = sum(len(m["content"]) for m in chosen[:-1]) + max(
                len(chosen[-1]["content"]), len(rejected[-1]["content"])
            )
            if size > max_chars:
                skipped += 1
                continue
            rows.append({"prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:]})
    random.Random(0).shuffle(rows)
    os.makedirs(out, exist_ok=True)
    for split, part in (("test", rows[:NUM_TEST]), ("train", rows[NUM_TEST:])):
        with open(os.path.join(out, f"{split}.jsonl"), "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in part)
    print(f"wrote {out}/train.jsonl ({len(rows) - NUM_TEST} pairs) and test.jsonl ({NUM_TEST}); skipped {skipped}")
