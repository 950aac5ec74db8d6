"""What readapt writes for people to read: the model cards (README.md) of its output folders and the text
summaries of its reports, one function each, with the names of the report files they point to.

    delta_card(manifest)          extract        merge_card(base, addends, dtype)     merge
    lore_card(report)             extract --tau, compress (embeds lore_summary)
    fold_card(report), fold_summary(report)   merge --as-lora
    spectrum_readme(report, ...)  spectrum       port_card(report), port_summary(report)  port
    train_card(...)               train
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

from readapt._version import __version__

LORE_REPORT = "lore_report.json"
FOLD_REPORT = "fold_report.json"
PORT_REPORT = "port_report.json"


def delta_card(m: dict) -> str:
    """README.md of a delta folder, from its manifest `m`."""
    return f"""---
library_name: readapt
tags: [readapt, re-adapter, weight-delta]
---
# RE-Adapter (weight delta)

Made by readapt {m['readapt_version']} on {m['created']}:

    delta = tuned - base        (float32 arithmetic, stored as {m['delta_dtype']})

- base: `{m['base']['spec']}` ({', '.join(m['base']['dtypes'])}, {m['base']['tensor_count']} tensors)
- tuned: `{m['tuned']['spec']}` ({', '.join(m['tuned']['dtypes'])}, {m['tuned']['tensor_count']} tensors)
- tensors in the delta: {m['tensor_count']}; skipped: {len(m['skipped'])}
{_exact_line(m)}
Apply it with any scale (β=1 gives back the tuned model; β<1 is partial adaptation):

    readapt merge BASE --add THIS_FOLDER:0.5 -o OUT

See `readapt_delta.json` for the full manifest.
"""


def _exact_line(m: dict) -> str:
    if "exact" not in m:
        return "- stored in a 16-bit dtype: base + 1.0·delta is within one rounding of tuned, not exact\n"
    e = m["exact"]
    return (f"- base + 1.0·delta gives tuned bit for bit: {e['elements']} of {e['of']:,} elements, whose "
            f"difference float32 cannot hold, are kept as tuned values in `readapt_exact.safetensors`\n")


def merge_card(base, addends, dtype, interference: dict | None = None) -> str:
    """README.md of a merged model folder: Ω = Φ + Σ sᵢ·Ψᵢ with each addend, its kind and scale, and with two
    or more addends how they meet per layer (readapt.interference)."""
    rows = "\n".join(f"| `{a.label}` | {a.kind} | {s:g} |" for a, s in addends)
    terms = " + ".join(f"{s:g}·Ψ{i + 1}" for i, (_, s) in enumerate(addends))
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return f"""---
library_name: transformers
tags: [readapt, merge, partial-adaptation]
---
# Merged model

Made by readapt {__version__} on {now}:

    Ω = Φ + {terms}        (float32 arithmetic, saved in {str(dtype).removeprefix("torch.")} dtype)

Φ (base): `{base}`

| adapter | kind | scale |
|---|---|---|
{rows}

A checkpoint adapter means its difference from the base; a delta folder is a RE-Adapter; a PEFT adapter
contributes s·B·A (DoRA: W′ − W). Load with `transformers.AutoModelForCausalLM.from_pretrained`.
{interference_section(interference) if interference else ""}"""


def interference_section(summary: dict) -> str:
    """The card's table of how the addends meet: per layer, each ‖sᵢΨᵢ‖/‖Φ‖ and each pair's cosine."""
    k = len(summary["addends"])
    pairs = list(summary["overall"].get("cos", {}))
    head = [f"‖s·Ψ{i + 1}‖/‖Φ‖" for i in range(k)] + [f"cos(Ψ{p.replace(',', ', Ψ')})" for p in pairs]

    def row(label, v):
        cells = [_fixed(r) for r in v["rel"]] + [_fixed(v["cos"][p], signed=True) for p in pairs]
        return f"| {label} | " + " | ".join(cells) + " |"

    rows = [row(k_, v) for k_, v in summary["layers"].items()] + [row("**all**", summary["overall"])]
    return f"""
## How the addends meet (weight space)

Per layer, over the tensors this merge touches: each scaled difference's size relative to the base, and the
cosine between each pair (0: orthogonal, > 0 the same direction, < 0 opposite). Orthogonal differences can
still interfere in function. The figures are in `readapt_interference.json`.

| layer | {" | ".join(head)} |
|---|{"---|" * len(head)}
{chr(10).join(rows)}
"""


def interference_summary(summary: dict) -> str:
    """A few lines for the terminal: per pair, the cosine over all touched tensors and its range over layers;
    per addend, its size relative to the base."""
    o, layers = summary["overall"], summary["layers"]
    lines = ["interference (weight space; cos between scaled differences, size relative to the base):"]
    for pair, c in o.get("cos", {}).items():
        per = [v["cos"][pair] for v in layers.values() if v["cos"].get(pair) is not None]
        rng = f", per layer {min(per):+.3f} … {max(per):+.3f}" if per else ""
        i, j = (int(x) for x in pair.split(","))
        lines.append(f"  cos(Ψ{i}, Ψ{j}) = {_fixed(c, True)} overall{rng}")
    for i, (label, r) in enumerate(zip(summary["addends"], o.get("rel", []))):
        lines.append(f"  ‖s·Ψ{i + 1}‖/‖Φ‖ = {_fixed(r)}  ({label})")
    return "\n".join(lines)


def _fixed(x: float | None, signed: bool = False) -> str:
    """A cosine with three decimals and its sign, a relative size with three significant digits; n/a for none."""
    return "n/a" if x is None else f"{x:+.3f}" if signed else f"{x:.3g}"


def lore_summary(report: dict) -> str:
    """A one-screen text summary of a LoRE report."""
    rule = report["rule"]
    head = f"τ={rule['tau']:g}" if "tau" in rule else f"rank {rule['rank']}"
    lines = [f"{head} keeps {100 * report['params_kept_share']:.1f}% of the delta's parameters "
             f"({report['params_kept']:,} of {report['params_delta']:,}) and "
             f"{100 * report['energy_kept_share']:.1f}% of its energy ‖Δ‖² "
             f"(relative error ‖Δ−BA‖/‖Δ‖ = {report['relative_error']:.4f})",
             f"{'kind':<10} {'tensors':>7} {'policy':>8} {'params kept':>12} {'energy kept':>12}"]
    for kind, k in report["by_kind"].items():
        pk = f"{100 * k['params_kept'] / k['params']:.1f}%" if k["params"] else "-"
        ek = f"{100 * k['energy_kept'] / k['energy']:.1f}%" if k["energy"] else "-"
        lines.append(f"{kind:<10} {k['tensors']:>7} {k['policy']:>8} {pk:>12} {ek:>12}")
    ranks = [t["rank"] for t in report["tensors"] if t["policy"] == "lowrank" and t["rank"] >= 0]
    if ranks:
        lines.append(f"ranks: min {min(ranks)}, median {sorted(ranks)[len(ranks) // 2]}, max {max(ranks)}; "
                     f"rank-0 (all-zero) tensors skipped: {sum(r == 0 for r in ranks)}")
    notes = [t for t in report["tensors"] if t["note"] and t["kind"] in ("tied", "unknown")]
    for t in notes[:5]:
        lines.append(f"note: {t['name']}: {t['note']}")
    if report.get("fidelity"):
        lines.append(fidelity_line(report["fidelity"]))
    return "\n".join(lines)


def fidelity_line(f: dict) -> str:
    """The line of a --calibration measurement (readapt.fidelity): KL and top-1 agreement, and its caveats."""
    notes = "".join(f"; {n}" for n in f["notes"])
    return (f"functional fidelity on {f['tokens']} tokens of {Path(f['file']).name}: mean KL(dense ‖ base + adapter) "
            f"{f['mean_kl']:.3g} nats/token, top-1 agreement {100 * f['top1_agreement']:.2f}%{notes}")


def lore_card(report: dict) -> str:
    """README.md of a LoRE-Adapter folder (extract --tau, compress), with the summary of its report."""
    rule = report["rule"]
    rule_text = (f"k(τ) = min{{k : Σ_{{i≤k}} σᵢ² / Σ σⱼ² ≥ {rule['tau']:g}}}" if "tau" in rule
                 else f"k = {rule['rank']} (clamped to each matrix's rank)")
    return f"""---
library_name: peft
tags: [readapt, lore-adapter, lora]
---
# LoRE-Adapter (low-rank RE-Adapter)

Made by readapt {report['readapt_version']} on {report['created']} from {json.dumps(report['source'])}.
Per 2-D weight Δ = U S Vᵀ: {rule_text}; B = U_k S_k, A = V_kᵀ (SVD: {report['svd']}), scale 1
(rank_pattern = alpha_pattern).

    {lore_summary(report).replace(chr(10), chr(10) + '    ')}

Load with `peft.PeftModel.from_pretrained(base_model, THIS_FOLDER)`, or merge with any scale:
`readapt merge BASE --add THIS_FOLDER:0.5 -o OUT`. Per-tensor ranks and energies: `{LORE_REPORT}`.
"""


def _size(nbytes: int) -> str:
    return next(f"{nbytes / d:.3g} {u}" for u, d in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3), ("bytes", 1))
                if nbytes >= d or d == 1)


def fold_summary(report: dict) -> str:
    """A one-screen text summary of a fold report (merge --as-lora)."""
    terms = "".join(f" {'-' if a['scale'] < 0 else '+'} {abs(a['scale']):g}·{a['spec']}"
                    for a in report["source"]["addends"])
    rule = report["rule"]
    if report["mode"] == "exact":
        how = ("exact: each module's LoRA factors concatenated (rank Σ rᵢ, scale 1), so PEFT's merge gives the "
               "dense merge up to float32 rounding" if report["exact"] else
               f"exact mode, but {len(report['totals']['not_carried'])} changed tensors were skipped by policy")
    else:
        how = (f"compressed: per module the best rank-{'k(τ=%g)' % rule['tau'] if 'tau' in rule else rule['rank']} "
               f"approximation of Σ sᵢΨᵢ (LoRE's rule)")
    low = [t for t in report["tensors"] if t["policy"] == "lowrank" and t["rank"] > 0]
    lines = [f"fold of base{terms} into one LoRA; {how}"]
    if low:
        ranks = sorted(t["rank"] for t in low)
        worst = max(low, key=lambda t: t["relative_error"] or 0.0)
        n_fac = sum(t["from_factors"] for t in low)
        error = ("" if report["mode"] == "exact" else
                 f"; relative error ‖Ω−Ω̂‖/‖Ω−Φ‖ {report['relative_error']:.4g} overall, worst "
                 f"{worst['relative_error']:.4g} ({worst['name']}), energy kept "
                 f"{100 * report['energy_kept_share']:.2f}%")
        how = (f"{n_fac} from their LoRA factors, {len(low) - n_fac} from the dense sum" if report["mode"] != "exact"
               else "their LoRA factors stacked")
        lines.append(f"{len(low)} modules low rank (ranks {ranks[0]}-{ranks[-1]}, median {ranks[len(ranks) // 2]}; "
                     f"{how}){error}")
    dense = [t for t in report["tensors"] if t["rank"] == -1]
    if dense:
        lines.append(f"{len(dense)} tensors carried as Ω's values (norms, biases, tied embedding rows: exact)")
    tot = report["totals"]
    lines.append(f"adapter {_size(tot['adapter_bytes'])} ({tot['adapter_params']:,} parameters) vs the dense model "
                 f"{_size(tot['model_bytes'])} ({tot['model_params']:,}): "
                 f"{100 * tot['adapter_bytes'] / max(tot['model_bytes'], 1):.2f}%")
    if tot["not_carried"]:
        lines.append(f"not carried (policy skip): {', '.join(tot['not_carried'][:5])}"
                     f"{' ...' if len(tot['not_carried']) > 5 else ''}")
    if report.get("fidelity"):
        lines.append(fidelity_line(report["fidelity"]))
    return "\n".join(lines)


def fold_card(report: dict) -> str:
    """README.md of a folded adapter (merge --as-lora), with the summary of its report."""
    return f"""---
library_name: peft
tags: [readapt, fold, partial-adaptation, lora]
---
# Folded adapter: a partial adaptation as one LoRA

Made by readapt {report['readapt_version']} on {report['created']}: Ω = Φ + Σ sᵢ·Ψᵢ
(Φ: `{report['source']['base']}`) as one PEFT LoRA on Φ, scale 1 per module (rank_pattern = alpha_pattern),
for serving many variants on one base.

    {fold_summary(report).replace(chr(10), chr(10) + '    ')}

Load with `peft.PeftModel.from_pretrained(base_model, THIS_FOLDER)` (or a multi-LoRA server). Per-module ranks,
kept energy and relative errors: `{FOLD_REPORT}`.
"""


def spectrum_readme(report: dict, provenance: dict, svd: str) -> str:
    """README.md of a spectrum report folder."""
    return (f"# Spectrum of a RE-Adapter (readapt {__version__})\n\nSource: {json.dumps(provenance)}; SVD: {svd}.\n\n"
            f"    {lore_summary(report).replace(chr(10), chr(10) + '    ')}\n\n"
            f"- `spectrum.json`: per tensor k(τ), retained energy v_k, parameters kept k·(m+n); `tau_grid`: the "
            f"whole model's share of parameters kept at each τ\n- `spectrum.safetensors`: σ of every tensor\n"
            f"- `figure2.png`: v_k against k (cf. RE-Adapt Figure 2); `figure3.png`: parameters kept against τ "
            f"(cf. Figure 3)\n")


def vocabulary_matched(st: dict, details: bool = True) -> str:
    """How the vocabulary rows were matched, in words (the report's `vocabulary`)."""
    if st["same_convention"] and not st["matched_by_text"]:
        how = "matched by token string"
    else:
        how = (f"matched by the text each token stands for ({st['matched_by_string']} by identical string, "
               f"{st['matched_by_text']} by identical text under another string)")
    if not details:
        return how
    if not st["same_convention"]:
        how += (f"; the tokenizers use different conventions (old: {st['old_convention']}; new: "
                f"{st['new_convention']})")
    if st["same_string_other_text"]:
        how += (f"; {st['same_string_other_text']} tokens with the same string stand for other text and were not "
                f"matched to each other ({st['other_text_matched_by_text']} of them found their text elsewhere)")
    if st["same_text_not_paired"]:
        how += (f"; {st['same_text_not_paired']} new tokens share their text with an old token already carried to "
                f"another new token of that text: no patch")
    return how


def fmt(x) -> str:
    return "-" if x is None else f"{x:.3g}"


def port_summary(report: dict) -> str:
    """The terminal summary of a port report: counts, every adjusted and skipped tensor, warnings, drift."""
    c, p = report["counts"], report["patch"]
    lines = [f"port {p['spec']} ({p['kind']}) -> {report['new_base']['spec']}: {c['carried']} carried, "
             f"{c['adjusted']} carried with adjustment, {c['skipped']} skipped "
             f"(old base: {report['old_base']['spec'] or 'unknown'}; {report['old_base']['source']})"]
    rest = [m for m in report["modules"] if m["status"] != "carried"]
    for m in rest[:40]:
        lines.append(f"  {m['status']:9s} {m['name']}: {m['why']}")
    if len(rest) > 40:
        lines.append(f"  ... {len(rest) - 40} more adjusted/skipped tensors in {PORT_REPORT}")
    renamed = [m for m in report["modules"] if m["new_name"] and m["new_name"] != m["name"]]
    if renamed:
        m = renamed[0]
        lines.append(f"  re-keyed: {len(renamed)} tensor{'s' * (len(renamed) != 1)} matched to a new name by their "
                     f"common suffix, e.g. {m['name']} -> {m['new_name']} (all in {PORT_REPORT})")
    v = report.get("vocabulary")
    if v:
        lines.append(f"  vocabulary: {v['old_rows']} -> {v['new_rows']} rows, {v['shared_tokens']} shared tokens "
                     f"carried ({v['moved_tokens']} of them moved to another id), "
                     f"{v['new_tokens']} new token{'s' * (v['new_tokens'] != 1)} without patch; rows {vocabulary_matched(v)}")
    for w in report["warnings"]:
        lines.append(f"  warning: {w}")
    d = report.get("drift")
    if d:
        lines.append(f"  drift vs the old base (total): drift {fmt(d['total']['drift'])}, patch/drift "
                     f"{fmt(d['total']['patch_to_drift'])}, cos {fmt(d['total']['cos_patch_drift'])}")
        lines.append("    drift = ‖θ′−θ‖/‖θ‖ (how far the new version moved); patch/drift = ‖P‖/‖θ′−θ‖ (the patch "
                     "is small next to the move when ≪ 1); cos = cos(P, θ′−θ) (≈ 0: unrelated directions)")
        lines.append(f"    {'layer':28s} {'drift':>9s} {'patch/drift':>12s} {'cos':>9s}")
        for k, r in d["layers"].items():
            lines.append(f"    {k:28s} {fmt(r['drift']):>9s} {fmt(r['patch_to_drift']):>12s} "
                         f"{fmt(r['cos_patch_drift']):>9s}")
    if report.get("output"):
        lines.append(f"  wrote {report['output']['path']} (details: {PORT_REPORT})")
    return "\n".join(lines)


def port_card(report: dict) -> str:
    """README.md of a port's output folder (a retargeted adapter or delta)."""
    c = report["counts"]
    what = "LoRA/DoRA adapter (PEFT)" if report["patch"]["kind"] != "delta" else "weight delta"
    return f"""---
library_name: {'peft' if report['patch']['kind'] != 'delta' else 'readapt'}
tags: [readapt, portllm, port]
---
# Ported {what}

Made by readapt {__version__} on {report['created']}: the patch `{report['patch']['spec']}` (made on
`{report['old_base']['spec'] or 'an older version'}`) retargeted to `{report['new_base']['spec']}` with no training
(PortLLM: θ′ + P).

{c['carried']} tensors carried, {c['adjusted']} carried with adjustment (vocabulary rows matched by the text each
token stands for, DoRA magnitudes rescaled), {c['skipped']} skipped. Every tensor and the reason: `{PORT_REPORT}`.
"""


def train_card(settings: dict, records: list[dict], n_blocks: int, n_tokens: int, counters: dict,
                eval_files: list, processes: int, precision: str) -> str:
    """README.md of the adapter folder: what it was trained on, how, and the losses."""
    s = settings
    train_losses = [r["loss"] for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    kind = "DoRA" if s["dora"] else "LoRA"
    data_rows = "\n".join(f"| `{d['file']}` | {d['documents']} |" for d in s["data"])
    first = f"{train_losses[0]:.4f}" if train_losses else "-"
    last = f"{sum(train_losses[-10:]) / len(train_losses[-10:]):.4f}" if train_losses else "-"
    lines = [
        "---", f"base_model: {s['base']}", "library_name: peft", "tags: [readapt, knowledge-adapter, "
        f"{kind.lower()}]", "---", "",
        f"# Knowledge adapter ({kind}, rank {s['rank']})", "",
        f"A {kind} adapter trained with `readapt train` on `{s['base']}` by next-token prediction on the "
        f"unlabeled text below (the knowledge adapter Ψ of RE-Adapt, Fleshman & Van Durme 2024).", "",
        "## Data", "", "| file | documents |", "|---|---|", data_rows, "",
        f"{n_tokens:,} tokens in {n_blocks:,} blocks of {s['max_length']} tokens (each document as the tokenizer "
        f"encodes it, then EOS; each block starts with BOS where the tokenizer adds one); "
        f"sha256 of the token blocks `{s['data_sha256'][:16]}`.", "",
        "## Training", "",
        f"- {counters['step']} optimizer steps of {s['batch_size']} blocks: {counters['tokens']:,} tokens seen, "
        f"{counters['step'] * s['batch_size'] / n_blocks:.2f} epochs",
        f"- {kind}: r={s['rank']}, lora_alpha={s['alpha']}, dropout={s['dropout']}, target modules "
        f"{s['target_modules']}",
        f"- AdamW lr={s['lr']}, weight decay {s['weight_decay']}, linear schedule with {s['warmup_steps']} warmup "
        f"steps, gradient clipping {s['max_grad_norm']}, seed {s['seed']}",
        f"- {processes} process(es), precision {precision}, {counters['train_seconds']:.0f} s of training",
        f"- training loss: first step {first}, mean of the last 10 steps {last}",
    ]
    if evals:
        lines += ["", "## Held-out loss", "", f"Files: {', '.join(f'`{Path(f).absolute()}`' for f in eval_files)}", "",
                  "| step | loss | perplexity |", "|---|---|---|"]
        lines += [f"| {r['step']} | {r['eval_loss']:.4f} | {r['eval_perplexity']:.3f} |" for r in evals]
    lines += ["", "## Use", "", "```python", "from peft import PeftModel",
              "from transformers import AutoModelForCausalLM",
              f"model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({s['base']!r}), THIS_FOLDER)",
              "```", "", "RE-Adapt (partial adaptation) with the instruction difference Δ = INSTRUCT − BASE:", "",
              "```", "readapt extract BASE INSTRUCT -o re_adapter/",
              "readapt merge BASE --add THIS_FOLDER:0.5 --add re_adapter/:0.5 -o merged/", "```", "",
              "`training_log.jsonl` has the loss of every step.", ""]
    return "\n".join(lines)
