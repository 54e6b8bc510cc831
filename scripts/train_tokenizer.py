#!/usr/bin/env python
"""Train the small byte-level BPE tokenizer shipped in ``lm_eval_bh/assets/tokenizer/``.

Deterministic: the corpus is the shipped offline task text (``tasks/offline/*.jsonl``,
questions and choices, in file order) plus lm-eval's MMLU chain-of-thought prompt file
(``lm_eval/tasks/mmlu/flan_cot_fewshot/_cot_prompts.json``, MIT), and training runs on
one thread.  Special tokens follow OLMoE's GPT-NeoX tokenizer: ``<|endoftext|>`` (id 0) is
bos, eos and unk; ``<|padding|>`` (id 1) is pad.

    python scripts/train_tokenizer.py [--vocab-size 4096] [--out lm_eval_bh/assets/tokenizer]
"""

from __future__ import annotations

import os

# single-threaded, so merges are reproducible; must be set before tokenizers is imported
os.environ["RAYON_NUM_THREADS"] = "1"
os.environ["RAYON_RS_NUM_CPUS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import argparse  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EOS, PAD = "<|endoftext|>", "<|padding|>"


def corpus() -> list[str]:
    import lm_eval

    texts: list[str] = []
    cot = Path(lm_eval.__file__).resolve().parent / "tasks/mmlu/flan_cot_fewshot/_cot_prompts.json"
    data = json.loads(cot.read_text(encoding="utf-8"))
    texts += [data[k] for k in sorted(data)]
    for path in sorted((REPO / "tasks" / "offline").glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            if "_meta" in rec:
                continue
            texts.append("Question: " + rec["question"] + "\nAnswer: " + " ".join(rec["choices"]))
    return texts


def train(vocab_size: int = 4096):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    return tok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--out", default=str(REPO / "lm_eval_bh" / "assets" / "tokenizer"))
    args = ap.parse_args(argv)

    from transformers import PreTrainedTokenizerFast

    tok = train(args.vocab_size)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=PAD,
        model_max_length=512, clean_up_tokenization_spaces=False,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    # "PreTrainedTokenizerFast" (an alias of transformers 5's TokenizersBackend) also loads with transformers 4.x
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    print(f"saved {len(fast)} tokens to {out}: {sorted(p.name for p in out.iterdir())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
