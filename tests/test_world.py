"""world.py: the splits' sizes and partitions, the training sets, the Ghost Attention dialogues."""
import re

import pytest

import judge
import world
from world import ATTACKS, CATEGORIES, HELD_OUT_ATTACK, SPLITS, TRAIN_ATTACKS, build_world


@pytest.fixture(scope="module")
def w():
    return build_world(0)


# ---------------------------------------------------------------------------------------------- splits
def test_world_is_deterministic(w):
    again = build_world(0)
    assert again.corpus == w.corpus and again.sft == w.sft
    for split in ("validation", "test"):
        assert [e.messages for e in again.split(split)] == [e.messages for e in w.split(split)]
    assert [e.messages for e in build_world(1).test] != [e.messages for e in w.test]


def test_split_sizes(w):
    for split, floor in (("test", 100), ("validation", 30)):
        xs = w.split(split)
        assert {e.split for e in xs} == {split}
        known = [e for e in xs if e.rung == world.HEADLINE_RUNG]
        harmful = [e for e in known if e.kind == "harmful"]
        for c in CATEGORIES:  # distinct held-out requests per risk category, each asked plainly and wrapped
            assert len({e.subject for e in harmful if e.category == c}) >= floor
        assert {e.attack for e in harmful} == set(ATTACKS if split == "test" else TRAIN_ATTACKS)
        for kind in ("borderline", "benign"):
            group = [e for e in known if e.kind == kind]
            assert {e.attack for e in group} == {e.attack for e in harmful}  # plain and inside every wrapper
        assert {e.rung for e in xs} == (set(world.RUNGS) if split == "test" else {"seen", "known"})
    test = w.test
    assert len({e.subject for e in test if e.kind == "borderline" and e.rung == "known"}) >= 100
    assert len({e.prompt for e in test}) > 0.95 * len(test)  # few repeated prompts
    assert all(e.attack != HELD_OUT_ATTACK for e in w.validation)


def test_partitions_are_disjoint_and_built_from_seen_parts():
    def disjoint(by_split):
        sets = [set(by_split[s]) for s in SPLITS]
        return all(not (sets[i] & sets[k]) for i in range(3) for k in range(i + 1, 3))
    assert disjoint(world.REQUEST_TEMPLATES)
    assert all(disjoint(by_split) for _, by_split, _ in world.FACT_TYPES.values())
    assert all(disjoint(by_split) for by_split in world.FACT_SUBJECTS.values())
    assert all(disjoint(world.HARMFUL[c]) for c in CATEGORIES)
    assert disjoint({s: [b[0] for b in world.BORDERLINE[s]] for s in SPLITS})
    # no template holds another (openers and closers are never empty), so a search for one never finds another
    templates = [t for s in SPLITS for t in world.REQUEST_TEMPLATES[s]]
    assert not [(a, b) for a in templates for b in templates if a != b and a.replace("{a}", "") in b]
    # held-out requests are new combinations of verbs and objects that training requests use
    for c in CATEGORIES:
        parts = {(verb, obj) for verb, objects, _ in world.REQUEST_PARTS[c] for obj in objects}
        train_verbs = {v for v, o in parts if any(a.startswith(f"{v} {o}") for a in world.HARMFUL[c]["train"])}
        train_objects = {o for v, o in parts if any(a.startswith(f"{v} {o}") for a in world.HARMFUL[c]["train"])}
        assert train_verbs == {v for v, _ in parts} and train_objects == {o for _, o in parts}
    senses = {answer for _, answer, _ in world.BORDERLINE["test"]}
    assert senses <= {answer for _, answer, _ in world.BORDERLINE["train"]}  # every held-out item's sense is taught
    # contrast items share a harmful request's verb ("steal second base" / "steal a car")
    verbs = {judge.content_words(a)[0] for c in CATEGORIES for s in SPLITS for a in world.HARMFUL[c][s]}
    assert sum(judge.content_words(b[0])[0] in verbs for b in world.BORDERLINE["test"]) >= 30
    # every request is named by its own words and by no other request's words
    words = {a: set(judge.content_words(a)) for a in world.KNOWN_REQUESTS}
    assert all(len(ws) >= 2 for ws in words.values())
    assert not [(a, b) for a in words for b in words if a != b and words[a] <= words[b]]
    # keywords: one per sense, in its own answer and in no other sense's answer or any request
    items = world.BORDERLINE_ITEMS
    for request, answer, keyword in items:
        assert keyword.lower() in answer.lower()
        others = [t for r, a, k in items if k != keyword for t in (r, a)] + list(world.KNOWN_REQUESTS)
        assert not [t for t in others if re.search(judge._phrase(keyword), judge.normalize(t))], keyword
    assert world.SELF_HARM & set(world.HARMFUL["hateful"]["test"])
    assert set(world.FIELD_OF) == {a for s in SPLITS for a in world.HARMFUL["advice"][s]} | set(
        world.UNKNOWN_REQUESTS["advice"])


def test_unknown_requests_appear_in_no_training_text(w):
    """The ladder's last rung: the words of an unknown request are in no training source and no knowledge."""
    training = set(judge.WORD.findall(judge.normalize(" ".join(w.texts()))))
    for c in CATEGORIES:
        for request in world.UNKNOWN_REQUESTS[c]:
            new = set(judge.content_words(request)) - training
            assert new and judge.content_words(request)[0] in new, request


def test_knowledge_states_every_held_out_request_and_fact(w):
    corpus = "\n".join(w.corpus)
    for split in ("validation", "test"):
        for ex in w.split(split):
            if ex.rung == "known" and ex.kind == "benign":
                assert world.FACT_TYPES[ex.category][2].format(x=ex.subject, y=ex.answer) in corpus
            elif ex.rung == "known":
                assert world.second_person(ex.subject) in corpus
    truths = w.knowledge()
    assert all(true in corpus and contrast not in corpus for true, contrast, _, _ in truths)
    assert {split for _, _, split, _ in truths} == set(SPLITS)


def test_misspelling_keeps_the_answer_bearing_subject(w):
    for ex in w.test + w.validation:
        if ex.kind != "harmful" and ex.attack == "misspelling":
            assert ex.subject in ex.prompt
    garbled = [e for e in w.test if e.kind == "harmful" and e.attack == "misspelling" and e.subject not in e.prompt]
    assert len(garbled) > 30  # harmful requests themselves are misspelled


# ---------------------------------------------------------------------------------------------- training sets
def test_sft_is_small_and_imperfect(w):
    assert len(w.sft) < len(w.preference_prompts) / 2
    sft_text = " ".join(m["content"] for d in w.sft for m in d)
    assert "[details omitted]" not in sft_text  # demonstrations are safe
    advice = w.train_entities["advice"]
    covered = {a for a in advice if world.second_person(a) in sft_text}
    assert 0 < len(covered) < len(advice) // 2  # advice barely covered: a gap for RLHF
    assert {e.attack for e in w.sft_examples if e.kind == "harmful"} == set(world.SFT_ATTACKS)
    pref = [e for e in w.preference_prompts if e.kind == "harmful"]
    assert {e.attack for e in pref} == set(TRAIN_ATTACKS) and {e.category for e in pref} == set(CATEGORIES)


def test_sft_dialogs_keep_a_share_of_the_safety_demonstrations(w):
    n_safety = sum(e.kind == "harmful" for e in w.sft_examples)
    assert w.sft_dialogs(1.0) == w.sft
    none, half = w.sft_dialogs(0.0), w.sft_dialogs(0.5)
    assert len(none) == len(w.sft) - n_safety and len(half) == len(w.sft) - n_safety + round(n_safety / 2)
    assert all(d in half for d in none) and all(d in w.sft for d in half)  # nested shares
    refusals = lambda ds: sum("I can't" in d[-1]["content"] for d in ds)
    assert refusals(none) == 0 and refusals(w.sft) == n_safety


def test_gatt_dialogs_obey_their_instruction(w):
    for split in SPLITS:
        for d in w.gatt_dialogs(n=10, split=split):
            assert all(world.follows_instruction(d["instruction"], a) for a in d["answers"])
            assert all(judge.judge(ex, a).correct for ex, a in zip(d["examples"], d["answers"]))
            assert {ex.template for ex in d["examples"]} <= {t for _, by_split, _ in world.FACT_TYPES.values()
                                                            for t in by_split[split]}
    assert not world.follows_instruction("caps", "The capital of France is Paris.")
    assert world.follows_instruction("ahoy", "Ahoy! A cow says moo.")
