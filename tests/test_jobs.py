"""Folds over the pool's processes and devices: the plan that shares the folds' epochs out between
processes and the order the pool is handed them, how many at once (with fake device lists and core
counts), and the environment that makes every GPU worker see its GPU as `cuda`."""
import dataclasses
import itertools

import numpy as np
import pytest

from kaggle_vit.config import TrainConfig, validate_config
from kaggle_vit.errors import KaggleVitError
from kaggle_vit.run.jobs import Segment, dispatch_order, plan_costs, plan_segments, worker_env
from kaggle_vit.train.device import auto_jobs, visible_devices


def test_five_folds_on_two_workers_cut_one_fold_between_them():
    # Equal costs: 5 folds x (6 epochs + a prediction) = 35 units, 17.5 a worker; fold 3 is cut,
    # its first four epochs opening worker 2 and its last two and its prediction closing worker 1.
    assert plan_segments([1, 2, 3, 4, 5], 6, 2) == [
        [Segment(1, 1, 6), Segment(2, 1, 6), Segment(3, 5, 6)],
        [Segment(3, 1, 4), Segment(4, 1, 6), Segment(5, 1, 6)],
    ]
    assert plan_segments([1, 2, 3, 4], 6, 2) == [[Segment(1, 1, 6), Segment(2, 1, 6)],
                                                 [Segment(3, 1, 6), Segment(4, 1, 6)]]  # nothing to cut


def test_epochs_of_different_costs_are_cut_where_their_costs_balance():
    # skip_easy: full first and last epochs, cheap middle ones; 5 folds x (2.8 + 1) = 19 units, 9.5 a
    # worker. Fold 3's last epoch and prediction (2.0) close worker 1 at 9.6 against 9.4; by a mean
    # epoch cost the cut would fall after its fourth epoch instead: 9.8 against 9.2.
    costs = [1.0, 0.2, 0.2, 0.2, 0.2, 1.0]
    assert plan_segments([1, 2, 3, 4, 5], 6, 2, costs, 1.0) == [
        [Segment(1, 1, 6), Segment(2, 1, 6), Segment(3, 6, 6)],
        [Segment(3, 1, 5), Segment(4, 1, 6), Segment(5, 1, 6)],
    ]
    assert plan_segments([1, 2, 3, 4, 5], 6, 2, sum(costs) / 6, 1.0)[0][-1] == Segment(3, 5, 6)


def test_plan_costs_count_validation_only_in_validated_epochs(small_comp, small_spec):
    from kaggle_vit.data.layouts import load_competition

    data, folds = load_competition(small_spec, small_comp), np.arange(100) % 5 + 1
    cfg = TrainConfig(epochs=5, folds=5, tta=3, skip_easy=0.0, valid_every=2)
    sparse, predict = plan_costs(data, folds, cfg)
    every, _ = plan_costs(data, folds, dataclasses.replace(cfg, valid_every=1))
    assert [e - s for e, s in zip(every, sparse)] == [20.0, 0.0, 20.0, 0.0, 0.0]  # 20 validation rows a fold
    assert predict == 3 * len(data.test.images) + 2 * 20  # the plain view of validation comes from fit
    skipping = plan_costs(data, folds, dataclasses.replace(cfg, skip_easy=0.5, valid_every=0))[0]
    assert skipping[0] == sparse[0] and skipping[-1] == sparse[-1]  # first and last epochs keep every row
    assert sparse[0] > skipping[1] > skipping[2] > skipping[3]  # fewer rows are below the mean early on


@pytest.mark.parametrize("costs", [(1.0, 1.0), (1.0, 0.3), (1.0, 2.5)])
def test_every_plan_covers_each_fold_once_in_order_and_balances(costs):
    epoch, predict = costs
    for n_folds, epochs in itertools.product(range(1, 9), range(1, 9)):
        for jobs in range(1, n_folds + 1):
            plan = plan_segments(list(range(1, n_folds + 1)), epochs, jobs, epoch, predict)
            assert len(plan) == jobs and all(plan)
            segments = sorted((s for worker in plan for s in worker), key=lambda s: (s.fold, s.first))
            for fold in range(1, n_folds + 1):  # each fold's epochs exactly once, 1..epochs
                mine = [s for s in segments if s.fold == fold]
                assert mine[0].first == 1 and mine[-1].last == epochs and len(mine) <= 2
                assert all(a.last + 1 == b.first for a, b in zip(mine, mine[1:]))
            loads = [sum((s.last - s.first + 1) * epoch + predict * (s.last == epochs) for s in w) for w in plan]
            share = n_folds * (epochs * epoch + predict) / jobs
            assert max(loads) <= share + epoch + predict
            for w, worker in enumerate(plan):  # a cut fold's tail closes a worker, its head opens the next
                for i, s in enumerate(worker):
                    if s.first > 1:
                        head = plan[w + 1][0]
                        assert i == len(worker) - 1 and head.fold == s.fold and head.last == s.first - 1


def test_the_pool_is_handed_segments_in_the_order_of_their_planned_start():
    # Five folds of 6 epochs (+1 for the prediction) on two processes: fold 3's head (epochs 1-4)
    # opens process 2 beside fold 1, so fold 4 starts next (at 4), then fold 2 (at 7), fold 5 (at
    # 11) and fold 3's tail (at 14): handed out in that order, each to the first process free, the
    # segments run as planned, and a tail always comes after its head.
    plan = plan_segments([1, 2, 3, 4, 5], 6, 2)
    assert dispatch_order(plan) == [Segment(1, 1, 6), Segment(3, 1, 4), Segment(4, 1, 6), Segment(2, 1, 6),
                                    Segment(5, 1, 6), Segment(3, 5, 6)]
    for n_folds, jobs in itertools.product(range(1, 8), range(1, 4)):
        order = dispatch_order(plan_segments(list(range(1, n_folds + 1)), 5, min(jobs, n_folds)))
        heads = {s.fold: i for i, s in enumerate(order) if s.first == 1}
        assert all(heads[s.fold] < i for i, s in enumerate(order) if s.first > 1)


def test_gpus_and_jobs():
    digits, t4 = 28 * 28, 40
    devices = visible_devices(TrainConfig(), gpu_count=2)
    assert devices == ["cuda:0", "cuda:1"] and auto_jobs(TrainConfig(), devices, 5, digits, [t4, t4], 4) == 2
    devices = visible_devices(TrainConfig(), gpu_count=1)
    assert auto_jobs(TrainConfig(), devices, 5, digits, [t4], 4) == 1
    assert auto_jobs(TrainConfig(jobs=4), devices, 5, digits, [t4], 4) == 4
    assert auto_jobs(TrainConfig(jobs=4), devices, 2, digits, [t4], 4) == 2


def test_a_large_gpu_is_shared_by_the_folds_of_small_images(caplog):
    one, two, digits, photos, t4, h200 = ["cuda:0"], ["cuda:0", "cuda:1"], 28 * 28, 128 * 128, 40, 132
    assert auto_jobs(TrainConfig(), one, 5, digits, [h200], 16) == 5
    assert caplog.messages == ["5 folds train at once on 1 GPU(s): one fold of images this small cannot fill them "
                               "(--jobs 1: one fold at a time)"]
    assert auto_jobs(TrainConfig(), one, 2, digits, [h200], 16) == 2  # no more workers than folds left
    assert auto_jobs(TrainConfig(), one, 5, digits, [h200], 6) == 3  # a worker per two cores
    assert auto_jobs(TrainConfig(), one, 5, digits, [h200], 1) == 1
    assert auto_jobs(TrainConfig(), one, 5, photos, [h200], 16) == 1  # one fold of large images fills it
    assert auto_jobs(TrainConfig(), two, 5, digits, [h200, t4], 16) == 2  # not every GPU is large
    assert auto_jobs(TrainConfig(), two, 5, digits, [h200, h200], 16) == 5
    assert auto_jobs(TrainConfig(jobs=1), one, 5, digits, [h200], 16) == 1  # --jobs decides


def test_devices_option_picks_and_checks_gpus():
    assert visible_devices(TrainConfig(devices="1"), gpu_count=2) == ["cuda:1"]
    assert visible_devices(TrainConfig(devices="1,0,1"), gpu_count=2) == ["cuda:1", "cuda:0"]
    assert visible_devices(TrainConfig(device="cuda:1"), gpu_count=2) == ["cuda:1"]
    assert visible_devices(TrainConfig(), gpu_count=0) == ["cpu"] == visible_devices(TrainConfig(device="cpu"), gpu_count=2)
    with pytest.raises(KaggleVitError, match=r"^devices 0,2: GPU 2 is not visible \(2 GPU\(s\) are: 0\.\.1\)$"):
        visible_devices(TrainConfig(devices="0,2"), gpu_count=2)
    with pytest.raises(KaggleVitError, match="give GPU indices such as 0,1, or all"):
        validate_config(TrainConfig(devices="first"))


def test_cpu_keeps_two_single_threaded_folds():
    assert auto_jobs(TrainConfig(), ["cpu"], 5, 784, cores=2) == 2 and auto_jobs(TrainConfig(), ["cpu"], 1, 784, cores=2) == 1
    assert auto_jobs(TrainConfig(), ["cpu"], 5, 784, cores=1) == 1


def test_a_gpu_worker_sees_only_its_gpu():
    env, device = worker_env("cuda:1", {"PATH": "/bin"})
    assert (env["CUDA_VISIBLE_DEVICES"], device, env["PATH"]) == ("1", "cuda", "/bin")
    env, device = worker_env("cuda:1", {"CUDA_VISIBLE_DEVICES": "4,6"})  # counted within the parent's GPUs
    assert (env["CUDA_VISIBLE_DEVICES"], device) == ("6", "cuda")
    env, device = worker_env("cpu", {"CUDA_VISIBLE_DEVICES": "4"})
    assert (env["CUDA_VISIBLE_DEVICES"], device) == ("4", "cpu")
