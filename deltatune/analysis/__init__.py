"""What an adapter learned: subspace similarity between adapters, the weight delta's size and spectrum,
and sweeps over ranks and seeds that produce adapters to compare (the LoRA paper's section 7)."""

from deltatune.analysis.delta import analyze_delta, delta_stats
from deltatune.analysis.subspace import analyze_subspace, phi_matrix, right_singular

__all__ = ["analyze_delta", "analyze_subspace", "delta_stats", "phi_matrix", "right_singular"]
