"""Folds over the pool's processes and devices: how many at once (with fake device lists and core
counts), and the environment that makes every GPU worker see its GPU as `cuda`."""
import pytest

from kaggle_vit.config import TrainConfig, validate_config
from kaggle_vit.errors import KaggleVitError
from kaggle_vit.run.jobs import worker_env
from kaggle_vit.train.device import auto_jobs, visible_devices


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
    with pytest.raises(KaggleVitError, match=r"^--devices 0,2: GPU 2 is not visible \(2 GPU\(s\) are: 0\.\.1\)$"):
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
