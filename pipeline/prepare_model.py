"""Stage prepare-model: the base policy (model.source) saved as safetensors + tokenizer + chat template.

    python -m pipeline.prepare_model --params params.yaml --out data/checkpoints/0
"""

from __future__ import annotations

import argparse

from grpo.config import load_params
from grpo.models.checkpoints import save_checkpoint
from grpo.models.loading import load_source
from pipeline.stage import run, stage


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default="data/checkpoints/0")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    with stage("prepare-model", reads=[params.model.source], writes=[args.out]) as log:
        model, tokenizer = load_source(params.model.source)
        info = {"source": params.model.source, "checkpoint_id": "base", "iteration": 0,
                "parameters": sum(p.numel() for p in model.parameters())}
        save_checkpoint(args.out, model, tokenizer, info)
        log.update(parameters=f"{info['parameters'] / 1e6:.1f}M")


if __name__ == "__main__":
    run(main)
