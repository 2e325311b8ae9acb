"""How a CPU run splits its cores between compute threads and loader workers: a pure function of the
cores and the measured rates (split_cores), the measurement leaving the random streams alone, and runs
taking the split (forced settings kept, the header saying what was chosen and why)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from simmim.config import load_config
from simmim.data.datasets import cpus_per_rank
from simmim.engine import pretrain
from simmim.engine.distributed import DistEnv
from simmim.engine.machine import choose_split, expected_rate, measure_rates, split_cores


@pytest.mark.parametrize(("cores", "load", "steps", "expected"), [
    (2, 3000, {2: 370, 1: 250}, (2, 1)),  # light loading, idle machine: both cores compute beside a worker
    (2, 2344, {2: 604, 1: 416}, (2, 1)),  # the demo on an idle Zen 4: a quarter of a core loads, 2 threads still win
    (2, 3000, {2: 10, 1: 100}, (1, 1)),  # other processes hold a core: 2 threads stall, 1 computes
    (2, 300, {2: 370, 1: 250}, (1, 1)),  # loading 1.2 cores' worth: the worker keeps a core of its own
    (16, 200, {16: 1000, 15: 950}, (12, 4)),  # 4 workers load 800 img/s, 12 threads compute 760
    (16, 10, {16: 1000, 15: 950}, (8, 8)),  # at most 8 workers
    (1, 3000, {1: 100}, (1, 0)),  # one core: the process loads between steps
])
def test_the_split_follows_the_cores_and_the_measured_rates(cores, load, steps, expected):
    split = split_cores(cores, load, steps)
    assert (split.threads, split.workers) == expected
    assert f"{cores} core{'s' * (cores > 1)}; step " in split.why and f"loading {load} img/s per process" in split.why
    assert split.why.endswith(" img/s with this split")


def test_the_expected_rate_charges_loading_on_shared_cores_to_the_step():
    assert expected_rate(4, 2, 2, 100, 50) == 50  # the workers have cores of their own: the step's rate
    assert expected_rate(4, 2, 2, 10, 50) == 20  # ... unless they load less
    assert expected_rate(2, 2, 1, 100, 100) == pytest.approx(50)  # a shared core: loading adds its time to the step
    assert expected_rate(2, 2, 0, 100, 100) == pytest.approx(50)  # no workers: loading between steps
    assert expected_rate(3, 2, 2, 100, 100) == pytest.approx(1 / (1 / 100 + 0.5 / 100))  # one worker of two shares


def test_a_forced_setting_is_kept_and_the_other_chosen_around_it():
    assert split_cores(2, 3000, {2: 370, 1: 250}, workers=0)[:2] == (2, 0)
    assert split_cores(2, 3000, {2: 370, 1: 250}, workers=2)[:2] == (2, 2)  # light: the workers mostly sleep
    assert split_cores(2, 300, {2: 370, 1: 250}, workers=0)[:2] == (2, 0)  # nothing loads beside the step
    assert split_cores(2, 3000, {1: 250}, threads=1)[:2] == (1, 1)
    assert split_cores(4, 100, {3: 300}, threads=3)[:2] == (3, 2)  # a 2nd worker adds more than it stalls
    forced = split_cores(2, None, None, threads=2, workers=1)
    assert forced[:2] == (2, 1) and forced.why == "runtime.threads and data.num_workers as set"
    # unmeasured: a worker per core but one, as before the rates were measured
    assert split_cores(4, None, None)[:2] == (1, 3)


class Images:
    """A dataset keyed (index, seed) that draws from the global streams, as transforms do."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, key):
        index, seed = key
        return torch.rand(3, 8, 8), index


def test_measuring_leaves_the_random_streams_alone():
    def collate(samples):
        return torch.stack([s[0] for s in samples]), torch.tensor([s[1] for s in samples])

    def step(batch):
        torch.nn.functional.dropout(batch[0], 0.5).sum()
        np.random.rand()
        random.random()

    states = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    threads = torch.get_num_threads()
    load, steps = measure_rates(Images(), collate, 16, step, [2, 1])
    torch.set_num_threads(threads)
    assert load > 0 and set(steps) == {1, 2} and all(rate > 0 for rate in steps.values())
    assert torch.equal(torch.get_rng_state(), states[0])
    assert np.array_equal(np.random.get_state()[1], states[1]) and random.getstate() == states[2]


def test_rank_0_measures_unless_both_are_given():
    env = DistEnv(0, 1, 0, 1, torch.device("cpu"))
    asked = []

    def measure(counts):
        asked.append(counts)
        return 3000.0, {c: 100.0 * c for c in counts}

    threads = torch.get_num_threads()
    try:
        cores = cpus_per_rank()
        split = choose_split(env, None, None, measure)
        assert asked == [sorted({cores, max(1, cores - 1)}, reverse=True)]
        assert torch.get_num_threads() == split.threads == cores  # the faster count, set for the process
        assert choose_split(env, 1, None, measure).workers == (1 if cores > 1 else 0) and asked[-1] == [1]
        assert choose_split(env, 1, 0, lambda counts: pytest.fail("both given: nothing to measure"))[:2] == (1, 0)
        assert choose_split(DistEnv(0, 1, 0, 1, torch.device("meta")), None, None, measure) is None  # not a CPU run
    finally:
        torch.set_num_threads(threads)


def test_a_run_takes_the_split_and_says_why(tmp_path, settings, image_folder, capsys):
    data = image_folder(tmp_path / "images")
    overrides = [s for s in settings("pretrain", data, tmp_path / "run", "schedule.epochs=1")
                 if not s.startswith(("runtime.threads", "data.num_workers"))]
    threads = torch.get_num_threads()
    try:
        pretrain(load_config("nano-pretrain", overrides=[*overrides, "data.num_workers=0"]))
        chosen = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("cores: "))
    cores = cpus_per_rank()
    assert line.startswith(f"cores: {chosen} thread{'s' * (chosen > 1)}, 0 loader workers ({cores} "
                           f"core{'s' * (cores > 1)}; step ")
    assert f"on cpu ({chosen} thread{'s' * (chosen > 1)}, 0 loader workers)" in out
