"""Export checkpoint k as a plain Hugging Face model folder (not a DVC stage: run it when you need the model).

    python -m pipeline.export --checkpoint data/checkpoints/7 --out exported/iter-7

A full fine-tuning checkpoint is written as it is, without the optimizer and trainer state; a LoRA checkpoint
(an adapter on checkpoint 0) is merged into its base, W + (alpha / r) B A. Either way the result loads with
`AutoModelForCausalLM.from_pretrained("exported/iter-7")` and `AutoTokenizer.from_pretrained(...)`, chat
template included. --dtype bfloat16 halves its size.
"""

from __future__ import annotations

import argparse
import json

import torch

from grpo.errors import InputError
from grpo.models.atomic import atomic_folder
from grpo.models.loading import INFO_FILE, checkpoint_info, load_checkpoint, save_model
from pipeline.stage import run, stage

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint folder, e.g. data/checkpoints/7")
    parser.add_argument("--out", required=True, help="the folder to write (replaced if it exists)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    args = parser.parse_args(argv)
    with stage("export", reads=[args.checkpoint], writes=[args.out]) as log:
        try:
            info = checkpoint_info(args.checkpoint)
        except FileNotFoundError:
            raise InputError(f"--checkpoint {args.checkpoint}: not a checkpoint folder (no {INFO_FILE})") from None
        model, tokenizer = load_checkpoint(args.checkpoint, dtype=DTYPES[args.dtype])
        exported = {"exported_from": info["checkpoint_id"], "iteration": info.get("iteration"),
                    "lora_merged": "base" in info}
        with atomic_folder(args.out) as folder:
            save_model(model, tokenizer, folder)
            (folder / "exported_from.json").write_text(json.dumps(exported, indent=2) + "\n")
        log.update(checkpoint=info["checkpoint_id"], lora_merged=exported["lora_merged"], dtype=args.dtype)


if __name__ == "__main__":
    run(main)
