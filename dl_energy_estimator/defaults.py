"""Analytical (hardware-free) default coefficients of the energy model.

Model (per layer ``l`` of family ``t``, energies in joules, features per input sample)::

    E_l = e_mac[t] * MACs_l + e_mem[t] * bytes_l + e_call[t] * calls_l

``MACs`` are multiply-accumulates (or the equivalent elementary op: an add, a compare), ``bytes`` are the bytes
moved (inputs + outputs + weights/buffers, dtype-aware), ``calls`` the kernel launches (1 per layer; divided by
the batch size, since a launch is shared by the batch).

Constants (Horowitz, "Computing's energy problem", ISSCC 2014, 45 nm, 0.9 V):

* FP32 multiply 3.7 pJ + FP32 add 0.9 pJ  -> one FP32 MAC = 4.6 pJ; an add/compare alone = 0.9 pJ.
* 32-bit read from an 8 KB SRAM ~5 pJ; from DRAM ~640 pJ.

Choices, and why they should rank whole networks well across edge GPUs, ARM CPUs and accelerators:

* Memory traffic. At batch 1 a DARTS CIFAR cell's activations (16-256 KB) live in L2/SRAM, so most traffic hits
  on-chip memory; a 5 % DRAM share (compulsory misses, weights, evictions) gives
  ``(0.95 * 5 + 0.05 * 640) / 4 = 9.19 pJ/byte``, i.e. ~2 "MAC-equivalents" per byte. That matches the
  time ratio of memory-bound to compute-bound work measured on ARM CPUs (~1) and edge GPUs (~2-5) and keeps
  pooling, BatchNorm, ReLU, skips and adds clearly non-free (FLOP counters call them free).
* Operand fetch. Dense/pointwise convolutions and linear layers reuse each operand across many MACs (tiling), so
  their per-MAC cost is the arithmetic alone (4.6 pJ). A depthwise MAC cannot reuse its input across output
  channels: one SRAM read each (+5 pJ) -> 9.6 pJ/MAC. A pooling-window element is a strided, overlapping gather
  that SIMD does not amortise: the element's read and the running max/sum's read-modify (2 x 5 pJ) plus the
  compare/add (0.9 pJ) -> 10.9 pJ. This is why depthwise layers and 3x3 stride-1 pooling are slower per
  operation than dense convolutions on real devices (measured on a CPU: ~13 conv-MAC equivalents per window
  element; GPUs are closer to 1-2; 10.9/4.6 ~ 2.4 sits between).
* Per-call overhead. A kernel launch / framework dispatch / synchronisation costs ~5-20 us at batch 1; at the
  incremental power of an edge device that is ~10^5 (ARM CPU) to ~10^6 (edge GPU) MAC-equivalents. We take the
  geometric middle, ``e_call = 1.5 uJ`` (~3e5 MACs): moderate, so that a network of many tiny layers costs
  more than FLOPs say, without letting launch counts alone decide the ranking (which only fits GPUs).
  For a DARTS-like CIFAR network (C=36, 20 cells, batch 1) this gives ~35 % compute, ~45 % memory, ~20 % calls.
* ``identity`` (nn.Identity, Dropout at inference) launches nothing but keeps a tensor alive that its consumer
  re-reads: it is charged one read of its input (no call). ``view`` (Flatten, reshapes, empty containers) is free.
* ``other`` (a leaf type this package does not know): its memory traffic plus one call, and a warning.

Calibrated models (``python -m dl_energy_estimator calibrate``) replace these numbers by measured ones.
"""
from __future__ import annotations

PJ = 1e-12
E_FP32_MUL = 3.7 * PJ
E_FP32_ADD = 0.9 * PJ
E_MAC = E_FP32_MUL + E_FP32_ADD  # 4.6 pJ
E_SRAM_32B = 5.0 * PJ
E_DRAM_32B = 640.0 * PJ
DRAM_SHARE = 0.05
E_BYTE = ((1.0 - DRAM_SHARE) * E_SRAM_32B + DRAM_SHARE * E_DRAM_32B) / 4.0  # 9.1875 pJ/byte
E_CALL = 1.5e-6

#: Layer-type families (the columns of the model). Keep in sync with features.py.
FAMILIES: tuple[str, ...] = (
    "conv", "conv_pw", "conv_dw", "bn", "relu", "pool", "linear",
    "elementwise", "concat", "identity", "view", "other", "pool_max", "conv_dw_dilated",
)
#: Families split off a coarser one (version 1.1): max pooling and dilated depthwise convolutions run other
#: kernels than average pooling and plain depthwise ones, at costs the features cannot tell apart (on a CPU,
#: max pooling cost twice what average pooling did per element). Their default coefficients are the parent's,
#: so the analytical model prices them as before; a file without them (1.0) gives them its parent's.
PARENTS: dict[str, str] = {"pool_max": "pool", "conv_dw_dilated": "conv_dw"}
#: Feature names, in the order of every coefficient triple.
FEATURES: tuple[str, ...] = ("e_mac", "e_mem", "e_call")


def analytical_coefficients() -> dict[str, dict[str, float]]:
    """The default coefficients, ``{family: {"e_mac": J/MAC, "e_mem": J/byte, "e_call": J/call}}``."""
    def c(mac: float, mem: float = E_BYTE, call: float = E_CALL) -> dict[str, float]:
        return {"e_mac": mac, "e_mem": mem, "e_call": call}

    return {
        "conv": c(E_MAC),
        "conv_pw": c(E_MAC),
        "conv_dw": c(E_MAC + E_SRAM_32B),
        "bn": c(E_MAC),
        "relu": c(E_FP32_ADD),
        "pool": c(E_FP32_ADD + 2 * E_SRAM_32B),
        "linear": c(E_MAC),
        "elementwise": c(E_FP32_ADD),
        "concat": c(0.0),
        "identity": c(0.0, E_BYTE, 0.0),
        "view": c(0.0, 0.0, 0.0),
        "other": c(0.0),
        "pool_max": c(E_FP32_ADD + 2 * E_SRAM_32B),
        "conv_dw_dilated": c(E_MAC + E_SRAM_32B),
    }
