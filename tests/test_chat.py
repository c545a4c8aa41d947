"""chat.py: streamed tokens equal generate()'s, the chat through stdin (the greedy answer, the RM score, long messages
cut with a notice, no library warning in its output)."""
import io
import sys
import warnings

import torch

import chat
import reward
import world
from model import generate, load_model


def test_stream_tokens_equal_generate(micro):
    paths, tok = micro
    model, _ = load_model(paths["b"])
    prompt = tok.encode_prompt(world.build_world(0).test[0].messages)
    expected = generate(model, [prompt], 12, tok.eos_id, tok.pad_id, temperature=0.0)[0]
    assert list(chat.stream_tokens(model, prompt, 12, tok.eos_id)) == expected


def test_chat_through_stdin_streams_the_greedy_answer_and_the_rm_score(micro, monkeypatch, capsys):
    paths, tok = micro
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is the capital of France?\n\nAnd of Spain?\n/quit\n"))
    argv = [paths["b"], "--rm-safety", paths["rm"], "--max-new-tokens", "6", "--device", "cpu"]
    transcript = chat.main(chat.get_args(argv))
    shown = capsys.readouterr().out
    assert [m["role"] for m in transcript] == ["user", "assistant", "user", "assistant"]
    model, _ = load_model(paths["b"])
    first = generate(model, [tok.encode_prompt(transcript[:1])], 6, tok.eos_id, tok.pad_id, temperature=0.0)[0]
    assert transcript[1]["content"] == tok.decode(first).strip()
    # the second answer was generated with the first exchange in its context
    second = generate(model, [tok.encode_prompt(transcript[:3])], 6, tok.eos_id, tok.pad_id, temperature=0.0)[0]
    assert transcript[3]["content"] == tok.decode(second).strip()
    rm, rm_tok = reward.load_reward_model(paths["rm"])
    p = torch.sigmoid(reward.score(rm, rm_tok, [transcript[:1]], [transcript[1]["content"]]))[0].item()
    assert f"[safety RM: {p:.3f}]" in shown
    assert shown.count("assistant>") == 2 and tok.decode(first) in shown


def chat_through(argv, lines, monkeypatch, capsys):
    """The chat's transcript and output for these input lines, any warning raised failing the test."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(line + "\n" for line in lines)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a library warning would break into the chat's output
        transcript = chat.main(chat.get_args(["--device", "cpu", *argv]))
    captured = capsys.readouterr()
    assert "Warning" not in captured.err and "Warning" not in captured.out
    return transcript, captured.out


def test_chat_cuts_a_message_longer_than_the_context_and_says_so(micro, monkeypatch, capsys):
    paths, tok = micro
    long = " ".join(f"What is the capital of France number {i}?" for i in range(80))  # far beyond 160 tokens
    transcript, shown = chat_through([paths["b"], "--rm-safety", paths["rm_short"], "--max-new-tokens", "6"],
                                     ["Hello there.", long, "/quit"], monkeypatch, capsys)
    # the long message forgets the first exchange, then is cut to its last tokens, leaving 6 to answer in
    assert [m["role"] for m in transcript] == ["user", "assistant"]
    cut = transcript[0]["content"]
    assert long.endswith(cut) and len(cut) < len(long)
    prompt = tok.encode_prompt(transcript[:1])
    assert len(prompt) + 6 <= 160
    kept = int(shown.split("[your message was cut to its last ")[1].split(" tokens")[0])
    assert f"[your message was cut to its last {kept} tokens to fit the 160-token context]" in shown
    assert tok.decode(tok.encode(long)[-kept:]).strip() == cut
    model, _ = load_model(paths["b"])
    answer = generate(model, [prompt], 6, tok.eos_id, tok.pad_id, temperature=0.0)[0]
    assert transcript[1]["content"] == tok.decode(answer).strip()
    # the 48-token reward model reads the cut message's last tokens, and the note says so
    n = len(reward.encode_scored(tok, transcript[:1], transcript[1]["content"]))
    assert n > 48 and f", on the last 48 of {n} tokens]" in shown
    assert shown.count("[safety RM: ") == 2


def test_chat_says_when_nothing_fits_instead_of_an_empty_reply(micro, monkeypatch, capsys):
    paths, _ = micro
    system = "Always answer in capitals. " * 60  # fills the 160-token context on its own
    transcript, shown = chat_through([paths["b"], "--system", system, "--max-new-tokens", "6"],
                                     ["What is the capital of France?", "/quit"], monkeypatch, capsys)
    assert "[your message does not fit the 160-token context" in shown and "shorten --system" in shown
    assert "assistant>" not in shown and [m["role"] for m in transcript] == ["system"]
