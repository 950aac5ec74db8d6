"""The demo world's generator: determinism, unique names, questions that agree with the bios, tokenizer."""

import random

import pytest

from readapt.demoworld.world import (
    ANSWER_TEMPLATES, ATTRIBUTES, BIO_TEMPLATES, LEXICON, QUESTION_TEMPLATES, build_tokenizer, make_world,
    vocabulary,
)

SIZES = {"A": 40, "B": 20, "C": 20}


def test_same_seed_same_world_and_text():
    w1, w2 = make_world(3, SIZES), make_world(3, SIZES)
    assert w1.populations == w2.populations
    assert w1.corpus("B", 2, seed=5) == w2.corpus("B", 2, seed=5)
    assert w1.questions("A") == w2.questions("A")
    assert w1.passages("B") == w2.passages("B")


def test_other_seed_other_world():
    assert make_world(0, SIZES).populations != make_world(1, SIZES).populations


def test_population_sizes_and_no_name_collisions():
    w = make_world(0, {"A": 200, "B": 100, "C": 100})
    assert {k: len(v) for k, v in w.populations.items()} == {"A": 200, "B": 100, "C": 100}
    names = [p.name for pop in w.populations.values() for p in pop]
    assert len(names) == len(set(names)) == 400
    rng = random.Random(0)
    strangers = [w.stranger(rng) for _ in range(1000)]  # reading practice: never one of the populations
    assert not {p.name for p in strangers} & set(names)
    assert len({p.name for p in strangers}) > 500
    for pop in w.populations.values():
        for p in pop:
            assert p.first in LEXICON["first"] and p.last in LEXICON["last"]


def test_too_many_people_refused():
    with pytest.raises(ValueError, match="at most"):
        make_world(0, {"A": 48 * 48})


def test_bio_states_every_fact_once_with_the_full_name():
    w = make_world(0, SIZES)
    rng = random.Random(0)
    for p in w["B"]:
        bio = w.bio(p, rng)
        sentences = [s.strip() + " ." for s in bio.split(" .") if s.strip()]
        assert len(sentences) == 4
        for s in sentences:
            assert p.name in s
        for a in ATTRIBUTES:
            matches = [s for s in sentences if s in {t.format(n=p.name, v=p.value(a)) for t in BIO_TEMPLATES[a]}]
            assert len(matches) == 1, (a, bio)


def test_questions_agree_with_the_person():
    w = make_world(0, SIZES)
    people = {p.id: p for p in w["A"]}
    qs = w.questions("A")
    assert len(qs) == 4 * len(w["A"]) and len({q["id"] for q in qs}) == len(qs)
    for q in qs:
        p = people[q["passage_id"]]
        a = q["attribute"]
        assert q["id"] == f"{p.id}/{a}"
        assert q["answers"] == [p.value(a)]
        assert q["question"] in {t.format(n=p.name) for t in QUESTION_TEMPLATES[a]}
        assert q["answer_sentence"] == ANSWER_TEMPLATES[a].format(n=p.name, v=p.value(a))
        assert p.value(a) in q["answer_sentence"]


def test_passages_are_bios_of_the_population():
    w = make_world(0, SIZES)
    passages = w.passages("B")
    assert [x["id"] for x in passages] == [p.id for p in w["B"]]
    for x, p in zip(passages, w["B"]):
        for a in ATTRIBUTES:
            assert p.value(a) in x["text"]


def test_tokenizer_round_trips_world_text_without_unknown_tokens(tmp_path):
    from transformers import AutoTokenizer

    build_tokenizer().save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)  # a normal HF tokenizer, no readapt import needed
    assert len(tok) == len(vocabulary())
    w = make_world(0, SIZES)
    rng = random.Random(0)
    p = w.stranger(rng)
    bio = w.bio(p, rng)
    ids = tok(bio, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == bio
    chat = w.chat(p, "city", rng, context=bio)
    text = tok.apply_chat_template(chat, tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    assert ids.count(tok.bos_token_id) == 3 and ids.count(tok.eos_token_id) == 3
    prompt = tok.apply_chat_template(chat[:2], tokenize=False, add_generation_prompt=True)
    assert text.startswith(prompt.rstrip())
    assert tok.decode(tok(text[len(prompt):], add_special_tokens=False)["input_ids"], skip_special_tokens=True) \
        == w.answer(p, "city")


def test_each_data_file_has_its_own_random_stream(tmp_path):
    """Changing the task corpus leaves the knowledge corpus (Ψ's text and its order) as it was, and back."""
    from dataclasses import replace

    from readapt.demoworld.experiments import write_data
    from readapt.demoworld.settings import QUICK

    world = make_world(0, dict(QUICK.sizes))
    files = {}
    for name, s in (("base", QUICK), ("task", replace(QUICK, task_examples=QUICK.task_examples // 2)),
                    ("knowledge", replace(QUICK, lora_copies=QUICK.lora_copies // 2))):
        (tmp_path / name).mkdir()
        write_data(world, s, tmp_path / name, 0)
        files[name] = {f: (tmp_path / name / f"{f}.jsonl").read_text() for f in ("task", "knowledge")}
    assert files["task"]["knowledge"] == files["base"]["knowledge"]
    assert files["task"]["task"] != files["base"]["task"]
    assert files["knowledge"]["task"] == files["base"]["task"]
    assert files["knowledge"]["knowledge"] != files["base"]["knowledge"]
