"""Batches of Shapes inputs for training and evaluation: a data source of the testbed (see :mod:`vlmsae.data`)."""

from __future__ import annotations

from collections.abc import Iterator

from ..errors import ConfigError
from .shapes import Sample, captioner_inputs, make_samples, qa_inputs


class ShapesData:
    """Batches of Shapes testbed inputs, deterministic: batch ``i`` holds ``make_samples(batch_size, seed + i)``.

    ``question=None`` gives captioner inputs (teacher-forced on the true caption); a question gives
    QA inputs (teacher-forced on the true answer). Iterating again gives the same batches.
    """

    def __init__(self, tokenizer, *, batches: int, batch_size: int = 64, seed: int = 20_000_000,
                 question: str | None = None):
        if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
            raise ConfigError(f"batches={batches!r} must be an integer >= 1")
        self.tokenizer, self.batches, self.batch_size = tokenizer, batches, batch_size
        self.seed, self.question = seed, question

    def __len__(self) -> int:
        return self.batches

    def samples(self, i: int) -> list[Sample]:
        return make_samples(self.batch_size, self.seed + i)

    def __iter__(self) -> Iterator[dict]:
        for i in range(self.batches):
            samples = self.samples(i)
            inputs = (captioner_inputs(samples, self.tokenizer) if self.question is None
                      else qa_inputs(samples, self.tokenizer, self.question))
            inputs.pop("labels")
            yield inputs
