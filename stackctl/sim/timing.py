"""The physical timing model: how long one engine step takes. Pure functions, no clock.

One vLLM step is one forward pass over every token scheduled in it (chunked prefill and
decode mixed), so it is bounded by whichever resource saturates first (a roofline):

* compute: ``2 x body_params`` FLOPs per new token (every linear layer), plus the LM head
  once per sampled sequence, plus causal attention ``4 x layers x hidden`` FLOPs per
  (query, key) pair (QK^T and PV, 2 FLOPs per multiply-add each), at ``peak x mfu``;
* memory: all weights read once per step, plus the KV cache of every scheduled sequence
  (its context and new tokens) read by attention, at ``hbm_bandwidth x hbm_efficiency``.

``step = overhead + h2d_load + max(compute, memory)``. The CPU-tier (LMCache) load is added
serially because LMCache's default (non-layerwise) retrieve completes before the forward
pass starts; it runs at the pinned-copy rate times ``lmcache_load_efficiency``, LMCache's
end-to-end share of it (profiles.py cites the measurements). Tensor parallelism divides
compute, memory traffic and loads over ``tp`` GPUs (all-reduce cost is not modelled).
"""

from __future__ import annotations

from dataclasses import dataclass

from stackctl.sim.profiles import HardwareProfile, ModelProfile, kv_bytes_per_token


@dataclass(slots=True)
class StepLoad:
    """What one step does, accumulated request by request while the scheduler plans it."""

    new_tokens: int = 0  # tokens whose KV is computed this step (prefill chunks + decodes)
    attention_pairs: float = 0.0  # causal (query, key) pairs over all scheduled sequences
    kv_read_tokens: int = 0  # tokens of KV attention reads (context + new, per sequence)
    sampled_sequences: int = 0  # sequences that sample a token (LM head runs for these)
    loaded_tokens: int = 0  # tokens whose KV is copied from the CPU tier this step

    def add(self, new_tokens: int, context: int, samples: bool) -> None:
        """Account ``new_tokens`` computed after ``context`` tokens already in the cache."""
        self.new_tokens += new_tokens
        self.attention_pairs += new_tokens * context + new_tokens * (new_tokens + 1) / 2
        self.kv_read_tokens += context + new_tokens
        if samples:
            self.sampled_sequences += 1


class TimingModel:
    """Step durations for one (hardware, model, tensor parallel size)."""

    def __init__(
        self, hardware: HardwareProfile, model: ModelProfile, tensor_parallel_size: int = 1
    ):
        self.hardware = hardware
        self.model = model
        tp = tensor_parallel_size
        self.flops_per_token = 2.0 * model.body_params
        self.flops_per_sample = 2.0 * model.vocab * model.hidden
        self.flops_per_attention_pair = 4.0 * model.layers * model.attention_heads * model.head_dim
        self.kv_bytes_per_token = kv_bytes_per_token(model)
        self.weight_bytes = model.weight_bytes
        self.compute_rate = hardware.peak_flops * hardware.mfu * tp
        self.memory_rate = hardware.hbm_bandwidth * hardware.hbm_efficiency * tp
        self.load_rate = (
            hardware.h2d_bandwidth * hardware.h2d_efficiency * hardware.lmcache_load_efficiency * tp
        )
        self.overhead_s = hardware.step_overhead_s

    def compute_seconds(self, load: StepLoad) -> float:
        flops = (
            load.new_tokens * self.flops_per_token
            + load.sampled_sequences * self.flops_per_sample
            + load.attention_pairs * self.flops_per_attention_pair
        )
        return flops / self.compute_rate

    def memory_seconds(self, load: StepLoad) -> float:
        traffic = self.weight_bytes + load.kv_read_tokens * self.kv_bytes_per_token
        return traffic / self.memory_rate

    def load_seconds(self, tokens: int) -> float:
        """Time for LMCache to bring ``tokens`` tokens of KV from its CPU tier onto the GPU."""
        return tokens * self.kv_bytes_per_token / self.load_rate

    def step_seconds(self, load: StepLoad) -> float:
        """Modelled duration of one engine step."""
        if load.new_tokens == 0 and load.loaded_tokens == 0:
            return 0.0
        forward = (
            max(self.compute_seconds(load), self.memory_seconds(load)) if load.new_tokens else 0.0
        )
        return self.overhead_s + self.load_seconds(load.loaded_tokens) + forward

    # --- Convenience figures (reports, tests, the planner) ---------------------------------

    def prefill_seconds(
        self, tokens: int, context: int = 0, chunk: int | None = None, loaded: int = 0
    ) -> float:
        """A lone request's prefill of ``tokens`` after ``context`` cached tokens, in chunks.

        ``loaded`` of the cached tokens come from the CPU tier, copied in the first step, as
        the engine schedules a CPU-tier hit (the TTFT of a lone request).
        """
        chunk = chunk or tokens
        total, done = 0.0, 0
        while done < tokens:
            n = min(chunk, tokens - done)
            load = StepLoad()
            load.add(n, context + done, samples=done + n == tokens)
            if done == 0:
                load.loaded_tokens = loaded
            total += self.step_seconds(load)
            done += n
        return total

    def decode_seconds(self, batch: int, context: int) -> float:
        """One decode step for ``batch`` sequences of ``context`` tokens each."""
        load = StepLoad()
        for _ in range(batch):
            load.add(1, context, samples=True)
        return self.step_seconds(load)
