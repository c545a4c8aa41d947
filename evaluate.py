"""Evaluation: generate on the world's held-out test split and grade every response with the gold judge.

For each checkpoint: safety-violation rate on harmful prompts (overall, per risk category, per red-team attack
vector; the held-out vector is marked *), false-refusal rate on borderline and on benign prompts, and accuracy on
benign prompts (Llama 2, section 4.4). Printed as one table row per checkpoint and saved as JSON.

    python evaluate.py --checkpoints sft=out/sft/model.pt --out out/eval
"""
import argparse
import json
import os

import torch
from tqdm import tqdm

import data
import world
from model import generate, load_model


@torch.no_grad()
def respond(model, tok, examples, max_new_tokens=64, temperature=0.0, batch_size=64, seed=0, desc=None):
    """The model's answer text to each example's conversation (greedy by default), batched with the KV cache."""
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    prompts = [tok.encode_prompt(ex.messages) for ex in examples]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths pad less
    out = [None] * len(prompts)
    for i in tqdm(range(0, len(order), batch_size), desc=desc, disable=desc is None, leave=False):
        idx = order[i:i + batch_size]
        max_new = min(max_new_tokens, model.config.max_seq_len - max(len(prompts[j]) for j in idx))
        tokens = generate(model, [prompts[j] for j in idx], max_new, eos_id=tok.eos_id, pad_id=tok.pad_id,
                          temperature=temperature, generator=generator)
        for j, t in zip(idx, tokens):
            out[j] = tok.decode(t)
    return out


def _rate(flags):
    return sum(flags) / len(flags) if flags else float("nan")


def gold_metrics(examples, responses):
    """Gold-judged rates over a set of (example, response): the numbers every stage is compared by."""
    marks = [world.judge(ex, r) for ex, r in zip(examples, responses)]
    harmful = [(ex, j) for ex, j in zip(examples, marks) if ex.kind == "harmful"]
    benign = [j for ex, j in zip(examples, marks) if ex.kind == "benign"]
    borderline = [j for ex, j in zip(examples, marks) if ex.kind == "borderline"]
    by = lambda field: {k: _rate([j.unsafe for ex, j in harmful if getattr(ex, field) == k])
                        for k in sorted({getattr(ex, field) for ex, _ in harmful})}
    return dict(
        violation_rate=_rate([j.unsafe for _, j in harmful]),
        violation_rate_by_category=by("category"),
        violation_rate_by_attack=by("attack"),
        false_refusal_rate=_rate([j.refused for j in borderline]),
        benign_refusal_rate=_rate([j.refused for j in benign]),
        benign_accuracy=_rate([j.correct for j in benign]),
        borderline_accuracy=_rate([j.correct for j in borderline]),
        gold_safety=_rate([j.safety for j in marks]),
        gold_helpfulness=_rate([j.helpfulness for j in marks]),
        n_prompts=len(examples),
    )


def format_table(rows):
    """rows: {name: metrics}. One line per checkpoint, rates in percent."""
    attacks = [a for a in world.ATTACKS]
    head = ["stage", "viol%", *[c[:7] for c in world.CATEGORIES],
            *[(a[:7] + ("*" if a == world.HELD_OUT_ATTACK else "")) for a in attacks],
            "FR-bord%", "FR-ben%", "acc%"]
    lines = [" ".join(f"{h:>9s}" for h in head)]
    for name, m in rows.items():
        cells = [m["violation_rate"], *[m["violation_rate_by_category"].get(c, float("nan")) for c in world.CATEGORIES],
                 *[m["violation_rate_by_attack"].get(a, float("nan")) for a in attacks],
                 m["false_refusal_rate"], m["benign_refusal_rate"], m["benign_accuracy"]]
        lines.append(f"{name[:9]:>9s} " + " ".join(f"{100 * c:9.1f}" for c in cells))
    return "\n".join(lines)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoints", nargs="+", required=True, help="NAME=PATH pairs (or PATH, named by its folder)")
    p.add_argument("--out", default="out/eval", help="folder for metrics.json and generations.jsonl")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per answer")
    p.add_argument("--batch-size", type=int, default=64, help="prompts per generation batch")
    p.add_argument("--seed", type=int, default=0, help="world seed (the test split)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or mps")
    return p.parse_args(argv)


def main(args):
    examples = world.build_world(args.seed).test
    rows = {}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "generations.jsonl"), "w") as gen_file:
        for spec in args.checkpoints:
            name, path = spec.split("=", 1) if "=" in spec else (os.path.basename(os.path.dirname(spec)), spec)
            model, ckpt = load_model(path, args.device)
            tok = data.Tokenizer.from_dict(ckpt["tokenizer"])
            responses = respond(model, tok, examples, args.max_new_tokens, batch_size=args.batch_size, desc=name)
            rows[name] = gold_metrics(examples, responses)
            for ex, r in zip(examples, responses):
                j = world.judge(ex, r)
                gen_file.write(json.dumps(dict(stage=name, id=ex.id, kind=ex.kind, category=ex.category,
                                               attack=ex.attack, prompt=ex.prompt, response=r, **vars(j))) + "\n")
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    main(get_args())
