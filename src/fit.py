"""Training entry point: a LightningCLI over a recipe, with omegaconf interpolation.

    python -m src.fit --recipe recipes/sft.yaml [--trainer.max_steps=100 --model.lr=1e-5 --data.batch_size=4 ...]
    python -m src.fit --recipe recipes/sft.yaml --print_config      # the resolved configuration
    python -m src.fit --recipe recipes/sft.yaml --resume last        # or --resume PATH.ckpt

``--recipe`` is LightningCLI's ``--config`` (so later flags override it); ``${...}`` interpolations resolve with
omegaconf. The resolved configuration is saved as config.yaml in the run's log directory.
"""

from __future__ import annotations

import sys

import torch
from lightning.pytorch.cli import LightningCLI

# Tensor-core matmuls on GPUs; no effect on CPU.
torch.set_float32_matmul_precision("high")


class FitCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--resume", default=None,
                            help='resume from a checkpoint: a path, or "last" (the ModelCheckpoint\'s last)')


def recipe_args(argv: list[str]) -> list[str]:
    """``--recipe X`` / ``--recipe=X`` -> ``--config X`` (LightningCLI's name for it)."""
    out = []
    for arg in argv:
        if arg == "--recipe":
            out.append("--config")
        elif arg.startswith("--recipe="):
            out.append("--config=" + arg.split("=", 1)[1])
        else:
            out.append(arg)
    return out


def build_cli(argv: list[str] | None = None) -> FitCLI:
    """Parse a recipe and its overrides and instantiate trainer, model and data (nothing runs yet)."""
    if argv is None:  # LightningCLI warns when given args beside a command line: rewrite the command line itself
        sys.argv[1:] = recipe_args(sys.argv[1:])
    return FitCLI(args=None if argv is None else recipe_args(argv), run=False,
                  parser_kwargs={"parser_mode": "omegaconf"}, save_config_kwargs={"overwrite": True},
                  subclass_mode_model=True, subclass_mode_data=True)


def main(argv: list[str] | None = None) -> FitCLI:
    cli = build_cli(argv)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.config.get("resume"))
    return cli


if __name__ == "__main__":
    main()
