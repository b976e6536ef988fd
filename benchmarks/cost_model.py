"""A roofline model of one training step of one adapted projection: each launch's FLOPs and DRAM
bytes from its shapes, its time as max(FLOPs / peak, bytes / bandwidth) plus a fixed launch cost,
summed per layer and compared with the frozen layer's (the floor: forward GEMM + dX GEMM).

It is a model, not a measurement: it assumes every kernel runs at the roofline and that tiles
re-read from L2 cost nothing. `python -m benchmarks.throughput` prints it labelled "model, not
measured" on a CPU and beside the measured ratio on a GPU, so a lent GPU checks the model.

The LoRA² launches are those of triton_kernels/lora_linear.py (4 a step for bf16 inputs):

    cast     A₁ and B₂ to bf16 (reads fp32, writes bf16)
    forward  x·Wᵀ + h·(B₂C)ᵀ in row bands: h = d(x)·A₁ᵀ once per row tile and column group (the GPU runs
             as many groups as one wave of programs holds: ``column_groups``)
    dx       dY·W + g·A₁ in row bands: gB = dY·B₂ once per row tile and column group, dB₂ partials
             (zᵀ·dY), dA₁ partials (gᵀ·x: x read once more), per row tile
    finish   the partials summed (read once), the k × k core's gradients

Terms beyond the roofline (Kernels v3, 2026-12-04), each pessimistic, each labelled in the table:

- dropout's ALU work: one keep decision per x element in the forward (its row bands) and one in dX,
  DROPOUT_OPS CUDA-core instructions each (a Philox evaluation serves four), not overlapped with the
  tensor cores;
- the dX kernel reads x (for dA₁ = gᵀ·d(x)) outside the GEMM's K loops (a pass of its own, or with dropout
  the tiles' epilogues): not overlapped with them, so those bytes add to the launch's time instead of hiding
  under its max();
- a GEMM-efficiency factor: the fused kernels' GEMM core (pointer loads: no TMA, not persistent, no warp
  specialisation) at a fraction of cuBLAS's rate, which the floor runs at; reported at 100 % and 85 %;
- the cuBLAS split (lora_linear.base_gemm): cuBLAS's GEMM plus an adapter launch that reads x (or dY) again
  and reads and writes y (or dX) once more; the autotuner picks the faster per direction, so the model
  takes min(fused, split) where the split is on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Device:
    name: str
    tensor_flops: float  # dense bf16 tensor-core FLOP/s
    bandwidth: float  # DRAM bytes/s
    launch_seconds: float  # fixed cost of a launch: its latency and its tail wave
    sms: int = 132  # streaming multiprocessors: how many column groups the row-band kernels run
    alu_ops: float = 20e12  # CUDA-core integer / float instructions a second (dequantising 4-bit values)


H100 = Device("H100 SXM (roofline)", 989e12, 3.35e12, 3e-6)
H100_SMS = H100.sms
# bitsandbytes' 4-bit: half a byte a value plus a fp32 absmax per 64 values (NF4 / FP4, no double quant)
FOUR_BIT_BYTES = 0.5 + 4 / 64
DEQUANT_OPS = 8  # instructions to dequantise one value: nibble, code and absmax lookups, scale, convert
# CUDA-core instructions per dropout keep decision (an estimate, to be read off SASS): a Philox evaluation is
# ten rounds of two IMAD.WIDE and two LOP3 plus set-up, ~50, and serves four elements (its four outputs:
# ~12.5 each); the uniform conversion, the compare, the select and the interleave of the four outputs add ~6.
# (One evaluation per element, as until 2026-12-04, was ~62 per element in the review's SASS count.)
DROPOUT_OPS = 19


@dataclass(frozen=True)
class Launch:
    name: str
    flops: float
    bytes: float

    alu: float = 0.0  # CUDA-core instructions (4-bit dequantisation, dropout's Philox), overlapping neither
    exposed_bytes: float = 0.0  # DRAM reads nothing overlaps (the dX epilogue's x tile)
    efficiency: float = 1.0  # the GEMM core's rate as a fraction of cuBLAS's (the tensor-core peak here)

    def seconds(self, device: Device) -> float:
        return (max(self.flops / (device.tensor_flops * self.efficiency), self.bytes / device.bandwidth)
                + self.exposed_bytes / device.bandwidth + self.alu / device.alu_ops + device.launch_seconds)


def floor_launches(tokens: int, in_f: int, out_f: int, element: int = 2) -> list[Launch]:
    """The frozen nn.Linear inside a model: the forward GEMM and the dX GEMM."""
    gemm = 2.0 * tokens * in_f * out_f
    return [Launch("forward", gemm, element * (tokens * in_f + in_f * out_f + tokens * out_f)),
            Launch("dx", gemm, element * (tokens * out_f + in_f * out_f + tokens * in_f))]


def column_groups(row_tiles: int, col_tiles: int, sms: int) -> int:
    """lora_linear.column_groups on a GPU of ``sms`` SMs: one wave of programs, no group without a tile."""
    wanted = max(1, min(sms // max(row_tiles, 1), col_tiles))
    return math.ceil(col_tiles / math.ceil(col_tiles / wanted))


def lora2_launches(tokens: int, in_f: int, out_f: int, k: int = 8, element: int = 2, block_m: int = 128,
                   block_n: int = 256, dropout: float = 0.0, efficiency: float = 1.0, sms: int = H100_SMS,
                   bands: bool = True, adapters: int = 1) -> list[Launch]:
    """The fused LoRA² step (k padded to the rank tile, as the tensor cores compute it). Tiles: the
    128 × 256 config, the one of the Hopper set meant for these shapes (on a GPU the autotuner picks).
    Row bands: h (forward) and gB (dX) once per row tile and column group; ``bands`` False models the
    per-output-tile schedule of before 2026-12-04 (h in every column tile). With dropout both directions draw one Philox value per x element.
    ``adapters`` > 1: that many adapters over the ``tokens`` rows (stacked factors, a segment each): the same
    launches, each adapter's factors read and written once, a partial row tile more per segment."""
    rank = max(16, 2 ** math.ceil(math.log2(k)))
    m_tiles = math.ceil(tokens / block_m) + adapters - 1
    gemm = 2.0 * tokens * in_f * out_f
    out_tiles, in_tiles = math.ceil(out_f / block_n), math.ceil(in_f / block_n)
    h_passes = column_groups(m_tiles, out_tiles, sms) if bands else out_tiles  # h = d(x)·A₁ᵀ
    forward_flops = gemm + 2.0 * tokens * in_f * rank * h_passes + 2.0 * tokens * out_f * rank
    forward_bytes = element * (tokens * in_f + in_f * out_f + tokens * out_f + adapters * k * in_f) + 4 * tokens * k
    dx_flops = (gemm + 2.0 * tokens * out_f * rank * column_groups(m_tiles, in_tiles, sms)  # gB, once a group
                + 2.0 * tokens * out_f * rank  # dB₂ partials
                + 4.0 * tokens * in_f * rank)  # g·A₁ and the dA₁ partials
    partial_bytes = 4 * m_tiles * (out_f * k + k * in_f + rank * rank)
    dx_bytes = (element * (tokens * out_f + in_f * out_f + tokens * in_f + adapters * k * out_f) + 4 * tokens * k
                + partial_bytes)
    draws = DROPOUT_OPS * tokens * in_f if dropout else 0.0
    cast_bytes = adapters * (4 + element) * k * (in_f + out_f)
    finish_bytes = partial_bytes + adapters * 4 * k * (in_f + out_f)
    return [Launch("cast", 0.0, cast_bytes),
            Launch("forward", forward_flops, forward_bytes, alu=draws, efficiency=efficiency),
            Launch("dx", dx_flops, dx_bytes, alu=draws, exposed_bytes=element * tokens * in_f, efficiency=efficiency),
            Launch("finish", 0.0, finish_bytes)]


def split_launches(tokens: int, in_f: int, out_f: int, k: int = 8, element: int = 2, dropout: float = 0.0
                   ) -> dict[str, list[Launch]]:
    """The cuBLAS split per direction: cuBLAS's GEMM (the floor's launch) and the adapter kernel (BASE False):
    the forward's reads x for h once per row band and reads + writes y; dX's streams dY for gB once per row
    band as the fused one does, reads + writes dX and reads x for dA₁."""
    rank = max(16, 2 ** math.ceil(math.log2(k)))
    floor = floor_launches(tokens, in_f, out_f, element)
    draws = DROPOUT_OPS * tokens * in_f if dropout else 0.0
    forward = Launch("forward adapter", 2.0 * tokens * (in_f + out_f) * rank,
                     element * (tokens * in_f + 2 * tokens * out_f + k * (in_f + out_f)) + 4 * tokens * k, alu=draws)
    dx = Launch("dx adapter", 2.0 * tokens * (2 * out_f + 2 * in_f) * rank,
                element * (tokens * out_f + 3 * tokens * in_f + k * (in_f + out_f)) + 4 * tokens * k, alu=draws)
    return {"forward": [floor[0], forward], "dx": [floor[1], dx]}


def step_seconds(tokens: int, in_f: int, out_f: int, k: int = 8, device: "Device | None" = None,
                 dropout: float = 0.0, efficiency: float = 1.0, split: bool = False, adapters: int = 1) -> float:
    """One projection's modelled training step; with ``split`` each direction takes the faster of the fused
    launch and the cuBLAS split, as lora_linear.base_gemm does on a GPU."""
    device = device or H100
    launches = {launch.name: launch for launch in lora2_launches(tokens, in_f, out_f, k, dropout=dropout,
                                                                  efficiency=efficiency, sms=device.sms,
                                                                  adapters=adapters)}
    alternatives = split_launches(tokens, in_f, out_f, k, dropout=dropout) if split else {}
    total = launches["cast"].seconds(device) + launches["finish"].seconds(device)
    for direction in ("forward", "dx"):
        fused = launches[direction].seconds(device)
        other = sum(launch.seconds(device) for launch in alternatives.get(direction, []))
        total += min(fused, other) if other else fused
    return total


def qlora2_launches(tokens: int, in_f: int, out_f: int, k: int = 8, element: int = 2, block_m: int = 128
                    ) -> list[Launch]:
    """The LoRA² step over a 4-bit W, as triton_kernels/lora_linear.py picks its path: up to
    FUSED_DEQUANT_MAX_TOKENS (384) rows every row tile dequantises W in its K loop (W read at 0.56 B a
    value, the dequantisation repeated per row tile on the CUDA cores, not overlapped: pessimistic);
    above, one launch per direction dequantises W into a bf16 buffer and the bf16 kernels follow."""
    from lora2_kernels.triton_kernels.lora_linear import FUSED_DEQUANT_MAX_TOKENS

    launches = lora2_launches(tokens, in_f, out_f, k, element, block_m)
    values = in_f * out_f
    if tokens > FUSED_DEQUANT_MAX_TOKENS:
        dequant = Launch("dequantize", 0.0, values * (FOUR_BIT_BYTES + element), alu=DEQUANT_OPS * values)
        return [launches[0], dequant, launches[1], dequant, *launches[2:]]
    m_tiles = math.ceil(tokens / block_m)
    fused = []
    for launch in launches:
        if launch.name in ("forward", "dx"):
            launch = Launch(launch.name, launch.flops, launch.bytes - values * (element - FOUR_BIT_BYTES),
                            alu=DEQUANT_OPS * values * m_tiles)
        fused.append(launch)
    return fused


@dataclass
class LayerModel:
    shape: str
    tokens: int
    in_f: int
    out_f: int
    floor_us: float
    lora2_us: float  # fused kernels at cuBLAS's GEMM rate, no dropout
    qlora2_us: float = 0.0  # the same step over a 4-bit W
    slow_us: float = 0.0  # the fused kernels' GEMM at SLOW_GEMM of cuBLAS's rate
    slow_split_us: float = 0.0  # the same, with the cuBLAS split where it is faster (the autotuner's choice)
    dropout_us: float = 0.0  # dropout 0.1, fused, at cuBLAS's rate

    @property
    def ratio(self) -> float:
        return self.lora2_us / self.floor_us


SLOW_GEMM = 0.85  # the GEMM efficiency the issue asks the model at (a Triton GEMM core 15 % behind cuBLAS)

# The shapes of ../shared/README.md: LLaMA-1.1B at 8×1024 tokens, DeBERTa-v3-base at 32×256.
SHAPES = [("llama-1.1b q/o", 8192, 2048, 2048), ("llama-1.1b k/v", 8192, 2048, 256),
          ("llama-1.1b gate/up", 8192, 2048, 5632), ("llama-1.1b down", 8192, 5632, 2048),
          ("deberta q/k/v/o", 8192, 768, 768), ("deberta up", 8192, 768, 3072), ("deberta down", 8192, 3072, 768)]


def layer_models(device: Device = H100, k: int = 8) -> list[LayerModel]:
    rows = []
    for name, tokens, in_f, out_f in SHAPES:
        floor = sum(launch.seconds(device) for launch in floor_launches(tokens, in_f, out_f))
        qlora2 = sum(launch.seconds(device) for launch in qlora2_launches(tokens, in_f, out_f, k))
        rows.append(LayerModel(name, tokens, in_f, out_f, 1e6 * floor, 1e6 * step_seconds(tokens, in_f, out_f, k, device),
                               1e6 * qlora2,
                               slow_us=1e6 * step_seconds(tokens, in_f, out_f, k, device, efficiency=SLOW_GEMM),
                               slow_split_us=1e6 * step_seconds(tokens, in_f, out_f, k, device, efficiency=SLOW_GEMM,
                                                                split=True),
                               dropout_us=1e6 * step_seconds(tokens, in_f, out_f, k, device, dropout=0.1)))
    return rows


def model_table(rows: list[LayerModel], measured: dict[str, float] | None = None, device: Device = H100) -> str:
    """Markdown: per shape the modelled µs and ratios, and the measured ratio where a GPU gave one."""
    slow = f"{100 * SLOW_GEMM:.0f} %"
    lines = [f"Model, not measured: {device.name}, bf16, {device.tensor_flops / 1e12:.0f} TFLOP/s, "
             f"{device.bandwidth / 1e12:.2f} TB/s, {device.launch_seconds * 1e6:.0f} µs a launch, "
             f"{device.alu_ops / 1e12:.0f} T CUDA-core instructions/s; k = 8; dX's epilogue read of x exposed; "
             f"dropout {DROPOUT_OPS} instructions a draw, not overlapped.", "",
             "| projection | tokens × in → out | floor µs | LoRA² µs | LoRA² / floor (GEMM at cuBLAS's rate) "
             f"| measured | at {slow} of cuBLAS | at {slow}, cuBLAS split where faster | dropout 0.1 / 0 "
             "| 4-bit LoRA² / bf16 floor |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        seen = (measured or {}).get(r.shape)
        lines.append(f"| {r.shape} | {r.tokens} × {r.in_f} → {r.out_f} | {r.floor_us:.1f} | {r.lora2_us:.1f} | "
                     f"{r.ratio:.3f} | {f'{seen:.3f}' if seen else '— (needs a GPU)'} | {r.slow_us / r.floor_us:.3f} | "
                     f"{r.slow_split_us / r.floor_us:.3f} | {r.dropout_us / r.lora2_us:.3f} | "
                     f"{r.qlora2_us / r.floor_us:.3f} |")
    for model, layer in DECODER_LAYERS.items():
        def total(field: str) -> float:
            return sum(n * getattr(r, field) for r in rows for shape, n in layer.items() if r.shape == shape)

        floor = total("floor_us")
        lines.append(f"| **{model} layer** ({sum(layer.values())} projections) | | {floor:.1f} | {total('lora2_us'):.1f} "
                     f"| **{total('lora2_us') / floor:.3f}** | | {total('slow_us') / floor:.3f} | "
                     f"{total('slow_split_us') / floor:.3f} | {total('dropout_us') / total('lora2_us'):.3f} | "
                     f"**{total('qlora2_us') / floor:.3f}** |")
    return "\n".join(lines)


# How many projections of each shape one decoder / encoder layer has.
DECODER_LAYERS = {"llama-1.1b": {"llama-1.1b q/o": 2, "llama-1.1b k/v": 2, "llama-1.1b gate/up": 2, "llama-1.1b down": 1},
                  "deberta": {"deberta q/k/v/o": 4, "deberta up": 1, "deberta down": 1}}


def adapters_table(adapters: int = 3, device: Device = H100, k: int = 8,
                   tokens_per_adapter: tuple[int, ...] = (8192, 1024)) -> str:
    """Markdown: a sweep's step of ``adapters`` adapters over one base (one launch set, every adapter's batch
    in it) against that many single-adapter steps, per decoder / encoder layer. The GEMM FLOPs are the same
    (every adapter's rows still go through W); what one step saves is W's reads and the launches."""
    lines = [(f"Model, not measured: {device.name}; {adapters} adapters in one step vs {adapters} single steps, each "
              "adapter's batch as a single run's."), "",
             "| layer | tokens an adapter | one step, µs | single steps, µs | one / singles |", "|---|---:|---:|---:|---:|"]
    for model, layer in DECODER_LAYERS.items():
        for tokens in tokens_per_adapter:
            together = singles = 0.0
            for name, _, in_f, out_f in SHAPES:
                n = layer.get(name, 0)
                together += n * step_seconds(adapters * tokens, in_f, out_f, k, device, adapters=adapters)
                singles += n * adapters * step_seconds(tokens, in_f, out_f, k, device)
            lines.append(f"| {model} | {tokens} | {1e6 * together:.1f} | {1e6 * singles:.1f} | "
                         f"{together / singles:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(model_table(layer_models()))
    print()
    print(adapters_table())
