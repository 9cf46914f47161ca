"""The tensor tracker: what it counts, what the fake-tensor estimate says, flat memory."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from mbp_cli.catalog.classification import cross_entropy
from mbp_cli.catalog.models import small_cnn, tiny_lm
from mbp_cli.commands.train import train
from mbp_cli.engine.micro_step import MicroStep
from mbp_cli.memory.measure import StepRunner
from mbp_cli.memory.tracker import SimulatedOutOfMemoryError, StorageTracker, is_out_of_memory
from mbp_cli.recipe.load import load_recipe
from mbp_cli.run.start import RunOptions
from tests.conftest import small_recipe

CPU = torch.device("cpu")


def test_counts_storage_once_rounded_to_blocks_and_forgets_freed_tensors():
    tracker = StorageTracker()
    with tracker:
        a = torch.empty(1000)  # 4000 bytes → 8 blocks of 512
        view = a[10:20].view(2, 5)  # shares a's storage
        b = torch.ones(10, dtype=torch.float64)
    assert tracker.live_bytes == 4096 + 512
    del a, view
    assert tracker.live_bytes == 512 and tracker.peak_bytes == 4096 + 512
    tracker.reset_peak()
    assert tracker.peak_bytes == 512
    del b
    assert tracker.live_bytes == 0


def test_registered_tensors_count_from_the_start():
    weights = torch.zeros(256)
    tracker = StorageTracker()
    tracker.register([weights, None, "not a tensor"])
    assert tracker.live_bytes == 1024


def test_a_capacity_makes_a_simulated_device():
    tracker = StorageTracker(capacity_bytes=10_000)
    with tracker:
        keep = torch.empty(1000)
        with pytest.raises(SimulatedOutOfMemoryError) as caught:
            torch.empty(2000)
    assert is_out_of_memory(caught.value) and isinstance(caught.value, torch.OutOfMemoryError)
    assert tracker.live_bytes == 4096  # the failed allocation is not kept
    assert tracker.peak_bytes == 4096  # nor counted in the peak, as on a GPU
    del keep


def test_other_errors_are_not_out_of_memory():
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you "
                                         "tried to allocate 10 bytes"))


def step_runner(build_model, optimizer_class, make_batch, backend):
    torch.manual_seed(0)
    model = build_model()
    optimizer = optimizer_class(model.parameters(), lr=0.1)
    return StepRunner(MicroStep(model, cross_entropy(), CPU, torch.float32), optimizer, make_batch,
                      backend)


@pytest.mark.parametrize(("build_model", "optimizer_class", "make_batch"), [
    (lambda: small_cnn(width=8), lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9),
     lambda n: (torch.randn(n, 1, 8, 8), torch.randint(10, (n,)))),
    (lambda: tiny_lm(vocab_size=16, dim=16), torch.optim.Adam,
     lambda n: (torch.randint(16, (n, 12)), torch.randint(16, (n, 12)))),
], ids=["cnn-sgd", "lm-adam"])
def test_the_fake_tensor_estimate_equals_the_tracked_step(build_model, optimizer_class,
                                                          make_batch):
    real = step_runner(build_model, optimizer_class, make_batch, "tracked")
    fake_mode = FakeTensorMode()
    with fake_mode:
        fake = step_runner(build_model, optimizer_class, make_batch, "estimate")
    fake.context = lambda: fake_mode
    for runner in (real, fake):
        runner.measure(1)  # optimizer state, as in the probe
    for size in (3, 16):
        measured, estimated = real.measure(size), fake.measure(size)
        assert measured.peak_bytes == estimated.peak_bytes
        assert measured.step_bytes == estimated.step_bytes
        assert measured.optimizer_bytes == estimated.optimizer_bytes


def test_peak_memory_is_flat_in_the_target_batch(write_recipe, tmp_path):
    """The same micro-batch needs the same memory for a target batch 16 times larger."""
    peaks = {}
    for target in (32, 512):
        recipe = small_recipe(batch={"target": target, "micro": 8},
                              train={"steps": 2, "eval_every": 0, "device": "cpu"})
        tracker = StorageTracker()
        out = tmp_path / str(target)
        out.mkdir()
        train(load_recipe(write_recipe(recipe, f"{target}.yaml")),
              RunOptions(out, simulated_memory=tracker), sinks=[])
        peaks[target] = tracker.peak_bytes
    assert peaks[512] == peaks[32]


def test_a_cpu_run_reports_its_tensors_peak_not_the_process(write_recipe, tmp_path):
    """On the CPU the summary's peak is the tensors' (tracked over the first target batches),
    what a simulated device of unlimited capacity records for the same run; the process's
    peak RSS, mostly torch's libraries, is kept apart."""
    recipe = small_recipe(batch={"target": 64, "micro": 8},
                          train={"steps": 2, "eval_every": 0, "device": "cpu"})
    path = write_recipe(recipe)
    plain = train(load_recipe(path), RunOptions(tmp_path / "plain"), sinks=[])
    tracker = StorageTracker()
    train(load_recipe(path), RunOptions(tmp_path / "simulated", simulated_memory=tracker),
          sinks=[])
    assert plain["peak_memory_source"] == "tracked_tensors_first_steps"
    assert plain["peak_memory_bytes"] == tracker.peak_bytes
    assert plain["process_peak_rss_bytes"] > 20 * plain["peak_memory_bytes"]
