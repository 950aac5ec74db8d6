"""Evaluation protocol: prompts from the chat template, retrieval, batched greedy generation, eval/sweep/score."""

import json
import warnings

import pytest
import torch
from tests.tiny import perturb, save_tiny, tiny_model, tiny_tokenizer

from readapt.cli import main
from readapt.errors import ReadaptError
from readapt.evaluation import evaluate, load_questions, score, split_validation, sweep
from readapt.generation import generate
from readapt.prompts import PLAIN_STOP, build_prompts, chat_template_kwargs, messages, prompt_format
from readapt.retrieval import bm25_search, retrieve
from readapt.metrics import contains_em, rouge_l_recall

NO_SYSTEM_RAISES = (  # Gemma-style: a system turn is an error
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{{ '<s> ' + m['role'] + ' ' + m['content'] + ' </s> ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<s> assistant ' }}{% endif %}"
)
NO_SYSTEM_DROPS = (  # a template that silently ignores system turns
    "{% for m in messages %}{% if m['role'] != 'system' %}{{ '<s> ' + m['role'] + ' ' + m['content'] + ' </s> ' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<s> assistant ' }}{% endif %}"
)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _responses(folder):
    return [json.loads(line)["response"] for line in (folder / "predictions.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: one thread is faster than two contending ones (2.5x on the shared 2-core CI box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny base, two "tuned" checkpoints far enough away to change greedy answers, questions, passages."""
    d = tmp_path_factory.mktemp("world")
    base = save_tiny(d / "base", "llama")
    t1 = perturb(base, d / "t1", scale=0.3, seed=1)
    # a shipped generation config with sampling and penalties (as instruct models have): eval must ignore it
    from transformers import GenerationConfig

    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=3, do_sample=True, temperature=0.6, top_p=0.9,
                     top_k=5, repetition_penalty=1.5, no_repeat_ngram_size=1).save_pretrained(t1)
    t2 = perturb(base, d / "t2", scale=0.3, seed=2)
    # varied prompt lengths, so that left padding matters inside a batch
    qs = [{"id": f"q{i}", "question": " ".join(f"w{j}" for j in range(i, i + 1 + i % 5)),
           "answers": [f"w{i + 3}", "w7 w8"], "passage_id": f"p{i}"} for i in range(10)]
    passages = [{"id": f"p{i}", "text": f"w{i + 20} w{i + 30} w{i}"} for i in range(12)]
    return dict(dir=d, base=base, t1=t1, t2=t2, questions=_write_jsonl(d / "qa.jsonl", qs),
                passages=_write_jsonl(d / "passages.jsonl", passages), qs=qs)


# --- prompts -----------------------------------------------------------------------------------------


def test_prompt_with_system_role_is_the_papers_llama3_prompt():
    tok = tiny_tokenizer()
    assert prompt_format(tok) == "system"
    qs = [{"question": "w1 w2"}, {"question": "w3?"}]
    prompts, fmt = build_prompts(tok, qs, [None, "w5 w6"])
    assert fmt == "system"
    assert prompts == [
        "<s> system Answer the following question. </s> <s> user w1 w2? </s> <s> assistant ",
        "<s> system Answer the following question given this context: w5 w6. </s> <s> user w3? </s> <s> assistant ",
    ]


@pytest.mark.parametrize("template", [NO_SYSTEM_RAISES, NO_SYSTEM_DROPS])
def test_prompt_without_system_role_is_the_papers_gemma_prompt(template):
    tok = tiny_tokenizer()
    tok.chat_template = template
    assert prompt_format(tok) == "user"
    prompts, fmt = build_prompts(tok, [{"question": "w1"}, {"question": "w2"}], [None, "w5 w6."])
    assert fmt == "user"
    assert prompts == [
        "<s> user w1? </s> <s> assistant ",
        "<s> user Answer the following question given this context: w5 w6.\nQuestion: w2? </s> <s> assistant ",
    ]


def test_no_chat_template_falls_back_to_a_plain_prompt_and_says_so():
    tok = tiny_tokenizer()
    tok.chat_template = None
    with pytest.warns(UserWarning, match="no chat template"):
        prompts, fmt = build_prompts(tok, [{"question": "w1"}, {"question": "w2"}], [None, "w5"])
    assert fmt == "plain"
    assert prompts == [
        "Answer the following question.\nQuestion: w1?\nAnswer:",
        "Answer the following question given this context: w5.\nQuestion: w2?\nAnswer:",
    ]


THINKING = (  # Qwen3-style: reasoning unless enable_thinking is false, which pre-fills an empty think block
    "{% for m in messages %}{{ '<s> ' + m['role'] + ' ' + m['content'] + ' </s> ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<s> assistant ' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{% endif %}"
)


def test_reasoning_is_switched_off_where_the_template_has_a_switch():
    tok = tiny_tokenizer()
    assert chat_template_kwargs(tok) == {}  # no switch in the template: nothing passed
    tok.chat_template = THINKING
    assert chat_template_kwargs(tok) == {"enable_thinking": False}
    assert chat_template_kwargs(tok, {"enable_thinking": True, "x": 1}) == {"enable_thinking": True, "x": 1}
    qs, ctx = [{"question": "w1"}], [None]
    expected = tok.apply_chat_template(messages("w1", None, "system"), tokenize=False, add_generation_prompt=True,
                                       enable_thinking=False)
    assert build_prompts(tok, qs, ctx)[0] == [expected]
    assert expected.endswith("<s> assistant <think>\n\n</think>\n\n")
    thinking = expected.removesuffix("<think>\n\n</think>\n\n")
    assert build_prompts(tok, qs, ctx, {"enable_thinking": True})[0] == [thinking]
    with pytest.raises(ReadaptError, match="JSON object"):
        chat_template_kwargs(tok, ["enable_thinking"])
    tok.chat_template = None
    with pytest.warns(UserWarning, match="no chat template"):
        assert chat_template_kwargs(tok, {"enable_thinking": True}) == {}


def test_messages_do_not_double_punctuation():
    assert messages("Who? ", "Ctx.", "system") == [
        {"role": "system", "content": "Answer the following question given this context: Ctx."},
        {"role": "user", "content": "Who?"},
    ]


# --- retrieval ---------------------------------------------------------------------------------------


def test_bm25_ranks_the_passage_sharing_rare_words_first():
    texts = ["the cat sat on the mat", "dogs bark loudly at night", "a bird sings in the morning"]
    queries = ["why do dogs bark", "morning bird song", "cat on a mat"]
    hits = bm25_search(texts, queries, k=2)
    assert [h[0] for h in hits] == [1, 2, 0] and all(len(h) == 2 and h[0] != h[1] for h in hits)
    assert bm25_search(texts, queries, k=10) == [h + [j for j in range(3) if j not in h] for h in hits]


def test_retrieve_bm25_accuracy_and_oracle(tmp_path):
    passages = _write_jsonl(tmp_path / "p.jsonl", [
        {"id": "a", "text": "zebras live in Kenya"}, {"id": "b", "text": "penguins live in Antarctica"},
        {"id": "c", "text": "camels live in deserts"}, {"id": "d", "text": "owls hunt at night"}])
    qs = [{"id": "1", "question": "where do zebras live", "passage_id": "a", "_line": 1},
          {"id": "2", "question": "where do penguins live", "passage_id": "d", "_line": 2},  # gold is wrong
          {"id": "3", "question": "camels", "_line": 3}]  # no gold id: not counted
    ctx, ret, stats = retrieve(qs, "bm25", passages, 1)
    assert ret == [["a"], ["b"], ["c"]]
    assert ctx == ["zebras live in Kenya", "penguins live in Antarctica", "camels live in deserts"]
    assert stats == {"retrieval_accuracy": 50.0, "retrieval_n": 2}
    ctx, ret, stats = retrieve(qs, "bm25", passages, 2)
    assert ctx[0].startswith("zebras live in Kenya\n\n") and stats["retrieval_hit_at_k"] == 50.0
    ctx, ret, _ = retrieve(qs[:2], "oracle", passages)
    assert ret == [["a"], ["d"]] and ctx == ["zebras live in Kenya", "owls hunt at night"]
    assert retrieve(qs, "none", None) == ([None] * 3, [None] * 3, {})


def test_retrieval_bad_input(tmp_path):
    passages = _write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "text": "x"}])
    qs = [{"id": "1", "question": "x", "passage_id": "a", "_line": 1},
          {"id": "2", "question": "y", "passage_id": "zz", "_line": 2}]
    with pytest.raises(ReadaptError, match=r"oracle.*id '2' \(line 2, passage_id 'zz'\)"):
        retrieve(qs, "oracle", passages)
    with pytest.raises(ReadaptError, match="needs --passages"):
        retrieve(qs, "bm25", None)
    dup = _write_jsonl(tmp_path / "dup.jsonl", [{"id": "a", "text": "x"}, {"id": "a", "text": "y"}])
    with pytest.raises(ReadaptError, match="'a' appears more than once"):
        retrieve(qs, "bm25", dup)


# --- data --------------------------------------------------------------------------------------------


def test_bad_question_files(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "a", "answers": ["b"]}\n\n{"question": "c", "answers": ["d"]\n')
    with pytest.raises(ReadaptError, match=r"bad.jsonl:3: malformed JSON"):
        load_questions(bad)
    bad.write_text('{"question": "a", "answers": ["b"]}\n{"question": "c"}\n')
    with pytest.raises(ReadaptError, match=r"bad.jsonl:2: missing key\(s\) \['answers'\]"):
        load_questions(bad)
    bad.write_text('{"question": "a", "answers": []}\n')
    with pytest.raises(ReadaptError, match=r"bad.jsonl:1: 'answers' must be a non-empty list"):
        load_questions(bad)
    bad.write_text('{"question": ["a"], "answers": ["b"]}\n')
    with pytest.raises(ReadaptError, match=r"bad.jsonl:1: 'question' must be a string"):
        load_questions(bad)
    bad.write_text('{"question": "a", "answers": ["b"]}\n{"question": "c", "answers": ["d"], "id": "x"}\n')
    assert [q["id"] for q in load_questions(bad)] == ["1", "x"]  # line number when there is no id
    assert len(load_questions(bad, limit=1)) == 1


# --- evaluate ----------------------------------------------------------------------------------------


def _greedy_one_by_one(folder, prompts, max_new_tokens):
    """Reference: unbatched, unpadded greedy decoding by argmax, stopping at eos."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = tiny_tokenizer()
    out = []
    for p in prompts:
        ids = tok(p, add_special_tokens=False, return_tensors="pt").input_ids
        new = []
        with torch.no_grad():
            for _ in range(max_new_tokens):
                nxt = int(model(ids).logits[0, -1].argmax())
                if nxt == tok.eos_token_id:
                    break
                new.append(nxt)
                ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
        out.append(tok.decode(new, skip_special_tokens=True).strip())
    return out


def test_evaluate_batched_left_padded_greedy_matches_one_by_one(world, tmp_path):
    out = tmp_path / "res"
    summary = evaluate(world["t1"], world["questions"], out, max_new_tokens=5, batch_size=3, quiet=True)
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [q["id"] for q in world["qs"]]  # original order restored
    expected = _greedy_one_by_one(world["t1"], [r["prompt"] for r in rows], 5)
    assert len(set(expected)) > 5  # the answers depend on the prompt, so a padding bug would show
    assert min(len(e.split()) for e in expected) < 5  # and some stop at eos before max_new_tokens
    assert [r["response"] for r in rows] == expected
    for r in rows:
        assert r["rouge_l_recall"] == 100 * rouge_l_recall(r["response"], r["answers"])
        assert r["contains_em"] == 100 * contains_em(r["response"], r["answers"])
    saved = json.loads((out / "summary.json").read_text())
    assert saved == summary and saved["n"] == 10 and saved["prompt_format"] == "system"
    assert saved["rouge_l_recall"] == pytest.approx(sum(r["rouge_l_recall"] for r in rows) / 10)
    # score() on the predictions file gives the same numbers
    again = score(out / "predictions.jsonl", quiet=True)
    assert {k: again[k] for k in ("rouge_l_recall", "contains_em", "n")} == {
        k: summary[k] for k in ("rouge_l_recall", "contains_em", "n")}


def _byte_tokenizer():
    """A byte-level tokenizer (one token per byte, as GPT-2's before merges) with no chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())} | {"<s>": 256, "</s>": 257, "<pad>": 258}
    tok = Tokenizer(models.BPE(vocab, [], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _bigram_model(tok, chain: str):
    """A Llama whose greedy next byte depends on the current byte only: each byte of `chain` is followed by the
    byte after its first occurrence, any other by EOS (one-hot embeddings, attention and MLP outputs zero)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    n = len(tok)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=n, hidden_size=n + 1, intermediate_size=4, num_hidden_layers=1,
                                         num_attention_heads=1, num_key_value_heads=1, head_dim=4,
                                         bos_token_id=256, eos_token_id=257, pad_token_id=258))
    ids = tok(chain, add_special_tokens=False).input_ids
    nxt = dict.fromkeys(range(n), tok.eos_token_id)
    for a, b in reversed(list(zip(ids, ids[1:]))):  # the first occurrence wins
        nxt[a] = b
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.model.embed_tokens.weight[:, :n] = torch.eye(n)
        for norm in (model.model.norm, *(m for m in model.modules() if type(m).__name__.endswith("RMSNorm"))):
            norm.weight.fill_(1.0)
        for a, b in nxt.items():
            model.lm_head.weight[b, a] = 1.0
    return model.eval()


@pytest.mark.parametrize("chain, answer", [(": Lab\nQuestion:", "Lab"), (": Lab.\n\n", "Lab.")])
def test_plain_prompts_stop_at_the_next_question_or_blank_line(tmp_path, chain, answer):
    """A pretrained model goes on with the next "Question:" (or after a blank line): generation stops there,
    spending no more tokens, and the answer is cut before it."""
    tok = _byte_tokenizer()
    model = _bigram_model(tok, chain)
    prompt = "Answer the following question.\nQuestion: Which lab?\nAnswer:"  # ends in ":", so " Lab..." follows
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    raw = generate(model, tok, [prompt], 40, progress=False, add_special_tokens=True)[0]
    assert raw.startswith(answer) and ("\nQuestion: Lab" in raw) == ("Question" in chain)
    assert len(calls) == 40  # without stop strings it runs on to max_new_tokens
    calls.clear()
    assert generate(model, tok, [prompt], 40, progress=False, add_special_tokens=True, stop=PLAIN_STOP) == [answer]
    assert len(calls) == len(f" {answer}\n") + (len("Question:") if "Question" in chain else 1)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    qa = _write_jsonl(tmp_path / "qa.jsonl", [{"question": "Which lab", "answers": ["lab"]}])
    with pytest.warns(UserWarning, match="no chat template"):
        s = evaluate(tmp_path / "m", qa, tmp_path / "out", max_new_tokens=40, quiet=True)
    assert _responses(tmp_path / "out") == [answer] and s["contains_em"] == 100
    assert s["prompt_format"] == "plain" and s["stop_strings"] == ["\nQuestion:", "\n\n"]


def test_half_checkpoints_compute_in_float32_on_cpu_and_the_settings_are_recorded(world, tmp_path):
    """A bf16 checkpoint is evaluated with its own weights in float32 arithmetic on CPU (answers independent of
    the batch size); a forced half dtype with several prompts per batch is warned about; summary.json says how."""
    bf16 = save_tiny(tmp_path / "bf16", "llama", dtype=torch.bfloat16)
    kw = dict(max_new_tokens=4, quiet=True)
    s = evaluate(bf16, world["questions"], tmp_path / "a", batch_size=4, **kw)
    assert {k: s[k] for k in ("dtype", "device", "batch_size", "padding_side", "chat_template_kwargs",
                              "stop_strings")} == {"dtype": "float32", "device": "cpu", "batch_size": 4,
                                                   "padding_side": "left", "chat_template_kwargs": {},
                                                   "stop_strings": []}
    evaluate(bf16, world["questions"], tmp_path / "b", batch_size=1, **kw)
    assert _responses(tmp_path / "a") == _responses(tmp_path / "b")
    with pytest.warns(UserWarning, match="bfloat16 in batches of 4.*--batch-size"):
        s = evaluate(bf16, world["questions"], tmp_path / "c", batch_size=4, dtype="bfloat16", **kw)
    assert s["dtype"] == "bfloat16"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one prompt per batch: the same kernels for every prompt, no warning
        evaluate(bf16, world["questions"], tmp_path / "d", batch_size=1, dtype="bfloat16", **kw)


def test_evaluate_with_adds_equals_the_merged_model(world, tmp_path):
    kw = dict(max_new_tokens=4, batch_size=4, quiet=True)
    evaluate(world["t1"], world["questions"], tmp_path / "t1", **kw)
    evaluate(world["base"], world["questions"], tmp_path / "base", **kw)
    evaluate(world["base"], world["questions"], tmp_path / "add", adds=[str(world["t1"])], **kw)  # scale 1
    assert _responses(tmp_path / "t1") != _responses(tmp_path / "base")
    assert _responses(tmp_path / "add") == _responses(tmp_path / "t1")


def test_evaluate_rag_puts_the_passage_in_the_prompt(world, tmp_path):
    evaluate(world["base"], world["questions"], tmp_path / "o", retrieval="oracle", passages=world["passages"],
             max_new_tokens=2, quiet=True, limit=3)
    rows = [json.loads(line) for line in (tmp_path / "o" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    for i, r in enumerate(rows):
        assert r["retrieved_passage_id"] == f"p{i}"
        assert f"given this context: w{i + 20} w{i + 30} w{i}. </s>" in r["prompt"]
    s = evaluate(world["base"], world["questions"], tmp_path / "b", retrieval="bm25", passages=world["passages"],
                 max_new_tokens=2, quiet=True)
    assert 0 <= s["retrieval_accuracy"] <= 100 and s["retrieval_n"] == 10


def test_model_without_tokenizer_or_template(world, tmp_path):
    bare = tmp_path / "bare"
    tiny_model("llama").save_pretrained(bare)  # weights, no tokenizer
    with pytest.raises(ReadaptError, match="--tokenizer"):
        evaluate(bare, world["questions"], tmp_path / "x", max_new_tokens=2, quiet=True)
    assert not (tmp_path / "x").exists()
    tok = tiny_tokenizer()
    tok.chat_template = None
    tok.save_pretrained(tmp_path / "plain_tok")
    with pytest.warns(UserWarning, match="no chat template"):
        s = evaluate(bare, world["questions"], tmp_path / "y", tokenizer=str(tmp_path / "plain_tok"),
                     max_new_tokens=2, quiet=True)
    assert s["prompt_format"] == "plain"
    row = json.loads((tmp_path / "y" / "predictions.jsonl").read_text().splitlines()[0])
    assert row["prompt"] == "Answer the following question.\nQuestion: w0?\nAnswer:"


def test_failed_eval_leaves_no_output(world, tmp_path):
    with pytest.raises(ReadaptError, match="unknown metric"):
        evaluate(world["base"], world["questions"], tmp_path / "x", metrics=["bleu"], quiet=True)
    with pytest.raises(ReadaptError):
        evaluate(world["base"], world["questions"], tmp_path / "x", adds=[(str(tmp_path / "nope"), 1.0)], quiet=True)
    assert list(tmp_path.iterdir()) == []


# --- sweep -------------------------------------------------------------------------------------------


def test_split_validation():
    val, test = split_validation(10, 0.3, seed=1)
    assert len(val) == 3 and len(test) == 7 and sorted(val + test) == list(range(10))
    assert split_validation(10, 0.3, seed=1) == (val, test)
    assert split_validation(5, 0.0) == ([], [0, 1, 2, 3, 4])
    for bad in (1.0, -0.1, 0.01):
        with pytest.raises(ReadaptError, match="val-fraction"):
            split_validation(10, bad)


def test_sweep_cells_are_exact_merges_and_selection_uses_validation(world, tmp_path):
    kw = dict(max_new_tokens=4, batch_size=4, quiet=True)
    out = tmp_path / "sweep"
    summary = sweep(world["base"], [str(world["t1"]), str(world["t2"])], world["questions"], out, grid="0,0.5",
                    val_fraction=0.4, seed=3, **kw)
    cells = summary["cells"]
    assert [c["scales"] for c in cells] == [[0, 0], [0, 0.5], [0.5, 0], [0.5, 0.5]]
    # every cell is base + alpha*(t1 - base) + beta*(t2 - base), whatever cell came before it
    evaluate(world["base"], world["questions"], tmp_path / "mix",
             adds=[(str(world["t1"]), 0.5), (str(world["t2"]), 0.5)], **kw)
    evaluate(world["base"], world["questions"], tmp_path / "t1", adds=[(str(world["t1"]), 0.5)], **kw)
    evaluate(world["base"], world["questions"], tmp_path / "base", **kw)
    pred = out / "predictions"
    assert len({tuple(_responses(tmp_path / k)) for k in ("mix", "t1", "base")}) == 3  # the cells differ
    def cell(name):
        return [json.loads(x)["response"] for x in (pred / name).open()]

    assert _responses(tmp_path / "mix") == cell("alpha=0.5_beta=0.5.jsonl")
    assert _responses(tmp_path / "t1") == cell("alpha=0.5_beta=0.jsonl")
    assert _responses(tmp_path / "base") == cell("alpha=0_beta=0.jsonl")
    # chosen on validation (first maximum), reported on test
    val, test = split_validation(10, 0.4, seed=3)
    best = max(cells, key=lambda c: c["val_contains_em"])
    assert summary["best"]["scales"] == best["scales"]
    assert summary["contains_em"] == best["test_contains_em"] and summary["n"] == len(test) == 6
    rows = [json.loads(x) for x in (pred / "alpha={:g}_beta={:g}.jsonl".format(*best["scales"])).open()]
    assert summary["rouge_l_recall"] == pytest.approx(sum(rows[i]["rouge_l_recall"] for i in test) / 6)
    assert json.loads((out / "summary.json").read_text()) == summary
    assert {k: summary[k] for k in ("dtype", "device", "batch_size", "padding_side", "max_new_tokens")} == {
        "dtype": "float32", "device": "cpu", "batch_size": 4, "padding_side": "left", "max_new_tokens": 4}
    assert len((out / "cells.csv").read_text().splitlines()) == 1 + 4
    from matplotlib.image import imread

    for m in ("rouge_l_recall", "contains_em"):
        assert imread(out / f"heatmap_{m}.png").ndim == 3


def test_sweep_one_adapter_and_bad_input(world, tmp_path):
    s = sweep(world["base"], [str(world["t1"])], world["questions"], tmp_path / "s1", grid=[0, 1], max_new_tokens=2,
              quiet=True, metrics=["rouge_l_recall"], select="rouge_l_recall")
    assert [c["scales"] for c in s["cells"]] == [[0], [1]] and "note" in s and set(s["cells"][0]) >= {"alpha"}
    assert (tmp_path / "s1" / "heatmap_rouge_l_recall.png").is_file()
    with pytest.raises(ReadaptError, match="one or two"):
        sweep(world["base"], [str(world["t1"])] * 3, world["questions"], tmp_path / "s3", quiet=True)
    with pytest.raises(ReadaptError, match="--grid"):
        sweep(world["base"], [str(world["t1"])], world["questions"], tmp_path / "s3", grid="0,a", quiet=True)
    with pytest.raises(ReadaptError, match="unknown metric"):
        sweep(world["base"], [str(world["t1"])], world["questions"], tmp_path / "s3", select="em", quiet=True)
    with pytest.raises(ReadaptError, match="without a scale"):
        sweep(world["base"], [f"{world['t1']}:0.5"], world["questions"], tmp_path / "s3", quiet=True)
    assert not (tmp_path / "s3").exists()


# --- CLI ---------------------------------------------------------------------------------------------


def test_cli_eval_sweep_score(world, tmp_path, capsys):
    q = str(world["questions"])
    assert main(["eval", str(world["base"]), "--add", f"{world['t1']}:0.5", "--questions", q, "-o",
                 str(tmp_path / "e"), "--max-new-tokens", "2", "--limit", "4", "--batch-size", "2"]) == 0
    summary = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert summary["n"] == 4 and summary["adds"] == [[str(world["t1"]), 0.5]]
    assert "rouge_l_recall" in capsys.readouterr().out
    assert main(["sweep", str(world["base"]), "--add", str(world["t1"]), "--grid", "0,1", "--questions", q,
                 "-o", str(tmp_path / "s"), "--max-new-tokens", "2", "--val-fraction", "0.5"]) == 0
    assert json.loads((tmp_path / "s" / "summary.json").read_text())["n"] == 5
    preds = _write_jsonl(tmp_path / "p.jsonl", [{"id": 1, "response": "It is Paris.", "answers": ["paris", "x"]},
                                                {"id": 2, "response": "no idea", "answers": ["Lyon"]}])
    assert main(["score", str(preds), "-o", str(tmp_path / "sc")]) == 0
    assert json.loads((tmp_path / "sc" / "summary.json").read_text()) == {
        "rouge_l_recall": 50.0, "contains_em": 50.0, "n": 2, "predictions": str(preds)}
    # bad input: exit 2, message names the fault, nothing written
    capsys.readouterr()
    assert main(["score", str(preds), "--metrics", "bleu"]) == 2
    assert "unknown metric" in capsys.readouterr().err
    assert main(["eval", str(world["base"]), "--questions", q, "--retrieval", "bm25", "-o", str(tmp_path / "z")]) == 2
    assert "--passages" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "response": "a", "answers": ["a"]}\n{oops\n')
    assert main(["score", str(bad)]) == 2
    assert "bad.jsonl:2: malformed JSON" in capsys.readouterr().err
    assert not (tmp_path / "z").exists()


def test_cli_chat_template_kwargs(world, tmp_path, capsys):
    q = str(world["questions"])
    assert main(["eval", str(world["base"]), "--questions", q, "-o", str(tmp_path / "e"), "--max-new-tokens", "1",
                 "--limit", "2", "--chat-template-kwargs", '{"enable_thinking": true}']) == 0
    summary = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert summary["chat_template_kwargs"] == {"enable_thinking": True} and summary["batch_size"] == 16
    capsys.readouterr()
    for bad, why in (("[1]", "a list where an object is expected"), ("{oops", "malformed JSON"),
                     ('{"a": NaN}', "NaN is not JSON"), ("[" * 50000 + "]" * 50000, "nested too deeply")):
        with pytest.raises(SystemExit) as exit_:
            main(["sweep", str(world["base"]), "--add", str(world["t1"]), "--questions", q, "-o", str(tmp_path / "s"),
                  "--chat-template-kwargs", bad])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and why in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()
