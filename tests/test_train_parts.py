"""Training's parts on their own: batch order, checkpoint files, stop requests, LR schedule, validation metrics."""

from __future__ import annotations

import csv
import logging
import math
import os
import random
import signal

import numpy as np
import pytest
import torch

from rag_hpc.checkpoint import CHECKPOINT_FORMAT, CheckpointError, CheckpointFile, CheckpointManager, rng_state, set_rng_state
from rag_hpc.config import load_config
from rag_hpc.errors import ConfigError
from rag_hpc.evaluate import dosage_r2
from rag_hpc.index.build import WindowCache
from rag_hpc.train.metrics import MetricsSink, ValAccumulator, maf_bin
from rag_hpc.train.sampler import WindowBatchSampler
from rag_hpc.train.stop import request_checkpoint, stop_on_signals, stop_reason, take_request
from rag_hpc.train.trainer import ChromosomeData, TrainState, WindowLoader, warmup_cosine

TRAIN_HAPS = np.array([h for h in range(100) if h // 2 % 5 != 0])  # every 5th sample held out: 80 haplotypes


# -- sampler ---------------------------------------------------------------------------------------


def test_every_batch_holds_queries_of_one_window_and_an_epoch_uses_each_query_at_most_once():
    sampler = WindowBatchSampler(7, TRAIN_HAPS, batch_size=16, seed=3, mix_windows=3)
    assert sampler.batches_per_epoch == 7 * 5
    seen: dict[int, list[int]] = {}
    for i in range(sampler.batches_per_epoch):
        b = sampler.batch(epoch=2, index=i)
        assert len(b.haplotypes) == 16 and set(b.haplotypes) <= set(TRAIN_HAPS)
        seen.setdefault(b.window, []).extend(b.haplotypes.tolist())
    assert sorted(seen) == list(range(7))
    for haps in seen.values():
        assert len(haps) == len(set(haps)) == 80  # 80 // 16 = 5 full batches, nothing dropped here


def test_mixed_windows_are_interleaved_so_consecutive_steps_see_different_sites():
    sampler = WindowBatchSampler(7, TRAIN_HAPS, batch_size=16, seed=3, mix_windows=3)
    windows = [sampler.batch(0, i).window for i in range(sampler.batches_per_epoch)]
    order = sampler.window_order(0).tolist()
    assert windows[:6] == order[:3] * 2
    assert windows[-5:] == [order[6]] * 5  # the last group holds the one window left over
    assert windows[:15] == order[:3] * 5  # 3 windows x 5 batches each, round-robin


def test_batch_order_is_a_function_of_seed_and_epoch_only():
    a = WindowBatchSampler(9, TRAIN_HAPS, 8, seed=1)
    b = WindowBatchSampler(9, TRAIN_HAPS, 8, seed=1)
    assert all(np.array_equal(a.batch(4, i).haplotypes, b.batch(4, i).haplotypes) for i in range(0, 90, 7))
    assert not np.array_equal(a.window_order(4), a.window_order(5))
    other_seed = WindowBatchSampler(9, TRAIN_HAPS, 8, seed=2)
    assert not np.array_equal(a.window_order(4), other_seed.window_order(4))


def test_a_position_is_reached_directly_like_the_same_position_reached_by_iterating():
    iterated = WindowBatchSampler(300, np.arange(4508), 32, seed=0, mix_windows=4)
    for i in range(iterated.batches_per_epoch // 2):  # walk half an epoch, as an uninterrupted run would
        iterated.batch(3, i)
    jumped = WindowBatchSampler(300, np.arange(4508), 32, seed=0, mix_windows=4)  # a fresh process resuming
    i = iterated.batches_per_epoch // 2
    want, got = iterated.batch(3, i), jumped.batch(3, i)
    assert (want.window, want.haplotypes.tolist()) == (got.window, got.haplotypes.tolist())


def test_ranks_split_each_global_batch_into_equal_disjoint_slices():
    sampler = WindowBatchSampler(4, TRAIN_HAPS, batch_size=12, seed=0, world_size=3)
    batch = sampler.batch(0, 5)
    parts = [batch.local(r, 3) for r in range(3)]
    assert [len(p) for p in parts] == [4, 4, 4]
    assert np.array_equal(np.concatenate(parts), batch.haplotypes)


def test_a_batch_that_cannot_be_split_evenly_across_ranks_is_refused():
    with pytest.raises(ConfigError, match="divide evenly"):
        WindowBatchSampler(4, TRAIN_HAPS, batch_size=10, seed=0, world_size=4)
    with pytest.raises(ConfigError, match="only 80 train-split haplotypes"):
        WindowBatchSampler(4, TRAIN_HAPS, batch_size=81, seed=0)


# -- checkpoints -----------------------------------------------------------------------------------


def _state(step: int) -> dict:
    return {"format": CHECKPOINT_FORMAT, "step": step, "weights": torch.full((3,), float(step)), "rng": rng_state()}


def test_checkpoint_loads_with_weights_only_and_restores_every_rng(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    state = _state(5)
    want = (random.random(), np.random.rand(), torch.rand(1).item())
    path = CheckpointManager(tmp_path, keep=2).save(state, 5)
    loaded = torch.load(path, weights_only=True)  # no pickled objects: plain torch.load accepts it
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    set_rng_state(loaded["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == want
    assert torch.equal(loaded["weights"], torch.full((3,), 5.0))


def test_only_the_newest_k_checkpoints_are_kept(tmp_path):
    manager = CheckpointManager(tmp_path, keep=2)
    for step in (10, 20, 30, 40):
        manager.save(_state(step), step)
    assert [c.step for c in manager.list()] == [30, 40]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step_000000030.pt",
        "step_000000030.pt.sha256",
        "step_000000040.pt",
        "step_000000040.pt.sha256",
    ]


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_sidecar"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one_and_says_so(tmp_path, caplog, damage):
    manager = CheckpointManager(tmp_path, keep=3)
    manager.save(_state(1), 1)
    newest = manager.save(_state(2), 2)
    if damage == "truncate":
        newest.write_bytes(newest.read_bytes()[:-100])
    elif damage == "flip":
        raw = bytearray(newest.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        newest.write_bytes(bytes(raw))
    else:  # the writer died between publishing the data and its sidecar
        newest.with_name(newest.name + ".sha256").unlink()
    with caplog.at_level(logging.WARNING, logger="rag_hpc.train"):
        found = manager.load_latest()
    assert found is not None and found[0].step == 1 and found[1]["step"] == 1
    assert f"checkpoint {newest} is unusable" in caplog.text and "falling back to the previous one" in caplog.text
    # Set aside, so that pruning after the next save cannot keep it in place of a good one.
    assert [c.step for c in manager.list()] == [1] and (tmp_path / f"{newest.name}.unusable").exists()


def test_a_checkpoint_of_an_older_format_stops_the_resume_and_names_the_fix(tmp_path):
    """It verifies, so it is not damage: falling back past it (or starting afresh over it) would rewind
    the run or lose it."""
    manager = CheckpointManager(tmp_path, keep=3)
    manager.save({**_state(1), "format": CHECKPOINT_FORMAT - 1}, 1)
    with pytest.raises(CheckpointError, match=f"of format {CHECKPOINT_FORMAT - 1}; .* train a new run"):
        manager.load_latest()
    assert [c.step for c in manager.list()] == [1]


def test_no_checkpoint_at_all_means_a_fresh_start(tmp_path):
    assert CheckpointManager(tmp_path / "none").load_latest() is None


# -- window loader ---------------------------------------------------------------------------------


def test_the_window_loader_reads_each_window_once_and_holds_only_the_newest_it_was_asked_for(tiny_panel, tmp_path):
    cache = WindowCache(
        load_config(overrides=[f"data.panel_h5={tiny_panel}", f"paths.cache_dir={tmp_path}", "windows.window_size=100"])
    )
    typed = np.arange(0, cache.panel.n_sites, 7)
    reference = cache.panel.reference_haplotypes()
    reads: list[int] = []
    shard = cache.shard
    cache.shard = lambda w: reads.append(w) or shard(w)  # type: ignore[method-assign]
    loader = WindowLoader([ChromosomeData(cache, typed)], [(0, w) for w in range(3)], reference, torch.device("cpu"), capacity=2)
    first = loader(0)
    assert loader(0) is first and reads == [0]
    loader(1), loader(0), loader(2)  # 1 is now the least recently asked for: it goes
    assert reads == [0, 1, 2] and loader(0) is first
    loader(1)
    assert reads == [0, 1, 2, 1]
    window = cache.windows[1]
    data = loader(1)
    assert torch.equal(data.alleles, torch.from_numpy(cache.panel.haplotypes(window.start, window.stop)))
    assert torch.equal(data.reference, data.alleles[torch.from_numpy(reference)].float())
    assert torch.equal(data.observed, torch.from_numpy(window.observed(typed)))


# -- stop requests ---------------------------------------------------------------------------------


def test_a_signal_asks_for_a_checkpoint_and_a_stop_and_the_handler_it_replaced_runs_only_when_passed_on():
    seen: list[int] = []
    before = signal.signal(signal.SIGUSR2, lambda sig, frame: seen.append(sig))  # submitit's requeue, say
    try:
        with stop_on_signals((signal.SIGUSR2,)) as pass_on:
            assert take_request() == (False, False)
            os.kill(os.getpid(), signal.SIGUSR2)
            assert take_request() == (True, True) and stop_reason() == "SIGUSR2"
            # The checkpoint request is consumed, the stop stays; the replaced handler has not run.
            assert take_request() == (False, True) and seen == []
            pass_on()  # the checkpoint is on disk
            assert seen == [signal.SIGUSR2]
        assert take_request() == (False, False), "a request must not outlive the training it was for"
        os.kill(os.getpid(), signal.SIGUSR2)
        assert seen == [signal.SIGUSR2] * 2 and take_request() == (False, False)  # its own handler is back
    finally:
        signal.signal(signal.SIGUSR2, before)


def test_a_checkpoint_request_without_stop_is_taken_once_and_training_goes_on():
    with stop_on_signals(()):
        request_checkpoint(stop=False, reason="a launcher")
        assert take_request() == (True, False)
        assert take_request() == (False, False)


# -- schedule ----------------------------------------------------------------------------------------


def test_lr_warms_up_linearly_then_follows_a_cosine_to_the_floor():
    f = warmup_cosine(warmup_steps=10, total_steps=110, min_ratio=0.1)
    assert [f(s) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the cosine
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 120))


# -- validation metrics ------------------------------------------------------------------------------


def test_maf_bins_follow_the_half_open_edges():
    af = torch.tensor([0.0, 0.004, 0.005, 0.0099, 0.01, 0.049, 0.05, 0.5, 0.97, 0.999])
    assert maf_bin(af).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 2, 0]


def test_dosage_r2_pairs_the_two_haplotypes_of_each_sample_and_is_evaluates_per_site_mean():
    g = torch.Generator().manual_seed(0)
    n_samples, length = 6, 8
    target = (torch.rand(2 * n_samples, length, generator=g) < 0.4).to(torch.uint8)
    target[:, 3] = 0  # monomorphic in the truth: no r², left out as evaluate leaves it out
    logits = torch.randn(2 * n_samples, length, generator=g) + 3 * (target.float() - 0.5)
    masked = torch.tensor([True, True, False, True, True, True, False, True])
    af = torch.full((length,), 0.3)  # one MAF bin: [.05, .5]
    acc = ValAccumulator()
    acc.add_window(logits, target, masked, af)
    got = acc.result()

    p = torch.sigmoid(logits.double())[:, masked]
    dose = (p[0::2] + p[1::2]).numpy()  # [samples, sites]
    true = (target[0::2] + target[1::2])[:, masked].double().numpy()
    per_site = dosage_r2(dose.T, true.T)  # the imputed-VCF report's statistic, one row per site
    assert got["val_r2_maf_0.050-0.500"] == pytest.approx(np.nanmean(per_site), rel=1e-9)
    assert got["val_n_maf_0.050-0.500"] == int(masked.sum()) - 1 == int(np.isfinite(per_site).sum())
    assert math.isnan(got["val_r2_maf_0.000-0.005"])  # no site there

    pred, truth = logits[:, masked] > 0, target[:, masked].bool()
    tp, fp, fn = (pred & truth).sum().item(), (pred & ~truth).sum().item(), (~pred & truth).sum().item()
    assert got["val_f1_alt"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert got["val_acc"] == pytest.approx((pred == truth).float().mean().item())
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, masked], target[:, masked].float())
    assert got["val_loss"] == pytest.approx(bce.item(), rel=1e-6)


def test_a_constant_prediction_scores_zero_where_the_truth_varies():
    target = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=torch.uint8)  # 2 samples, 2 sites, both vary
    acc = ValAccumulator()
    acc.add_window(torch.zeros(4, 2), target, torch.tensor([True, True]), torch.full((2,), 0.3))
    got = acc.result()
    assert got["val_r2_maf_0.050-0.500"] == 0.0 and got["val_n_maf_0.050-0.500"] == 2


def test_a_train_state_round_trips_through_a_checkpoint_and_refuses_another_epoch_length(tmp_path):
    state = TrainState(step=37, epoch_loss_sum=12.5, epoch_loss_steps=5, epoch_seconds=3.25)
    manager = CheckpointManager(tmp_path, keep=2)
    path = manager.save({"format": CHECKPOINT_FORMAT, **state.to_checkpoint(steps_per_epoch=10, grad_accum=2)}, state.step)
    loaded = manager.load(CheckpointFile.named(path))
    assert TrainState.from_checkpoint(loaded, 10, 2, path) == state
    assert (loaded["epoch"], loaded["batch_in_epoch"]) == (3, 14)  # step 37 = epoch 3, 7 steps of 2 micro-batches in
    with pytest.raises(CheckpointError, match="sampler position"):
        TrainState.from_checkpoint(loaded, 12, 2, path)  # other windows or split: other batches, so refused
    state.end_epoch()
    assert state == TrainState(step=37)


def test_a_metrics_sink_reopened_at_a_resume_drops_what_a_killed_run_logged_past_it(tmp_path):
    def run(start: int, stop: int) -> None:
        sink = MetricsSink(tmp_path, start, steps_per_epoch=2, tensorboard=False, resumed=start > 0)
        for step in range(start + 1, stop + 1):
            sink.step(
                {"step": step, "epoch": (step - 1) // 2, "loss": 1.0 / step, "lr": 1e-3, "grad_norm": 1.0, "steps_per_s": 9.0}
            )
            if step % 2 == 0:
                sink.epoch({"epoch": step // 2 - 1, "step": step, "lr": 1e-3, "train_loss": 0.5, "epoch_seconds": 1.0})
        sink.close()

    run(0, 5)  # killed after step 5; its last checkpoint was at step 2
    run(2, 4)  # the resume: steps 3 and 4 again
    steps = [int(r["step"]) for r in csv.DictReader((tmp_path / "steps.csv").open())]
    epochs = [int(r["epoch"]) for r in csv.DictReader((tmp_path / "metrics.csv").open())]
    assert steps == [1, 2, 3, 4] and epochs == [0, 1]
