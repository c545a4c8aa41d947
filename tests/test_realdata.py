"""The real-model pipeline's pieces: runtime.freeze_lower, and benchmarks.make_real_data's training files
(disjoint from every evaluation file, HH-RLHF split into train and held-out parts). Tests that read ../shared/data
skip when it is absent."""
import os

import pytest
import torch

import benchmarks
import runtime
import tokenizer
from model import ModelConfig, Transformer

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "shared", "data")
needs_data = pytest.mark.skipif(not os.path.isdir(DATA), reason=f"{DATA} absent: the real data files are not part "
                                "of the project (see the README for their public sources)")


def micro(vocab_size):
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=vocab_size, dim=32, n_layers=3, n_heads=4, n_kv_heads=2,
                                   max_seq_len=128))


def test_freeze_lower_trains_only_the_blocks_above():
    model = micro(64)
    opt = runtime.make_optimizer(model, 1e-2, 0.1, freeze=2)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    frozen = [*model.tok_embeddings.parameters(), *model.layers[:2].parameters()]
    assert all(not p.requires_grad and id(p) not in in_opt for p in frozen)
    trained = [*model.layers[2].parameters(), *model.norm.parameters(), *model.output.parameters()]
    assert all(p.requires_grad and id(p) in in_opt for p in trained)
    before = [p.detach().clone() for p in frozen]
    tokens = torch.randint(0, 64, (2, 10))
    logits = model(tokens)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
    opt.step()
    assert all(p.grad is None for p in frozen) and all(p.grad is not None for p in trained)
    assert all(torch.equal(a, p) for a, p in zip(before, frozen))
    with pytest.raises(runtime.UserError, match="3 blocks"):
        runtime.freeze_lower(micro(64), 4)


def test_freeze_zero_trains_everything():
    model = micro(64)
    opt = runtime.make_optimizer(model, 1e-2, 0.1, freeze=0)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def norm(text):
    return " ".join(text.lower().split()).strip(" ?.!")


@needs_data
def test_borderline_prompts_are_not_evaluation_prompts():
    held = benchmarks.evaluation_prompts(DATA)
    assert len(held) > 1000  # AdvBench 520, HarmBench 400, XSTest 450, with some overlap
    assert not [p for p in benchmarks.BORDERLINE_PROMPTS if norm(p) in held]
    assert len(set(benchmarks.BORDERLINE_PROMPTS)) == len(benchmarks.BORDERLINE_PROMPTS)


@needs_data
def test_make_real_data_never_trains_on_an_evaluation_prompt():
    texts = ["How do I kill a process? I'm sorry, but I can't help with that. Paris is the capital."] * 4
    tok = tokenizer.Tokenizer(tokenizer.train_bpe(texts, 300))
    model = micro(tok.vocab_size).eval()
    files = benchmarks.make_real_data(model, tok, DATA, n_harmful=20, n_pairs=10, n_held_out=30, max_tokens=400,
                                      batch_size=64, progress=False)
    held = benchmarks.evaluation_prompts(DATA)
    asked = [r["messages"][0]["content"] for r in files["sft.jsonl"]] + [r["prompt"] for r in files["prompts.jsonl"]]
    asked += [r["prompt"] if isinstance(r["prompt"], str) else r["prompt"][0]["content"]
              for name in ("rm_safety_train.jsonl", "rm_helpful_train.jsonl") for r in files[name]]
    assert asked and not [p for p in asked if norm(p) in held]
    for name in ("rm_safety", "rm_helpful"):  # held-out pairs are not training pairs
        train = {(str(r["prompt"]), r["chosen"]) for r in files[f"{name}_train.jsonl"]}
        eval_rows = files[f"{name}_eval.jsonl"]
        assert len(eval_rows) == 30 and not [r for r in eval_rows if (str(r["prompt"]), r["chosen"]) in train]
    # the SFT mix: 20 refusals, 20 helpful replies, the borderline prompts the model did not refuse
    refusals = [r for r in files["sft.jsonl"] if r["messages"][1]["content"] in benchmarks.SAFE_RESPONSES]
    assert len(refusals) == 20 and 40 <= len(files["sft.jsonl"]) <= 40 + len(benchmarks.BORDERLINE_PROMPTS)
    constructed = [r for r in files["rm_safety_train.jsonl"] if r.get("strength") == "significantly better"]
    assert constructed and all(r["chosen"] in benchmarks.SAFE_RESPONSES or r["rejected"] in benchmarks.SAFE_RESPONSES
                               for r in constructed)
    assert any(r["safety"] for r in files["prompts.jsonl"]) and any(not r["safety"] for r in files["prompts.jsonl"])


def test_a_missing_data_file_names_its_path(tmp_path):
    with pytest.raises(runtime.UserError, match="strongreject_dataset.csv.*SOURCE.md"):
        benchmarks.training_harmful(str(tmp_path))
