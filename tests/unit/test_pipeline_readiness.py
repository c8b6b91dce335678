"""Readiness while a partition retries: /readyz must stay 503 for the whole outage, not only
while the partition happens to be paused between two attempts."""

from __future__ import annotations

from consumer.core.errors import RegistryUnavailable
from consumer.engine.pipeline import Pipeline
from tests.fakes import FakeEvent, FakeSink, FakeSource, fake_pipeline


class FlakyRegistryDecoder:
    """Raises RegistryUnavailable `outage` times, then decodes."""

    def __init__(self, outage: int):
        self.outage = outage

    def decode(self, value):
        if self.outage:
            self.outage -= 1
            raise RegistryUnavailable("schema registry unreachable")
        return FakeEvent()


def pipeline_with(decoder) -> tuple[Pipeline, FakeSource]:
    source = FakeSource(end=5)
    pipeline = fake_pipeline(source, FakeSink(), decoder, retry_base_s=0)  # resume at the next step
    source.start()
    return pipeline, source


def test_not_ready_for_the_whole_registry_outage_then_ready() -> None:
    pipeline, source = pipeline_with(FlakyRegistryDecoder(outage=4))
    assert pipeline.ready
    seen = []
    for _ in range(4):
        pipeline.step()
        seen.append((pipeline.ready, bool(pipeline.paused)))
    # Each step resumes the partition to retry (so it is not paused at the end of the step) ...
    assert not any(paused for _, paused in seen)
    # ... but it is held back all the same: not ready.
    assert not any(ready for ready, _ in seen), seen
    pipeline.step()  # the registry answers: the messages go through
    pipeline.step()
    assert pipeline.ready
    assert source.next == 5
