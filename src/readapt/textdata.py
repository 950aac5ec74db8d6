"""Training text: documents packed into blocks, and the order the blocks are read in.

    blocks, tail, summary = load_blocks(["corpus.jsonl"], tokenizer, max_length=1024)
    idx = stream(step * batch_size, batch_size, len(blocks), seed, cache)   # the blocks of one step

Packing: every document is encoded as `tokenizer(text)` encodes it, with the special tokens the tokenizer
adds itself (BOS for Gemma, Llama-2/3; nothing for GPT-2-style tokenizers), and followed by EOS (unless the
tokenizer ends every text with EOS itself): BOS doc EOS BOS doc EOS ..., as the models were pretrained
(torchtune's text-completion packing; run_clm.py and litgpt also keep the tokenizer's BOS). The stream is
cut into blocks of `max_length` tokens; where the tokenizer adds BOS, every block starts with BOS, as every
input does at inference: a block that would start inside a document is BOS + the next max_length - 1
tokens (plain concatenation, as run_clm.py, litgpt and torchtune cut, would start it without one, and a BOS
model is off there: Gemma-3 270m on the Apache-2.0 license text, 1024-token blocks, loss 3.08 and 3.36 on
the blocks after the first without BOS, 2.28 and 2.21 with it). Without BOS (GPT-2-style tokenizers) the
stream is cut plainly. The tail shorter than a block is returned apart (held-out text scores it too).

Order: one endless stream of shuffled epochs; epoch e visits the blocks in `order(n, seed, e)`, and step t
reads stream positions [t·B, (t+1)·B): the data position is the step number, so a resumed run reads exactly
the blocks an uninterrupted one would.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from readapt.errors import ReadaptError
from readapt.userfiles import read_texts


def pack(docs: Sequence[str], tokenizer, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """tokenizer(doc_1) EOS tokenizer(doc_2) EOS ... cut into (blocks [n_blocks, max_length], tail
    [< max_length]), int32. Each document gets the special tokens `tokenizer(text)` adds (BOS where the
    model was pretrained with it), then EOS unless the tokenizer itself ends every text with EOS. Where the
    tokenizer adds BOS, a block that would start inside a document is BOS + the next max_length - 1 tokens."""
    eos = tokenizer.eos_token_id
    added = tokenizer("")["input_ids"]  # the special tokens the tokenizer puts around any text
    bos = added[0] if added and added[0] == tokenizer.bos_token_id else None
    end = [] if added and added[-1] == eos else [eos]
    pieces = []
    for i in range(0, len(docs), 1000):  # batches of documents: the fast tokenizer runs them in parallel
        for ids in tokenizer(list(docs[i:i + 1000]), verbose=False)["input_ids"]:
            pieces.append(torch.tensor([*ids, *end], dtype=torch.int32))
    stream = torch.cat(pieces)  # [n_tokens]
    if bos is None:
        n = stream.numel() // max_length
        return stream[: n * max_length].view(n, max_length), stream[n * max_length:]
    chunks, pos, head = [], 0, torch.tensor([bos], dtype=torch.int32)
    while pos < stream.numel():
        at_bos = bool(stream[pos] == bos)
        take = max_length if at_bos else max_length - 1
        chunks.append(stream[pos:pos + take] if at_bos else torch.cat([head, stream[pos:pos + take]]))
        pos += take
    full = chunks if chunks[-1].numel() == max_length else chunks[:-1]
    tail = chunks[-1] if len(full) < len(chunks) else stream[:0]
    return (torch.stack(full) if full else stream.new_empty(0, max_length)), tail


def load_blocks(files: Sequence[str | os.PathLike], tokenizer, max_length: int, what: str = "--data"
                ) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """Read, tokenize and pack every file (in order) -> (blocks, tail, per-file summary)."""
    if not files:
        raise ReadaptError(f"no {what} files given")
    docs, summary = [], []
    for f in files:
        d = read_texts(f)
        docs += d
        summary.append({"file": str(Path(f).expanduser().absolute()), "documents": len(d)})
    blocks, tail = pack(docs, tokenizer, max_length)
    return blocks, tail, summary


def order(n_blocks: int, seed: int, epoch: int) -> torch.Tensor:
    """The order epoch `epoch` visits the blocks in: randperm(n_blocks) from a generator seeded with (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n_blocks, generator=g)


def stream(start: int, count: int, n_blocks: int, seed: int, cache: dict) -> torch.Tensor:
    """Block indices at stream positions [start, start + count) of the endless shuffled-epoch stream."""
    out = []
    for pos in range(start, start + count):
        e = pos // n_blocks
        if e not in cache:
            cache.clear()
            cache[e] = order(n_blocks, seed, e)
        out.append(cache[e][pos % n_blocks])
    return torch.stack(out)
