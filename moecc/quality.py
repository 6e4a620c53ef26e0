"""Held-out perplexity of a byte-level causal LM on the Python standard library (the tiny-moe-stdlib recipe):
every 10th file of ``sorted(glob(stdlib/*.py))`` is held out; bytes are the token ids."""

from __future__ import annotations

import glob
import math
import os
import sysconfig

import torch


def held_out_bytes() -> torch.Tensor:
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    held = [f for i, f in enumerate(files) if i % 10 == 0]
    return torch.tensor(list(b"".join(open(f, "rb").read() for f in held)), dtype=torch.long)


def windows(data: torch.Tensor, count: int, seq: int = 128, batch: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(count):
        ix = torch.randint(0, len(data) - seq - 1, (batch,), generator=g)
        yield torch.stack([data[i:i + seq] for i in ix])


def perplexity(logits_fn, batches: int = 10, seq: int = 128, batch: int = 16) -> float:
    """exp(mean next-byte cross-entropy); ``logits_fn(input_ids) -> logits``."""
    data = held_out_bytes()
    losses = []
    with torch.no_grad():
        for x in windows(data, batches, seq, batch):
            logits = logits_fn(x).float()
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                     x[:, 1:].reshape(-1))
            losses.append(loss.item())
    return math.exp(sum(losses) / len(losses))
