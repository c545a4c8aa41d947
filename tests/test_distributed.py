"""Every stage under torchrun: two CPU processes (gloo) compute what one process computes on the same global batch,
and --fsdp (PyTorch's FSDP2) trains, saves and resumes as an unsharded run does. The two-process runs go through
torchrun; the one-process runs are main() in this process. Micro models, a few steps each."""
import json
import math
import os
import shutil

import pytest
import torch

import bench
import distill
import runtime
import train_ppo
import train_rm
import train_sft
from model import ModelConfig, Transformer, load_checkpoint
from test_distill import micro_chat_model, micro_argv
from test_reliability import MICRO, assert_same_weights, micro_checkpoint, read_metrics, run_script, tok  # noqa: F401
from test_train_ppo import micro_models

ATOL, RTOL = 2e-5, 1e-4     # weights after a few steps: float32 sums taken in another order, nothing more


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def assert_close_json(a, b, where="", rel=1e-4, abs=1e-6):
    """a == b for nested dicts and lists of JSON values, floats within tolerance (NaN equal to NaN)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: {sorted(a)} vs {sorted(b)}"
        for key in a:
            assert_close_json(a[key], b[key], f"{where}.{key}", rel, abs)
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), f"{where}: lengths {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close_json(x, y, f"{where}[{i}]", rel, abs)
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), f"{where}: nan vs {b}"
    elif isinstance(a, (int, float)) and not isinstance(a, bool):
        assert b == pytest.approx(a, rel=rel, abs=abs), f"{where}: {a} vs {b}"
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def weights(folder, key="model"):
    return load_checkpoint(os.path.join(folder, "model.pt"))[key]


@pytest.fixture(scope="module")
def init(tok, tmp_path_factory):
    return micro_checkpoint(str(tmp_path_factory.mktemp("init") / "model.pt"), tok)


@pytest.fixture(scope="module")
def tied_init(tok, tmp_path_factory):
    return micro_checkpoint(str(tmp_path_factory.mktemp("tied") / "model.pt"), tok, tie_embeddings=True)


# ---------------------------------------------------------------------------------------------- reward model
def preference_file(path, numbers):
    strengths = ["significantly better", "better", "slightly better", "negligibly better"]
    path.write_text("".join(json.dumps(dict(prompt=f"What is {i} plus {i}?", chosen=f"{i} plus {i} is {2 * i}.",
                                            rejected=f"{i} plus {i} is {2 * i + 1}.", strength=strengths[i % 4]))
                            + "\n" for i in numbers))
    return str(path)


def test_rm_two_processes_match_one_process(init, tmp_path):
    """train_rm.py's ranking loss (with margins) is a mean over the global batch's pairs, each rank holding as
    many: 2 ranks of 4 pairs give the curve, the weights and the held-out evaluation of one process with 8."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    argv = ["--objective", "safety", "--init", init, "--data", preference_file(tmp_path / "train.jsonl", range(40)),
            "--eval-data", preference_file(tmp_path / "eval.jsonl", range(40, 56)), "--steps", "3", "--batch-size",
            "8", "--lr", "3e-3", "--warmup", "1", "--eval-every", "1000", "--device", "cpu"]
    train_rm.main(train_rm.get_args([*argv, "--out", one]))
    run_script(["train_rm.py", *argv, "--out", two], nproc=2)
    rows = [read_metrics(folder) for folder in (one, two)]
    assert len(rows[0]) == 3 and {"loss", "accuracy", "reward_gap", "grad_norm"} <= rows[0][0].keys()
    assert_close_json(rows[0], rows[1], "metrics")
    start = load_checkpoint(init)["model"]
    assert not torch.equal(weights(one)["layers.0.attention.wq.weight"], start["layers.0.attention.wq.weight"])
    assert_same_weights(weights(one), weights(two), atol=ATOL, rtol=RTOL)
    reports = [json.load(open(os.path.join(folder, "eval.json"))) for folder in (one, two)]
    assert_close_json(reports[0], reports[1])


# ---------------------------------------------------------------------------------------------- PPO
def test_ppo_two_processes_match_one_process(chat, tmp_path):
    """Two ranks of 4 prompts against one process of 8, for 3 iterations with the adaptive KL controller.

    What makes it equal: each response is sampled from its own generator, seeded by its place in the global batch
    (runtime.row_generators), so two ranks sample the responses one process samples; the reward whitening and the
    advantage whitening take mean and variance over the whole batch (all_reduce), as do the logged means and so the
    KL controller's beta; the policy and value losses are means over the whole minibatch's response tokens,
    however they fall on the ranks; the gold evaluation is split over the ranks and gathered in order. A minibatch
    here is the whole batch (one per epoch): with smaller ones each rank shuffles its own rows, a partition one
    process does not draw. The policy is the micro chat model, whose answers end with </s> at different lengths, so
    that the ranks hold different numbers of response tokens (the reward model, the ASCII scorer, reads the text
    with its own byte tokenizer). Whitening each rank's own batch, or averaging each rank's own token mean, as
    before, fails this test."""
    micro = micro_models(tmp_path)
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    argv = ["--init", chat["policy"], "--value-init", "policy", "--rm-safety", micro["rm"], "--rm-helpful",
            micro["rm"], "--prompts", micro["prompts"], "--iterations", "3", "--batch-size", "8", "--minibatch-size",
            "8", "--ppo-epochs", "2", "--max-new-tokens", "32", "--lr", "3e-3", "--value-lr", "3e-3", "--beta",
            "0.05", "--kl-target", "0.5", "--missing-eos-score", "none", "--eval-prompts", "6", "--eval-every", "2",
            "--device", "cpu"]
    train_ppo.main(train_ppo.get_args([*argv, "--out", one]))
    run_script(["train_ppo.py", *argv, "--out", two], nproc=2)
    rows = [read_metrics(folder) for folder in (one, two)]
    assert [r["step"] for r in rows[0]] == [1, 2, 3, 3] and "eval" in rows[0][1]
    assert len({r["beta"] for r in rows[0][:3]}) == 3                # the controller moved beta every iteration
    # the first iteration's responses end at different lengths, so the ranks hold different numbers of response
    # tokens (later ones may all run to --max-new-tokens: on an AMD EPYC the policy stops ending by iteration 2)
    assert 0 < rows[0][0]["no_eos"] < 1
    assert rows[0][0]["kl"] == 0.0 and rows[0][-2]["kl"] != 0          # the policy moved away from the reference
    # value_clip_frac counts tokens where (V_old + clip(V - V_old) - R)^2 > (V - R)^2: in the first epoch V = V_old
    # up to rounding, so it counts rounding, which differs with the batch's padding; every other number is compared
    for row in rows[0] + rows[1]:
        row.pop("value_clip_frac", None)
    assert_close_json(rows[0], rows[1], "metrics", abs=1e-5)  # whitened means are zero up to rounding
    for key in ("model", "value_model"):
        assert_same_weights(weights(one, key), weights(two, key), atol=ATOL, rtol=RTOL)
    assert load_checkpoint(os.path.join(two, "model.pt"))["beta"] == pytest.approx(
        load_checkpoint(os.path.join(one, "model.pt"))["beta"], rel=1e-5)


def test_a_fresh_run_reproduces_a_run_exactly(chat, tmp_path):
    """What the README's seed row rests on: on one machine and thread count, a stage run twice from nothing, each in
    a fresh interpreter, writes the same log and the same weights, and evaluate.py, run twice on the result, the same
    metrics.json byte for byte. PPO is the stage that samples (every response from its own seeded generator)."""
    micro = micro_models(tmp_path)
    argv = ["train_ppo.py", "--init", chat["policy"], "--value-init", "policy", "--rm-safety", micro["rm"],
            "--rm-helpful", micro["rm"], "--prompts", micro["prompts"], "--iterations", "2", "--batch-size", "8",
            "--minibatch-size", "4", "--max-new-tokens", "16", "--lr", "3e-3", "--value-lr", "3e-3",
            "--eval-prompts", "0", "--device", "cpu"]
    runs = [str(tmp_path / name) for name in ("first", "second")]
    for out in runs:
        run_script([*argv, "--out", out])
    logs = [open(os.path.join(out, "metrics.jsonl")).read() for out in runs]
    assert logs[0] == logs[1] and logs[0].count("\n") == 2
    assert_same_weights(weights(runs[0]), weights(runs[1]))
    evaluations = []
    for k, out in enumerate(runs * 2):
        folder = str(tmp_path / f"eval{k}")
        run_script(["evaluate.py", "--checkpoints", f"sft={chat['policy']}", f"ppo={out}/model.pt", "--limit", "24",
                    "--max-new-tokens", "16", "--no-plots", "--out", folder])
        evaluations.append(open(os.path.join(folder, "metrics.json"), "rb").read())
    assert len(set(evaluations)) == 1 and b'"violation_rate"' in evaluations[0]


# ---------------------------------------------------------------------------------------------- distillation
@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    return micro_chat_model(tmp_path_factory.mktemp("chat"))


@pytest.mark.parametrize("mode, extra", [("rejection", ["--iterations", "2"]), ("context", []),
                                         ("gatt", ["--gatt-warmup-steps", "2", "--temperature", "0.7"])])
def test_distill_two_processes_match_one_process(chat, tmp_path, mode, extra):
    """Sampling (K answers per prompt, distilled answers, GAtt turns) and the evaluation are split over the ranks and
    gathered back in the prompts' order, each sample drawn from its own generator seeded by its place: two ranks
    sample and keep the very dialogues one process does, in the same order (which sets the training batches), then
    train on them with the loss normalised by the global token count. Rejection sampling runs two iterations (the
    kept pool carries over). GAtt's dialogues hold prompts of different lengths, so a rank's batch pads them otherwise
    than one process does, and the micro model's near-flat logits turn that rounding into other answers: for GAtt
    the ranks must ask the very same turns in the same order, and train and evaluate without error."""
    one, two = tmp_path / "one", tmp_path / "two"
    distill.main(distill.get_args(micro_argv(chat, one, mode, "--steps", "2", *extra)))
    run_script(["distill.py", *micro_argv(chat, two, mode, "--steps", "2", *extra)], nproc=2)
    samples = [read_jsonl(folder / "samples.jsonl") for folder in (one, two)]
    assert [s["phase"] for s in samples[0]] == [s["phase"] for s in samples[1]]
    if mode == "gatt":
        users = lambda s: [[m["content"] for m in r["messages"] if m["role"] != "assistant"] for r in s["rows"]]
        assert all(a["rows"] and users(a) == users(b) for a, b in zip(*samples))
        logs = [read_jsonl(folder / "metrics.jsonl") for folder in (one, two)]
        assert (two / "eval.json").exists() and len(logs[0]) == len(logs[1]) > 0
        return
    for a, b in zip(*samples):
        assert a["rows"] and [(r["messages"], r.get("answer")) for r in a["rows"]] == \
            [(r["messages"], r.get("answer")) for r in b["rows"]], a["phase"]
        assert_close_json(a, b, a["phase"])
    assert_close_json(read_jsonl(one / "metrics.jsonl"), read_jsonl(two / "metrics.jsonl"), "metrics")
    assert_close_json(*(json.load(open(folder / "eval.json")) for folder in (one, two)), "eval")
    assert_same_weights(weights(one), weights(two), atol=ATOL, rtol=RTOL)


# ---------------------------------------------------------------------------------------------- FSDP
def test_fsdp_trains_saves_and_resumes_as_one_unsharded_process(tied_init, tmp_path):
    """train_sft.py --fsdp on two gloo processes (FSDP2 works on CPU) against one plain process, on a model whose
    head is tied to its embedding (both in FSDP's root unit, so it stays one parameter): 2 sharded steps, saved; the
    checkpoint is the single file an unsharded run writes (full weights, optimizer state numbered as
    optimizer.state_dict() numbers it); resumed sharded with --activation-checkpointing for 2 more steps, and
    resumed by one plain process, both end where 4 plain steps end."""
    plain, sharded = str(tmp_path / "plain"), str(tmp_path / "sharded")
    argv = ["--stage", "sft", "--init", tied_init, *MICRO]
    train_sft.main(train_sft.get_args([*argv, "--steps", "4", "--out", plain]))
    run_script(["train_sft.py", *argv, "--steps", "2", "--fsdp", "--out", sharded], nproc=2)
    expected, ckpt = (load_checkpoint(os.path.join(folder, "model.pt")) for folder in (plain, sharded))
    assert ckpt["step"] == 2 and ckpt["model"].keys() == expected["model"].keys()
    assert torch.equal(ckpt["model"]["output.weight"], ckpt["model"]["tok_embeddings.weight"])   # still tied
    assert ckpt["optimizer"]["state"].keys() == expected["optimizer"]["state"].keys()
    assert [g["params"] for g in ckpt["optimizer"]["param_groups"]] == \
        [g["params"] for g in expected["optimizer"]["param_groups"]]

    unsharded_resume = str(tmp_path / "unsharded_resume")
    shutil.copytree(sharded, unsharded_resume)
    run_script(["train_sft.py", *argv, "--steps", "4", "--fsdp", "--activation-checkpointing", "--resume",
                "--out", sharded], nproc=2)
    train_sft.main(train_sft.get_args([*argv, "--steps", "4", "--resume", "--out", unsharded_resume]))
    for folder in (sharded, unsharded_resume):
        got = load_checkpoint(os.path.join(folder, "model.pt"))
        assert got["step"] == 4
        assert_same_weights(expected["model"], got["model"], atol=ATOL, rtol=RTOL)
        for i, state in expected["optimizer"]["state"].items():
            assert_same_weights(state, got["optimizer"]["state"][i], atol=1e-7, rtol=RTOL)
        curve = [r["loss"] for r in read_metrics(folder)]
        assert curve == pytest.approx([r["loss"] for r in read_metrics(plain)], rel=1e-5), folder


# ---------------------------------------------------------------------------------------------- memory plan
def test_memory_plan_of_7b_by_hand():
    """bench.memory_plan for Llama 2 7B (dim 4096, 32 layers, 32 heads, SwiGLU 11008, vocabulary 32000, 4096 tokens)
    against the arithmetic written out."""
    block = 2 * 4096 * 4096 + 2 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096      # wq wo, wk wv, w1 w2 w3, norms
    root = 2 * 32000 * 4096 + 4096                                                 # embedding, head, final norm
    P = 32 * block + root
    assert P == 6_738_415_616                                                      # Llama 2's "6.7B"
    plan = bench.memory_plan(bench.MEMORY_SHAPES["7B"], 4096)
    assert (plan["params"], plan["block_params"], plan["root_params"]) == (P, block, root)
    assert plan["states"] == 16 * P                                                # 4 + 4 + 8 bytes a parameter
    per_block = 32 * 4096 + 4 * 4096 + 8 * 11008 + 4 * 32 + 8                      # bytes a token
    assert per_block == 235_656
    plain, checkpointed = (32 * per_block + 8 * 32000) * 4096, (32 * 4 * 4096 + per_block + 8 * 32000) * 4096
    assert plan["activations_per_sequence"] == {False: plain, True: checkpointed}
    budget = 76 * 2 ** 30
    one_gpu = plan["setups"][(False, False)]
    assert one_gpu["fixed"] == 18 * P > budget and one_gpu["sequences"] == 0      # 113 GiB: not on one GPU
    fsdp = plan["setups"][(True, False)]
    assert fsdp["fixed"] == 16 * P / 8 + 2 * (root + 2 * block) + 6 * (root + block)
    assert fsdp["sequences"] == (budget - fsdp["fixed"]) // plain == 2            # (76 - 16.4) / 29.7 GiB
    assert plan["setups"][(True, True)]["sequences"] == (budget - fsdp["fixed"]) // checkpointed == 15
    ppo = bench.ppo_memory(bench.MEMORY_SHAPES["7B"], 4096)
    assert ppo["total"] == (18 + 18 + 4 + 4 + 4) * P and not ppo["fits"]
    assert ppo["kv_cache_per_sequence"] == 2 * 32 * 4096 * 4 * 4096                # 4 GiB


def saved_bytes(config, tokens, checkpointing=False):
    """Bytes of the tensors autograd saves in one forward pass under bf16 autocast (CPU), parameters left out."""
    torch.manual_seed(0)
    model = Transformer(config)
    runtime.distribute(model, runtime.Runtime(torch.device("cpu")), activation_checkpointing=checkpointing)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    batch = torch.randint(0, config.vocab_size, (2, tokens), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        model(batch)
    return sum(storages.values())


@pytest.mark.parametrize("shape", [dict(dim=64, n_heads=4, n_kv_heads=2, hidden_dim=96),
                                   dict(dim=96, n_heads=6, n_kv_heads=6, hidden_dim=160)])
def test_block_activation_bytes_are_what_autograd_saves(shape):
    """The plan's bytes a token per block are the tensors a block saves for its backward pass: a second block adds
    them, and a longer batch adds them per token (which leaves out autocast's bf16 weight copies, the same at any
    length). With --activation-checkpointing a block keeps only its float32 input, 4 dim bytes a token."""
    configs = [ModelConfig(vocab_size=64, n_layers=n, max_seq_len=64, **shape) for n in (1, 2)]

    def per_block_per_token(checkpointing):
        grown = [saved_bytes(c, t, checkpointing) for c in configs for t in (16, 32)]    # (1 block, 2 blocks) x T
        return ((grown[3] - grown[2]) - (grown[1] - grown[0])) / (2 * 16)             # 2 rows of 16 more tokens
    assert per_block_per_token(False) == bench.block_activation_bytes(configs[0])
    assert per_block_per_token(True) == 4 * shape["dim"]
