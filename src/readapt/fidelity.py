"""Functional fidelity of an adapter: how closely base + adapter predicts like the dense model it stands for.

    cal = Calibration("calib.jsonl", base_ckpt)          # read and tokenized first: a bad file fails early
    line = cal.measure(base_ckpt, [(addend, s), ...], adapter_folder)

The reference is Ω = Φ + Σ sᵢΨᵢ (a fold: the dense merge; a LoRE adapter: the tuned model, Φ + 1·Δ),
the approximation is Φ + the adapter as PEFT runs it (unmerged, what a multi-LoRA server computes). Over the
calibration tokens t (every position of every document), with p_t = softmax of Ω's logits and q_t of the
adapter's:

    mean KL = (1/T) Σ_t Σ_v p_t(v) (log p_t(v) − log q_t(v))      (nats per token)
    top-1 agreement = (1/T) Σ_t [argmax p_t = argmax q_t]

One model is loaded, in float32 (both sides then differ only by the adapter, not by rounding): PEFT wraps it
with the adapter and log q of every token is kept on the CPU (at most `max_tokens` × vocab floats), PEFT's
`unload()` puts the base layers back, Ω is copied into the weights (readapt.merging.copy_merged, Ω in
float32) and the reference runs. A document longer than the model's context is truncated to it, and the
whole is capped at `max_tokens`; both are said (warning and report).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from readapt.addends import Addend
from readapt.checkpoint import Checkpoint
from readapt.errors import ReadaptError
from readapt.numerics import parse_device
from readapt.userfiles import read_texts

MAX_TOKENS = 2048  # log q kept for the comparison: 2048 × 49152 floats = 0.4 GB for SmolLM2's vocabulary


class Calibration:
    """The token ids of a calibration file (JSON lines {"text"} or .txt), read with the base's tokenizer."""

    def __init__(self, file: str | os.PathLike, base: Checkpoint, device: str | None = None,
                 max_tokens: int = MAX_TOKENS):
        from transformers import AutoTokenizer

        self.file, self.device = Path(file).expanduser().absolute(), parse_device(device, "auto")
        texts = read_texts(file, what="--calibration")
        try:
            tok = AutoTokenizer.from_pretrained(base.path, local_files_only=True)
        except (OSError, ValueError, TypeError) as err:
            raise ReadaptError(f"--calibration needs the base's tokenizer, and {base.path} has none usable "
                               f"({type(err).__name__}); add its tokenizer files to the base folder") from None
        cfg = base.config or {}
        n_ctx = cfg.get("max_position_embeddings") or (cfg.get("text_config") or {}).get("max_position_embeddings")
        self.ids: list[torch.Tensor] = []
        self.notes: list[str] = []
        cut = left = 0
        for text in texts:
            ids = tok(text)["input_ids"]
            room = max_tokens - sum(len(i) for i in self.ids)
            cut += bool(n_ctx) and len(ids) > n_ctx
            ids = ids[: min(n_ctx or len(ids), room)]
            left += len(ids) == 0
            if ids:
                self.ids.append(torch.tensor([ids]))
        if not self.ids:
            raise ReadaptError(f"--calibration {file}: its text gives no tokens; give a few hundred tokens of text")
        if cut:
            self.notes.append(f"{cut} document(s) longer than the model's context ({n_ctx} tokens) truncated to it")
        if left or sum(i.numel() for i in self.ids) == max_tokens:
            self.notes.append(f"the calibration stops at {max_tokens} tokens ({left} document(s) left out)")
        for note in self.notes:
            warnings.warn(f"--calibration {file}: {note}", stacklevel=2)

    @torch.no_grad()
    def measure(self, base: Checkpoint, reference: Sequence[tuple[Addend, float]], adapter: Path) -> dict:
        """Mean KL(Ω ‖ Φ + adapter) per token and top-1 agreement, one model loaded (see the module)."""
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        from readapt.merging import copy_merged

        model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32, local_files_only=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            served = PeftModel.from_pretrained(model.to(self.device), str(adapter)).eval()
        approx = [self._log_probs(served, ids) for ids in self.ids]
        model = served.unload()  # the base layers back, nothing merged
        copy_merged(model, base, reference, torch.float32)
        kl, agree, total = 0.0, 0, 0
        for ids, log_q in zip(self.ids, approx):
            log_p = self._log_probs(model, ids)
            kl += float(torch.nn.functional.kl_div(log_q.double(), log_p.double(), reduction="sum", log_target=True))
            agree += int((log_p.argmax(-1) == log_q.argmax(-1)).sum())
            total += log_p.shape[0]
        return {"file": str(self.file), "documents": len(self.ids), "tokens": total, "mean_kl": kl / total,
                "top1_agreement": agree / total, "dtype": "float32", "device": str(self.device), "notes": self.notes}

    def _log_probs(self, model, ids: torch.Tensor) -> torch.Tensor:
        """log softmax of the next-token logits at every position of one document: [tokens, vocab], CPU."""
        logits = model(input_ids=ids.to(self.device)).logits[0].float()
        return torch.log_softmax(logits, dim=-1).cpu()

