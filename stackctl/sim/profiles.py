"""Hardware and model data for the simulator's timing model, and capacity helpers.

Every constant names its source. Efficiency factors (how much of a peak a real vLLM
reaches) are estimates and say why; they are the knobs to recalibrate against a
measurement, the rest is data sheets and model configs.

The deployment planner may call :func:`kv_bytes_per_token`, :func:`gpu_kv_capacity_tokens`
and :func:`cpu_kv_capacity_tokens`; the simulator uses the same functions, so planned and
simulated capacities agree.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

GIB = 1024**3


@dataclass(frozen=True)
class HardwareProfile:
    """One accelerator (per GPU; tensor parallelism multiplies them)."""

    name: str
    memory_bytes: int  # device memory
    peak_flops: float  # dense BF16 tensor FLOP/s
    hbm_bandwidth: float  # device memory bandwidth, bytes/s
    h2d_bandwidth: float  # host-to-device (PCIe) bandwidth per direction, bytes/s
    mfu: float  # fraction of peak_flops a prefill forward pass reaches
    hbm_efficiency: float  # fraction of hbm_bandwidth a decode step reaches
    h2d_efficiency: float  # fraction of h2d_bandwidth one pinned host-to-device copy reaches
    # fraction of that pinned-copy rate an LMCache CPU-tier retrieve reaches end to end, as TTFT
    # measures it (chunk lookup, per-chunk copies, the scatter into vLLM's paged blocks)
    lmcache_load_efficiency: float
    step_overhead_s: float  # fixed CPU/launch cost of one engine step (scheduler, sampling)
    activation_reserve_bytes: int  # memory vLLM's profiling run keeps for activations, graphs
    default_max_num_batched_tokens: int  # vLLM's default chunked-prefill token budget here


@dataclass(frozen=True)
class ModelProfile:
    """One model's shape, from its Hugging Face config.json."""

    name: str
    hf_names: tuple[str, ...]
    params: float  # total parameters, embeddings and LM head included
    layers: int
    hidden: int  # hidden size = attention heads x head_dim
    attention_heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_position_embeddings: int
    tied_embeddings: bool = False
    dtype_bytes: int = 2  # BF16 weights and KV cache (vLLM's default dtype "auto" for these)

    @property
    def weight_bytes(self) -> float:
        return self.params * self.dtype_bytes

    @property
    def body_params(self) -> float:
        """Parameters every token multiplies through (all but embedding table and LM head).

        vLLM computes logits only for the sampled position of each sequence, so the LM head
        costs once per scheduled sequence, not once per prompt token.
        """
        lm_tables = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return self.params - lm_tables


# --- Hardware -----------------------------------------------------------------------------
# A100 SXM 80GB: NVIDIA A100 Tensor Core GPU datasheet (nvidia.com/a100, "A100 80GB SXM"):
# 80 GB HBM2e, 2,039 GB/s, BF16 Tensor Core 312 TFLOPS dense (624 with sparsity),
# PCIe Gen4 64 GB/s (both directions together, so 32 GB/s each way).
A100_80GB = HardwareProfile(
    name="a100-80gb",
    memory_bytes=80 * GIB,  # nvidia-smi reports 81920 MiB
    peak_flops=312e12,
    hbm_bandwidth=2.039e12,
    h2d_bandwidth=32e9,
    # Prefill of an 8B model with FlashAttention-2 reaches roughly half of peak (FA2 paper,
    # Dao 2023: 50-73% of A100 peak for the attention kernels; GEMMs ~60-70%, less norms,
    # rotary, sampling). 0.55 puts Llama-3.1-8B prefill near 8k tokens/s at 20k context.
    # Check: in the LMCache blog's run cited below, basic K8s (round-robin, vLLM prefix caching,
    # no LMCache) shows 1.9-2.0 s TTFT at low load for ~21k-token prompts whose shared system
    # prompt alone is cached; this models 2.33 s (+17-23%). No published GPU prefix-hit TTFT
    # for this setup was found; the model gives one ~12 ms step.
    mfu=0.55,
    # Batch-1 decode of Llama-3.1-8B on an A100 runs at ~77% of the bandwidth ceiling
    # (johnmusgrave.com/p/vllm-throughput-latency-sweep-on: 75 tok/s on A100-40GB, vLLM);
    # with the step overhead below, 0.85 reproduces that fraction end to end.
    hbm_efficiency=0.85,
    # Pinned host-to-device copies reach ~25 GB/s of Gen4's 32 GB/s (~80%, cudaMemcpy bandwidthTest).
    h2d_efficiency=0.8,
    # An LMCache CPU-tier hit reaches about half of that, ~12.8 GB/s end to end:
    # - vLLM production-stack's multi-round QA run (LMCache blog "Open-Source LLM Inference
    #   Cluster Performing 10x FASTER...", blog.lmcache.ai/2025-03-06-benchmark, TTFT_1 figure;
    #   setup in production-stack tutorials/08-benchmark-multi-round-qa-multi-gpu.md): 8x
    #   A100-80GB SXM, Llama-3.1-8B, ~21k-token prompts (1000 shared + 20000 history), vLLM
    #   prefix caching *off* and 120 GB of LMCache CPU offload per engine, so every hit is a
    #   CPU-tier load: mean TTFT 0.22-0.25 s below 3 QPS, i.e. ~2.75 GB of KV in ~0.21 s once
    #   the ~150 uncached tokens' prefill (~23 ms) is taken off: 12-13 GB/s.
    # - LMCache issue #56 (2024-08-26, maintainer's table): Mistral-7B (also 128 KiB of KV per
    #   token), 25k tokens on an A40 (PCIe Gen4): retrieve from local CPU 0.25 s = ~13 GB/s.
    # Both are end to end, so this factor also carries what a request costs around the load
    # that the step model has no term for. They give one size only: no per-chunk split.
    lmcache_load_efficiency=0.5,
    step_overhead_s=0.001,  # vLLM v1 step with CUDA graphs: ~1 ms of scheduling + sampling
    # vLLM's profile run for 2048 batched tokens plus CUDA graphs and NCCL/non-torch memory
    # leaves ~54.5 GiB of KV cache for Llama-3.1-8B at 0.9 utilization (~446k tokens).
    activation_reserve_bytes=int(2.5 * GIB),
    default_max_num_batched_tokens=2048,  # vLLM v1 OpenAI server default below H100 class
)

# H100 SXM 80GB: NVIDIA H100 Tensor Core GPU datasheet (H100 SXM column): 80 GB HBM3,
# 3.35 TB/s, BF16 Tensor Core 1,979 TFLOPS with sparsity (989.5 dense), PCIe Gen5 128 GB/s
# (both directions, 64 GB/s each way).
H100_80GB = HardwareProfile(
    name="h100-80gb",
    memory_bytes=80 * GIB,
    peak_flops=989.5e12,
    hbm_bandwidth=3.35e12,
    h2d_bandwidth=64e9,
    mfu=0.45,  # FA2 reaches ~35-50% of H100 peak (FA3 paper, Shah 2024); vLLM default is FA2/FA3 mix
    hbm_efficiency=0.8,  # HBM3 reaches a little less of its peak than HBM2e in decode GEMV
    h2d_efficiency=0.8,  # as for the A100
    # No published end-to-end LMCache figure on H100 found: the A100's, as the retrieve path
    # (chunked copies + scatter) is the same software; an assumption, to recalibrate on one.
    lmcache_load_efficiency=0.5,
    step_overhead_s=0.001,
    activation_reserve_bytes=int(3 * GIB),  # larger default batched tokens (8192) -> larger profile
    default_max_num_batched_tokens=8192,  # vLLM v1 OpenAI server default on H100/H200
)

# A small CPU "device" for quick local runs; orders of magnitude of one server socket:
# ~2 TFLOP/s BF16 AMX (Intel 4th-gen Xeon), ~200 GB/s DDR5 (8 channels x 4800 MT/s x 8 B
# = 307 GB/s peak), KV "loads" are memcpy at ~10 GB/s.
CPU = HardwareProfile(
    name="cpu",
    memory_bytes=32 * GIB,  # vLLM CPU backend: VLLM_CPU_KVCACHE_SPACE-sized pool + weights
    peak_flops=2e12,
    hbm_bandwidth=307e9,
    h2d_bandwidth=10e9,
    mfu=0.3,  # CPU GEMMs through oneDNN rarely pass a third of peak AMX
    hbm_efficiency=0.6,  # STREAM-like bandwidth share
    h2d_efficiency=1.0,  # already folded into the 10 GB/s memcpy figure
    # LMCache still retrieves in chunks and scatters them into the paged cache here; no CPU
    # figure published, so the A100's measured share (an assumption, like the H100's).
    lmcache_load_efficiency=0.5,
    step_overhead_s=0.005,  # Python engine step without CUDA graphs
    activation_reserve_bytes=int(1 * GIB),
    default_max_num_batched_tokens=2048,
)

HARDWARE: dict[str, HardwareProfile] = {hw.name: hw for hw in (A100_80GB, H100_80GB, CPU)}

# --- Models -------------------------------------------------------------------------------
# Llama-3.1-8B: huggingface.co/meta-llama/Llama-3.1-8B-Instruct config.json
# (hidden_size 4096, num_hidden_layers 32, num_attention_heads 32, num_key_value_heads 8,
# head_dim 128, vocab_size 128256, max_position_embeddings 131072, tie_word_embeddings false);
# parameter count 8.03B from the model card.
LLAMA_31_8B = ModelProfile(
    name="llama-3.1-8b",
    hf_names=(
        "meta-llama/Llama-3.1-8B-Instruct",
        "meta-llama/Llama-3.1-8B",
        "meta-llama/Meta-Llama-3.1-8B-Instruct",
        "meta-llama/Meta-Llama-3.1-8B",
    ),
    params=8.03e9,
    layers=32,
    hidden=4096,
    attention_heads=32,
    kv_heads=8,
    head_dim=128,
    vocab=128256,
    max_position_embeddings=131072,
)

# Llama-3.1-70B: huggingface.co/meta-llama/Llama-3.1-70B-Instruct config.json (hidden 8192,
# 80 layers, 64 heads, 8 KV heads, head_dim 128); 70.6B parameters from the model card.
LLAMA_31_70B = ModelProfile(
    name="llama-3.1-70b",
    hf_names=(
        "meta-llama/Llama-3.1-70B-Instruct",
        "meta-llama/Llama-3.1-70B",
        "meta-llama/Meta-Llama-3.1-70B-Instruct",
        "meta-llama/Meta-Llama-3.1-70B",
    ),
    params=70.6e9,
    layers=80,
    hidden=8192,
    attention_heads=64,
    kv_heads=8,
    head_dim=128,
    vocab=128256,
    max_position_embeddings=131072,
)

# TinyLlama-1.1B: huggingface.co/TinyLlama/TinyLlama-1.1B-Chat-v1.0 config.json (hidden 2048,
# 22 layers, 32 heads, 4 KV heads, head_dim 64, vocab 32000, 2048 positions); 1.1B params.
TINYLLAMA_11B = ModelProfile(
    name="tinyllama-1.1b",
    hf_names=("TinyLlama/TinyLlama-1.1B-Chat-v1.0",),
    params=1.1e9,
    layers=22,
    hidden=2048,
    attention_heads=32,
    kv_heads=4,
    head_dim=64,
    vocab=32000,
    max_position_embeddings=2048,
)

MODELS: dict[str, ModelProfile] = {m.name: m for m in (LLAMA_31_8B, LLAMA_31_70B, TINYLLAMA_11B)}
REFERENCE_HARDWARE = A100_80GB
REFERENCE_MODEL = LLAMA_31_8B


def model_for_hf_name(hf_name: str | None) -> ModelProfile:
    """Profile for a Hugging Face model name, or the reference profile (with a warning)."""
    if hf_name:
        wanted = hf_name.lower().rstrip("/")
        for model in MODELS.values():
            if wanted == model.name or any(wanted == n.lower() for n in model.hf_names):
                return model
        for model in MODELS.values():  # local paths and mirrors: match on the last component
            if any(wanted.endswith(n.lower().split("/")[-1]) for n in model.hf_names):
                return model
    log.warning("no model profile for %r; using %s", hf_name, REFERENCE_MODEL.name)
    return REFERENCE_MODEL


def kv_bytes_per_token(model: ModelProfile) -> int:
    """KV cache bytes one token occupies across the whole model: K and V for every layer."""
    return 2 * model.layers * model.kv_heads * model.head_dim * model.dtype_bytes


def gpu_kv_capacity_bytes(
    hardware: HardwareProfile,
    model: ModelProfile,
    gpu_memory_utilization: float,
    tensor_parallel_size: int = 1,
) -> float:
    """Bytes per GPU left for the KV cache, as vLLM's memory profiling computes them."""
    budget = hardware.memory_bytes * gpu_memory_utilization
    return budget - model.weight_bytes / tensor_parallel_size - hardware.activation_reserve_bytes


def gpu_kv_capacity_tokens(
    hardware: HardwareProfile,
    model: ModelProfile,
    gpu_memory_utilization: float,
    tensor_parallel_size: int = 1,
) -> int:
    """Tokens the GPU KV cache holds (0 when the weights do not fit).

    With tensor parallelism each GPU holds 1/tp of the KV heads, so a token costs 1/tp of
    its bytes per GPU.
    """
    free = gpu_kv_capacity_bytes(hardware, model, gpu_memory_utilization, tensor_parallel_size)
    per_token_per_gpu = kv_bytes_per_token(model) / tensor_parallel_size
    return max(0, int(free // per_token_per_gpu))


def gpu_kv_capacity_blocks(
    hardware: HardwareProfile,
    model: ModelProfile,
    gpu_memory_utilization: float,
    tensor_parallel_size: int = 1,
    block_size: int = 16,
) -> int:
    """Whole KV blocks (vLLM's num_gpu_blocks) the GPU holds."""
    return (
        gpu_kv_capacity_tokens(hardware, model, gpu_memory_utilization, tensor_parallel_size)
        // block_size
    )


def cpu_kv_capacity_tokens(model: ModelProfile, cpu_gb: float, chunk_size: int = 256) -> int:
    """Tokens LMCache's local CPU backend holds in ``cpu_gb`` GB (LMCache's GB are GiB), whole chunks."""
    chunk_bytes = kv_bytes_per_token(model) * chunk_size
    return int(cpu_gb * GIB // chunk_bytes) * chunk_size
