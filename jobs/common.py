"""What every job does first: logging, torch threads, and the model from the model/ config group."""

from __future__ import annotations

import logging

import torch
from omegaconf import DictConfig

from skipengine import Engine, load_model


def setup(threads: int | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if threads:
        torch.set_num_threads(int(threads))


def engine_from_config(model_cfg: DictConfig) -> Engine:
    model, tokenizer = load_model(
        model_cfg.spec,
        device=model_cfg.device,
        dtype=model_cfg.dtype,
        trust_remote_code=model_cfg.trust_remote_code,
    )
    return Engine(model, tokenizer)
