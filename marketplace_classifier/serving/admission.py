"""Batching by cost for an asyncio engine (the second engine's Ray Serve replicas).

A FIFO batcher (Ray Serve's `@serve.batch`) queues whatever arrives: four heavy requests ahead
of an ordinary one hold it for several batches of work. TorchServe's workers refuse, per batch,
what does not fit the work budget beside cheaper batch-mates (marketplace_classifier/serving/budget.py); this
does the
same before batching: each request is read on arrival (parsed, its photos' headers read, its
cost known), every batch takes the cheapest waiting requests that fit the batch budget, and
those that do not fit beside them are answered 503 + Retry-After at once. So a waiting request
is never behind more than the batch in progress, and the queue never holds more than one
batch's work. The work itself runs in one thread, so the event loop keeps admitting meanwhile.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from marketplace_classifier.serving.budget import admit, batch_full
from marketplace_classifier.serving.core import Answer, ListingService, Refusal, Request
from marketplace_classifier.serving.processing import AnswerTimedOut
from marketplace_classifier.serving.protocols import Envelope


@dataclass
class Waiting:
    envelope: Envelope
    answer: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)


class CostBatcher:
    """`await batcher.submit(request)` -> the request's Answer, batched with its neighbours."""

    def __init__(self, service: ListingService, max_batch_size: int, batch_wait_s: float,
                 response_timeout_s: float = 60):
        if max_batch_size < 1 or batch_wait_s < 0 or response_timeout_s <= 0:
            raise ValueError("max_batch_size must be at least 1, batch_wait_s at least 0 and "
                             "response_timeout_s above 0")
        self.service, self.max_batch_size, self.batch_wait_s = service, max_batch_size, batch_wait_s
        self.response_timeout_s = response_timeout_s
        self.waiting: list[Waiting] = []
        self.reader = ThreadPoolExecutor(1, thread_name_prefix="read")
        self.runner = ThreadPoolExecutor(1, thread_name_prefix="batch")
        self.arrived: asyncio.Event | None = None
        self.loop_task: asyncio.Task | None = None

    async def submit(self, request: Request) -> Answer:
        loop = asyncio.get_running_loop()
        self.start(loop)
        parsed = await loop.run_in_executor(self.reader, self.service.read_one, request)
        if isinstance(parsed, Refusal):
            return self.service.refuse(parsed.error)
        waiting = Waiting(parsed, loop.create_future())
        self.waiting.append(waiting)
        self.arrived.set()
        try:  # the batch goes on without this request's client; its answer is dropped
            return await asyncio.wait_for(asyncio.shield(waiting.answer), self.response_timeout_s)
        except TimeoutError:
            if waiting in self.waiting:  # not in a batch yet: it never will be
                self.waiting.remove(waiting)
            return self.service.refuse(AnswerTimedOut(
                f"no answer within the response timeout ({self.response_timeout_s:g} s); retry it"))

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.loop_task is None:
            self.arrived = asyncio.Event()
            self.loop_task = loop.create_task(self.run_batches())

    async def run_batches(self) -> None:
        while True:
            await self.arrived.wait()
            self.arrived.clear()
            if len(self.waiting) < self.max_batch_size:
                await asyncio.sleep(self.batch_wait_s)  # let concurrent requests join the batch
            chosen = self.take_batch()
            if chosen:
                await self.run(chosen)
            if self.waiting:
                self.arrived.set()

    def take_batch(self) -> list[Waiting]:
        """The cheapest waiting requests that fit the batch budget, at most max_batch_size of
        them; those that do not fit beside the cheaper ones are refused now (503, retry)."""
        budget = self.service.budget
        order = sorted(self.waiting, key=lambda w: (w.envelope.cost.photos, w.envelope.cost.pixels))
        fits = admit([w.envelope.cost for w in order], budget)
        admitted = [w for w, fit in zip(order, fits, strict=True) if fit]
        for waiting, fit in zip(order, fits, strict=True):
            if not fit:
                self.settle(waiting, self.service.refuse(batch_full(waiting.envelope.cost, budget)))
        chosen = admitted[:self.max_batch_size]
        self.waiting = admitted[self.max_batch_size:]
        return chosen

    async def run(self, chosen: list[Waiting]) -> None:
        loop = asyncio.get_running_loop()
        try:
            answers = await loop.run_in_executor(self.runner, self.answer_batch,
                                                 [w.envelope for w in chosen])
        except Exception as error:  # the batch failed as a whole: each request says so
            answers = [self.service.refuse(error)] * len(chosen)
        for waiting, answer in zip(chosen, answers, strict=True):
            self.settle(waiting, answer)

    def answer_batch(self, envelopes: list[Envelope]) -> list[Answer]:
        service = self.service
        return service.answer(service.predict(service.prepare_read(envelopes)))

    @staticmethod
    def settle(waiting: Waiting, answer: Answer) -> None:
        if not waiting.answer.done():  # its client may have gone
            waiting.answer.set_result(answer)
