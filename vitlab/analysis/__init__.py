"""Look inside the models: the ViT paper's analyses (Fig. 6, Fig. 7) as plain functions on
tensors, plus ConvMixer's weight figures and CvT's per-stage attention distance.

    attention_distance(attn, grid_size, patch_size, num_prefix_tokens=0, kv_grid_size=None, kv_patch_size=None)
    attention_rollout(attentions, num_prefix_tokens, head_fusion="mean", discard_ratio=0.0)
    pos_embed_similarity(model)                -> (gh, gw, gh, gw) cosine similarities
    sincos_dimension_maps(grid, dim, dims=None) -> (len(dims), gh, gw) channels of the 2D sinusoid
    embedding_filter_components(model, k=28)   -> FilterComponents(components (k, C, p, p), explained variance)
    collect_attentions(model, images, batch_size=64, mean=None, std=None) -> AttentionStats (one batched pass)
    analyze_model(model, images, out_dir, ...) / write_report(out_dir, analysis, run) / analyze_run(target, ...)

The names are imported on first use (PEP 562), so `vitlab analyze --help` does not import torch.
"""
from .._lazy import lazy_names as _lazy_names

# public name -> submodule that defines it
_LAZY = {
    "AttentionStats": "attention",
    "attention_distance": "attention",
    "attention_rollout": "attention",
    "collect_attentions": "attention",
    "distance_matrix": "attention",
    "mean_pairwise_distance": "attention",
    "patch_centres": "attention",
    "FilterComponents": "embeddings",
    "depthwise_kernels": "embeddings",
    "embedding_filter_components": "embeddings",
    "patch_embedding_weight": "embeddings",
    "pos_embed_similarity": "embeddings",
    "sincos_dimension_maps": "embeddings",
    "position_embedding_table": "embeddings",
    "analyze_model": "report",
    "analyze_run": "report",
    "write_report": "report",
}

__all__ = ["attention_distance", "attention_rollout", "pos_embed_similarity", "embedding_filter_components",
           "collect_attentions", "AttentionStats", "FilterComponents", "distance_matrix", "patch_centres",
           "mean_pairwise_distance", "depthwise_kernels", "patch_embedding_weight", "position_embedding_table",
           "sincos_dimension_maps", "analyze_model", "analyze_run", "write_report"]


__getattr__, __dir__ = _lazy_names(__name__, _LAZY, globals())
