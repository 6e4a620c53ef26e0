"""Where batch-1 greedy generation through ``cm.generate`` spends its time, against the model's own generate: wall
per new token, host time by function (cProfile) and device time by kernel (torch.profiler)."""

import cProfile
import pstats
import time

import torch
from model_e2e import mixtral
from torch.profiler import ProfilerActivity, profile

import moecc

NEW = 32
model = mixtral(4, shared_experts=False)
cm = moecc.compile(model, backend="triton")
ids = torch.randint(0, 32000, (1, 128), device="cuda")


def run(generate):
    torch.cuda.synchronize()
    start = time.perf_counter()
    generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
             pad_token_id=0)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / NEW * 1e3


with torch.no_grad():
    for generate, label in ((model.generate, "HF"), (cm.generate, "moecc")):
        run(generate)
        print(f"{label}: {min(run(generate) for _ in range(3)):.3f} ms per new token")
    for generate, label in ((model.generate, "HF"), (cm.generate, "moecc")):
        prof = cProfile.Profile()
        prof.enable()
        run(generate)
        prof.disable()
        print(f"== {label} host, by own time")
        pstats.Stats(prof).sort_stats("tottime").print_stats(12)
        with profile(activities=[ProfilerActivity.CUDA]) as p:
            run(generate)
        print(f"== {label} device")
        print(p.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
