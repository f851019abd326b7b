"""The SAE steps of online training on their own CUDA stream (vlmsae.overlap).

Without a GPU the stream API is replaced by stand-ins that record what the run asks of it; the tests check
the order that makes the overlap safe on CUDA: a phase's rows gathered and owned by the side stream before
its first step, every step on the side stream, and the current stream waiting for the side stream before
anything the steps wrote is read (the next fill's NaN markers, a checkpoint, the returned SAE). With a GPU,
the trained SAE is the plain alternation's.
"""

import contextlib
import importlib

import pytest
import torch

from vlmsae import SAE, zoo
from vlmsae.errors import ConfigError
from vlmsae.overlap import StepStreams
from vlmsae.train import OnlineRunConfig, train
from vlmsae.trainer import SAETrainer
from vlmsae.zoo import tiny_inputs

LAYER = 1
FAST = dict(batch_size=64, buffer_size=512, sync_every=25, warmup_steps=10, k_start=32, progress=False)
train_module = importlib.import_module("vlmsae.train")


def data(model, n=6):
    return [tiny_inputs(model, 6, seed=s) for s in range(n)]


def sae(seed=0):
    torch.manual_seed(seed)
    return SAE(d_in=64, d_sae=256, k=8)


class Streams:
    """Stand-ins for torch.cuda's streams on the CPU device, logging into ``log``: ``main`` is the device's current
    stream outside ``torch.cuda.stream``; ``side`` the stream StepStreams makes."""

    def __init__(self, monkeypatch):
        self.log, self.current = [], None
        self.main, self.side = self.Stream(self, "main"), self.Stream(self, "side")
        self.current = self.main
        self.recorded = []  # the tensors the side stream owns (held: ids of freed tensors are reused)
        self.first_bad = []  # the run's NaN markers, which both streams write
        log = self.log

        @contextlib.contextmanager
        def stream(s):
            before, self.current = self.current, s
            try:
                yield
            finally:
                self.current = before

        def record_stream(tensor, s):
            assert s is self.side
            self.recorded.append(tensor)

        def masked_fill_(tensor, *args):
            if any(tensor is t for t in self.first_bad):
                log.append(("mark", self.current.name))
            return real_masked_fill_(tensor, *args)

        real_masked_fill_ = torch.Tensor.masked_fill_
        monkeypatch.setattr(torch.cuda, "stream", stream)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: self.current)
        monkeypatch.setattr(torch.Tensor, "record_stream", record_stream)
        monkeypatch.setattr(torch.Tensor, "masked_fill_", masked_fill_)
        streams = StepStreams([])
        streams.side = {torch.device("cpu"): self.side}  # the CPU plays a CUDA device
        monkeypatch.setattr(train_module, "StepStreams", lambda devices, enabled: streams)
        real_step, real_fill = SAETrainer.step, train_module.OnlineRun.fill
        real_save = train_module.save_checkpoint

        def step(trainer, x, k=None, kinds=None):
            owned = all(any(t is r for r in self.recorded) for t in (x, kinds))
            log.append(("step", self.current.name, owned))
            return real_step(trainer, x, k=k, kinds=kinds)

        def fill(run):
            log.append(("fill", self.current.name))
            if not self.first_bad:  # allocated once, written in place from then on (never freed mid-phase)
                self.first_bad[:] = list(run.first_bad.values())
            assert all(a is b for a, b in zip(run.first_bad.values(), self.first_bad))
            real_fill(run)

        def save(*args, **kwargs):
            log.append(("checkpoint", self.current.name))
            return real_save(*args, **kwargs)

        def read(buffer, *args, **kwargs):
            for rows in real_read(buffer, *args, **kwargs):
                log.append(("gather", self.current.name))
                yield rows

        real_read = train_module.RingBuffer.read
        monkeypatch.setattr(SAETrainer, "step", step)
        monkeypatch.setattr(train_module.OnlineRun, "fill", fill)
        monkeypatch.setattr(train_module, "save_checkpoint", save)
        monkeypatch.setattr(train_module.RingBuffer, "read", read)

    class Stream:
        def __init__(self, owner, name):
            self.owner, self.name = owner, name

        def wait_stream(self, other):
            self.owner.log.append(("wait", self.name, other.name))


def phases(log):
    """The log cut at each fill: [events of the first fill and phase, ...]."""
    out = []
    for event in log:
        if event[0] == "fill":
            out.append([])
        out[-1].append(event)
    return out


def test_each_phase_is_gathered_and_owned_by_the_side_stream_before_its_steps_which_run_there(monkeypatch, tmp_path):
    streams = Streams(monkeypatch)
    model = zoo.tiny_model("llava")
    train(model, LAYER, data(model), sae(), steps=22, out=tmp_path, checkpoint_every=8, **FAST)  # 5 x 4 + 2
    log = streams.log
    steps = [e for e in log if e[0] == "step"]
    assert len(steps) == 22 and all(on == "side" and owned for _, on, owned in steps)
    assert sum(e[0] == "gather" for e in log) == 22  # the last phase gathers no row it will not train on
    for phase in phases(log):
        kinds = [e[0] for e in phase]
        if "step" not in kinds:
            continue
        first_step, wait = kinds.index("step"), phase.index(("wait", "side", "main"))
        # every gather of the phase happened on the current stream before the side stream waited for it
        assert [e for e in phase[:wait] if e[0] == "gather"] == [("gather", "main")] * kinds.count("step")
        assert wait < first_step and "gather" not in kinds[wait:]


@pytest.mark.parametrize("checkpoints", [True, False], ids=["checkpoints", "none"])
def test_the_current_stream_waits_for_the_steps_before_a_fill_a_checkpoint_and_the_end(monkeypatch, tmp_path,
                                                                                     checkpoints):
    streams = Streams(monkeypatch)
    model = zoo.tiny_model("llava")
    saving = dict(out=tmp_path, checkpoint_every=8) if checkpoints else {}
    train(model, LAYER, data(model), sae(), steps=24, **saving, **FAST)
    log = streams.log
    assert ("checkpoint", "main") in log if checkpoints else "checkpoint" not in [e[0] for e in log]
    joined = ("wait", "main", "side")
    last_step = 0
    for i, event in enumerate(log):
        if event[0] == "step":
            last_step = i
        if event[0] == "checkpoint":
            assert joined in log[last_step:i], "a checkpoint read the SAEs before the steps were waited for"
        if event[0] == "fill" and last_step:
            # inside the fill, after its forwards (which overlap the steps) and before it writes first_bad
            later = log[i:]
            mark = later.index(("mark", "main"))
            assert joined in later[:mark], "a fill wrote first_bad before the steps were waited for"
    assert joined in log[last_step:], "the run returned before the last steps were waited for"
    assert all(on == "main" for kind, on, *_ in log if kind in ("fill", "checkpoint"))


def test_on_the_cpu_overlap_changes_nothing_and_must_be_a_bool():
    model = zoo.tiny_model("llava")
    runs = [train(model, LAYER, data(model), sae(), steps=16, overlap=flag, **FAST).sae for flag in (True, False)]
    assert all(torch.equal(a, b) for a, b in zip(runs[0].state_dict().values(), runs[1].state_dict().values()))
    assert not StepStreams([torch.device("cpu")]).active
    with pytest.raises(ConfigError, match="overlap='yes'"):
        OnlineRunConfig(overlap="yes")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_overlapped_steps_train_the_sae_of_the_plain_alternation():
    model = zoo.tiny_model("llava").cuda()
    batches = [{k: v.cuda() for k, v in b.items()} for b in data(model)]
    assert StepStreams([torch.device("cuda")]).active and not StepStreams([torch.device("cuda")], False).active
    runs = []
    for flag in (True, False):
        s = sae().cuda()
        runs.append(train(model, LAYER, batches, s, steps=32, overlap=flag, **FAST).sae)
    for name, a in runs[0].state_dict().items():
        torch.testing.assert_close(a, runs[1].state_dict()[name], rtol=1e-4, atol=1e-5, msg=name)
