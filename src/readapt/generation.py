"""The model under evaluation and its answers: Φ + Σ sᵢΨᵢ built in memory, greedy decoding in batches.

    model, tokenizer = load_model("base/", adds=[("knowledge/", 0.5)], device=None)   # cuda when available
    answers = generate(model, tokenizer, prompts, max_new_tokens=64, batch_size=16, stop=PLAIN_STOP)

A score must not depend on how the questions were batched: `load_model` computes in float32 on CPU and
`generate` says why (the batch changes half-precision rounding).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from readapt.checkpoint import ReadOptions
from readapt.errors import ReadaptError
from readapt.merging import load_merged
from readapt.numerics import parse_device


def load_model(model: str, adds: Sequence[tuple[str, float]] = (), dtype: str | None = None,
               tokenizer: str | None = None, device: str | None = None, read: ReadOptions | None = None):
    """(model, tokenizer) on `device`: MODEL + sum(scale_i * adapter_i) built in memory by
    readapt.merging.load_merged (MODEL as is without adds); `tokenizer` overrides MODEL's tokenizer.

    The weights are those of the checkpoint `readapt merge` would write (the checkpoint's dtype, or `dtype`).
    On CPU a bfloat16/float16 checkpoint computes in float32 unless `dtype` says otherwise: the same weights,
    and greedy answers that do not depend on the batch (bf16 rounding does, see `generate`). The price is
    twice the memory and time (SmolLM2, 30 questions, batch 16, one core: 33 s in float32, 11 s in bf16);
    `dtype="bfloat16"` takes it back, with a warning. On a GPU the checkpoint's dtype is kept (speed),
    with the same warning."""
    from transformers import AutoTokenizer

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="no tokenizer in")
        net, tok = load_merged(model, list(adds), dtype=dtype, read=read)
    if tokenizer is not None or tok is None:
        source = tokenizer or model
        try:
            tok = AutoTokenizer.from_pretrained(source, local_files_only=True)
        except (OSError, ValueError, TypeError) as err:
            raise ReadaptError(
                f"no usable tokenizer in {source!r} ({type(err).__name__}); pass --tokenizer FOLDER_OR_ID "
                "(e.g. the model it was fine-tuned from)"
            ) from None
    device = parse_device(device, "auto")
    if dtype is None and device.type == "cpu" and net.dtype in (torch.bfloat16, torch.float16):
        net = net.float()  # exact upcast of the stored weights; float32 arithmetic
    return net.to(device).eval(), tok


def _stop_criteria(tokenizer, stop: Sequence[str]):
    """transformers' StopStringCriteria for `stop` (None without stop strings, or when it cannot read the
    tokenizer's vocabulary, as for word-level ones: the answers are cut all the same, only later)."""
    from transformers import StoppingCriteriaList, StopStringCriteria

    if not stop:
        return None
    try:
        return StoppingCriteriaList([StopStringCriteria(tokenizer, list(stop))])
    except (ValueError, KeyError, IndexError, TypeError):
        return None


def _cut(text: str, stop: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop string."""
    return text[:min((i for s in stop if (i := text.find(s)) >= 0), default=len(text))]


def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 64, batch_size: int = 16,
             add_special_tokens: bool = False, progress: bool = True, stop: Sequence[str] = ()) -> list[str]:
    """Greedy responses to `prompts`, batched with left padding (prompts sorted by length to pad little).

    Chat prompts already hold their special tokens (add_special_tokens=False); plain prompts get BOS.
    Generation ends at EOS or, with `stop`, once a row's text ends in a stop string (transformers'
    StopStringCriteria: no tokens are spent after it; for a vocabulary it cannot read, generation runs to
    max_new_tokens), and the response is cut before the first stop string either way.
    Batching is exact up to rounding: transformers builds position ids from the attention mask and masks the
    pad keys (SmolLM2, float32: a left-padded prompt's logits are within 4e-5 of its unpadded ones). But the
    kernels, and so the rounding, depend on the batch: SDPA takes its causal path without padding and its
    masked path with it, and a decoding step is a matrix-vector product alone and a matrix product in a
    batch. In bfloat16 that rounding (0.66 logits, padded vs alone) flips near-tied greedy choices: SmolLM2
    gave 16 of 30 answers different at batch 16 than at batch 1, and 3 of 6 even in batches of identical,
    unpadded prompts. In float32 (load_model's default on CPU) none changed; a half-precision model with
    more than one prompt per batch gets a warning.
    """
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    if max_new_tokens < 1 or batch_size < 1:
        raise ReadaptError(f"--max-new-tokens and --batch-size must be positive, got {max_new_tokens}, {batch_size}")
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ReadaptError("the tokenizer has neither a pad nor an eos token; cannot batch prompts")
        tokenizer.pad_token = tokenizer.eos_token
    # pure greedy: the model's generation_config only fills what is left unset here, so its sampling
    # settings and penalties (temperature, top_p, repetition_penalty, ...) are neutralised explicitly
    gen = GenerationConfig(
        do_sample=False, num_beams=1, temperature=1.0, top_k=50, top_p=1.0, typical_p=1.0,
        repetition_penalty=1.0, no_repeat_ngram_size=0, min_length=0,
        max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=model.generation_config.eos_token_id or tokenizer.eos_token_id,
    )
    lengths = [len(ids) for ids in tokenizer(list(prompts), add_special_tokens=add_special_tokens).input_ids]
    gen.max_new_tokens = context_cap(model, max(lengths, default=0), max_new_tokens)
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])  # longest first: out-of-memory shows at once
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    if model.dtype in (torch.bfloat16, torch.float16) and len(batches[0]) > 1:
        warnings.warn(f"generating in {str(model.dtype).removeprefix('torch.')} in batches of {batch_size}: its "
                      f"rounding depends on the batch (shape, padding), so greedy answers may change with "
                      f"--batch-size; --dtype float32 or --batch-size 1 gives batch-invariant scores", stacklevel=2)
    responses: list[str] = [""] * len(prompts)
    device = next(model.parameters()).device
    criteria = _stop_criteria(tokenizer, stop)
    for idx in tqdm(batches, desc="generate", unit="batch", disable=not progress):
        enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True,
                        add_special_tokens=add_special_tokens).to(device)
        with torch.inference_mode():
            out = model.generate(**enc, generation_config=gen, stopping_criteria=criteria)  # [b, prompt_len + new]
        for i, row in zip(idx, out[:, enc["input_ids"].shape[1]:]):
            responses[i] = _cut(tokenizer.decode(row, skip_special_tokens=True), stop).strip()
    return responses


def context_cap(model, longest_prompt: int, max_new_tokens: int) -> int:
    """max_new_tokens, clamped with a one-line warning to what the model's context leaves after the longest
    prompt: min(max_new_tokens, config.max_position_embeddings − longest_prompt). A prompt that already
    fills the context is an error; a model whose config gives no context length is not capped."""
    n_ctx = getattr(model.config, "max_position_embeddings", None)
    if not isinstance(n_ctx, int) or longest_prompt + max_new_tokens <= n_ctx:
        return max_new_tokens
    room = n_ctx - longest_prompt
    if room < 1:
        raise ReadaptError(f"the longest prompt has {longest_prompt} tokens and fills the model's context "
                           f"(max_position_embeddings={n_ctx}): shorten the questions or passages (--top-k)")
    warnings.warn(f"--max-new-tokens {max_new_tokens} exceeds what the model's context leaves after the longest "
                  f"prompt ({n_ctx} - {longest_prompt} tokens): generating at most {room} tokens per answer")
    return room
