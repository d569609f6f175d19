"""The thinker's fused MoE experts stored in NF4, one expert at a time.

transformers keeps a sparse MoE block's experts as two fused 3-D parameters, ``gate_up_proj`` (experts x 2 width x
hidden) and ``down_proj`` (experts x hidden x width). bitsandbytes' 4-bit loading replaces ``nn.Linear`` modules
only, so under ``load_in_4bit`` those stacks stay 16-bit (91 % of the 30B-A3B thinker). :class:`NF4Experts`
replaces the experts module: each expert's two matrices are quantized on their own with bitsandbytes' public
``quantize_4bit`` (NF4, blocks of ``blocksize`` values that never straddle two experts, optional double
quantization of the block scales, whose blocks of 256 scales never straddle two experts either), and the forward
dequantizes (``dequantize_4bit``) only the experts the batch routes to, one at a time. The routing and the
arithmetic are the stock experts' (top-k weights applied after ``down_proj``, ``index_add_`` back).

Stored bytes per matrix of ``n`` values (:func:`nf4_matrix_bytes`, the planner's figure): ``n / 2`` packed codes,
plus ``4 n / blocksize`` fp32 block scales; with double quantization ``n / blocksize`` uint8 scales, ``4 ceil(n /
blocksize / 256)`` fp32 second-level scales and a 4-byte offset. The two 16-value and 256-value code tables are
shared (bitsandbytes' own), not stored per expert.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

#: the projections of a fused experts module: name -> (rows, columns) as functions of (hidden, width)
PROJECTIONS = {"gate_up_proj": lambda hidden, width: (2 * width, hidden),
               "down_proj": lambda hidden, width: (hidden, width)}
NESTED_BLOCKSIZE = 256  # bitsandbytes' block size for the second-level (double) quantization


def nf4_matrix_bytes(numel: int, blocksize: int = 64, double_quant: bool = True) -> int:
    """Bytes one expert matrix of ``numel`` values takes in NF4 (codes and quantization constants)."""
    blocks = numel // blocksize
    if double_quant:
        return numel // 2 + blocks + 4 * math.ceil(blocks / NESTED_BLOCKSIZE) + 4
    return numel // 2 + 4 * blocks


def check_blocksize(numel: int, blocksize: int, what: str) -> None:
    if blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096) or numel % blocksize:
        raise ValueError(f"{what}: {numel} values per expert are not a whole number of NF4 blocks of {blocksize} "
                         "(the block size must be a power of two from 32 to 4096 that divides it)")


class NF4Experts(nn.Module):
    """Drop-in replacement of a fused experts module (same ``forward(hidden_states, top_k_index,
    top_k_weights)``) holding every expert's ``gate_up_proj`` and ``down_proj`` in NF4 buffers."""

    def __init__(self, num_experts: int, hidden_dim: int, intermediate_dim: int, act_fn,
                 blocksize: int = 64, double_quant: bool = True):
        super().__init__()
        self.num_experts, self.hidden_dim, self.intermediate_dim = num_experts, hidden_dim, intermediate_dim
        self.act_fn = act_fn
        self.blocksize, self.double_quant = blocksize, double_quant
        self.compute_dtype = torch.bfloat16
        for name, shape in PROJECTIONS.items():
            rows, cols = shape(hidden_dim, intermediate_dim)
            numel = rows * cols
            check_blocksize(numel, blocksize, name)
            blocks = numel // blocksize
            self.register_buffer(f"{name}_codes", torch.empty(num_experts, numel // 2, dtype=torch.uint8))
            if double_quant:
                nested = math.ceil(blocks / NESTED_BLOCKSIZE)
                self.register_buffer(f"{name}_absmax", torch.empty(num_experts, blocks, dtype=torch.uint8))
                self.register_buffer(f"{name}_absmax_scale", torch.empty(num_experts, nested, dtype=torch.float32))
                self.register_buffer(f"{name}_absmax_offset", torch.empty(num_experts, dtype=torch.float32))
            else:
                self.register_buffer(f"{name}_absmax", torch.empty(num_experts, blocks, dtype=torch.float32))

    @classmethod
    def like(cls, experts: nn.Module, blocksize: int = 64, double_quant: bool = True) -> NF4Experts:
        """An empty NF4 module shaped like the stock fused ``experts``."""
        return cls(experts.num_experts, experts.hidden_dim, experts.intermediate_dim, experts.act_fn,
                   blocksize=blocksize, double_quant=double_quant)

    def expose_for_lora(self) -> None:
        """Give the module ``gate_up_proj`` / ``down_proj`` parameters as the stock experts have, for PEFT's LoRA
        on parameters (``target_parameters``): all-zero stacks that hold no memory (one zero expanded with stride
        0), so under PEFT's parametrization ``self.gate_up_proj`` is exactly the LoRA update of every expert, which
        :meth:`forward` adds to the dequantized routed experts. Adapters trained so have PEFT's own format: they
        load and merge on the 16-bit model unchanged. Never move such a module with ``.to()`` (a copy of an expanded
        tensor would be materialised): :meth:`_apply` makes them again after a move."""
        device = self.gate_up_proj_codes.device
        for name in PROJECTIONS:
            if not hasattr(self, name):
                zero = torch.zeros((), dtype=torch.float32, device=device).expand(self.num_experts, *self.shape(name))
                self.register_parameter(name, nn.Parameter(zero, requires_grad=False))

    def _apply(self, fn, recurse: bool = True):
        """``.to()`` / ``.cuda()`` / casts: the storage-free placeholders are made again on the new device instead
        of being copied (a copy of an expanded tensor would be a full stack)."""
        placeholders = [name for name in PROJECTIONS if name in self._parameters]
        for name in placeholders:
            del self._parameters[name]
        result = super()._apply(fn, recurse)
        if placeholders:
            self.expose_for_lora()
        return result

    def _lora_updates(self) -> dict[str, torch.Tensor]:
        """Per projection under PEFT's parametrization: the LoRA update of every expert (experts x rows x cols)."""
        return {name: getattr(self, name) for name in PROJECTIONS if parametrize.is_parametrized(self, name)}

    def shape(self, name: str) -> tuple[int, int]:
        return PROJECTIONS[name](self.hidden_dim, self.intermediate_dim)

    def quantized_numel(self) -> int:
        """Weights held in NF4 (both projections of every expert): ``check_quantized`` counts them as 4-bit (and
        not the storage-free LoRA placeholders of :meth:`expose_for_lora`)."""
        return self.num_experts * sum(rows * cols for rows, cols in map(self.shape, PROJECTIONS))

    def stored_bytes(self) -> int:
        """Bytes of the buffers: the NF4 codes and every quantization constant (nothing else is stored)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    # -- quantization ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def quantize_(self, name: str, stack: torch.Tensor) -> None:
        """Store the fused ``stack`` (experts x rows x cols, any float dtype, any device) of projection ``name``,
        expert by expert, on this module's device. Only one expert is held in 16/32-bit on that device at a time."""
        expected = (self.num_experts, *self.shape(name))
        if tuple(stack.shape) != expected:
            raise ValueError(f"{name}: a stack of shape {tuple(stack.shape)} does not fit {expected}")
        for expert in range(self.num_experts):
            self.quantize_expert_(name, expert, stack[expert])

    @torch.no_grad()
    def quantize_expert_(self, name: str, expert: int, weight: torch.Tensor) -> None:
        """Store expert ``expert``'s ``name`` matrix (rows x cols) in NF4 on this module's device."""
        from bitsandbytes.functional import quantize_4bit

        if tuple(weight.shape) != self.shape(name):
            raise ValueError(f"{name} of expert {expert}: shape {tuple(weight.shape)} does not fit {self.shape(name)}")
        codes = getattr(self, f"{name}_codes")
        weight = weight.to(device=codes.device)
        if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            weight = weight.float()
        packed, state = quantize_4bit(weight.contiguous(), blocksize=self.blocksize, quant_type="nf4",
                                      compress_statistics=self.double_quant)
        codes[expert].copy_(packed.reshape(-1))
        getattr(self, f"{name}_absmax")[expert].copy_(state.absmax.reshape(-1))
        if self.double_quant:
            getattr(self, f"{name}_absmax_scale")[expert].copy_(state.state2.absmax.reshape(-1))
            getattr(self, f"{name}_absmax_offset")[expert] = state.offset
            self._nested_code = state.state2.code
        self._code = state.code

    def _codes_tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        from bitsandbytes.functional import create_dynamic_map, get_4bit_type

        code = getattr(self, "_code", None)
        if code is None or code.device != device:
            code = self._code = get_4bit_type("nf4", device=device)
        nested = getattr(self, "_nested_code", None)
        if self.double_quant and (nested is None or nested.device != device):
            nested = self._nested_code = create_dynamic_map(signed=True).to(device)
        return code, nested

    def dequantize(self, name: str, expert: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Expert ``expert``'s ``name`` matrix (rows x cols) in ``dtype`` (default: the compute dtype)."""
        from bitsandbytes.functional import QuantState, dequantize_4bit

        codes = getattr(self, f"{name}_codes")
        code, nested = self._codes_tables(codes.device)
        dtype = dtype or self.compute_dtype
        absmax = getattr(self, f"{name}_absmax")[expert]
        state2 = offset = None
        if self.double_quant:
            state2 = QuantState(absmax=getattr(self, f"{name}_absmax_scale")[expert], code=nested,
                                blocksize=NESTED_BLOCKSIZE, dtype=torch.float32)
            offset = getattr(self, f"{name}_absmax_offset")[expert]
        state = QuantState(absmax=absmax, shape=torch.Size(self.shape(name)), code=code, blocksize=self.blocksize,
                           quant_type="nf4", dtype=dtype, offset=offset, state2=state2)
        return dequantize_4bit(codes[expert].reshape(-1, 1), state)

    def dequantized_stack(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole fused stack, dequantized (tests and benchmarks; the forward never builds it)."""
        return torch.stack([self.dequantize(name, e, dtype) for e in range(self.num_experts)])

    # -- forward -----------------------------------------------------------------------------------------------
    def expert_forward(self, expert: int, states: torch.Tensor,
                       updates: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """One expert's SwiGLU on its routed ``states`` (tokens x hidden); ``updates``: LoRA updates per projection
        (see :meth:`expose_for_lora`)."""
        updates = updates or {}
        weights = {}
        for name in PROJECTIONS:
            weights[name] = self.dequantize(name, expert, states.dtype)
            if name in updates:
                weights[name] = weights[name] + updates[name][expert].to(states.dtype)
        gate, up = nn.functional.linear(states, weights["gate_up_proj"]).chunk(2, dim=-1)
        return nn.functional.linear(self.act_fn(gate) * up, weights["down_proj"])

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        final = torch.zeros_like(hidden_states)
        updates = self._lora_updates()
        with torch.no_grad():
            mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert in hit.reshape(-1).tolist():
            top_k_pos, token_idx = torch.where(mask[expert])
            out = self.expert_forward(expert, hidden_states[token_idx], updates)
            out = out * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, out.to(final.dtype))
        return final

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden={self.hidden_dim}, width={self.intermediate_dim}, nf4 "
                f"blocksize={self.blocksize}, double_quant={self.double_quant}")
