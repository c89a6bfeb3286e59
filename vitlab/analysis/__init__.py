"""Look inside the models: the ViT paper's analyses (Fig. 6, Fig. 7) as plain functions on
tensors, plus ConvMixer's weight figures and CvT's per-stage attention distance.

    attention_distance(attn, grid_size, patch_size, num_prefix_tokens=0, kv_grid_size=None, kv_patch_size=None)
    attention_rollout(attentions, num_prefix_tokens, head_fusion="mean", discard_ratio=0.0)
    pos_embed_similarity(model)                -> (gh, gw, gh, gw) cosine similarities
    embedding_filter_components(model, k=28)   -> FilterComponents(components (k, C, p, p), explained variance)
    collect_attentions(model, images, batch_size=64, mean=None, std=None) -> AttentionStats (one batched pass)
    analyze_model(model, images, out_dir, ...) / write_report(out_dir, analysis, run) / analyze_run(target, ...)
"""
from .attention import (AttentionStats, attention_distance, attention_rollout, collect_attentions, distance_matrix,
                        mean_pairwise_distance, patch_centres)
from .embeddings import (FilterComponents, depthwise_kernels, embedding_filter_components, patch_embedding_weight,
                         pos_embed_similarity, position_embedding_table)
from .report import analyze_model, analyze_run, write_report

__all__ = ["attention_distance", "attention_rollout", "pos_embed_similarity", "embedding_filter_components",
           "collect_attentions", "AttentionStats", "FilterComponents", "distance_matrix", "patch_centres",
           "mean_pairwise_distance", "depthwise_kernels", "patch_embedding_weight", "position_embedding_table",
           "analyze_model", "analyze_run", "write_report"]
