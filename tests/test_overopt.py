"""overopt.py: the best-of-n KL, Gao et al.'s fits and their peaks against hand computations; the best-of-n pick;
an end-to-end micro study that trains what it needs, writes its tables and resumes."""
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch

import overopt
import tokenizer
import train_rm
from model import ModelConfig, Transformer, save_checkpoint
from overopt import best_of_n, bon_curve, bon_kl, bon_peak, fit_bon, fit_rl, rl_peak


# ---------------------------------------------------------------------------------------------- the equations
def test_bon_kl_by_hand():
    assert bon_kl(1) == 0.0
    assert math.isclose(bon_kl(2), math.log(2) - 0.5)           # 0.193
    assert math.isclose(bon_kl(64), math.log(64) - 63 / 64)     # 3.17
    assert all(bon_kl(2 * n) > bon_kl(n) for n in (1, 2, 4, 8, 16, 32))


def test_fit_bon_recovers_alpha_beta_and_the_peak():
    # alpha 2, beta 0.5: d (2 - 0.5 d) at d = 0, 1, 2, 3 is 0, 1.5, 2, 1.5; the peak is at 2 / (2 * 0.5) = 2
    alpha, beta = fit_bon([0, 1, 2, 3], [0, 1.5, 2, 1.5])
    assert math.isclose(alpha, 2.0, abs_tol=1e-9) and math.isclose(beta, 0.5, abs_tol=1e-9)
    assert math.isclose(bon_peak(alpha, beta), 2.0)
    # a gain that only rises has no peak: beta <= 0
    assert bon_peak(*fit_bon([0, 1, 2], [0, 1, 2])) == math.inf


def test_fit_rl_recovers_alpha_beta_and_the_peak():
    # alpha 1, beta 0.5: d (1 - 0.5 log d) at d = 0, 1, e, e^2 is 0, 1, e / 2, 0; the peak is at exp(1 / 0.5 - 1) = e
    e = math.e
    alpha, beta = fit_rl([0, 1, e, e * e], [0, 1, e / 2, 0])
    assert math.isclose(alpha, 1.0, abs_tol=1e-9) and math.isclose(beta, 0.5, abs_tol=1e-9)
    assert math.isclose(rl_peak(alpha, beta), e)
    assert rl_peak(1.0, 0.0) == math.inf and rl_peak(1.0, -0.1) == math.inf


def test_best_of_n_picks_the_proxy_maximum_among_the_first_n():
    proxy = np.array([[0.1, 0.9, 0.5], [0.7, 0.2, 0.8]])
    gold = np.array([[1.0, 0.0, 0.5], [0.3, 0.6, 0.2]])
    for n, want_proxy, want_gold in ((1, [0.1, 0.7], [1.0, 0.3]), (2, [0.9, 0.7], [0.0, 0.3]),
                                     (3, [0.9, 0.8], [0.0, 0.2])):
        got_proxy, got_gold = best_of_n(proxy, gold, n)
        assert np.allclose(got_proxy, want_proxy) and np.allclose(got_gold, want_gold), n
    # R(0) is the mean of every sample: proxy 3.2 / 6, gold 2.6 / 6; best-of-2 means 0.8 and 0.15
    curve = bon_curve(proxy, gold, [1, 2])
    assert np.allclose(curve["proxy"], [0.4, 0.8]) and np.allclose(curve["gold"], [0.65, 0.15])
    assert np.allclose(curve["proxy_gain"], [0.4 - 3.2 / 6, 0.8 - 3.2 / 6])
    assert np.allclose(curve["gold_gain"], [0.65 - 2.6 / 6, 0.15 - 2.6 / 6])


# ---------------------------------------------------------------------------------------------- a micro study
@pytest.fixture(scope="module")
def from_folder(tmp_path_factory):
    """A pipeline seed folder of micro models: a random byte-level SFT model (also standing in for base/) and two
    reward models trained for a few steps on the world's pairs."""
    folder = tmp_path_factory.mktemp("overopt_from")
    tok = tokenizer.Tokenizer({bytes([b]): b for b in range(256)}, name="bytes")
    torch.manual_seed(0)
    policy = Transformer(ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=2, n_kv_heads=1,
                                     max_seq_len=384))
    for name in ("sft", "base"):
        os.makedirs(folder / name)
        save_checkpoint(str(folder / name / "model.pt"), dict(model=policy.state_dict(), tokenizer=tok.to_dict(),
                                                               model_config=vars(policy.config), step=0))
    for objective, name in (("safety", "rm_safety"), ("helpfulness", "rm_helpful")):
        train_rm.main(train_rm.get_args(["--objective", objective, "--init", str(folder / "sft" / "model.pt"),
                                         "--out", str(folder / name), "--device", "cpu", "--steps", "3",
                                         "--batch-size", "8", "--lr", "3e-3", "--warmup", "1",
                                         "--max-train-pairs", "64", "--max-eval-pairs", "40"]))
    return folder


def micro_argv(from_folder, out, *extra):
    return ["--from", str(from_folder), "--out", str(out), "--device", "cpu", "--prompts", "4", "--samples", "4",
            "--max-new-tokens", "8", "--bootstrap", "5", "--pair-shares", "0.5", "--small-dim", "0",
            "--ensemble-k", "2", "--rl-iterations", "3", "--rl-keep-every", "1", "--seeds", "0", "1",
            "--rm-flags", "--steps 2 --batch-size 8 --warmup 1 --max-eval-pairs 40",
            "--ppo-flags", "--batch-size 8 --minibatch-size 4 --max-new-tokens 8 --eval-prompts 0 --lr 3e-3 "
            "--iterations 3",
            "--eval-flags", "--limit 12 --max-new-tokens 8", *extra]


@pytest.mark.slow
def test_micro_study_writes_its_tables_and_reuses_its_work(from_folder, tmp_path, capsys):
    out = tmp_path / "study"
    result = overopt.main(overopt.get_args(micro_argv(from_folder, out)))
    saved = json.load(open(out / "overopt.json"))
    assert set(saved["bon"]) == {"default", "pairs_0.5", "ensemble_mean", "ensemble_min"}
    for name, bon in saved["bon"].items():
        assert bon["n"] == [1, 2, 4] and bon["n_prompts"] == 4 and len(bon["gold_ci"]) == 3
        assert len(bon["gold_fit"]) == 2 and "gold_peak_d" in bon and len(bon["gold_peak_ci"]) == 2
        # best-of-4 picks the highest proxy reward among four: its mean rises above best-of-1's
        assert bon["proxy"][-1] > bon["proxy"][0], name
    # the ensemble's members: the --from RM and one more seed on the same pairs
    assert saved["rm_accuracy"]["ensemble_mean"]["safety"].count("/") == 1
    for run in ("default", "ensemble_mean"):
        rl = saved["rl"][run]
        # the SFT model (iteration 0, no KL to itself) and each kept checkpoint, judged on the same prompts
        assert rl["iteration"] == [0, 1, 2, 3] and rl["kl"][0] == 0.0 and rl["d"][-1] > 0   # the policy moved
        assert rl["n"] == [12] * 4 and all(0 <= g <= 1 for g in rl["gold"]) and len(rl["gold_fit"]) == 2
    assert set(saved["constrained"]) == {"sft", "llama2", "lagrangian", "safety", "helpfulness"}
    assert saved["constrained"]["lagrangian"]["n_seeds"] == 2
    assert 0 <= saved["constrained"]["llama2"]["violation_rate"] <= 1
    for seed in ("0", "1"):
        steps, lambdas, costs = saved["lambdas"][seed]
        assert steps == [1, 2, 3] and lambdas[0] == 1.0 and lambdas[-1] != 1.0   # the multiplier moved
    table = open(out / "overopt.md").read()
    assert "Best-of-n fits" in table and "Constrained RLHF" in table and "| lagrangian |" in table
    assert result["bon"]["default"]["gold"] == saved["bon"]["default"]["gold"]
    # a second run reuses every trained model and cached score
    capsys.readouterr()
    overopt.main(overopt.get_args(micro_argv(from_folder, out)))
    printed = capsys.readouterr().out
    assert "reusing" in printed and ": done in" not in printed and "evaluating seed" not in printed


def test_missing_inputs_are_one_line_errors_and_write_nothing(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        overopt.runtime.command(overopt.main, overopt.get_args, ["--from", str(tmp_path / "none"), "--out",
                                                                  str(tmp_path / "out")])
    assert stop.value.code == 2 and "missing" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")
    with pytest.raises(SystemExit):
        overopt.get_args(["--from", "x", "--out", "y", "--pair-shares", "1.5"])
