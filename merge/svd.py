"""SVD truncation of an exact LoRA merge: one PEFT adapter of a chosen rank k below Σ r_i.

For each adapted weight the exact merged update is

    ΔW = Σ_i c_i B_i A_i = B A,   B = [c_1 B_1 | … | c_n B_n] (m×R),   A = [A_1; …; A_n] (R×n),

with c_i = w_i·s_i and R = Σ r_i. Its best rank-k approximation in the Frobenius norm is the
truncated SVD ΔW_k = U_k Σ_k V_kᵀ (Eckart & Young 1936), with relative error

    ‖ΔW − ΔW_k‖_F / ‖ΔW‖_F = sqrt(Σ_{j>k} σ_j²) / sqrt(Σ_j σ_j²)   (0 for a zero update).

When R < min(m, n) the SVD is taken without forming ΔW: reduced QR of both factors,
B = Q_B R_B and Aᵀ = Q_A R_A, gives ΔW = Q_B (R_B R_Aᵀ) Q_Aᵀ; the SVD of the R×R core,
R_B R_Aᵀ = U_c Σ V_cᵀ, gives U = Q_B U_c and V = Q_A V_c (the Q's have orthonormal columns).
Otherwise the m×n update is cheaper to decompose directly. Everything is in float32.

The truncated update is written as B' = U_k Σ_k^½ and A' = Σ_k^½ V_kᵀ (the singular values split
evenly between the factors) in a PEFT folder with r = lora_alpha = k, so its scale is 1. A weight
whose update has fewer than k singular values gets zero columns and rows up to rank k. The adapter
folder also holds `truncation.json` with the errors (PEFT ignores it).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .streaming import stacked_lora_factors, write_lora_adapter

TRUNCATION_FILE = "truncation.json"  # beside the adapter: the errors below, so the folder documents itself


@dataclass
class TruncationReport:
    """The relative Frobenius error of the rank-k adapter, per weight and over all weights."""

    rank: int
    exact_rank: int
    per_tensor: dict[str, float] = field(default_factory=dict)
    overall: float = 0.0

    def as_dict(self) -> dict:
        return {"rank": self.rank, "exact_rank": self.exact_rank,
                "relative_error": self.overall, "per_tensor": self.per_tensor}


def truncate_factored(b: torch.Tensor, a: torch.Tensor, rank: int
                      ) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """The best rank-`rank` factors (B', A') of ΔW = b @ a, and (‖ΔW − B'A'‖_F², ‖ΔW‖_F²).

    `b` is m×R and `a` is R×n. B' is m×rank and A' is rank×n whatever the rank of ΔW.
    """
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    b, a = b.float(), a.float()
    m, inner = b.shape
    n = a.shape[1]
    if inner < min(m, n):
        q_b, r_b = torch.linalg.qr(b, mode="reduced")
        q_a, r_a = torch.linalg.qr(a.T, mode="reduced")
        u_c, sigma, vh_c = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
        u, vh = q_b @ u_c, vh_c @ q_a.T
    else:
        u, sigma, vh = torch.linalg.svd(b @ a, full_matrices=False)
    keep = min(rank, sigma.numel())
    root = sigma[:keep].sqrt()
    b_k = torch.zeros(m, rank)
    a_k = torch.zeros(rank, n)
    b_k[:, :keep] = u[:, :keep] * root
    a_k[:keep] = root[:, None] * vh[:keep]
    squares = sigma.double() ** 2
    return b_k, a_k, float(squares[keep:].sum()), float(squares.sum())


def svd_truncated_adapter(adapters: list[tuple[Path, float]], out_folder: Path, rank: int,
                          base_model: str | None = None) -> TruncationReport:
    """Write one LoRA adapter of rank `rank` holding the best rank-`rank` approximation of
    Σ w_i·s_i·B_i·A_i for every adapted weight; return the truncation errors.

    `adapters` holds (PEFT LoRA folder, weight) pairs. `rank` must be below Σ r_i (at Σ r_i the
    exact merge is `merge.streaming.lora_concat_adapter`). Written atomically; an existing
    `out_folder` is refused before anything is read.
    """
    out_folder = Path(out_folder)
    if out_folder.exists():
        raise FileExistsError(f"{out_folder}: output folder already exists")
    stacked, exact_rank, template = stacked_lora_factors(adapters)
    if not 1 <= rank < exact_rank:
        raise ValueError(f"rank {rank}: an SVD-truncated adapter needs 1 ≤ rank < Σ r_i = {exact_rank} "
                         "(leave rank unset for the exact adapter of rank Σ r_i)")
    report = TruncationReport(rank=rank, exact_rank=exact_rank)
    truncated = {}
    tail_total, norm_total = 0.0, 0.0
    for name, (b, a) in stacked.items():
        b_k, a_k, tail, norm = truncate_factored(b, a, rank)
        truncated[name] = (b_k, a_k)
        report.per_tensor[name] = math.sqrt(tail / norm) if norm > 0 else 0.0
        tail_total, norm_total = tail_total + tail, norm_total + norm
    report.overall = math.sqrt(tail_total / norm_total) if norm_total > 0 else 0.0
    write_lora_adapter(truncated, rank, out_folder, template, base_model,
                       extra_files={TRUNCATION_FILE: json.dumps(report.as_dict(), indent=2) + "\n"})
    return report


def read_truncation(adapter_folder: Path) -> TruncationReport | None:
    """The truncation errors an SVD-truncated adapter folder records, or None for another adapter."""
    path = Path(adapter_folder) / TRUNCATION_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return TruncationReport(data["rank"], data["exact_rank"], data["per_tensor"], data["relative_error"])


def format_truncation(report: TruncationReport) -> str:
    """The per-tensor and overall truncation errors as a terminal table."""
    rows = [("tensor", "relative error")]
    rows += [(name, f"{error:.4%}") for name, error in report.per_tensor.items()]
    rows.append(("overall", f"{report.overall:.4%}"))
    width = max(len(r[0]) for r in rows)
    lines = [f"{r[0].ljust(width)}  {r[1].rjust(14)}" for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(len(lines) - 1, "-" * len(lines[0]))
    return (f"SVD truncation of the merged update from rank {report.exact_rank} to rank {report.rank} "
            "(relative Frobenius error ‖ΔW − ΔW_k‖/‖ΔW‖):\n" + "\n".join(lines))
