"""Integer codes of 2..8 bits <-> a dense little-endian bit stream in uint8 (exact round trip)."""

from __future__ import annotations

import torch

from .quantizers import MAX_BITS, MIN_BITS


def packed_size(numel: int, bits: int) -> int:
    """Bytes needed for ``numel`` codes of ``bits`` bits."""
    return (numel * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer from {MIN_BITS} to {MAX_BITS}; got {bits!r}")


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes (values in [0, 2^bits)) into a flat uint8 tensor of packed_size bytes.

    Code i occupies stream bits [i * bits, (i + 1) * bits), least significant bit first.
    """
    _check_bits(bits)
    flat = codes.detach().reshape(-1).to(torch.int64)
    if flat.numel() and (flat.min() < 0 or flat.max() >= (1 << bits)):
        raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] for {bits}-bit packing; "
                         f"got values in [{int(flat.min())}, {int(flat.max())}]")
    shifts = torch.arange(bits, device=flat.device)
    stream = ((flat.unsqueeze(1) >> shifts) & 1).to(torch.uint8).reshape(-1)
    stream = torch.nn.functional.pad(stream, (0, (-stream.numel()) % 8))
    weights = (1 << torch.arange(8, device=flat.device)).to(torch.int64)
    return (stream.view(-1, 8).to(torch.int64) * weights).sum(dim=1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of pack_codes: the first ``numel`` codes as int16."""
    _check_bits(bits)
    expected = packed_size(numel, bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != expected:
        raise ValueError(f"packed tensor must be 1-D uint8 with {expected} bytes for {numel} codes of {bits} bits; "
                         f"got dtype {packed.dtype}, shape {tuple(packed.shape)}")
    shifts = torch.arange(8, device=packed.device)
    stream = ((packed.to(torch.int64).unsqueeze(1) >> shifts) & 1).reshape(-1)[: numel * bits]
    weights = (1 << torch.arange(bits, device=packed.device)).to(torch.int64)
    return (stream.view(numel, bits) * weights).sum(dim=1).to(torch.int16)
