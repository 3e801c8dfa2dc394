"""Coverage sweep over Hugging Face transformers families, from small configs built in code (no downloads).

For each family (a ``model_type`` and an Auto class): build the family's default config with
every size field made small (hidden 64, 2 layers, 4 heads, 2 key/value heads, vocabulary 100,
…), then in a subprocess under ``--timeout``: analyze + prune 30% (L1, one call, default
options, timed); output shape kept and finite; parameters left; ``graphprune.save`` →
``graphprune.load`` into a freshly built model, outputs bit-identical; the dead-channel
oracle on a fresh copy (groups torch.export's numbers leave to the audit are not among its
samples; the prune's own audit checks those); whether
``model.config`` still describes the pruned model; and, pruned again with
``uniform=True, prune_heads=True`` at 25%, whether ``save_pretrained`` → ``from_pretrained``
gives the same outputs. Blocked groups are summed up by reason. Usage:

    python benchmarks/hf_zoo.py > benchmarks/results/hf.md
    python benchmarks/hf_zoo.py --families llama,bloom,falcon
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from typing import Optional

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.append(_HERE)

import torch  # noqa: E402

from zoo import round_trip  # noqa: E402  (puts tests/ on sys.path)
from oracle import dead_channel_oracle  # noqa: E402
import graphprune  # noqa: E402

FAMILIES = {  # model_type -> Auto class
    "bert": "AutoModelForSequenceClassification", "roberta": "AutoModelForSequenceClassification",
    "distilbert": "AutoModelForSequenceClassification", "albert": "AutoModelForSequenceClassification",
    "electra": "AutoModelForSequenceClassification", "xlm-roberta": "AutoModelForMaskedLM", "mpnet": "AutoModel",
    "gpt2": "AutoModelForCausalLM", "gpt_neo": "AutoModelForCausalLM", "gptj": "AutoModelForCausalLM",
    "gpt_neox": "AutoModelForCausalLM", "opt": "AutoModelForCausalLM", "bloom": "AutoModelForCausalLM",
    "falcon": "AutoModelForCausalLM", "llama": "AutoModelForCausalLM", "mistral": "AutoModelForCausalLM",
    "mixtral": "AutoModelForCausalLM", "qwen2": "AutoModelForCausalLM", "qwen3": "AutoModelForCausalLM",
    "qwen2_moe": "AutoModelForCausalLM", "gemma": "AutoModelForCausalLM", "gemma2": "AutoModelForCausalLM",
    "gemma3_text": "AutoModelForCausalLM", "phi": "AutoModelForCausalLM", "phi3": "AutoModelForCausalLM",
    "stablelm": "AutoModelForCausalLM", "olmo": "AutoModelForCausalLM", "starcoder2": "AutoModelForCausalLM",
    "t5": "AutoModelForSeq2SeqLM", "bart": "AutoModelForSeq2SeqLM", "vit": "AutoModelForImageClassification",
    "dinov2": "AutoModel", "resnet": "AutoModelForImageClassification",
}
SMALL = dict(  # every size field a family may have, made small
    vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, n_embd=64, n_layer=2, n_head=4, n_positions=64, d_model=64,
    d_ff=128, d_kv=16, num_layers=2, num_heads=4, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
    decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, ffn_dim=128, word_embed_proj_dim=64,
    embedding_size=64, head_dim=16, num_experts=4, num_local_experts=4, num_experts_per_tok=2,
    moe_intermediate_size=64, shared_expert_intermediate_size=64, image_size=32, patch_size=8, num_channels=3,
    num_decoder_layers=2, n_inner=128, rotary_dim=8, num_labels=5, hidden_sizes=[16, 32, 64, 128],
    depths=[1, 1, 1, 1], embedding_size_resnet=16)
IMAGES = {"vit": 32, "dinov2": 32, "resnet": 64}


def build(kind: str) -> tuple:
    """``(model in eval mode, example inputs)`` of family ``kind``'s small config."""
    import transformers

    config = transformers.AutoConfig.for_model(kind)
    for name, value in SMALL.items():
        if hasattr(config, name) and (getattr(config, name) is not None or name == "n_inner"):
            with contextlib.suppress(AttributeError):  # a computed property (Falcon's head_dim)
                setattr(config, name, value)
    if getattr(config, "pad_token_id", None) is not None and config.pad_token_id >= config.vocab_size:
        config.pad_token_id = 0
    if isinstance(getattr(config, "layer_types", None), list) and hasattr(config, "num_hidden_layers"):  # one per layer
        config.layer_types = config.layer_types[: config.num_hidden_layers]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = getattr(transformers, FAMILIES[kind]).from_config(config).eval()
    if kind in IMAGES:
        return model, torch.randn(2, 3, IMAGES[kind], IMAGES[kind], generator=torch.Generator().manual_seed(0))
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    return model, ({"input_ids": ids, "decoder_input_ids": ids[:, :6]} if config.is_encoder_decoder else {"input_ids": ids})


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        output = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return getattr(output, "logits", None) if getattr(output, "logits", None) is not None else output[0]


def _pretrained_round_trip(kind: str) -> str:
    """Pruned with ``uniform=True, prune_heads=True`` at 25%: "equal" when ``save_pretrained`` →
    ``from_pretrained`` gives the same outputs, else why not."""
    model, inputs = build(kind)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", graphprune.ConfigWarning)
        graphprune.prune(model, 0.25, inputs, uniform=True, prune_heads=True)
    if any(w.category is graphprune.ConfigWarning for w in caught):
        return "config cannot say it"
    with tempfile.TemporaryDirectory() as directory, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(directory)
        loaded = type(model).from_pretrained(directory).eval()
    return "equal" if torch.equal(_logits(loaded, inputs), _logits(model, inputs)) else "DIFFERENT"


def _oracle(kind: str, inputs) -> str:
    """The dead-channel oracle on up to 8 exact groups of a fresh copy (in float64). Groups whose
    sizes only the shape audit confirms (torch.export's numbers) are left to the audit, which
    the oracle's raw surgery skips."""
    try:
        summary = dead_channel_oracle(build(kind)[0], inputs, max_groups=8)
    except RuntimeError as exc:
        if "Double" in str(exc):
            return "n/a (float64 unsupported)"
        raise
    return f"pass ({summary['groups_tested']})"


def worker(kind: str) -> dict:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    model, inputs = build(kind)
    expected, params = _logits(model, inputs), graphprune.count_parameters(model)
    start = time.perf_counter()
    report = graphprune.analyze(model, inputs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", graphprune.ConfigWarning)
        graphprune.prune(model, 0.3, inputs, report=report)
    row = {"seconds": time.perf_counter() - start, "groups": len(report.groups), "prunable": len(report.prunable_groups)}
    produced = _logits(model, inputs)
    row["output"] = "kept" if produced.shape == expected.shape and bool(produced.isfinite().all()) else "CHANGED"
    row["params_left"] = graphprune.count_parameters(model) / params
    row["config"] = "stale" if any(w.category is graphprune.ConfigWarning for w in caught) else "follows"
    row["save_load"] = round_trip(kind, model, inputs, make=lambda: build(kind)[0])
    row["oracle"] = _oracle(kind, inputs)
    row["pretrained"] = _pretrained_round_trip(kind)
    row["blocked"] = Counter(r.split(" (")[0][:70] for g in report.groups for r in g.blocked).most_common(3)
    return row


def run(kind: str, timeout: float) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", kind]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        return {"error": (done.stderr.strip().splitlines() or ["crashed"])[-1][:160]}
    return json.loads(lines[-1])


def table(rows: dict) -> str:
    lines = ["| family | groups (prunable) | output | params left | save/load | oracle | config | "
             "save_pretrained (uniform) | s | most blocked |", "|---|---|---|---|---|---|---|---|---|---|"]
    for kind, r in rows.items():
        if "error" in r:
            lines.append(f"| {kind} | FAILED: {r['error']} |  |  |  |  |  |  |  |  |")
            continue
        blocked = "; ".join(f"{reason} ×{n}" for reason, n in r["blocked"])
        lines.append(f"| {kind} | {r['groups']} ({r['prunable']}) | {r['output']} | {r['params_left']:.3f} | {r['save_load']} | "
                     f"{r['oracle']} | {r['config']} | {r['pretrained']} | {r['seconds']:.1f} | {blocked} |")
    ok = [r for r in rows.values() if "error" not in r and r["output"] == "kept" and r["save_load"] == "equal"]
    left = sorted(r["params_left"] for r in ok)
    lines += ["", f"{len(ok)}/{len(rows)} families prune, keep their output shape and round-trip; median params left "
              f"{left[len(left) // 2]:.3f}" if left else "", f"save_pretrained round-trips with uniform=True: "
              f"{sum(r.get('pretrained') == 'equal' for r in rows.values())}/{len(rows)}"]
    return "\n".join(lines)


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", help=f"comma-separated model types (default: all {len(FAMILIES)})")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per family (default 300)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker)))
        return 0
    import transformers

    kinds = args.families.split(",") if args.families else list(FAMILIES)
    rows = {}
    for kind in kinds:
        rows[kind] = run(kind, args.timeout)
        print(f"  {kind}: {rows[kind]}", file=sys.stderr)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, ratio 0.3, one thread per family\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
