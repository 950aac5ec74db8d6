"""Bounds of eval: --max-new-tokens is capped at what the model's context leaves."""

import json
import warnings

import pytest
from tests.tiny import save_tiny, tiny_model, tiny_tokenizer

from readapt.cli import main
from readapt.errors import ReadaptError
from readapt.generation import generate


def _spy(model) -> list[int]:
    """Record the max_new_tokens of every model.generate call."""
    seen, real = [], model.generate

    def spy(**kw):
        seen.append(kw["generation_config"].max_new_tokens)
        return real(**kw)

    model.generate = spy
    return seen


def test_max_new_tokens_is_clamped_to_the_context_with_a_warning():
    """It used to run unbounded: 200 new tokens asked of a 32-token context gave 200."""
    model, tok = tiny_model("llama").eval(), tiny_tokenizer()
    model.config.max_position_embeddings = 32
    prompts = ["<s> user w1 w2 w3 w4 </s> <s> assistant", "<s> user w1 </s> <s> assistant"]
    room = 32 - max(len(tok(p, add_special_tokens=False).input_ids) for p in prompts)
    seen = _spy(model)
    with pytest.warns(UserWarning, match=rf"--max-new-tokens 200 exceeds .*generating at most {room} tokens"):
        generate(model, tok, prompts, max_new_tokens=200, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # within the context: as asked, no warning
        generate(model, tok, prompts, max_new_tokens=room, progress=False)
    assert seen == [room, room]
    with pytest.raises(ReadaptError, match=r"the longest prompt has \d+ tokens and fills the model's context "
                                           r"\(max_position_embeddings=32\)"):
        generate(model, tok, ["<s> user " + "w1 " * 40 + "</s>"], max_new_tokens=1, progress=False)


def test_cli_eval_with_a_huge_max_new_tokens_finishes(tmp_path, capfd):
    base = save_tiny(tmp_path / "base", "llama")  # max_position_embeddings 64
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"question": f"w{i} w{i + 1}", "answers": [f"w{i}"]}) + "\n" for i in range(3)))
    assert main(["eval", str(base), "--questions", str(qa), "-o", str(tmp_path / "out"),
                 "--max-new-tokens", "100000000"]) == 0
    assert "warning: --max-new-tokens 100000000 exceeds" in capfd.readouterr().err
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["n"] == 3
