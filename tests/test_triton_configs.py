"""Tile configs: the tuning cache, shipped defaults, the nearest-shape fallback and the shared-memory fit."""

import json

import pytest
import torch

from moecc.codegen.triton import configs
from moecc.codegen.triton.configs import TileConfig

H100_SMEM = 232448  # bytes a block may opt into on an H100


def test_token_buckets_are_powers_of_two():
    assert [configs.token_bucket(t) for t in (0, 1, 2, 3, 64, 65, 4096, 65536)] == [1, 1, 2, 4, 64, 128, 4096,
                                                                                   65536]


def test_fp32_tiles_shrink_to_fit_shared_memory():
    bf16 = TileConfig(128, 128, 64, 8, 8, 4)
    assert configs.fit_shared_memory(bf16, 2, 2, H100_SMEM) == bf16
    fp32 = configs.fit_shared_memory(bf16, 4, 2, H100_SMEM)
    assert fp32.block_m == bf16.block_m and fp32.block_n == bf16.block_n and fp32 != bf16
    assert (fp32.num_stages - 1) * (fp32.block_m + 2 * fp32.block_n) * fp32.block_k * 4 <= H100_SMEM
    assert configs.shrink(TileConfig(16, 16, 16, 1, 1, 2)) is None


def test_tuned_config_is_stored_found_and_shares_block_m(tmp_path, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("MOECC_CACHE_DIR", str(tmp_path))
    dev = "Test GPU (store)"
    assert configs.lookup(dev, torch.float16, 4, 64, 32, 8, "gemm1") is None
    c1, c2 = TileConfig(32, 64, 64, 4, 4, 3), TileConfig(64, 128, 32, 8, 4, 3)
    configs.store(dev, torch.float16, 4, 64, 32, 8, "gemm1", c1)
    configs.store(dev, torch.float16, 4, 32, 64, 8, "gemm2", c2)
    assert configs.lookup(dev, torch.float16, 4, 64, 32, 8, "gemm1") == c1
    table = json.loads((tmp_path / "triton_configs.json").read_text())
    assert any("triton" in key and key.endswith("|gemm1") for key in table)
    got1, got2 = configs.choose(dev, torch.float16, 4, 32, 64, 5, 10)
    assert got1 == c1 and got2.block_m == c1.block_m and got2.block_n == c2.block_n


def test_a_damaged_tuning_cache_is_ignored_with_a_warning_and_written_anew(tmp_path, monkeypatch, moecc_warnings):
    pytest.importorskip("triton")
    monkeypatch.setenv("MOECC_CACHE_DIR", str(tmp_path))
    (tmp_path / "triton_configs.json").write_text('{"Test GPU (damaged)|triton')  # a write cut short
    dev = "Test GPU (damaged)"
    assert configs.lookup(dev, torch.float16, 4, 64, 32, 8, "gemm1") is None
    assert "cannot be read" in moecc_warnings.text
    tile = TileConfig(32, 64, 64, 4, 4, 3)
    configs.store(dev, torch.float16, 4, 64, 32, 8, "gemm1", tile)
    assert len(json.loads((tmp_path / "triton_configs.json").read_text())) == 1
    assert configs.lookup(dev, torch.float16, 4, 64, 32, 8, "gemm1") == tile


def test_a_tile_that_cannot_be_stored_still_serves_the_process(tmp_path, monkeypatch, moecc_warnings):
    pytest.importorskip("triton")
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("MOECC_CACHE_DIR", str(tmp_path / "file" / "cache"))  # a folder that cannot be made
    dev = "Test GPU (read-only)"
    tile = TileConfig(32, 64, 64, 4, 4, 3)
    configs.store(dev, torch.float16, 4, 64, 32, 8, "gemm1", tile)
    assert "could not store" in moecc_warnings.text
    assert configs.lookup(dev, torch.float16, 4, 64, 32, 8, "gemm1") == tile


def _store_tiles(cache_dir: str, worker: int) -> None:
    import os

    os.environ["MOECC_CACHE_DIR"] = cache_dir
    for bucket in range(1, 9):
        configs.store(f"Test GPU (worker {worker})", torch.float16, 4, 64, 32, bucket, "gemm1",
                      TileConfig(32, 64, 64, 4, 4, 3))


def test_processes_tuning_at_once_keep_each_others_tiles(tmp_path):
    """Workers of one server tune into one cache: each store adds its tile to the table as it is on disk then."""
    pytest.importorskip("triton")
    import multiprocessing

    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("needs fork")
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_store_tiles, args=(str(tmp_path), i)) for i in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert [w.exitcode for w in workers] == [0] * 4
    assert len(json.loads((tmp_path / "triton_configs.json").read_text())) == 4 * 8
    assert not list(tmp_path.glob("*.tmp"))


def test_shipped_configs_cover_h100_and_h200_and_fit():
    table = json.loads(configs.SHIPPED.read_text())
    for device in ("NVIDIA H100 80GB HBM3", "NVIDIA H200"):
        for shape in ("E8|N14336|K4096", "E128|N768|K2048"):
            for bucket in (1, 8, 64, 512, 4096, 16384):
                assert f"{device}|bfloat16|{shape}|T{bucket}|gemm1" in table
    for key, cfg in table.items():  # tuned tiles ran, so the fit must leave them as they are
        assert cfg["top_k"] >= 1, key
        tile = configs._config(cfg)
        assert configs.fit_shared_memory(tile, 2, 2 if key.endswith("gemm1") else 1, H100_SMEM) == tile, key


def test_untuned_shape_takes_the_nearest_shipped_one_then_the_heuristic():
    near = configs.nearest_shipped("NVIDIA H100 80GB HBM3", torch.bfloat16, 64, 1024, 2048, 256, "gemm1")
    assert near is not None
    same_family = configs.nearest_shipped("NVIDIA H800", torch.bfloat16, 64, 1024, 2048, 256, "gemm1")
    assert same_family is not None
    assert configs.nearest_shipped("Some Other GPU", torch.bfloat16, 64, 1024, 2048, 256, "gemm1") is None
    c1, c2 = configs.choose("Some Other GPU", torch.bfloat16, 64, 1024, 2048, 256, 2048)
    assert c1 == configs.heuristic(2048 / 64, torch.bfloat16, False) and c2.block_m == c1.block_m


def test_fp16_starts_from_the_bf16_tiles_and_fp32_from_its_own(monkeypatch):
    """Only bf16 tiles are shipped. fp16 runs the same tensor-core instructions at the same element size, so it
    takes them (Mixtral fp16 at 64 tokens, H200: 0.679 ms with them, 0.909 with the heuristic); fp32 multiplies as
    three TF32 products and has tiles of its own (the bf16 ones spent 42 ms on Qwen3-MoE's 512 tokens, its own 1.4)."""
    monkeypatch.setattr(configs, "_chosen", {})
    dev = "NVIDIA H200"
    bf16 = configs.choose(dev, torch.bfloat16, 128, 2048, 768, 512, 512 * 8)
    assert configs.choose(dev, torch.float16, 128, 2048, 768, 512, 512 * 8) == bf16
    assert configs.nearest_shipped(dev, torch.float32, 128, 768, 2048, 512, "gemm1", 8) is None
    c1, c2 = configs.choose(dev, torch.float32, 128, 2048, 768, 512, 512 * 8)
    assert c1 == configs.heuristic(512 * 8 / 128, torch.float32, False) and c1.block_k == 32
    assert c2.block_m == c1.block_m
    assert configs.dtype_step(torch.float16, "bfloat16") > 0 == configs.dtype_step(torch.bfloat16, "bfloat16")


def test_fp32_dots_keep_fp32_accuracy_unless_torch_allows_tf32(monkeypatch):
    pytest.importorskip("triton")
    from moecc.codegen.triton import grouped_gemm

    x = torch.zeros(2, device="cuda" if torch.cuda.is_available() else "cpu")
    exact = "tf32x3" if x.is_cuda and not configs.INTERPRET and torch.cuda.get_device_capability() >= (8, 0) else "ieee"
    assert grouped_gemm._precision(x) == exact
    assert grouped_gemm._precision(x.half()) == "tf32"  # 16-bit dots ignore it
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    assert grouped_gemm._precision(x) == "tf32"


def test_tiles_tuned_at_another_top_k_are_not_taken_for_the_same_key(tmp_path, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("MOECC_CACHE_DIR", str(tmp_path))
    dev = "Test GPU (top-k)"
    tuned = TileConfig(128, 128, 64, 8, 8, 4)
    configs.store(dev, torch.bfloat16, 64, 1024, 2048, 512, "gemm1", tuned, top_k=8)
    assert configs.lookup(dev, torch.bfloat16, 64, 1024, 2048, 512, "gemm1", 8) == tuned
    assert configs.lookup(dev, torch.bfloat16, 64, 1024, 2048, 512, "gemm1", 1) is None
    assert configs.lookup(dev, torch.bfloat16, 64, 1024, 2048, 512, "gemm1") == tuned  # top-k unknown: any fits


def test_nearest_shipped_tiles_follow_pairs_per_expert():
    """OLMoE's shape (E 64, H 2048, I 1024) at top-2 has a quarter of top-8's rows per expert: 512 tokens at top-2
    are matched with tiles tuned at 16 rows per expert, not with OLMoE's own 64-row tiles at 512 tokens."""
    dev = "NVIDIA H100 80GB HBM3"
    own = configs.lookup(dev, torch.bfloat16, 64, 1024, 2048, 512, "gemm1", 8)
    assert own is not None and own.block_m == 64
    assert configs.lookup(dev, torch.bfloat16, 64, 1024, 2048, 512, "gemm1", 2) is None
    near = configs.nearest_shipped(dev, torch.bfloat16, 64, 1024, 2048, 512, "gemm1", top_k=2)
    assert near.block_m < own.block_m
    c1, _ = configs.choose(dev, torch.bfloat16, 64, 2048, 1024, 512, 512 * 2)
    assert c1 == near


def test_nearest_shipped_tiles_prefer_the_same_expert_count_on_a_tie(monkeypatch):
    """Mixtral at 1024 tokens has no shipped tiles: its own 512-token ones and a 16-expert shape's 4096-token ones
    are equally near in rows per expert, N and K; the 16-expert tiles (tuned where the Gluon GEMM 1 runs) took its
    GEMM 1 7.6 ms on an H200 against 0.5."""
    monkeypatch.setattr(configs, "_chosen", {})
    own = configs.lookup("NVIDIA H200", torch.bfloat16, 8, 14336, 4096, 512, "gemm1", 2)
    c1, _ = configs.choose("NVIDIA H200", torch.bfloat16, 8, 4096, 14336, 1024, 2048)
    assert own is not None and c1 == own


@pytest.mark.parametrize("cfg,accumulators,block_n", [
    (TileConfig(128, 256, 64, 8, 8, 3), 2, 128),  # gated GEMM 1: 256 fp32 a thread would spill
    (TileConfig(128, 256, 64, 8, 8, 3), 1, 256),  # GEMM 2's one accumulator: 128 a thread, as tuned
    (TileConfig(128, 128, 64, 8, 4, 4), 2, 64),
    (TileConfig(64, 128, 64, 8, 4, 4), 2, 128),
    (TileConfig(16, 64, 128, 1, 4, 4), 2, 64),
])
def test_tiles_keep_their_accumulators_within_the_registers(cfg, accumulators, block_n):
    assert configs.within_registers(cfg, accumulators).block_n == block_n


def test_gemm1_launches_a_wide_gated_tile_narrowed(monkeypatch):
    pytest.importorskip("triton")
    from moecc.codegen.triton import grouped_gemm

    launched = []
    monkeypatch.setattr(grouped_gemm, "_launch", lambda kernel, grid, cfg, *a, **kw: launched.append(cfg))
    x = torch.randn(8, 64)
    w_up = torch.randn(4, 2 * 32, 64)
    # align's output as it would be, not launched: without the interpreter (a CUDA machine) CPU tensors cannot
    aligned = (torch.zeros(4 * 128, dtype=torch.int32), torch.zeros(4, dtype=torch.int32), torch.tensor([128]))
    grouped_gemm.gemm1(x, w_up, w_up, None, aligned, 16, 2, True, "silu", 1.0, 0.0,
                       TileConfig(128, 256, 64, 8, 8, 3))
    assert [c.block_n for c in launched] == [128]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="tuning times kernels on a GPU")
def test_tuning_a_decode_bucket_times_graph_replays_and_stores_tiles(tmp_path, monkeypatch):
    from moecc.codegen.triton import tune

    monkeypatch.setenv("MOECC_CACHE_DIR", str(tmp_path))
    timed = []
    graph_timer = tune._graph_timer

    def counting_timer():
        graph_ms = graph_timer()
        return lambda fn: timed.append(graph_ms(fn)) or timed[-1]

    monkeypatch.setattr(tune, "_graph_timer", counting_timer)
    c1, c2, ms = tune.tune_shape(4, 128, 64, 2, 8, torch.float16)  # 8 tokens: replayed from CUDA graphs
    assert timed and 0 < ms < float("inf") and c1.block_m == c2.block_m
    assert configs.lookup(torch.cuda.get_device_name(), torch.float16, 4, 64, 128, 8, "gemm1", 2) == c1
