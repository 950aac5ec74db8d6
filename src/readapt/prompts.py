"""Prompts as in the RE-Adapt paper (Appendix B): the question (and retrieved context) in the model's own
chat template, or a plain "Question: ... Answer:" prompt for a model without one.

    build_prompts(tokenizer, questions, contexts) -> (prompts, "system" | "user" | "plain")

A template with a system role gets system "Answer the following question." (with context: "...given
this context: <context>.") and user "<question>?"; one without (Gemma, Mistral) gets the paper's user-only
prompt. Templates with a reasoning switch get it turned off (`enable_thinking=False` where the template
reads that variable, as Qwen3's does: the answer, not a chain of thought, is scored); `template_kwargs`
overrides. Plain prompts stop at the next "\nQuestion:" or blank line (PLAIN_STOP), cut from the answer.
"""

from __future__ import annotations

import json
import re
import warnings

from readapt.errors import ReadaptError

SYSTEM = "Answer the following question."
SYSTEM_RAG = "Answer the following question given this context: {context}"
PLAIN_STOP = ("\nQuestion:", "\n\n")  # a pretrained model goes on with the next item of the list
REASONING_OFF = {"enable_thinking": False}  # template variable -> value that turns reasoning off


def _ends(text: str, mark: str) -> str:
    text = text.strip()
    return text if text.endswith(("?", ".", "!")) else text + mark


def chat_template_kwargs(tokenizer, override: dict | None = None) -> dict:
    """The options passed to the chat template: for each variable of REASONING_OFF that the template source
    reads (Qwen3's `enable_thinking`), the value that turns reasoning off; then `override` on top ({} when the
    tokenizer has no chat template)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):  # named templates: apply_chat_template uses "default"
        template = template.get("default", "")
    if override is not None and not isinstance(override, dict):
        raise ReadaptError(f"chat template kwargs must be a JSON object such as {{\"enable_thinking\": true}}, "
                           f"got {override!r}")
    if not template:
        if override:
            warnings.warn(f"the tokenizer has no chat template: --chat-template-kwargs {json.dumps(override)} ignored")
        return {}
    found = {k: v for k, v in REASONING_OFF.items() if re.search(rf"\b{k}\b", template)}
    return {**found, **(override or {})}


def prompt_format(tokenizer, template_kwargs: dict | None = None) -> str:
    """'system' if the chat template renders a system turn, 'user' if it has no system role (raises, as
    Gemma's does, or drops it), 'plain' if the tokenizer has no chat template at all."""
    from jinja2 import TemplateError

    if not getattr(tokenizer, "chat_template", None):
        return "plain"
    probe = "readapt-probe-2c9f"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "system", "content": probe}, {"role": "user", "content": "?"}],
            tokenize=False, add_generation_prompt=True, **(template_kwargs or {}),
        )
    except TemplateError:
        return "user"
    return "system" if probe in text else "user"


def messages(question: str, context: str | None, fmt: str) -> list[dict]:
    """The paper's chat turns (Appendix B): Llama-3 style with a system role, Gemma/Mistral style without."""
    q = _ends(question, "?")
    if fmt == "system":
        system = SYSTEM if context is None else _ends(SYSTEM_RAG.format(context=context.strip()), ".")
        return [{"role": "system", "content": system}, {"role": "user", "content": q}]
    if context is None:
        return [{"role": "user", "content": q}]
    return [{"role": "user", "content": f"{SYSTEM_RAG.format(context=context.strip())}\nQuestion: {q}"}]


def build_prompts(tokenizer, questions: list[dict], contexts: list[str | None],
                  template_kwargs: dict | None = None) -> tuple[list[str], str]:
    """(prompt strings, format). 'plain' (no chat template) is "<instruction>\\nQuestion: <q>?\\nAnswer:".
    Chat prompts are apply_chat_template(..., **chat_template_kwargs(tokenizer, template_kwargs))."""
    template_kwargs = chat_template_kwargs(tokenizer, template_kwargs)
    fmt = prompt_format(tokenizer, template_kwargs)
    if fmt == "plain":
        warnings.warn("the tokenizer has no chat template: using a plain 'Question: ...? Answer:' prompt")
        prompts = []
        for q, c in zip(questions, contexts):
            head = SYSTEM if c is None else _ends(SYSTEM_RAG.format(context=c.strip()), ".")
            prompts.append(f"{head}\nQuestion: {_ends(q['question'], '?')}\nAnswer:")
        return prompts, fmt
    prompts = [
        tokenizer.apply_chat_template(messages(q["question"], c, fmt), tokenize=False, add_generation_prompt=True,
                                      **template_kwargs)
        for q, c in zip(questions, contexts)
    ]
    return prompts, fmt
