"""Folds over devices: the schedule that puts folds on GPUs (with fake device lists) and the
environment that makes every GPU worker see its GPU as `cuda`."""
import pytest

from kaggle_vit.config import TrainConfig, validate_config
from kaggle_vit.errors import KaggleVitError
from kaggle_vit.workers import auto_jobs, fold_batches, visible_devices, worker_env


def test_two_gpus_train_two_folds_at_once():
    devices = visible_devices(TrainConfig(), gpu_count=2)
    assert devices == ["cuda:0", "cuda:1"] and auto_jobs(TrainConfig(), devices, 5) == 2
    assert fold_batches([1, 2, 3, 4, 5], 2, devices) == [[(1, "cuda:0"), (2, "cuda:1")], [(3, "cuda:0"), (4, "cuda:1")],
                                                         [(5, "cuda:0")]]


def test_several_folds_share_one_large_gpu():
    devices = visible_devices(TrainConfig(), gpu_count=1)
    assert auto_jobs(TrainConfig(), devices, 5) == 1
    assert auto_jobs(TrainConfig(jobs=4), devices, 5) == 4
    assert fold_batches([1, 2, 3, 4, 5], 4, devices) == [[(k, "cuda:0") for k in (1, 2, 3, 4)], [(5, "cuda:0")]]
    assert fold_batches([2, 5], 4, ["cuda:0", "cuda:1", "cuda:2"]) == [[(2, "cuda:0"), (5, "cuda:1")]]


def test_devices_option_picks_and_checks_gpus():
    assert visible_devices(TrainConfig(devices="1"), gpu_count=2) == ["cuda:1"]
    assert visible_devices(TrainConfig(devices="1,0,1"), gpu_count=2) == ["cuda:1", "cuda:0"]
    assert visible_devices(TrainConfig(device="cuda:1"), gpu_count=2) == ["cuda:1"]
    assert visible_devices(TrainConfig(), gpu_count=0) == ["cpu"] == visible_devices(TrainConfig(device="cpu"), gpu_count=2)
    with pytest.raises(KaggleVitError, match=r"^--devices 0,2: GPU 2 is not visible \(2 GPU\(s\) are: 0\.\.1\)$"):
        visible_devices(TrainConfig(devices="0,2"), gpu_count=2)
    with pytest.raises(KaggleVitError, match="give GPU indices such as 0,1, or all"):
        validate_config(TrainConfig(devices="first"))


def test_cpu_keeps_two_single_threaded_folds():
    assert auto_jobs(TrainConfig(), ["cpu"], 5) in (1, 2) and auto_jobs(TrainConfig(), ["cpu"], 1) == 1


def test_a_gpu_worker_sees_only_its_gpu():
    env, device = worker_env("cuda:1", {"PATH": "/bin"})
    assert (env["CUDA_VISIBLE_DEVICES"], device, env["PATH"]) == ("1", "cuda", "/bin")
    env, device = worker_env("cuda:1", {"CUDA_VISIBLE_DEVICES": "4,6"})  # counted within the parent's GPUs
    assert (env["CUDA_VISIBLE_DEVICES"], device) == ("6", "cuda")
    env, device = worker_env("cpu", {"CUDA_VISIBLE_DEVICES": "4"})
    assert (env["CUDA_VISIBLE_DEVICES"], device) == ("4", "cpu")
