"""The benchmark scripts run end to end and write the JSON keys CI and regression tracking read.

Tiny sizes: these check that the scripts work, not how fast anything is (no timed asserts)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
pytestmark = pytest.mark.slow


def run(script: str, *args: str, cwd: Path) -> str:
    out = subprocess.run(
        [sys.executable, str(SCRIPTS / script), *args], capture_output=True, text=True, cwd=cwd, timeout=600
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    return out.stdout


def test_bench_loader_writes_every_ratio(tmp_path):
    run(
        "bench_loader.py",
        *("--quick", "--images", "96", "--batch-size", "16", "--workers", "1", "--wait-idle", "0"),
        *("--root", str(tmp_path / "bench"), "--json", str(tmp_path / "loader.json")),
        cwd=tmp_path,
    )
    figures = json.loads((tmp_path / "loader.json").read_text())
    for key in ("l3_over_l0", "l3_over_l1", "l3_over_l2", "rss_10x_over_1x"):
        assert figures[key] > 0, key


PEER_MODULES = ("streaming", "litdata")  # the bench extra's loaders (scripts/bench_peers.py)
PEERS_INSTALLED = all(importlib.util.find_spec(m) for m in PEER_MODULES)
TINY = ("--quick", "--images", "96", "--batch-size", "16", "--workers", "1", "--wait-idle", "0")


@pytest.mark.skipif(PEERS_INSTALLED, reason="the peers are installed: test_bench_loader_runs_the_peers runs")
def test_bench_loader_says_the_peers_are_missing_and_runs_the_rest(tmp_path):
    out = run(
        "bench_loader.py", *TINY, "--only", "L3,mosaic+ours", "--no-memory-check",
        *("--root", str(tmp_path / "bench"), "--json", str(tmp_path / "loader.json")),
        cwd=tmp_path,
    )  # fmt: skip
    assert 'peers not installed, skipped: mosaic (pip install -e ".[bench]" installs them)' in out
    figures = json.loads((tmp_path / "loader.json").read_text())
    assert set(figures["results"]) == {"L3"} and "l3_over_mosaic_ours" not in figures


@pytest.mark.peers
def test_bench_loader_runs_the_peers(tmp_path):
    for module in PEER_MODULES:
        pytest.importorskip(module)
    peers = "mosaic,mosaic+ours,litdata,litdata+ours"
    run(
        "bench_loader.py", *TINY, "--only", f"L0,L3,{peers}", "--no-memory-check",
        *("--root", str(tmp_path / "bench"), "--json", str(tmp_path / "loader.json")),
        cwd=tmp_path,
    )  # fmt: skip
    figures = json.loads((tmp_path / "loader.json").read_text())
    for key in ("l3_over_mosaic", "l3_over_mosaic_ours", "l3_over_litdata", "l3_over_litdata_ours"):
        assert figures[key] > 0, key
    for key in ("l3_over_l0", "mosaic_ours_over_l0", "litdata_ours_over_l0"):
        assert figures[key] > 0, key
    results = figures["results"]
    assert results["mosaic"]["batch"].startswith("float32 (16, 3, 224, 224)")
    assert results["litdata+ours"]["batch"].startswith("uint8 (16, 3, 224, 224)")
    for peer in ("mosaic", "litdata"):  # each saw every image once: the copies hold the set unchanged
        assert results[peer]["images_timed"] == results["L3"]["images_timed"], peer
    # The copies keep the bytes: each peer's copy of the set holds our shards' JPEGs byte for byte.
    sys.path.insert(0, str(SCRIPTS))
    try:
        import bench_peers
        from bench_data import build
    finally:
        sys.path.remove(str(SCRIPTS))
    bench = build("large", 96, root=str(tmp_path / "bench"))
    ours = [jpg for jpg, _ in bench_peers._samples(bench.index)]
    import litdata
    from streaming import StreamingDataset

    mds = StreamingDataset(local=bench_peers.mds_dir(bench.index, bench.directory), batch_size=1)
    assert [mds[i]["jpg"] for i in range(len(mds))] == ours
    lit = litdata.StreamingDataset(input_dir=bench_peers.litdata_dir(bench.index, bench.directory))
    assert sorted(lit[i]["jpg"] for i in range(len(lit))) == sorted(ours)


def test_bench_stages_breaks_the_fixed_cost_down(tmp_path):
    run(
        "bench_stages.py", "--variant", "large", "--images", "96", "--batch-size", "16", "--repeat", "1",
        *("--root", str(tmp_path / "bench"), "--json", str(tmp_path / "stages.json")),
        cwd=tmp_path,
    )  # fmt: skip
    figures = json.loads((tmp_path / "stages.json").read_text())
    us = figures["us_per_sample"]
    for key in ("tar", "batch, fresh memory", "batch, reused slot", "loader, fresh memory"):
        assert us[key] > 0, key
    assert us["L0 (decode + transform)"] > us["tar"]  # a decode costs more than parsing its tar entry
    assert us["loader, reused slots"] > 0
    assert set(figures["stage_us"]) >= {"plan", "decode wrapper", "loader, reused slots"}


def test_bench_train_writes_the_framework_ratio(tmp_path):
    run(
        "bench_train.py",
        *("--backbone", "test_resnet", "--image-size", "32", "--batch", "16", "--images", "200"),
        *(
            "--warmup",
            "1",
            "--steps",
            "2",
            "--rounds",
            "1",
            "--recipes",
            "--json",
            str(tmp_path / "train.json"),
        ),
        cwd=tmp_path,
    )
    figures = json.loads((tmp_path / "train.json").read_text())
    assert figures["ours_over_plain"] > 0 and figures["ours_over_resident"] > 0
    assert figures["ema_over_ours"] > 0 and figures["mixup_over_ours"] > 0


def test_bench_plan_and_stream_run(tmp_path):
    out = run("bench_plan.py", "--shards", "200", "--world", "4", "--workers", "2", cwd=tmp_path)
    assert "after an elastic resume" in out
    run(
        "bench_stream.py",
        "--images",
        "200",
        "--epochs",
        "1",
        "--json",
        str(tmp_path / "s.json"),
        cwd=tmp_path,
    )
    figures = json.loads((tmp_path / "s.json").read_text())
    assert set(figures) >= {"audit_over_none_local", "s3_over_local"}


def test_bench_export_reports_parity_and_latency(tmp_path):
    run(
        "bench_export.py",
        *("--backbone", "test_resnet", "--image-size", "32", "--parity-images", "8", "--repeat", "2"),
        *("--formats", "onnx/fp32,torchscript/fp16", "--json", str(tmp_path / "e.json")),
        cwd=tmp_path,
    )
    figures = json.loads((tmp_path / "e.json").read_text())
    assert figures["parity"]["onnx/fp32"]["batch1"]["top1_agreement"] == 1.0
    assert figures["parity"]["torchscript/fp16"]["tolerance"] == 1e-2
    assert figures["ort_over_eager"]["batch1"] > 0 and figures["ort_over_eager"]["batch32"] > 0


def test_bench_serve_reports_requests_per_second(tmp_path):
    run(
        "bench_serve.py",
        *("--backbone", "test_resnet", "--image-size", "32", "--requests", "20", "--clients", "1,2"),
        *("--json", str(tmp_path / "serve.json")),
        cwd=tmp_path,
    )
    figures = json.loads((tmp_path / "serve.json").read_text())
    assert figures["inprocess_images_per_s"] > 0
    for clients in ("clients1", "clients2"):
        assert figures["served"][clients]["requests_per_s"] > 0
        assert figures["served"][clients]["served_over_inprocess"] > 0


def test_bench_preemption_reports_both_exits_and_the_check_time(tmp_path):
    tiny = ("data.synthetic.num_samples=400", "data.synthetic.image_size=48", "data.image_size=32")
    run(
        "bench_preemption.py",
        *("--batch", "3", "--batch-size", "16", "--repeat", "3", "--json", str(tmp_path / "p.json")),
        *("--extra", *tiny, f"paths.cache_dir={tmp_path}/cache"),
        cwd=tmp_path,
    )
    figures = json.loads((tmp_path / "p.json").read_text())
    assert figures["ours"]["exit_status"] == 143 and figures["ours"]["last_ckpt_step"] >= 3
    assert figures["lightning"]["exit_status"] == 0  # Lightning's own SIGTERM handling, the baseline
    assert figures["check_ms"] > 0 and figures["ours_over_lightning_exit"] > 0


def test_bench_tasks_writes_the_task_ratios(tmp_path):
    run(
        "bench_tasks.py",
        *("--image-size", "32", "--stored", "48", "--images", "200", "--batch", "16"),
        *("--warmup", "1", "--steps", "2", "--rounds", "1", "--json", str(tmp_path / "tasks.json")),
        cwd=tmp_path,
    )
    figures = json.loads((tmp_path / "tasks.json").read_text())
    for key in ("loader_mask_over_class", "segment_over_classify", "multilabel_over_classify"):
        assert figures[key] > 0, key


def test_bench_anomaly_writes_both_methods_figures(tmp_path):
    run(
        "bench_anomaly.py",
        *("--images", "100", "--scale", "2", "--image-size", "32", "--classifier-epochs", "1"),
        *("--json", str(tmp_path / "anomaly.json")),
        cwd=tmp_path,
    )
    figures = json.loads((tmp_path / "anomaly.json").read_text())
    for method in ("draem", "patchcore"):
        f = figures[method]
        assert f["1x"]["peak_rss_mb"] > 0 and f["2x"]["train_s"] > 0, f
        assert f["onnx_parity_max_abs_diff"] <= 1e-4 and f["predict_ms_onnx"] > 0
        assert 0 <= f["image_auroc"] <= 1


def test_bench_tiles_writes_the_four_sections(tmp_path):
    run("bench_tiles.py", "--quick", "--json", str(tmp_path / "tiles.json"), cwd=tmp_path)
    figures = json.loads((tmp_path / "tiles.json").read_text())
    region, loader = figures["region_vs_full"], figures["loader_vs_tight"]
    rss, latency = figures["peak_rss_50mp"], figures["predict_latency_20mp"]
    for kind in ("one_tile", "sixteen_tiles"):
        assert region[kind]["ratio"] > 0 and region[kind]["full_tiles_per_s"] > 0, region
    assert loader["loader_tiles"] > 0 and loader["tight_tiles_per_s"] > 0 and loader["ratio"] > 0, loader
    assert rss["main_peak_mb"] > 0 and rss["worker_peak_mb"] > 0 and rss["decoded_image_mb"] > 0, rss
    assert latency["checkpoint_ms"] > 0 and latency["onnx_ms"] > 0 and latency["tiles_per_image"] > 0, latency


def test_bench_write_reports_both_writers_and_the_append(tmp_path):
    out = run("bench_write.py", "--quick", "--root", str(tmp_path / "bench"), cwd=tmp_path)
    figures = json.loads(out.strip().splitlines()[-1])
    for key in ("ray_over_local", "sql_over_folder", "append_over_rewrite", "local_images_per_s"):
        assert figures[key] > 0, key
    assert figures["images"] == 400 and figures["appended"] == 40


def test_bench_cache_writes_every_figure(tmp_path):
    run(
        "bench_cache.py",
        *("--images", "1200", "--shard-samples", "50", "--sorted-shard-samples", "200", "--rounds", "1"),
        *("--delay-ms", "1", "2", "--json", str(tmp_path / "cache.json")),
        cwd=tmp_path,
    )
    figures = json.loads((tmp_path / "cache.json").read_text())
    for key in ("s3_over_local", "s3_epoch1_over_local", "s3_epoch2_over_local", "blocks_classes_per_batch"):
        assert figures[key] > 0, key
    assert figures["fetched_plan_100"] == figures["fetched_lru_100"] == 0  # epochs 2 and 3 from the cache
    assert figures["fetched_plan_50"] <= 1.0  # a fetch is never wasted under the plan's rule
    assert figures["blocks_held"] > figures["shards_held"]
